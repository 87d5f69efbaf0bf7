"""``/v1/methods``: every job kind with the JSON schema of its params (defaults included)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
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


@router.get("/methods", response_model=MethodList)
def list_methods() -> MethodList:
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
    )
