"""Probes and metrics: ``/healthz`` (alive), ``/readyz`` (Redis + warm workers), ``/metrics``."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from service.deps import MetricsDep, RedisDep
from service.warm import fleet

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Alive: answered on the event loop itself (no thread hand-off), so it shows whether the
    loop is free."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Redis unreachable, or a queue without a warm worker"}})
def readyz(conn: RedisDep) -> JSONResponse:
    """200 when Redis answers and every queue has a registered worker whose models are warm
    (``service.warm``); the body lists per queue the warm workers (``workers``) and all the
    registered ones (``registered``), per model the workers that have it warm (``models``),
    and what is being warmed or failed to warm."""
    try:
        conn.ping()
        f = fleet(conn)
    except RedisError as e:
        return JSONResponse(
            {"ready": False, "redis": False, "reason": str(e)}, status_code=503, headers={"Retry-After": "5"}
        )
    ready = all(f.ready.values())
    body: dict[str, object] = {
        "ready": ready,
        "redis": True,
        "workers": f.ready,
        "registered": f.registered,
        "models": {m: sorted(ws) for m, ws in sorted(f.models.items())},
        "warming": f.warming,
        "failed": f.failed,
    }
    if not ready:
        cold = [q for q, n in f.ready.items() if not n]
        body["reason"] = (
            "no warm worker on queue(s) "
            + ", ".join(cold)
            + (" (workers are warming up)" if any(f.registered[q] for q in cold) or f.warming else "")
        )
    return JSONResponse(body, status_code=200 if ready else 503, headers={} if ready else {"Retry-After": "5"})


@router.get("/metrics", response_class=Response)
def metrics(m: MetricsDep) -> Response:
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
