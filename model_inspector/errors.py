"""Every error the client raises, in one tree (the API's ``schemas.errors`` mirrored by name).

    InspectorError                 base of everything below
    ├── TransportError             the API could not be reached (after the retries)
    ├── WaitTimeout                job.wait() ran out of time (also a TimeoutError)
    ├── JobError                   a job ended without a result: .job, .type, .message
    │   ├── JobFailed              status ``failed`` (.type: job_failed, worker_lost, timeout...)
    │   │   └── MemoryBudgetExceeded   type ``memory_budget``
    │   └── JobCanceled            status ``canceled``
    └── APIError                   an error answer: .status, .type, .message, .details, .retry_after
        ├── BadImage               400  corrupt or truncated image
        ├── Unauthorized           401  no API key, or an unknown one
        ├── NotFound               404
        │   ├── UnknownModel, UnknownJob, UnknownArtifact, UnknownDataset
        ├── Conflict               409
        │   └── DatasetInUse       a data set a queued or running job still reads
        ├── PayloadTooLarge        413  too many bytes, pixels or images
        ├── UnsupportedMedia       415  not an image, or a format the API does not decode
        ├── BadParams              422  params that fail their schema (.details names the field)
        │   ├── UnsupportedMethod
        │   └── IdempotencyKeyReused
        ├── RateLimited            429  .retry_after seconds (retried by the client first)
        │   └── QuotaExceeded      429  too many unfinished jobs
        ├── QueueUnavailable       503  Redis unreachable (retried by the client first)
        ├── NoWorker               503  no worker answered in time (retried by the client first)
        └── ServerError            500  a bug in the API (``internal``)

An answer is translated in exactly one place, :func:`from_response`: by its error ``type``
first, then by its HTTP status for types this client does not know yet.
"""

from __future__ import annotations

from email.utils import parsedate_to_datetime
from typing import Any

import httpx


class InspectorError(Exception):
    """Base of every error this client raises."""


class TransportError(InspectorError):
    """The API could not be reached (connection refused, reset, timed out) after the retries."""


class WaitTimeout(InspectorError, TimeoutError):
    """``job.wait(timeout)`` returned before the job ended."""


class JobError(InspectorError):
    """A job ended without a result. ``job`` is the client's job handle (its last view)."""

    def __init__(self, job: Any, type: str, message: str) -> None:
        super().__init__(f"job {job.id} {job.status}: {type}: {message}")
        self.job, self.type, self.message = job, type, message


class JobFailed(JobError):
    pass


class MemoryBudgetExceeded(JobFailed):
    pass


class JobCanceled(JobError):
    pass


class APIError(InspectorError):
    """An error answer of the API, ``{"error": {"type", "message", "details"}}``."""

    type = "error"
    status = 0

    def __init__(
        self,
        message: str,
        *,
        status: int,
        type: str,
        details: Any = None,
        retry_after: float | None = None,
        response: httpx.Response | None = None,
    ) -> None:
        super().__init__(f"{status} {type}: {message}")
        self.message, self.status, self.type, self.details = message, status, type, details
        self.retry_after = retry_after  # seconds, from the Retry-After header; None without one
        self.response = response


class BadImage(APIError):
    type, status = "bad_image", 400


class Unauthorized(APIError):
    type, status = "unauthorized", 401


class NotFound(APIError):
    type, status = "not_found", 404


class UnknownModel(NotFound):
    type = "unknown_model"


class UnknownJob(NotFound):
    type = "unknown_job"


class UnknownArtifact(NotFound):
    type = "unknown_artifact"


class UnknownDataset(NotFound):
    type = "unknown_dataset"


class Conflict(APIError):
    type, status = "conflict", 409


class DatasetInUse(Conflict):
    type = "dataset_in_use"


class PayloadTooLarge(APIError):
    type, status = "payload_too_large", 413


class UnsupportedMedia(APIError):
    type, status = "unsupported_media_type", 415


class BadParams(APIError):
    type, status = "bad_params", 422


class UnsupportedMethod(BadParams):
    type = "unsupported_method"


class IdempotencyKeyReused(BadParams):
    type = "idempotency_key_reused"


class RateLimited(APIError):
    type, status = "rate_limited", 429


class QuotaExceeded(RateLimited):
    type = "quota_exceeded"


class QueueUnavailable(APIError):
    type, status = "queue_unavailable", 503


class NoWorker(APIError):
    type, status = "no_worker", 503


class ServerError(APIError):
    type, status = "internal", 500


def _leaves(cls: type[APIError]) -> list[type[APIError]]:
    return [cls, *(c for sub in cls.__subclasses__() for c in _leaves(sub))]


BY_TYPE: dict[str, type[APIError]] = {c.type: c for c in _leaves(APIError) if c is not APIError}
"""Error ``type`` -> class."""
BY_STATUS: dict[int, type[APIError]] = {
    400: BadImage,
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    415: UnsupportedMedia,
    422: BadParams,
    429: RateLimited,
    503: QueueUnavailable,
    500: ServerError,
}
"""Status -> class, for error types this client does not know."""
JOB_ERRORS: dict[str, type[JobFailed]] = {"memory_budget": MemoryBudgetExceeded}


def retry_after(response: httpx.Response) -> float | None:
    """The ``Retry-After`` header in seconds (delta-seconds or an HTTP date), None without one."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    date = response.headers.get("date")
    now = parsedate_to_datetime(date) if date else None
    if now is None:
        from datetime import UTC, datetime

        now = datetime.now(UTC)
    return max(0.0, (when - now).total_seconds())


def from_response(response: httpx.Response) -> APIError:
    """The exception for an error answer (status >= 400)."""
    status = response.status_code
    try:
        err = response.json()["error"]
        type_, message, details = str(err["type"]), str(err["message"]), err.get("details")
    except (ValueError, KeyError, TypeError):  # not our JSON: a proxy's page, an empty body
        type_, message, details = "http_error", response.text[:500] or response.reason_phrase, None
    cls = BY_TYPE.get(type_) or BY_STATUS.get(status) or (ServerError if status >= 500 else APIError)
    after = retry_after(response)
    return cls(message, status=status, type=type_, details=details, retry_after=after, response=response)


def job_error(job: Any) -> JobError:
    """The exception for a job that ended ``failed`` or ``canceled``."""
    err = job.view.error
    type_, message = (err.type, err.message) if err is not None else (str(job.status), "the job did not finish")
    if job.status == "canceled":
        return JobCanceled(job, type_, message)
    return JOB_ERRORS.get(type_, JobFailed)(job, type_, message)
