"""Splitting one job into chunks that any worker can take, through Redis.

A kind that defines ``plan``, ``run_chunk`` and ``aggregate`` (e.g. ``u_sweep``) runs like
this: the job plans its chunks, pushes the ones not done yet onto a Redis list, enqueues
helper jobs (``workers.tasks.help_job``) on its queue so idle workers join in, and works
through the list itself. Each chunk's JSON result is stored in a Redis hash as soon as it
is done, so a job that is resubmitted after its worker died recomputes only the missing
chunks; a chunk whose worker stopped renewing its lease goes back on the list. With one
worker the job simply does every chunk; each extra worker takes chunks off the same list,
so the speed-up is near-linear until the list runs dry.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import partial
from typing import Any, cast

from redis import Redis

from schemas.keys import PREFIX


class ChunkBoard:
    """The shared state of one chunked job: todo list, leases, results (all in Redis)."""

    def __init__(self, conn: Redis, job_id: str, n_chunks: int, lease_s: float, ttl_s: int) -> None:
        self.conn, self.n, self.lease_s, self.ttl_s = conn, n_chunks, lease_s, ttl_s
        base = f"{PREFIX}:chunks:{job_id}"
        self.todo, self.done, self.plan_key = f"{base}:todo", f"{base}:done", f"{base}:plan"
        self._lease = f"{base}:lease:" + "{}"

    def start(self, fingerprint: str) -> int:
        """(Re)fill the todo list with every chunk that has no result; returns how many.
        ``fingerprint`` identifies the plan: results of a different plan are discarded."""
        if cast(bytes, self.conn.get(self.plan_key) or b"").decode() != fingerprint:
            self.conn.delete(self.done)
        missing = [i for i in range(self.n) if not self.conn.hexists(self.done, str(i))]
        with self.conn.pipeline() as pipe:
            pipe.delete(self.todo)
            if missing:
                pipe.rpush(self.todo, *missing)
            pipe.set(self.plan_key, fingerprint, ex=self.ttl_s)
            for key in (self.todo, self.done):
                pipe.expire(key, self.ttl_s)
            pipe.execute()
        return len(missing)

    def claim(self) -> int | None:
        raw = self.conn.lpop(self.todo)
        if raw is None:
            return None
        chunk = int(cast(bytes, raw))
        self.renew(chunk)
        return chunk

    def renew(self, chunk: int) -> None:
        self.conn.set(self._lease.format(chunk), 1, ex=max(1, int(self.lease_s)))

    def finish(self, chunk: int, result: dict[str, Any]) -> None:
        with self.conn.pipeline() as pipe:
            pipe.hset(self.done, str(chunk), json.dumps(result))
            pipe.expire(self.done, self.ttl_s)
            pipe.delete(self._lease.format(chunk))
            pipe.execute()

    def n_done(self) -> int:
        return int(self.conn.hlen(self.done))

    def done_ids(self) -> list[int]:
        return [int(x) for x in self.conn.hkeys(self.done)]

    def requeue_lost(self) -> None:
        """Put back chunks that are neither done, queued nor leased (their worker died)."""
        queued = {int(x) for x in self.conn.lrange(self.todo, 0, -1)}
        done = {int(x) for x in self.conn.hkeys(self.done)}
        for i in range(self.n):
            if i not in done and i not in queued and not self.conn.exists(self._lease.format(i)):
                self.conn.rpush(self.todo, i)

    def results(self) -> list[dict[str, Any]]:
        raw = self.conn.hgetall(self.done)
        return [json.loads(raw[str(i).encode()]) for i in range(self.n)]


def work_through(
    board: ChunkBoard,
    compute: Callable[[int, Callable[[], None]], dict[str, Any]],
    on_chunk_done: Callable[[], None] = lambda: None,
    wait_for_others: bool = True,
    poll_s: float = 0.2,
) -> None:
    """Take chunks off the board and compute them until none is left. ``compute(chunk, renew)``
    must call ``renew()`` now and then (the progress callback does) to keep its lease. With
    ``wait_for_others`` (the owning job), also wait for chunks other workers hold, and requeue
    those whose lease lapsed."""
    while True:
        chunk = board.claim()
        if chunk is not None:
            board.finish(chunk, compute(chunk, partial(board.renew, chunk)))
            on_chunk_done()
            continue
        if not wait_for_others or board.n_done() >= board.n:
            return
        board.requeue_lost()
        time.sleep(poll_s)
