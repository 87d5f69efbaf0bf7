"""Every dependency of the routes as a typed alias (``SettingsDep``, ``RedisDep``, ...)."""

from __future__ import annotations

import asyncio
import weakref
from functools import lru_cache
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from rq import Queue
from rq.serializers import JSONSerializer

from schemas.manifests import ModelRegistry
from schemas.settings import Settings

if TYPE_CHECKING:
    from service.metrics import Metrics


@lru_cache
def redis_for(url: str, timeout_s: float) -> Redis:
    """One connection pool per URL. Short timeouts: Redis down answers 503 within ~2 s."""
    return Redis.from_url(
        url,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        health_check_interval=30,
    )


# Every dependency is ``async def``: FastAPI runs a plain ``def`` one in its thread pool, a
# thread hand-off per dependency per request.


async def app_settings(request: Request) -> Settings:
    """The settings the app was created with (``service.main.create_app``)."""
    settings: Settings = request.app.state.settings
    return settings


async def get_redis(settings: Annotated[Settings, Depends(app_settings)]) -> Redis:
    return redis_for(settings.redis_url, settings.redis_timeout_s)


def queue(name: str, conn: Redis) -> Queue:
    return Queue(name, connection=conn, serializer=JSONSerializer)


SettingsDep = Annotated[Settings, Depends(app_settings)]
RedisDep = Annotated[Redis, Depends(get_redis)]

_async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, float], AsyncRedis]] = (
    weakref.WeakKeyDictionary()
)


async def get_async_redis(settings: SettingsDep) -> AsyncRedis:
    """An asyncio client (for waits that must not hold a thread, e.g. predict replies), one
    pool per event loop: asyncio connections cannot move between loops."""
    clients = _async_clients.setdefault(asyncio.get_running_loop(), {})
    key = (settings.redis_url, settings.redis_timeout_s)
    if key not in clients:
        clients[key] = AsyncRedis.from_url(
            key[0], socket_connect_timeout=key[1], socket_timeout=key[1], health_check_interval=30
        )
    return clients[key]


AsyncRedisDep = Annotated[AsyncRedis, Depends(get_async_redis)]


async def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
MetricsDep = Annotated["Metrics", Depends(get_metrics)]
