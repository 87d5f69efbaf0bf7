"""``workers.scheduling``: due scheduled jobs move to their queue when, and only when, the
queue's scheduler lock is free or held by a dead scheduler; each exactly once."""

from __future__ import annotations

import os
import socket
from datetime import UTC, datetime, timedelta

from redis import Redis
from rq import Queue
from rq.registry import ScheduledJobRegistry
from rq.scheduler import SCHEDULER_KEY_TEMPLATE, RQScheduler
from rq.serializers import JSONSerializer
from rq.utils import utcformat

from workers.scheduling import enqueue_orphaned, scheduler_alive


def _scheduler(conn: Redis, name: str, pid: int, beat_age_s: float, host: str | None = None) -> None:
    """The metadata hash RQ's scheduler ``name`` keeps, as if it last beat ``beat_age_s`` ago."""
    beat = datetime.now(UTC) - timedelta(seconds=beat_age_s)
    conn.hset(SCHEDULER_KEY_TEMPLATE % name, mapping={
        "hostname": host or socket.gethostname(), "pid": str(pid), "last_heartbeat": utcformat(beat),
    })  # fmt: skip


def test_due_jobs_move_only_when_their_scheduler_is_dead_and_only_once(own_redis):
    conn = Redis.from_url(own_redis.url)
    queue = Queue("high", connection=conn, serializer=JSONSerializer)
    job = queue.enqueue_in(timedelta(seconds=-1), "workers.tasks.run_job", {})  # due already
    later = queue.enqueue_in(timedelta(hours=1), "workers.tasks.run_job", {})
    registry = ScheduledJobRegistry("high", connection=conn, serializer=JSONSerializer)
    assert set(registry.get_job_ids()) == {job.id, later.id} and queue.count == 0
    conn.set(RQScheduler.get_locking_key("high"), "live")

    _scheduler(conn, "live", os.getpid(), 0.5)  # beats, its process exists
    assert scheduler_alive(conn, "live")
    assert enqueue_orphaned(conn, ["high"], own_scheduler=None) == 0 and queue.count == 0
    _scheduler(conn, "live", 2**22 + 12345, 0.5)  # a pid not here, but it beats: another PID namespace
    assert scheduler_alive(conn, "live")
    assert enqueue_orphaned(conn, ["high"], own_scheduler="live") == 0, "our own: left to _revive_scheduler"

    _scheduler(conn, "dead", 2**22 + 12345, 3.0)  # missed two beats and its process is gone
    conn.set(RQScheduler.get_locking_key("high"), "dead")
    assert not scheduler_alive(conn, "dead")
    _scheduler(conn, "far", 1, 3.0, host="another-host")  # another host: only its beats tell
    assert scheduler_alive(conn, "far")
    _scheduler(conn, "far", 1, 11.0, host="another-host")
    assert not scheduler_alive(conn, "far") and not scheduler_alive(conn, "never-registered")

    assert enqueue_orphaned(conn, ["high"], own_scheduler=None) == 1
    assert queue.job_ids == [job.id] and registry.get_job_ids() == [later.id]
    assert enqueue_orphaned(conn, ["high"], own_scheduler=None) == 0 and queue.count == 1  # once
    conn.delete(RQScheduler.get_locking_key("high"))  # a free lock: nobody schedules the queue
    conn.zadd(registry.key, {later.id: 0})  # now due
    assert enqueue_orphaned(conn, ["high"], own_scheduler=None) == 1 and queue.job_ids == [job.id, later.id]
