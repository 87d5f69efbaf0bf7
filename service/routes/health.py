"""Probes and metrics: ``/healthz`` (alive), ``/readyz`` (Redis + workers), ``/metrics``."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError
from rq import Worker

from schemas import keys
from service.deps import MetricsDep, RedisDep, queue

router = APIRouter(tags=["operations"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Redis unreachable or no worker"}})
def readyz(conn: RedisDep) -> JSONResponse:
    try:
        conn.ping()
        workers = {name: Worker.count(queue=queue(name, conn)) for name in keys.QUEUES}
    except RedisError as e:
        return JSONResponse(
            {"ready": False, "redis": False, "reason": str(e)}, status_code=503, headers={"Retry-After": "5"}
        )
    ready = all(workers.values())
    body = {"ready": ready, "redis": True, "workers": workers}
    if not ready:
        body["reason"] = "no worker on queue(s) " + ", ".join(q for q, n in workers.items() if not n)
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response)
def metrics(m: MetricsDep) -> Response:
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
