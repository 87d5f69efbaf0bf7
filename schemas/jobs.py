"""Jobs as the API shows them, predictions, and the payload the API queues for a worker."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from schemas.errors import ErrorBody


class JobStatus(StrEnum):
    queued = "queued"
    started = "started"
    finished = "finished"
    failed = "failed"
    canceled = "canceled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.finished, JobStatus.failed, JobStatus.canceled)


class Progress(BaseModel):
    done: int = 0
    total: int = 0
    stage: str = "queued"


class ArtifactLink(BaseModel):
    name: str
    url: str
    media_type: str
    size: int = Field(description="bytes")


class JobView(BaseModel):
    id: str
    kind: str
    model_id: str
    status: JobStatus
    progress: Progress
    params: dict[str, Any]
    created_at: datetime | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    error: ErrorBody | None = None
    result: dict[str, Any] | None = None
    artifacts: list[ArtifactLink] = Field(default_factory=list)
    deduplicated: bool = Field(False, description="true when an identical earlier submission was reused")
    cold_start_s: float | None = Field(
        None, description="seconds the job waited for its worker to load and warm the model (absent when it was warm)"
    )


class JobPayload(BaseModel):
    """What the API enqueues (as JSON) for ``workers.tasks.run_job``."""

    kind: str
    model_id: str
    model_version: str
    inputs: list[str] = Field(
        description="ids of the stored normalised input images (schemas.keys.input_key, schemas.stored_images)"
    )
    files: dict[str, str] = Field(default_factory=dict, description="extra upload name -> sha256 id")
    params: dict[str, Any]
    datasets: dict[str, str] = Field(
        default_factory=dict,
        description="uploaded data sets the params name: id -> sha256 of the zip (schemas.datasets.dataset_path_of)",
    )
    other_models: dict[str, str] = Field(
        default_factory=dict, description="other models the job uses (e.g. transfer models) -> version submitted"
    )


class ClassScore(BaseModel):
    index: int
    label: str
    probability: float


class Prediction(BaseModel):
    top: list[ClassScore]


class PredictResponse(BaseModel):
    model_id: str
    model_version: str
    predictions: list[Prediction] = Field(description="one per input image, in order")
    runtime_ms: float
    batch_size: int = Field(1, description="images in the batched forward pass that served this request")
    cold_start_s: float | None = Field(
        None, description="seconds this request waited for the worker to load and warm the model (absent when warm)"
    )


class WarmState(BaseModel):
    """What one worker has warm, as it publishes it (``schemas.keys.warm_key``): the API's
    ``/readyz`` and ``GET /v1/models/{id}`` read it."""

    model_config = ConfigDict(protected_namespaces=())

    worker: str
    queues: list[str]
    ready: bool = Field(description="every model it was asked to warm is warm (it takes work)")
    models: dict[str, str] = Field(default_factory=dict, description="warm model id -> version")
    warming: list[str] = Field(default_factory=list, description="model ids being warmed now")
    failed: dict[str, str] = Field(default_factory=dict, description="model id -> why its warm-up failed")


class Base64Images(BaseModel):
    """JSON form of a submission: images as base64 (``image_base64`` one, ``images_base64`` many)."""

    model_config = ConfigDict(extra="forbid")

    model_id: str | None = None
    callback_url: str | None = Field(None, description="notified (signed POST) when the job ends")
    image_base64: str | None = None
    images_base64: list[str] | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    top_k: int | None = None
    files_base64: dict[str, str] = Field(default_factory=dict, description="extra uploads by name (see the kind)")


class WebhookJob(BaseModel):
    id: str
    kind: str
    model_id: str
    status: JobStatus
    error: ErrorBody | None = None
    url: str = Field(description="where to read the job (result and artifacts)")


class WebhookEvent(BaseModel):
    """Body of a completion webhook: POSTed to each ``callback_url`` of a job when it ends,
    signed with HMAC-SHA256 (``X-Inspector-Signature: sha256=<hex of HMAC(secret,
    "<X-Inspector-Timestamp>." + body)>``)."""

    event: str = "job.ended"
    job: WebhookJob
