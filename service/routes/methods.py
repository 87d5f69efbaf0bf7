"""``/v1/methods``: every job kind with the JSON schema of its params (defaults included)."""

from __future__ import annotations

from functools import cache
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from pydantic import BaseModel

from schemas.kinds import KINDS, UPLOADS

router = APIRouter(prefix="/v1", tags=["methods"])


class UploadInfo(BaseModel):
    name: str  # the multipart file field, or the key in files_base64
    description: str


class KindInfo(BaseModel):
    kind: str
    queue: str
    description: str
    min_images: int
    max_images: int | None
    files: list[UploadInfo]  # extra uploads the kind accepts besides images
    params_schema: dict[str, Any]


class MethodList(BaseModel):
    kinds: list[KindInfo]


@cache
def catalogue() -> bytes:
    """The list as JSON, built once: the kinds are fixed at import, and generating every
    params schema took 0.8 s per request on a loaded 2-core machine (the web page waits
    for it before it can show a form)."""
    return MethodList(
        kinds=[
            KindInfo(
                kind=spec.name,
                queue=spec.queue,
                description=spec.description,
                min_images=spec.min_images,
                max_images=spec.max_images,
                files=[UploadInfo(name=f, description=UPLOADS.get(f, "")) for f in spec.files],
                params_schema=spec.params.model_json_schema(),
            )
            for spec in KINDS.values()
        ]
    ).model_dump_json().encode()


@router.get("/methods", response_model=MethodList)
def list_methods() -> Response:
    return Response(catalogue(), media_type="application/json")
