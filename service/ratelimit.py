"""Per-tenant limits, kept in Redis so every API replica shares them.

- Rate limit: a token bucket per tenant (``rate_limit_per_s`` refill, ``rate_limit_burst``
  size) on the requests that create work (job submissions and predicts); over it: 429
  ``rate_limited`` with ``Retry-After`` (seconds until a token is back). Reads (job status,
  artifacts, catalogues) are not limited here; a reverse proxy is the place for that.
- Queue quota: at most ``max_unfinished_jobs`` queued + running jobs per tenant; a new job
  over it is 429 ``quota_exceeded``. Resubmitting an existing job is never refused.

Per-key values in the keys file override the settings' defaults; 0 turns a limit off.
"""

from __future__ import annotations

import math
from typing import Annotated, cast

from fastapi import Depends
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from rq.job import Job
from rq.job import JobStatus as RQStatus

from schemas import keys
from schemas.errors import QuotaExceeded, RateLimited
from schemas.settings import Settings
from service.auth import Tenant, TenantDep
from service.deps import AsyncRedisDep, SettingsDep

# Atomic refill-and-take on Redis' clock (all replicas agree). Returns the seconds to wait
# for `cost` tokens, 0 when they were taken.
TOKEN_BUCKET = """
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or burst
local ts = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local wait = 0
if tokens >= cost then tokens = tokens - cost else wait = (cost - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return tostring(wait)
"""
TERMINAL = {RQStatus.FINISHED.value, RQStatus.FAILED.value, RQStatus.CANCELED.value, RQStatus.STOPPED.value}
QUOTA_RETRY_AFTER_S = 5


async def take_token(conn: AsyncRedis, tenant: str, rate: float, burst: int, cost: int = 1) -> float:
    """Seconds until the request may go (0: allowed now, and a token was taken)."""
    wait = await conn.eval(TOKEN_BUCKET, 1, keys.rate_key(tenant), rate, burst, cost)  # type: ignore[misc]
    return float(wait)


async def rate_limit(tenant: TenantDep, conn: AsyncRedisDep, settings: SettingsDep) -> None:
    """Dependency of the routes that create work: 429 when the tenant's bucket is empty."""
    rate = settings.rate_limit_per_s if tenant.rate_limit_per_s is None else tenant.rate_limit_per_s
    if rate <= 0:
        return
    burst = tenant.rate_limit_burst or settings.rate_limit_burst
    wait = await take_token(conn, tenant.name, rate, burst)
    if wait > 0:
        raise RateLimited(
            f"rate limit of {rate:g} requests/s (burst {burst}) reached for tenant {tenant.name!r}",
            retry_after_s=math.ceil(wait),
            details={"limit_per_s": rate, "burst": burst},
        )


RateLimitDep = Annotated[None, Depends(rate_limit)]


def quota_of(tenant: Tenant, settings: Settings) -> int:
    return settings.max_unfinished_jobs if tenant.max_unfinished_jobs is None else tenant.max_unfinished_jobs


def reserve_job_slot(conn: Redis, tenant: str, limit: int, job_id: str, now: float) -> None:
    """Count ``job_id`` against the tenant's quota, or raise 429 ``quota_exceeded``.

    The set of the tenant's unfinished jobs is pruned lazily here (jobs that ended or
    expired leave it), under a per-tenant lock so concurrent submits cannot overshoot.
    """
    key = keys.unfinished_key(tenant)
    with conn.lock(f"{key}:lock", timeout=10, blocking_timeout=5):
        ids = [m.decode() for m in cast(list[bytes], conn.zrange(key, 0, -1))]
        if ids:
            with conn.pipeline() as pipe:
                for i in ids:
                    pipe.hget(Job.key_for(i), "status")
                statuses = pipe.execute()
            gone = [i for i, s in zip(ids, statuses, strict=True) if s is None or s.decode() in TERMINAL]
            if gone:
                conn.zrem(key, *gone)
            ids = [i for i in ids if i not in set(gone)]
        if limit and job_id not in ids and len(ids) >= limit:
            raise QuotaExceeded(
                f"tenant {tenant!r} has {len(ids)} unfinished jobs; the quota is {limit}",
                retry_after_s=QUOTA_RETRY_AFTER_S,
                details={"unfinished": len(ids), "limit": limit},
            )
        with conn.pipeline() as pipe:
            pipe.zadd(key, {job_id: now})
            pipe.expire(key, 7 * 24 * 3600)
            pipe.execute()
