"""Riding out a Redis outage (a restart, a failover, a network blip) inside a worker.

A job computes for seconds to minutes without Redis; what it needs Redis for is reading
its inputs, reporting progress, storing its artifacts and RQ's bookkeeping at the end.
Progress is best effort (``RedisProgress`` skips a report it cannot write). The rest goes
through ``through_outage``: it retries while Redis is unreachable, for up to
``redis_outage_s`` (settings), so a finished job's result is kept in memory and stored
once Redis is back instead of being lost with the worker. After that long the error
propagates: the worker exits, and its jobs are rerun or reported ``worker_lost``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)

T = TypeVar("T")

REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)
FIRST_WAIT_S, MAX_WAIT_S = 0.25, 5.0


def through_outage(call: Callable[[], T], give_up_s: float, what: str) -> T:
    """``call()``, retried with backoff (0.25 s doubling to 5 s) while it fails because Redis
    is unreachable, for up to ``give_up_s`` seconds; then its error is raised. ``call`` must
    be safe to repeat (idempotent writes, or a pipeline that either ran or did not)."""
    deadline = time.monotonic() + give_up_s
    wait = FIRST_WAIT_S
    while True:
        try:
            return call()
        except REDIS_DOWN as e:
            left = deadline - time.monotonic()
            if left <= 0:
                log.error("%s: Redis unreachable for %.0f s; giving up", what, give_up_s)
                raise
            log.warning("%s: Redis unreachable (%s); retrying in %.2f s", what, e, min(wait, left))
            time.sleep(min(wait, left))
            wait = min(2 * wait, MAX_WAIT_S)
