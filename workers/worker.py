"""The RQ worker: one process, no fork per job, models kept warm, dead peers detected.

RQ's ``SimpleWorker`` runs jobs in the worker process (forking would drop the model cache
and breaks CUDA), but then nothing heartbeats while a job runs, so a killed worker's job
would look ``started`` until its timeout (an hour). ``InspectorWorker`` fixes that with a
heartbeat thread: every ``heartbeat_s`` it extends the worker key and the running job's
execution entry in the StartedJobRegistry by ``lost_after_s`` seconds. When the process
dies the entry expires, and RQ's own ``StartedJobRegistry.cleanup`` (run by this thread on
every live worker, and by the API when it reads a started job) moves the job to failed
with ``AbandonedJobError``, which the API reports as ``worker_lost`` (or reruns it when
``job_retries`` allows: ``workers.webhooks.on_failure``).

Also here: the predict batcher thread (``workers.batching``), graceful shutdown (SIGTERM:
RQ's warm shutdown lets the running job finish, then the batcher finishes its batch and
the worker exits), recycling (``max_jobs`` through RQ; ``max_rss_mb`` here: a worker
that a job left above it exits after that job, for its supervisor to start a fresh one),
each job's memory budget, checked at every beat (``workers.budget``), and Redis outages:
a job's outcome is held until Redis is back (``workers.outage``), and the heartbeat
retries every 0.25 s meanwhile, so the running job's registry entry is renewed as soon as
Redis answers again (an outage longer than ``lost_after_s`` lets the API see the job as
lost first: it is then rerun).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import TYPE_CHECKING, Any

from redis import Redis
from redis.exceptions import LockError
from rq import Queue, SimpleWorker
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.timeouts import TimerDeathPenalty
from rq.utils import now

from schemas import keys
from workers.allocator import release_free_memory
from workers.budget import MEMORY, rss_mb
from workers.outage import FIRST_WAIT_S, REDIS_DOWN, through_outage
from workers.scheduling import enqueue_orphaned

if TYPE_CHECKING:
    from workers.batching import PredictBatcher
    from workers.warmup import Warmer

log = logging.getLogger(__name__)
BATCHER_WARM_S = 60.0  # longest wait for the predict batcher's threads to warm before saying ready


def reap_abandoned(conn: Redis, queue_names: tuple[str, ...] = keys.QUEUES) -> None:
    """Fail (or rerun) started jobs whose worker stopped heartbeating (RQ's own registry
    cleanup). It runs their failure callbacks in this thread, so no SIGALRM timeouts."""
    for name in queue_names:
        lock = conn.lock(keys.reap_lock_key(name), timeout=keys.REAP_LOCK_S)
        if not lock.acquire(blocking=False):
            continue  # another process is reaping this queue
        try:
            StartedJobRegistry(
                name, connection=conn, serializer=JSONSerializer, death_penalty_class=TimerDeathPenalty
            ).cleanup()
        finally:
            lock.release()


def count_attempt(job: Job) -> None:
    """``meta.attempt`` (1, 2, ...); from the second on, ``meta.last_error``: why the one
    before ended (its error, or ``worker_lost`` when its worker died without a word)."""
    attempt = int(job.meta.get("attempt", 0)) + 1
    job.meta["attempt"] = attempt
    if attempt > 1:
        job.meta["last_error"] = job.meta.pop("error", None) or {
            "type": "worker_lost",
            "message": "the worker running the previous attempt stopped (killed or crashed)",
        }
    job.save_meta()


class InspectorWorker(SimpleWorker):
    def __init__(
        self,
        *args: Any,
        heartbeat_s: float = 3.0,
        lost_after_s: float = 15.0,
        batcher: PredictBatcher | None = None,
        max_rss_mb: int = 0,
        redis_outage_s: float = 300.0,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("serializer", JSONSerializer)
        super().__init__(*args, **kwargs)
        self.batcher = batcher
        self.max_rss_mb = max_rss_mb
        self.redis_outage_s = redis_outage_s
        self.heartbeat_s = heartbeat_s
        self.lost_after_s = max(int(lost_after_s), 2)
        self._beating = threading.Event()
        self._current: tuple[Job, Queue] | None = None
        self._thread = threading.Thread(target=self._beat, name="inspector-heartbeat", daemon=True)
        self.warmer: Warmer | None = None  # publishes what this worker has warm (workers.warmup)
        self._taking_work = False  # the first dequeue happened: registered, scheduler forked

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.lost_after_s

    def work(self, *args: Any, **kwargs: Any) -> bool:
        self._thread.start()
        return super().work(*args, **kwargs)

    def execute_job(self, job: Job, queue: Queue) -> None:
        if job.func_name == keys.RUN_JOB_FUNC:
            count_attempt(job)
        self._current = (job, queue)
        try:
            super().execute_job(job, queue)
        finally:
            self._current = None
        # The job's activations go back to the OS: the allocator settings keep freed blocks
        # for the next batch (workers.allocator), which an idle worker does not need.
        release_free_memory()
        if self.max_rss_mb and (rss := rss_mb()) > self.max_rss_mb:
            log.warning("worker %s: %.0f MiB resident > %d MiB after job %s: recycling", self.name, rss,
                        self.max_rss_mb, job.id)  # fmt: skip
            self._stop_requested = True

    def dequeue_job_and_maintain_ttl(self, *args: Any, **kwargs: Any) -> Any:
        """RQ's wait for the next job: the first call means the worker is registered and
        its scheduler started, so it takes work now: ready (``workers.warmup``)."""
        if not self._taking_work:
            self._taking_work = True
            if self.batcher is not None:
                # Started now, after RQ has forked its scheduler process: memory the threads
                # touched before the fork would be copied on their first write to it, on
                # the first request (copy-on-write). They warm their predict path first.
                self.batcher.start()
                self.batcher.warmed.wait(BATCHER_WARM_S)
            if self.warmer is not None:
                self.warmer.mark_ready()
        return super().dequeue_job_and_maintain_ttl(*args, **kwargs)

    def handle_execution_ended(self, job: Job, queue: Queue, heartbeat_ttl: int) -> None:
        """RQ's first Redis call once a job has returned or raised: hold the job's outcome
        here through a Redis outage (``workers.outage``) rather than exit and lose it."""
        through_outage(
            lambda: super(InspectorWorker, self).handle_execution_ended(job, queue, heartbeat_ttl),
            self.redis_outage_s,
            f"job {job.id} end",
        )

    def _beat(self) -> None:
        wait = self.heartbeat_s
        while not self._beating.wait(wait):
            wait = self.heartbeat_s
            try:
                current = self._current
                with self.connection.pipeline() as pipe:
                    self.heartbeat(self.lost_after_s + 60, pipeline=pipe)
                    if current is not None:
                        job, queue = current
                        for execution in list(self.executions.values()):
                            execution.heartbeat(queue.started_job_registry, self.lost_after_s, pipe)
                    pipe.execute()
                MEMORY.check()  # the running job's memory budget (workers.budget)
                reap_abandoned(self.connection)
                self._revive_scheduler()
                enqueue_orphaned(self.connection, self.queue_names(), self.scheduler.name if self.scheduler else None)
            except REDIS_DOWN as e:  # beat again soon: a running job's entry must not expire
                log.warning("heartbeat failed: %s", e)
                wait = min(FIRST_WAIT_S, self.heartbeat_s)
            except Exception:  # nothing must kill the heartbeat; the next beat retries
                log.warning("heartbeat failed", exc_info=True)

    def _revive_scheduler(self) -> None:
        """RQ's scheduler process exits on a Redis error (e.g. a Redis restart) and RQ starts
        it again only between jobs, every 10 minutes; delayed retries and webhook
        redeliveries would wait that long. Restart it at the next beat instead (it re-takes
        its own locks at once), and take over from a dead worker's scheduler as soon as its
        locks expire (61 s); until then ``workers.scheduling.enqueue_orphaned`` moves the
        dead scheduler's due jobs."""
        scheduler = self.scheduler
        if scheduler is None or self._stop_requested or self._beating.is_set():
            return
        if scheduler._process is None or not scheduler._process.is_alive():
            if scheduler._process is not None:
                log.warning("worker %s: the RQ scheduler stopped; starting it again", self.name)
                scheduler._process.join(0)
            scheduler.acquire_locks(auto_start=True)  # no-op while another worker's holds the locks

    def clean_registries(self) -> None:
        """RQ's periodic maintenance (every registry of each queue) under our reap locks too:
        its started-job cleanup is the reaper's, and the two must not rerun a job twice."""
        locks = [self.connection.lock(keys.reap_lock_key(q.name), timeout=keys.REAP_LOCK_S) for q in self.queues]
        held = [lock for lock in locks if lock.acquire(blocking=False)]
        try:
            if len(held) == len(locks):
                super().clean_registries()
            else:
                self.last_cleaned_at = now()  # type: ignore[assignment]  # a reaper is at it: next time
        finally:
            for lock in held:
                with contextlib.suppress(LockError):  # held past REAP_LOCK_S: expired, nothing to free
                    lock.release()

    def teardown(self) -> None:
        if self.warmer is not None:
            self.warmer.stop()
        if self.batcher is not None:
            self.batcher.stop()
        self._beating.set()
        super().teardown()
