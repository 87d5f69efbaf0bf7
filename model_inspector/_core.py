"""What the sync and async clients share, free of I/O: the requests of every endpoint and how
their answers are read (:class:`Call`), the retry policy, the SSE parser and progress reports.

``Client`` and ``AsyncClient`` only send the calls built here and sleep where the policy says,
so the two cannot drift apart.
"""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx

from model_inspector import errors
from model_inspector.inputs import ImageLike, file_parts, image_parts
from schemas.jobs import JobView, PredictResponse, Progress
from schemas.models import ModelInfo, ModelList

log = logging.getLogger("model_inspector")
T = TypeVar("T")
RETRY_STATUSES = (429, 503)
SSE_READ_S = 30.0  # the API pings every 15 s, so a silent stream this long is dead
TERMINAL = ("finished", "failed", "canceled")


def seg(value: str) -> str:
    """One URL path segment."""
    return quote(str(value), safe="")


@dataclass
class Call(Generic[T]):
    """One request and how its (successful) answer becomes a value."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: dict[str, Any] | None = None
    data: dict[str, str] | None = None
    files: list[tuple[str, tuple[Any, ...]]] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    final: tuple[str, ...] = ()  # error types answered at once, never retried (e.g. a storage quota)

    def rewind(self) -> None:
        """Before a retry: file objects sent again from their start."""
        for _, (_, content, *_) in self.files or []:
            if hasattr(content, "seek"):
                content.seek(0)

    def request(self, http: httpx.Client | httpx.AsyncClient) -> httpx.Request:
        return http.build_request(
            self.method, self.path, params=self.params, data=self.data, files=self.files, headers=self.headers
        )


def _json(r: httpx.Response) -> Any:
    return r.json()


def _job(r: httpx.Response) -> JobView:
    return JobView.model_validate_json(r.content)


def models() -> Call[list[ModelInfo]]:
    return Call("GET", "/v1/models", lambda r: ModelList.model_validate_json(r.content).models)


def model(model_id: str) -> Call[ModelInfo]:
    return Call("GET", f"/v1/models/{seg(model_id)}", lambda r: ModelInfo.model_validate_json(r.content))


def methods() -> Call[dict[str, Any]]:
    return Call("GET", "/v1/methods", _json)


def predict(images: ImageLike | Iterable[ImageLike], model_id: str, top_k: int) -> Call[PredictResponse]:
    return Call(
        "POST",
        f"/v1/models/{seg(model_id)}/predict",
        lambda r: PredictResponse.model_validate_json(r.content),
        data={"top_k": str(top_k)},
        files=image_parts(images),
    )


def submit(
    kind: str,
    images: ImageLike | Iterable[ImageLike] | None,
    model_id: str,
    params: Mapping[str, Any] | None,
    files: Mapping[str, Any] | None,
    dataset: str | None,
    callback_url: str | None,
    idempotency_key: str | None,
    wait: float,
) -> Call[JobView]:
    """A submission; ``dataset`` goes into the params (the API reads it there). The
    Idempotency-Key (a fresh one per call unless given) makes the client's retries safe: a
    retried submit gets the job the first attempt created."""
    params = dict(params or {})
    if dataset is not None:
        params["dataset"] = dataset
    fields = {"model_id": model_id, "params": json.dumps(params)}
    if callback_url:
        fields["callback_url"] = callback_url
    return Call(
        "POST",
        f"/v1/jobs/{seg(kind)}",
        _job,
        params={"wait": wait} if wait else None,
        # The fields as file-less parts: a job without images is still multipart (httpx would
        # send fields alone urlencoded, which the API does not read).
        files=[*form_fields(fields), *image_parts(images), *file_parts(files)],
        headers={"Idempotency-Key": idempotency_key or uuid.uuid4().hex},
    )


def form_fields(fields: Mapping[str, str]) -> list[tuple[str, tuple[None, str]]]:
    return [(name, (None, value)) for name, value in fields.items()]


def job(job_id: str) -> Call[JobView]:
    return Call("GET", f"/v1/jobs/{seg(job_id)}", _job)


def cancel(job_id: str) -> Call[JobView]:
    return Call("DELETE", f"/v1/jobs/{seg(job_id)}", _job)


def artifact_path(job_id: str, name: str) -> str:
    return f"/v1/jobs/{seg(job_id)}/artifacts/{seg(name)}"


def artifact(job_id: str, name: str) -> Call[bytes]:
    return Call("GET", artifact_path(job_id, name), lambda r: r.content)


def archive(job_id: str) -> Call[bytes]:
    return Call("GET", f"/v1/jobs/{seg(job_id)}/download", lambda r: r.content)


def events_path(job_id: str) -> str:
    return f"/v1/jobs/{seg(job_id)}/events"


# --- retries -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of 429 and 503 answers and of failed connections, with exponential backoff
    (``backoff * 2**attempt``, jittered) or, when the answer says, its ``Retry-After``. An
    answer asking to wait longer than ``max_wait`` seconds is raised at once instead."""

    retries: int = 4
    backoff: float = 0.5
    max_wait: float = 60.0

    def delay(self, attempt: int, response: httpx.Response | None) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``; None: do not retry."""
        if attempt >= self.retries:
            return None
        if response is not None and response.status_code not in RETRY_STATUSES:
            return None
        after = errors.retry_after(response) if response is not None else None
        if after is not None:
            return after if after <= self.max_wait else None
        return min(self.max_wait, self.backoff * 2**attempt * random.uniform(0.5, 1.0))


def retry_after_error(call: Call[Any], policy: RetryPolicy, attempt: int, url: str, error: Exception) -> float:
    """Seconds to wait after attempt ``attempt`` of ``call`` could not reach the API; raises
    :class:`~model_inspector.errors.TransportError` when it is not retried."""
    delay = policy.delay(attempt, None)
    if delay is None:
        raise errors.TransportError(f"{call.method} {url}{call.path}: {error}") from error
    log.warning("%s %s: %s: %s; retrying in %.2f s", call.method, call.path, type(error).__name__, error, delay)
    return delay


def retry_after_answer(call: Call[Any], policy: RetryPolicy, attempt: int, response: httpx.Response) -> float | None:
    """Seconds to wait after attempt ``attempt`` of ``call`` got ``response``; None: it is the answer."""
    delay = policy.delay(attempt, response) if response.status_code >= 400 else None
    if delay is not None and call.final and errors.from_response(response).type in call.final:
        return None
    if delay is not None:
        log.warning("%s %s: %s; retrying in %.2f s", call.method, call.path, response.status_code, delay)
    return delay


def check(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        raise errors.from_response(response)
    return response


# --- Server-Sent Events and progress ---------------------------------------------------------


@dataclass
class SSEParser:
    """Incremental ``text/event-stream`` parser (the WHATWG rules we need): ``feed`` one line
    at a time; a blank line ends an event, ``:`` lines are comments (the API's pings)."""

    event: str = ""
    data: list[str] = field(default_factory=list)

    def feed(self, line: str) -> tuple[str, str] | None:
        line = line.rstrip("\r\n")
        if not line:
            if not self.data and not self.event:
                return None
            out = (self.event or "message", "\n".join(self.data))
            self.event, self.data = "", []
            return out
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            self.event = value
        elif name == "data":
            self.data.append(value)
        return None


@dataclass(frozen=True)
class Update:
    """What a progress callback receives: the job's status and progress (``done`` of
    ``total`` in the kind's unit: images, configurations, chunks...)."""

    job_id: str
    status: str
    done: int
    total: int
    stage: str


class Reporter:
    """Sends updates to ``progress``: a callable (called with :class:`Update` on each change),
    a tqdm bar (its total, count and description are set), a tqdm class (e.g.
    ``tqdm.notebook.tqdm``: a bar of that class is made and closed), True (a tqdm bar on
    stderr), or None."""

    def __init__(self, progress: Any) -> None:
        self.own = progress is True or isinstance(progress, type)
        if progress is True:
            from tqdm import tqdm

            progress = tqdm
        if self.own:
            progress = progress(total=1, unit="step")
        self.target = progress
        self.last: Update | None = None

    def __call__(self, job_id: str, status: str, p: Progress) -> None:
        update = Update(job_id, str(status), p.done, p.total, p.stage)
        if self.target is None or update == self.last:
            return
        self.last = update
        if hasattr(self.target, "refresh") and hasattr(self.target, "set_description"):  # tqdm
            bar = self.target
            bar.total = max(update.total, 1)
            bar.n = min(update.done, bar.total)
            bar.set_description(f"{update.status}: {update.stage}", refresh=False)
            bar.refresh()
        else:
            self.target(update)

    def close(self) -> None:
        if self.own:
            self.target.close()


def on_event(event: str, data: str, reporter: Reporter) -> JobView | None:
    """An SSE event of ``/v1/jobs/{id}/events``: progress is reported; ``end`` returns the
    terminal job."""
    if event == "end":
        return JobView.model_validate_json(data)
    if event == "progress":
        body = json.loads(data)
        reporter(body["id"], body["status"], Progress.model_validate(body["progress"]))
    return None


def read_timeout(deadline: float | None) -> float:
    """Read timeout of the SSE stream: a silent stream is dead after SSE_READ_S, and a wait
    ends at its deadline."""
    return SSE_READ_S if deadline is None else max(0.01, min(SSE_READ_S, deadline - time.monotonic()))


def check_deadline(deadline: float | None, job_id: str) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise errors.WaitTimeout(f"job {job_id} did not end in time")


def sse_unusable(response: httpx.Response) -> bool:
    """An events answer the client cannot follow (a proxy's error, no stream): poll instead.
    Errors that polling would meet too (unknown job, bad key) are raised by the caller."""
    ctype = response.headers.get("content-type", "")
    return response.status_code != 200 or not ctype.startswith("text/event-stream")


def sse_error(response: httpx.Response) -> errors.APIError | None:
    """The error to raise for an events answer, None when polling should take over."""
    if response.status_code in (401, 404):
        return errors.from_response(response)
    return None


def local_name(name: str) -> str:
    """An artifact's name as a file name in a download folder (never a path out of it)."""
    base = PurePosixPath(name.replace("\\", "/")).name
    if base in ("", ".", "..") or base != name:
        raise errors.InspectorError(f"refusing to write an artifact named {name!r}")
    return base


class JobState:
    """What a job handle knows without asking: its last view (``schemas.jobs.JobView``)."""

    def __init__(self, view: JobView) -> None:
        self.view = view

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} {self.view.kind} {self.status}>"

    @property
    def id(self) -> str:
        return self.view.id

    @property
    def status(self) -> str:
        return str(self.view.status)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    @property
    def result(self) -> dict[str, Any] | None:
        """The summary JSON of a finished job."""
        return self.view.result

    @property
    def artifacts(self) -> list[str]:
        return [a.name for a in self.view.artifacts]
