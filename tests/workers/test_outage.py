"""Riding out a Redis outage (``workers.outage``) against a real redis-server that is
stopped and started again."""

from __future__ import annotations

import json
import threading
import time

import pytest
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from rq import Queue
from rq.serializers import JSONSerializer

from schemas import keys
from workers.explain.base import JobCanceled
from workers.outage import through_outage
from workers.tasks import RedisProgress


def _start_later(server, after_s: float) -> threading.Thread:
    t = threading.Thread(target=lambda: (time.sleep(after_s), server.start()), daemon=True)
    t.start()
    return t


def test_a_write_during_an_outage_lands_once_redis_is_back(own_redis):
    conn = Redis.from_url(own_redis.url)
    own_redis.stop()
    back = _start_later(own_redis, 1.0)
    t0 = time.monotonic()
    through_outage(lambda: conn.set("result", "kept"), 30, "test")
    elapsed = time.monotonic() - t0
    back.join()
    assert conn.get("result") == b"kept"
    assert 0.9 <= elapsed < 10, elapsed  # waited for the restart, then a few backoff steps at most


def test_it_gives_up_after_the_outage_budget(own_redis):
    conn = Redis.from_url(own_redis.url)
    own_redis.stop()
    t0 = time.monotonic()
    with pytest.raises(RedisConnectionError):
        through_outage(lambda: conn.set("result", "lost"), 0.6, "test")
    assert 0.6 <= time.monotonic() - t0 < 5
    own_redis.start()  # for the fixture's teardown


def test_progress_is_skipped_while_redis_is_down_and_cancel_still_works(own_redis):
    conn = Redis.from_url(own_redis.url)
    job = Queue("default", connection=conn, serializer=JSONSerializer).enqueue("workers.tasks.run_job", {})
    progress = RedisProgress(job)
    progress(1, 4, "first")
    assert json.loads(conn.hget(job.key, "meta"))["progress"] == {"done": 1, "total": 4, "stage": "first"}
    own_redis.stop()
    progress(2, 4, "during the outage")  # skipped, not raised: the job goes on
    own_redis.start()  # empty (no persistence here): the report after it lands
    progress(3, 4, "after")
    assert json.loads(conn.hget(job.key, "meta"))["progress"] == {"done": 3, "total": 4, "stage": "after"}
    conn.set(keys.cancel_key(job.id), 1)
    with pytest.raises(JobCanceled):
        progress(4, 4, "canceled")
