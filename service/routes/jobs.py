"""``/v1/jobs``: submit, read, follow (SSE), fetch artifacts, cancel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from sse_starlette.sse import EventSourceResponse

from schemas.errors import BadParams, NotFound, UnknownArtifact
from schemas.jobs import JobStatus, JobView
from schemas.kinds import KINDS
from service import datasets, jobs
from service.auth import TenantDep
from service.deps import MetricsDep, RedisDep, RegistryDep, SettingsDep
from service.openapi import ERRORS, SUBMISSION_BODY
from service.ratelimit import RateLimitDep, quota_of
from service.uploads import check_callback_url, read_submission
from service.zipstream import zip_stream

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
POLL_S = 0.05


async def _view(
    conn: RedisDep, job_id: str, tenant: str, base_url: str = "", deduplicated: bool = False
) -> JobView:
    job = await asyncio.to_thread(jobs.fetch, conn, job_id, tenant)
    return await asyncio.to_thread(jobs.view, job, conn, base_url, deduplicated)


@router.post(
    "/{kind}",
    response_model=JobView,
    status_code=202,
    responses={200: {"model": JobView, "description": "finished (within ?wait= or reused)"}, **ERRORS},
    openapi_extra=SUBMISSION_BODY,
)
async def submit(
    kind: str,
    request: Request,
    conn: RedisDep,
    registry: RegistryDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    tenant: TenantDep,
    _: RateLimitDep,
    wait: float = Query(0, ge=0, le=600, description="seconds to wait for the result"),
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            pattern=r"^[!-~]{1,255}$",
            description="a retried submit with the same key gets the same job back (per tenant, for a day)",
        ),
    ] = None,
) -> JSONResponse:
    spec = KINDS.get(kind)
    if spec is None:
        raise NotFound(f"unknown job kind {kind!r}", details={"known": sorted(KINDS)})
    sub = await read_submission(request, settings, spec.files, allow_no_image=spec.min_images == 0)
    if not sub.model_id:
        raise BadParams("model_id is required")
    if sub.callback_url is not None:
        check_callback_url(sub.callback_url, settings)
    entry = registry.get(sub.model_id)
    params = jobs.validate_params(spec, sub.params)
    jobs.check_request(spec, entry, params, len(sub.images), settings)
    others = jobs.other_models(spec, entry, params, registry)
    sizes = [(img.height, img.width) for img in sub.images]
    await asyncio.to_thread(jobs.check_uploads, spec, entry, sub.files, settings, len(sub.images), params, sizes)
    used = await asyncio.to_thread(
        datasets.check_job, conn, registry, tenant.name, entry, params, len(sub.images), sub.files
    )
    options = jobs.SubmitOptions(tenant.name, quota_of(tenant, settings), sub.callback_url, idempotency_key, used)
    job, reused = await asyncio.to_thread(
        datasets.submit_using, conn, tenant.name, used,
        partial(jobs.submit, conn, settings, kind, entry, sub.images, params, sub.files, options, others),
    )  # fmt: skip
    metrics.submitted.labels(kind, str(reused).lower()).inc()
    view = await _view(conn, job.id, tenant.name, settings.public_url, reused)
    deadline = asyncio.get_running_loop().time() + wait
    while not view.status.terminal and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(POLL_S)
        view = await _view(conn, job.id, tenant.name, settings.public_url, reused)
    status = 200 if view.status is JobStatus.finished else 202
    return JSONResponse(
        view.model_dump(mode="json"), status_code=status, headers={"Location": f"/v1/jobs/{job.id}"}
    )


@router.get("/{job_id}", response_model=JobView, responses=ERRORS)
async def get_job(job_id: str, conn: RedisDep, settings: SettingsDep, tenant: TenantDep) -> JobView:
    return await _view(conn, job_id, tenant.name, settings.public_url)


@router.get("/{job_id}/events", responses=ERRORS, response_class=EventSourceResponse)
async def job_events(job_id: str, conn: RedisDep, settings: SettingsDep, tenant: TenantDep) -> EventSourceResponse:
    """Server-Sent Events: ``progress`` on every change of status or progress, then one
    ``end`` event with the terminal job (result included), then the stream closes."""
    first = await _view(conn, job_id, tenant.name, settings.public_url)

    async def events() -> AsyncIterator[dict[str, str]]:
        view, last = first, None
        while True:
            if view.status.terminal:
                yield {"event": "end", "data": view.model_dump_json()}
                return
            state = (view.status, view.progress)
            if state != last:
                yield {"event": "progress", "data": view.model_dump_json(include={"id", "status", "progress"})}
                last = state
            await asyncio.sleep(0.2)
            view = await _view(conn, job_id, tenant.name, settings.public_url)

    return EventSourceResponse(events(), ping=15)


@router.get(
    "/{job_id}/artifacts/{name}",
    responses={200: {"content": {"image/png": {}, "application/x-npy": {}, "text/csv": {}}}, **ERRORS},
    response_class=Response,
)
async def get_artifact(job_id: str, name: str, conn: RedisDep, settings: SettingsDep, tenant: TenantDep) -> Response:
    job = await asyncio.to_thread(jobs.fetch, conn, job_id, tenant.name)
    found = await asyncio.to_thread(jobs.artifact, conn, job, name, settings.data_dir)
    if found is None:
        raise UnknownArtifact(f"job {job_id!r} has no artifact {name!r}")
    data, media_type = found
    disposition = {"Content-Disposition": f'inline; filename="{name}"'}
    if isinstance(data, Path):  # a large artifact on the data volume (data-set jobs' maps.npy)
        return FileResponse(data, media_type=media_type, headers=disposition)
    return Response(data, media_type=media_type, headers=disposition)


@router.get(
    "/{job_id}/download",
    responses={200: {"content": {"application/zip": {}}}, **ERRORS},
    response_class=StreamingResponse,
)
async def download(job_id: str, conn: RedisDep, settings: SettingsDep, tenant: TenantDep) -> StreamingResponse:
    """Every artifact of a finished job (and ``result.json``, its summary) as one ``.zip``,
    streamed: stored, not compressed, so a large ``maps.npy`` costs no CPU and no memory."""
    job = await asyncio.to_thread(jobs.fetch, conn, job_id, tenant.name)
    view = await asyncio.to_thread(jobs.view, job, conn, settings.public_url)
    if view.status is not JobStatus.finished:
        raise UnknownArtifact(f"job {job_id!r} is {view.status.value}: results are downloadable once it finished")
    entries: list[tuple[str, bytes | Path]] = [("result.json", view.model_dump_json(indent=2).encode())]
    for link in await asyncio.to_thread(jobs.artifact_links, job):
        found = await asyncio.to_thread(jobs.artifact, conn, job, link["name"], settings.data_dir)
        if found is not None:
            entries.append((link["name"], found[0]))
    return StreamingResponse(
        zip_stream(entries),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{job_id}.zip"'},
    )


@router.delete("/{job_id}", response_model=JobView, responses=ERRORS)
async def cancel_job(job_id: str, conn: RedisDep, settings: SettingsDep, tenant: TenantDep) -> JobView:
    """Cancel a queued job at once; a running one stops at its next progress report."""
    job = await asyncio.to_thread(jobs.fetch, conn, job_id, tenant.name)
    await asyncio.to_thread(jobs.cancel, conn, job)
    return await _view(conn, job_id, tenant.name, settings.public_url)
