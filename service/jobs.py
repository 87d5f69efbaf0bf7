"""Submitting, reading and canceling jobs (the API side of the RQ job machinery).

Job ids are content hashes of (kind, model version, input image hashes, canonical params):
an identical submission finds the same job, and a finished result is reused. A failed or
canceled job is replaced by a fresh run of the same id.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from typing import Any

from pydantic import BaseModel, ValidationError
from redis import Redis
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.job import JobStatus as RQStatus
from rq.serializers import JSONSerializer

from schemas import keys
from schemas.errors import BadParams, ErrorBody, InspectorError, NoWorker, UnknownJob
from schemas.jobs import ArtifactLink, JobPayload, JobStatus, JobView, PredictResponse, Progress
from schemas.kinds import KINDS, KindSpec
from schemas.manifests import ModelEntry
from schemas.settings import Settings
from service.deps import queue
from service.images import DecodedImage

_STATUS = {
    RQStatus.QUEUED: JobStatus.queued,
    RQStatus.DEFERRED: JobStatus.queued,
    RQStatus.SCHEDULED: JobStatus.queued,
    RQStatus.STARTED: JobStatus.started,
    RQStatus.FINISHED: JobStatus.finished,
    RQStatus.FAILED: JobStatus.failed,
    RQStatus.STOPPED: JobStatus.canceled,
    RQStatus.CANCELED: JobStatus.canceled,
}


def validate_params(spec: KindSpec, params: dict[str, Any]) -> BaseModel:
    try:
        return spec.params.model_validate(params)
    except ValidationError as e:
        raise BadParams(f"invalid params for {spec.name!r}", details=json.loads(e.json(include_url=False))) from None


def check_request(spec: KindSpec, entry: ModelEntry, params: BaseModel, n_images: int, settings: Settings) -> None:
    """Checks that need the model's manifest but no torch (before anything is queued)."""
    limit = settings.max_images_per_request if spec.max_images is None else spec.max_images
    if not spec.min_images <= n_images <= limit:
        raise BadParams(f"{spec.name!r} takes {spec.min_images} to {limit} images; got {n_images}")
    n_classes = len(entry.manifest.labels)
    target = getattr(params, "target", None)
    targets = [] if target is None else [target] if isinstance(target, int) else target
    if target is not None and not isinstance(target, int) and len(targets) != n_images:
        raise BadParams(f"target has {len(targets)} entries for {n_images} images")
    for t in targets:
        if not 0 <= t < n_classes:
            raise BadParams(f"target {t} is out of range: {entry.manifest.id!r} has {n_classes} classes")
    check = getattr(spec.params, "check_model", None)
    if check is not None:
        check(params, entry.manifest)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def job_id_for(
    kind: str, entry: ModelEntry, images: list[DecodedImage], params: BaseModel, files: dict[str, bytes]
) -> str:
    canonical = json.dumps(
        {
            "kind": kind,
            "model": entry.manifest.id,
            "version": entry.version,
            "inputs": [i.sha256 for i in images],
            "files": {name: _sha(data) for name, data in files.items()},
            "params": params.model_dump(mode="json"),
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def store_inputs(
    conn: Redis, images: list[DecodedImage], ttl: int, files: dict[str, bytes] | None = None
) -> tuple[list[str], dict[str, str]]:
    """Store normalised images and extra uploads under their sha256; returns their ids."""
    file_ids = {name: _sha(data) for name, data in (files or {}).items()}
    with conn.pipeline() as pipe:
        for img in images:
            pipe.set(keys.input_key(img.sha256), img.png, ex=ttl)
        for name, data in (files or {}).items():
            pipe.set(keys.input_key(file_ids[name]), data, ex=ttl)
        pipe.execute()
    return [img.sha256 for img in images], file_ids


def fetch(conn: Redis, job_id: str) -> Job:
    try:
        return Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
    except NoSuchJobError:
        raise UnknownJob(f"no job {job_id!r}") from None


def submit(
    conn: Redis,
    settings: Settings,
    kind: str,
    entry: ModelEntry,
    images: list[DecodedImage],
    params: BaseModel,
    files: dict[str, bytes] | None = None,
) -> tuple[Job, bool]:
    """Enqueue (or find) the job; returns it and whether an earlier identical job was reused."""
    spec = KINDS[kind]
    files = files or {}
    job_id = job_id_for(kind, entry, images, params, files)
    # One submitter at a time per id, so two identical requests cannot both enqueue.
    with conn.lock(keys.submit_lock_key(job_id), timeout=10, blocking_timeout=5):
        try:
            job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
            if job.get_status() not in (RQStatus.FAILED, RQStatus.CANCELED, RQStatus.STOPPED):
                return job, True
            job.delete(delete_dependents=True)
        except NoSuchJobError:
            pass
        conn.delete(keys.cancel_key(job_id))
        inputs, file_ids = store_inputs(conn, images, settings.result_ttl_s + settings.job_timeout_s, files)
        payload = JobPayload(
            kind=kind,
            model_id=entry.manifest.id,
            model_version=entry.version,
            inputs=inputs,
            files=file_ids,
            params=params.model_dump(mode="json"),
        )
        job = queue(spec.queue, conn).enqueue(
            keys.RUN_JOB_FUNC,
            payload.model_dump(mode="json"),
            job_id=job_id,
            job_timeout=settings.job_timeout_s,
            result_ttl=settings.result_ttl_s,
            failure_ttl=settings.result_ttl_s,
            meta={"kind": kind, "model_id": entry.manifest.id, "progress": Progress().model_dump()},
            description=f"{kind} on {entry.manifest.id}",
        )
    return job, False


def _error(job: Job, status: JobStatus) -> ErrorBody | None:
    if status not in (JobStatus.failed, JobStatus.canceled):
        return None
    if "error" in job.meta:
        return ErrorBody.model_validate(job.meta["error"])
    if status is JobStatus.canceled:
        return ErrorBody(type="canceled", message="the job was canceled")
    result = job.latest_result()
    exc = (result.exc_string or "") if result is not None else ""
    if "AbandonedJobError" in exc:
        return ErrorBody(type="worker_lost", message="the worker running this job stopped (killed or crashed)")
    if "JobTimeoutException" in exc:
        return ErrorBody(type="timeout", message="the job exceeded its time limit")
    return ErrorBody(type="job_failed", message=exc.strip().splitlines()[-1] if exc else "the job failed")


def status_of(job: Job, conn: Redis) -> JobStatus:
    rq_status = job.get_status(refresh=True)
    if rq_status == RQStatus.STARTED:
        # Lets RQ fail the job now if its worker stopped heartbeating (see workers.worker).
        job.started_job_registry.cleanup()
        rq_status = job.get_status(refresh=True)
    status = _STATUS.get(rq_status, JobStatus.queued) if rq_status else JobStatus.failed
    if status is JobStatus.failed and job.meta.get("error", {}).get("type") == "canceled":
        status = JobStatus.canceled
    return status


def view(job: Job, conn: Redis, base_url: str = "", deduplicated: bool = False) -> JobView:
    status = status_of(job, conn)
    job.refresh()
    payload = job.args[0] if job.args else {}
    result: dict[str, Any] | None = None
    artifacts: list[ArtifactLink] = []
    if status is JobStatus.finished:
        value = job.return_value() or {}
        result = value.get("summary")
        artifacts = [
            ArtifactLink(
                name=a["name"],
                url=f"{base_url}/v1/jobs/{job.id}/artifacts/{a['name']}",
                media_type=a["media_type"],
                size=a["size"],
            )
            for a in value.get("artifacts", [])
        ]
    return JobView(
        id=job.id,
        kind=payload.get("kind", job.meta.get("kind", "?")),
        model_id=payload.get("model_id", job.meta.get("model_id", "?")),
        status=status,
        progress=Progress.model_validate(job.meta.get("progress") or {}),
        params=payload.get("params", {}),
        created_at=job.created_at,
        started_at=job.started_at,
        ended_at=job.ended_at,
        error=_error(job, status),
        result=result,
        artifacts=artifacts,
        deduplicated=deduplicated,
    )


def cancel(conn: Redis, job: Job) -> None:
    """Cancel a queued job now; ask a running one to stop at its next progress report."""
    status = job.get_status(refresh=True)
    if status in (RQStatus.QUEUED, RQStatus.DEFERRED, RQStatus.SCHEDULED):
        job.cancel()
        job.meta["error"] = {"type": "canceled", "message": "canceled before it started", "details": None}
        job.save_meta()
    elif status == RQStatus.STARTED:
        conn.set(keys.cancel_key(job.id), 1, ex=3600)


def artifact(conn: Redis, job: Job, name: str) -> tuple[bytes, str] | None:
    value = job.return_value() if job.get_status() == RQStatus.FINISHED else None
    for a in (value or {}).get("artifacts", []):
        if a["name"] == name:
            data = conn.get(keys.artifact_key(job.id, name))
            return (data, a["media_type"]) if data is not None else None
    return None


def predict(
    conn: Redis, settings: Settings, entry: ModelEntry, images: list[DecodedImage], top_k: int
) -> PredictResponse:
    """Run a predict on the ``high`` queue and wait (bounded) for the worker's reply."""
    job_id = uuid.uuid4().hex
    inputs, _ = store_inputs(conn, images, int(settings.predict_timeout_s) + 60)
    queue("high", conn).enqueue(
        keys.PREDICT_FUNC,
        {"model_id": entry.manifest.id, "inputs": inputs, "top_k": top_k},
        job_id=job_id,
        job_timeout=int(settings.predict_timeout_s) + 5,
        result_ttl=settings.predict_result_ttl_s,
        failure_ttl=settings.predict_result_ttl_s,
        ttl=int(settings.predict_timeout_s) + 1,  # not started in time: dropped from the queue
    )
    deadline = time.monotonic() + settings.predict_timeout_s
    reply = None
    while reply is None and time.monotonic() < deadline:
        # Short BLPOPs keep each Redis call under the socket timeout.
        wait = max(0.01, min(settings.redis_timeout_s * 0.6, deadline - time.monotonic()))
        reply = conn.blpop([keys.reply_key(job_id)], timeout=wait)
    if reply is None:
        raise NoWorker(f"no worker answered within {settings.predict_timeout_s:g} s; are workers running?")
    data = json.loads(reply[1])
    if "error" in data:
        err = data["error"]
        exc = InspectorError(err["message"], err.get("details"))
        exc.type, exc.status = err["type"], int(err.get("status", 500))
        raise exc
    return PredictResponse.model_validate(data)
