"""``/v1/datasets``: upload a zip of images, list, read and delete a tenant's data sets
(``service.datasets``; the contract is ``schemas.datasets``)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from schemas.datasets import DatasetDetail, DatasetInfo, DatasetList
from service import datasets
from service.auth import TenantDep
from service.deps import RedisDep, RegistryDep, SettingsDep
from service.openapi import ERRORS

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/zip": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "name": {"type": "string"},
                    },
                    "required": ["file"],
                }
            },
        },
    }
}


@router.post(
    "",
    response_model=DatasetInfo,
    status_code=201,
    responses={
        200: {"model": DatasetInfo, "description": "the same bytes were uploaded before: that data set"},
        **ERRORS,
    },
    openapi_extra=UPLOAD_BODY,
)
async def upload(
    request: Request,
    conn: RedisDep,
    settings: SettingsDep,
    tenant: TenantDep,
    name: str | None = Query(None, max_length=200, description="a name to show (default: the file name)"),
) -> JSONResponse:
    """A zip of images, ImageFolder (``<class>/<image>``) or flat (optional ``labels.csv``
    of ``file,label``): checked, stored once per content, answered with its id (201; 200
    when the tenant uploaded the same bytes before)."""
    received = await datasets.receive(request, settings, name)
    listing = await asyncio.to_thread(datasets.check, received, settings)
    info, created = await asyncio.to_thread(datasets.store, conn, settings, tenant.name, received, listing)
    status = 201 if created else 200
    location = {"Location": f"/v1/datasets/{info.id}"}
    return JSONResponse(info.model_dump(mode="json"), status_code=status, headers=location)


@router.get("", response_model=DatasetList, responses=ERRORS)
async def list_datasets(conn: RedisDep, registry: RegistryDep, settings: SettingsDep, tenant: TenantDep) -> DatasetList:
    """The tenant's uploads (newest first), then every model's registered data (read-only)."""
    infos, used = await asyncio.to_thread(datasets.list_all, conn, registry, tenant.name)
    return DatasetList(
        datasets=infos, bytes_used=used, bytes_quota=settings.max_dataset_bytes, count_quota=settings.max_datasets
    )


@router.get("/{dataset_id:path}", response_model=DatasetDetail, responses=ERRORS)
async def get_dataset(dataset_id: str, conn: RedisDep, registry: RegistryDep, tenant: TenantDep) -> DatasetDetail:
    """One data set with its images per class and the queued or running jobs using it."""
    return await asyncio.to_thread(datasets.detail, conn, registry, tenant.name, dataset_id)


@router.delete(
    "/{dataset_id:path}",
    status_code=204,
    response_class=Response,
    responses={409: {"description": "dataset_in_use: a queued or running job uses it"}, **ERRORS},
)
async def delete_dataset(dataset_id: str, conn: RedisDep, settings: SettingsDep, tenant: TenantDep) -> Response:
    """Delete an uploaded data set (registered data are read-only: 404 here)."""
    await asyncio.to_thread(datasets.delete, conn, settings, tenant.name, dataset_id)
    return Response(status_code=204)
