"""``/v1/models``: list, describe, and predict synchronously."""

from __future__ import annotations

from fastapi import APIRouter, Request
from redis.exceptions import RedisError

from schemas.errors import BadParams
from schemas.jobs import PredictResponse
from schemas.models import ModelInfo, ModelList
from service import jobs
from service.auth import TenantDep
from service.deps import AsyncRedisDep, RedisDep, RegistryDep, SettingsDep
from service.openapi import ERRORS, SUBMISSION_BODY
from service.ratelimit import RateLimitDep
from service.uploads import read_submission
from service.warm import fleet

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ModelList)
def list_models(registry: RegistryDep) -> ModelList:
    return ModelList(models=[e.info() for e in registry.entries().values()])


@router.get("/{model_id}", response_model=ModelInfo, responses=ERRORS)
def get_model(model_id: str, registry: RegistryDep, conn: RedisDep) -> ModelInfo:
    """The model, and whether a live worker has its current version warm (``warm`` is null
    when Redis cannot be asked)."""
    entry = registry.get(model_id)
    info = entry.info()
    try:
        workers = fleet(conn).warm_workers(model_id, entry.version)
    except RedisError:
        return info
    return info.model_copy(update={"warm": bool(workers), "warm_workers": workers})


@router.post(
    "/{model_id}/predict",
    response_model=PredictResponse,
    responses=ERRORS,
    openapi_extra=SUBMISSION_BODY,
    summary="Top-k classes of one or several images (batched by a worker; the request waits for it)",
)
async def predict(
    model_id: str,
    request: Request,
    registry: RegistryDep,
    conn: AsyncRedisDep,
    settings: SettingsDep,
    tenant: TenantDep,
    _: RateLimitDep,
) -> PredictResponse:
    entry = registry.get(model_id)
    # A plain JPEG is decoded once, by the worker, which answers a corrupt one with 400.
    sub = await read_submission(request, settings, verify=False)
    if sub.params:
        raise BadParams("predict takes no params (use top_k)")
    if sub.callback_url is not None:
        raise BadParams("predict answers at once; callback_url is for jobs")
    top_k = sub.top_k or 5
    return await jobs.predict(conn, settings, entry, sub.images, top_k, tenant.name)
