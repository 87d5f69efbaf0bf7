"""Every error the service reports, in one tree.

    InspectorError            base: an error type, an HTTP status, a message, details
    ├── BadImage              400  corrupt or truncated image
    ├── PayloadTooLarge       413  too many bytes, pixels or images
    ├── UnsupportedMedia      415  not an image, or a format we do not decode
    ├── Unauthorized          401  no API key, or an unknown one (when keys are configured)
    ├── NotFound              404  (UnknownModel, UnknownJob, UnknownArtifact, UnknownDataset)
    ├── BadParams             422  params that fail their schema or do not fit the model
    │   ├── UnsupportedMethod 422  a method that cannot run on this model (names the layer)
    │   └── IdempotencyKeyReused 422  an Idempotency-Key sent again with a different request
    ├── DatasetInUse          409  a data set a queued or running job uses cannot be deleted
    ├── RateLimited           429  the tenant's request rate is over its limit (Retry-After)
    │   └── QuotaExceeded     429  the tenant has too many unfinished jobs (Retry-After)
    ├── QueueUnavailable      503  Redis unreachable (with Retry-After)
    ├── NoWorker              503  no worker answered a synchronous call in time
    └── JobFailure            500-class errors raised inside a job (type names the cause)
        └── MemoryBudgetExceeded  the job grew the worker past its kind's memory budget

Both the API and the workers raise these; the API maps them to HTTP in exactly one place
(``service.errors.install_error_handlers``); a job stores ``{"type", "message"}`` of the
error that ended it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorBody(BaseModel):
    type: str
    message: str
    details: Any = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class InspectorError(Exception):
    type = "error"
    status = 500

    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorBody(type=self.type, message=self.message, details=self.details))


class BadImage(InspectorError):
    type, status = "bad_image", 400


class PayloadTooLarge(InspectorError):
    type, status = "payload_too_large", 413


class UnsupportedMedia(InspectorError):
    type, status = "unsupported_media_type", 415


class NotFound(InspectorError):
    type, status = "not_found", 404


class UnknownModel(NotFound):
    type = "unknown_model"


class UnknownJob(NotFound):
    type = "unknown_job"


class UnknownArtifact(NotFound):
    type = "unknown_artifact"


class UnknownDataset(NotFound):
    type = "unknown_dataset"


class DatasetInUse(InspectorError):
    type, status = "dataset_in_use", 409


class BadParams(InspectorError):
    type, status = "bad_params", 422


class UnsupportedMethod(BadParams):
    type = "unsupported_method"


class IdempotencyKeyReused(BadParams):
    type = "idempotency_key_reused"


class Unauthorized(InspectorError):
    type, status = "unauthorized", 401


class RateLimited(InspectorError):
    """429; ``retry_after_s`` (whole seconds) becomes the ``Retry-After`` header."""

    type, status = "rate_limited", 429

    def __init__(self, message: str, retry_after_s: int, details: Any = None) -> None:
        super().__init__(message, details)
        self.retry_after_s = max(1, int(retry_after_s))


class QuotaExceeded(RateLimited):
    type = "quota_exceeded"


class QueueUnavailable(InspectorError):
    type, status = "queue_unavailable", 503
    retry_after_s = 5


class NoWorker(InspectorError):
    type, status = "no_worker", 503
    retry_after_s = 10


class JobFailure(InspectorError):
    """An error inside a job that is not the client's fault (``type`` says which)."""

    type, status = "job_failed", 500

    def __init__(self, message: str, type: str = "job_failed", details: Any = None) -> None:
        super().__init__(message, details)
        self.type = type


class MemoryBudgetExceeded(JobFailure):
    """Raised into a job by its worker's watchdog (``workers.budget``): the job grew the
    worker's resident memory by more than its kind's budget. Never retried: it would again."""

    message_default = "the job exceeded its memory budget"

    def __init__(self, message: str | None = None, details: Any = None) -> None:
        super().__init__(message or self.message_default, type="memory_budget", details=details)
