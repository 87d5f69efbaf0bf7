"""Every dependency of the routes as a typed alias (``SettingsDep``, ``RedisDep``, ...)."""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from schemas.settings import Settings, get_settings
from schemas.manifests import ModelRegistry

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


def get_redis(settings: Annotated[Settings, Depends(get_settings)]) -> Redis:
    return redis_for(settings.redis_url, settings.redis_timeout_s)


def queue(name: str, conn: Redis) -> Queue:
    return Queue(name, connection=conn, serializer=JSONSerializer)


SettingsDep = Annotated[Settings, Depends(get_settings)]
RedisDep = Annotated[Redis, Depends(get_redis)]


def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


def get_metrics(request: Request) -> "Metrics":
    return request.app.state.metrics


RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
MetricsDep = Annotated["Metrics", Depends(get_metrics)]
