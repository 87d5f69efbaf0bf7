"""The RQ worker: one process, no fork per job, models kept warm, dead peers detected.

RQ's ``SimpleWorker`` runs jobs in the worker process (forking would drop the model cache
and breaks CUDA), but then nothing heartbeats while a job runs, so a killed worker's job
would look ``started`` until its timeout (an hour). ``InspectorWorker`` fixes that with a
heartbeat thread: every ``heartbeat_s`` it extends the worker key and the running job's
execution entry in the StartedJobRegistry by ``lost_after_s`` seconds. When the process
dies the entry expires, and RQ's own ``StartedJobRegistry.cleanup`` (run by this thread on
every live worker, and by the API when it reads a started job) moves the job to failed
with ``AbandonedJobError``, which the API reports as ``worker_lost``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from redis import Redis
from rq import Queue, SimpleWorker
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from schemas import keys

log = logging.getLogger(__name__)


def reap_abandoned(conn: Redis, queue_names: tuple[str, ...] = keys.QUEUES) -> None:
    """Fail started jobs whose worker stopped heartbeating (RQ's own registry cleanup)."""
    for name in queue_names:
        StartedJobRegistry(name, connection=conn, serializer=JSONSerializer).cleanup()


class InspectorWorker(SimpleWorker):
    def __init__(self, *args: Any, heartbeat_s: float = 3.0, lost_after_s: float = 15.0, **kwargs: Any) -> None:
        kwargs.setdefault("serializer", JSONSerializer)
        super().__init__(*args, **kwargs)
        self.heartbeat_s = heartbeat_s
        self.lost_after_s = max(int(lost_after_s), 2)
        self._beating = threading.Event()
        self._current: tuple[Job, Queue] | None = None
        self._thread = threading.Thread(target=self._beat, name="inspector-heartbeat", daemon=True)

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.lost_after_s

    def work(self, *args: Any, **kwargs: Any) -> bool:
        self._thread.start()
        return super().work(*args, **kwargs)

    def execute_job(self, job: Job, queue: Queue) -> None:
        self._current = (job, queue)
        try:
            super().execute_job(job, queue)
        finally:
            self._current = None

    def _beat(self) -> None:
        while not self._beating.wait(self.heartbeat_s):
            try:
                current = self._current
                with self.connection.pipeline() as pipe:
                    self.heartbeat(self.lost_after_s + 60, pipeline=pipe)
                    if current is not None:
                        job, queue = current
                        for execution in list(self.executions.values()):
                            execution.heartbeat(queue.started_job_registry, self.lost_after_s, pipe)
                    pipe.execute()
                reap_abandoned(self.connection)
            except Exception:  # a Redis blip must not kill the heartbeat; the next beat retries
                log.warning("heartbeat failed", exc_info=True)

    def teardown(self) -> None:
        self._beating.set()
        super().teardown()
