"""Due scheduled jobs (delayed retries, webhook redeliveries) whose queue's scheduler is dead.

RQ moves a queue's due jobs from its ``ScheduledJobRegistry`` to the queue in one scheduler
process, the holder of ``rq:scheduler-lock:<queue>``, a lock it renews every second and that
expires 61 s after its last renewal. When the worker whose scheduler holds it is killed,
nobody can take the lock for that minute (in a one-worker deployment, every death), so a
retry due in 1 s ran a minute late. Every worker's heartbeat therefore looks at the holder
of each of its queues' locks: when the holder is dead (on this host: its process is gone
and it missed two beats; anywhere: no beat for :data:`STALE_S` s; or the lock is not held
at all) the heartbeat moves the due jobs itself. Each job moves in a transaction watched
on the registry, so two workers doing it at once never enqueue a job twice (nor does a
scheduler that takes the lock over, unless it read the registry just before our move).
"""

from __future__ import annotations

import logging
import os
import socket
import time

from redis import Redis
from redis.exceptions import WatchError
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.registry import ScheduledJobRegistry
from rq.scheduler import SCHEDULER_KEY_TEMPLATE, RQScheduler
from rq.serializers import JSONSerializer
from rq.utils import as_text, current_timestamp, utcparse

log = logging.getLogger(__name__)

STALE_S = 10.0
"""A scheduler whose last heartbeat (RQ: every second) is older than this is dead."""
MISSED_S = 2.5
"""A scheduler on this host that missed two beats and whose process is gone is dead."""


def scheduler_alive(conn: Redis, name: str, stale_s: float = STALE_S) -> bool:
    """Whether the RQ scheduler ``name`` is alive: its metadata hash exists and it beat within
    ``stale_s`` seconds; or, when it runs on this host and its process is gone, within
    :data:`MISSED_S` (a process of the same name in another PID namespace on a host of the
    same name, e.g. host networking, is never taken for dead while it beats)."""
    host, pid, beat = (as_text(v) if v is not None else None for v in conn.hmget(
        SCHEDULER_KEY_TEMPLATE % name, ["hostname", "pid", "last_heartbeat"]
    ))  # fmt: skip
    if beat is None:
        return False
    age = time.time() - utcparse(beat).timestamp()
    if age >= MISSED_S and host == socket.gethostname() and pid:
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, ValueError):
            pass
    return age < stale_s


def _move(conn: Redis, registry: ScheduledJobRegistry, queue: Queue, job_id: str) -> bool:
    """Move one due job to its queue, unless someone else moved it first."""
    with conn.pipeline() as pipe:
        try:
            pipe.watch(registry.key)
            if pipe.zscore(registry.key, job_id) is None:
                return False
            try:
                job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
            except NoSuchJobError:
                job = None
            pipe.multi()
            pipe.zrem(registry.key, job_id)
            if job is not None:
                queue._enqueue_job(job, pipeline=pipe, at_front=job.should_enqueue_at_front())
            pipe.execute()
            return job is not None
        except WatchError:
            return False


def enqueue_orphaned(conn: Redis, queue_names: list[str], own_scheduler: str | None) -> int:
    """Move the due scheduled jobs of each queue in ``queue_names`` whose scheduler lock is
    free or held by a dead scheduler (``own_scheduler``, this worker's, is left to
    ``InspectorWorker._revive_scheduler``); returns how many were enqueued."""
    moved = 0
    for name in queue_names:
        holder = conn.get(RQScheduler.get_locking_key(name))
        holder_name = as_text(holder) if holder is not None else None
        if holder_name is not None and (holder_name == own_scheduler or scheduler_alive(conn, holder_name)):
            continue
        registry = ScheduledJobRegistry(name, connection=conn, serializer=JSONSerializer)
        due = registry.get_jobs_to_schedule(current_timestamp())
        if not due:
            continue
        queue = Queue(name, connection=conn, serializer=JSONSerializer)
        n = sum(_move(conn, registry, queue, job_id) for job_id in due)
        if n:
            log.warning("%d due job(s) of queue %s enqueued: its scheduler (%s) is gone", n, name, holder_name)
        moved += n
    return moved
