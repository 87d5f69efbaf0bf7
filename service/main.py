"""The FastAPI application: ``create_app()``; ``service.main:app`` for uvicorn."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from redis.exceptions import RedisError
from starlette.types import Message

from schemas.manifests import ModelRegistry
from schemas.settings import Settings, get_settings
from service.auth import authenticate, install_auth
from service.deps import get_async_redis, redis_for
from service.errors import install_error_handlers
from service.metrics import Metrics
from service.openapi import ERRORS
from service.routes import datasets, health, jobs, methods, models
from service.routes.ui import install_ui
from service.uploads import BodySizeLimit, body_limit, dataset_body_limit, warm_up


async def build_routes(app: FastAPI) -> None:
    """Have the router match a path that no route has: FastAPI builds each included router's
    routes (their dependencies and fields) when a request first passes through it, 60 ms and
    more of imports on 2 cores that would land on the first request (or stall the event
    loop during the first big upload). No middleware, no side effect: a plain 404."""
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/__warm-up__",
        "root_path": "",
        "query_string": b"",
        "headers": [],
    }

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        pass

    await app.router(scope, receive, send)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """At start, the request path is used once, so the first requests find it warm: the
    routes, the upload parsing and decoding, and this loop's Redis connection (Redis down:
    later)."""
    settings: Settings = app.state.settings
    await build_routes(app)
    await warm_up(settings)
    try:
        await asyncio.wait_for((await get_async_redis(settings)).ping(), 0.5)  # type: ignore[arg-type]
    except (RedisError, OSError, TimeoutError):
        pass  # answered 503 per request until Redis is back
    yield


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        lifespan=lifespan,
        title="Model Inspector",
        version="1.0.0",
        description="Predictions and explanations (attributions, U Analysis, influence, ...) "
        "for PyTorch image classifiers, as jobs run by GPU workers through Redis.",
    )
    app.state.settings = settings  # what service.deps.SettingsDep hands the routes
    app.state.registry = ModelRegistry(settings.models_dir)
    app.state.metrics = Metrics(lambda: redis_for(settings.redis_url, settings.redis_timeout_s))
    app.add_middleware(app.state.metrics.middleware)
    # Not FastAPI(max_body_size=...): its 413 is plain text, ours is the usual JSON error.
    app.add_middleware(
        BodySizeLimit, limit=body_limit(settings), overrides={"/v1/datasets": dataset_body_limit(settings)}
    )
    install_error_handlers(app)
    install_auth(app, settings)
    app.include_router(health.router)  # probes and metrics stay open
    for r in (models.router, methods.router, jobs.router, datasets.router):
        app.include_router(r, dependencies=[Depends(authenticate)], responses={401: ERRORS[401]})
    install_ui(app)  # the web page: no key (it holds no data), not in the OpenAPI schema
    return app


app = create_app()
