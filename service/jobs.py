"""Submitting, reading and canceling jobs (the API side of the RQ job machinery).

Job ids are content hashes of (tenant, kind, model version, input image hashes, canonical
params): an identical submission by the same tenant finds the same job, and a finished
result is reused. A failed or canceled job is replaced by a fresh run of the same id
(unless the retried request carries the same ``Idempotency-Key``: then it gets the same
job back, whatever its status). Jobs, their inputs and artifacts belong to their tenant:
another tenant's job id reads as unknown (404), exactly like a missing one.

Every job carries RQ callbacks (``workers.webhooks.on_success``/``on_failure``, by dotted
path) that decide whether a failure is retried (``job_retries``) and notify its
``callback_url``s when it ends.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, cast

from pydantic import BaseModel, ValidationError
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from rq import Callback, Retry
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.job import JobStatus as RQStatus
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from schemas import keys
from schemas.errors import BadParams, ErrorBody, IdempotencyKeyReused, InspectorError, NoWorker, UnknownJob
from schemas.jobs import ArtifactLink, JobPayload, JobStatus, JobView, PredictResponse, Progress
from schemas.kinds import KINDS, KindSpec, budgets
from schemas.manifests import ModelEntry
from schemas.settings import Settings
from schemas.training_zip import UPLOAD_NAME, check_training_zip
from service.auth import ANONYMOUS
from service.deps import queue
from service.images import DecodedImage
from service.ratelimit import reserve_job_slot

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
    check_images = getattr(spec.params, "check_images", None)  # e.g. a data set that needs uploads
    if check_images is not None:
        check_images(params, n_images)


def check_uploads(spec: KindSpec, entry: ModelEntry, files: dict[str, bytes], settings: Settings) -> None:
    """Extra uploads whose structure can be checked without torch: a ``training_set`` zip
    (``schemas.training_zip``: the worker runs the same check again)."""
    data = files.get(UPLOAD_NAME) if UPLOAD_NAME in spec.files else None
    if data is not None:
        check_training_zip(
            data, entry.manifest.labels, settings.max_training_set_images, settings.max_training_set_uncompressed_bytes
        )


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def scoped_id(tenant: str, sha256: str) -> str:
    """Id under which a tenant's upload is stored: two tenants never share an input key."""
    return _sha(f"{tenant}:{sha256}".encode())


def job_id_for(
    kind: str,
    entry: ModelEntry,
    images: list[DecodedImage],
    params: BaseModel,
    files: dict[str, bytes],
    tenant: str = ANONYMOUS,
) -> str:
    canonical = json.dumps(
        {
            "tenant": tenant,
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
    conn: Redis,
    images: list[DecodedImage],
    ttl: int,
    files: dict[str, bytes] | None = None,
    tenant: str = ANONYMOUS,
) -> tuple[list[str], dict[str, str]]:
    """Store normalised images and extra uploads under tenant-scoped ids; returns the ids."""
    image_ids = [scoped_id(tenant, img.sha256) for img in images]
    file_ids = {name: scoped_id(tenant, _sha(data)) for name, data in (files or {}).items()}
    with conn.pipeline() as pipe:
        for img, i in zip(images, image_ids, strict=True):
            pipe.set(keys.input_key(i), img.data, ex=ttl)
        for name, data in (files or {}).items():
            pipe.set(keys.input_key(file_ids[name]), data, ex=ttl)
        pipe.execute()
    return image_ids, file_ids


def tenant_of(job: Job) -> str:
    return job.meta.get("tenant", ANONYMOUS)


def fetch(conn: Redis, job_id: str, tenant: str | None = None) -> Job:
    """The job, if it exists and (when ``tenant`` is given) belongs to that tenant: another
    tenant's job is reported exactly like a missing one."""
    try:
        job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
    except (NoSuchJobError, ValueError):  # ValueError: not even a valid RQ job id
        job = None
    if job is None or (tenant is not None and tenant_of(job) != tenant):
        raise UnknownJob(f"no job {job_id!r}")
    return job


@dataclass(frozen=True)
class SubmitOptions:
    """Who submits, and what they ask for besides the job's content."""

    tenant: str = ANONYMOUS
    max_unfinished: int = 0  # the tenant's queue quota; 0 = none
    callback_url: str | None = None
    idempotency_key: str | None = None


def _retry_waits(settings: Settings) -> list[int]:
    """Seconds before each rerun (RQ repeats the last interval)."""
    backoff = settings.job_retry_backoff_s or [0]
    return [backoff[min(i, len(backoff) - 1)] for i in range(settings.job_retries)]


def _idempotent_job(conn: Redis, options: SubmitOptions, job_id: str) -> Job | None:
    """The job an earlier request with the same Idempotency-Key got, if it still exists."""
    if not options.idempotency_key:
        return None
    prior = conn.get(keys.idempotency_key(options.tenant, _sha(options.idempotency_key.encode())))
    if prior is None:
        return None
    prior_id = prior.decode() if isinstance(prior, bytes) else str(prior)
    if prior_id != job_id:
        raise IdempotencyKeyReused(
            "this Idempotency-Key was already used for a different request", details={"job_id": prior_id}
        )
    try:
        return Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
    except NoSuchJobError:
        return None


def add_callback(conn: Redis, settings: Settings, job_id: str, url: str) -> None:
    """Register ``url`` to be notified when the job ends. Atomic with the worker's claim of
    the callbacks (``workers.webhooks.job_ended``): either the worker sees the URL, or we
    see that the job already ended and have it notified now."""
    with conn.pipeline(transaction=True) as pipe:
        pipe.sadd(keys.callbacks_key(job_id), url)
        pipe.expire(keys.callbacks_key(job_id), 2 * settings.result_ttl_s)
        pipe.exists(keys.ended_key(job_id))
        added, _, ended = pipe.execute()
    if added and ended:
        queue("high", conn).enqueue(
            keys.JOB_ENDED_FUNC, {"job_id": job_id, "urls": [url]}, result_ttl=60, failure_ttl=settings.result_ttl_s
        )


def submit(
    conn: Redis,
    settings: Settings,
    kind: str,
    entry: ModelEntry,
    images: list[DecodedImage],
    params: BaseModel,
    files: dict[str, bytes] | None = None,
    options: SubmitOptions | None = None,
) -> tuple[Job, bool]:
    """Enqueue (or find) the job; returns it and whether an earlier job was reused."""
    files = files or {}
    options = options or SubmitOptions()
    job_id = job_id_for(kind, entry, images, params, files, options.tenant)
    job = _idempotent_job(conn, options, job_id)
    reused = job is not None
    if job is None:
        job, reused = _find_or_enqueue(conn, settings, kind, entry, images, params, files, options, job_id)
    if options.idempotency_key:
        ikey = keys.idempotency_key(options.tenant, _sha(options.idempotency_key.encode()))
        conn.set(ikey, job_id, ex=settings.idempotency_ttl_s, nx=True)
    if options.callback_url:
        add_callback(conn, settings, job_id, options.callback_url)
    return job, reused


def _find_or_enqueue(
    conn: Redis,
    settings: Settings,
    kind: str,
    entry: ModelEntry,
    images: list[DecodedImage],
    params: BaseModel,
    files: dict[str, bytes],
    options: SubmitOptions,
    job_id: str,
) -> tuple[Job, bool]:
    spec = KINDS[kind]
    timeout, memory_mb = budgets(spec, settings)
    waits = _retry_waits(settings)
    # One submitter at a time per id, so two identical requests cannot both enqueue.
    with conn.lock(keys.submit_lock_key(job_id), timeout=10, blocking_timeout=5):
        try:
            job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
            if job.get_status() not in (RQStatus.FAILED, RQStatus.CANCELED, RQStatus.STOPPED):
                return job, True
            job.delete(delete_dependents=True)
        except NoSuchJobError:
            pass
        if options.max_unfinished:
            reserve_job_slot(conn, options.tenant, options.max_unfinished, job_id, time.time())
        conn.delete(keys.cancel_key(job_id), keys.callbacks_key(job_id), keys.ended_key(job_id))
        # Inputs outlive every attempt and the result.
        input_ttl = settings.result_ttl_s + timeout * (len(waits) + 1) + sum(waits)
        inputs, file_ids = store_inputs(conn, images, input_ttl, files, options.tenant)
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
            job_timeout=timeout,
            result_ttl=settings.result_ttl_s,
            failure_ttl=settings.result_ttl_s,
            retry=Retry(max=len(waits), interval=waits) if waits else None,
            on_success=Callback(keys.ON_SUCCESS_FUNC),
            on_failure=Callback(keys.ON_FAILURE_FUNC),
            meta={
                "kind": kind,
                "model_id": entry.manifest.id,
                "tenant": options.tenant,
                "memory_mb": memory_mb,  # the worker's watchdog enforces it (workers.budget)
                "progress": Progress().model_dump(),
            },
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


class _ReapedJob(Job):
    """A job as the API's reaper sees it: without its failure callback, which is worker code
    (``workers.webhooks``, not in the API image); a worker is asked to notify instead."""

    @property
    def failure_callback(self) -> None:  # type: ignore[override]
        return None


def reap_abandoned(conn: Redis, queue_name: str) -> None:
    """Let RQ fail (or rerun, with ``job_retries``) the started jobs of ``queue_name`` whose
    worker stopped heartbeating (see workers.worker), and have their end notified."""
    registry = StartedJobRegistry(queue_name, connection=conn, serializer=JSONSerializer, job_class=_ReapedJob)
    expired = registry.get_expired_job_ids()
    if not expired:
        return
    lock = conn.lock(keys.reap_lock_key(queue_name), timeout=30)
    if not lock.acquire(blocking=False):
        return  # a worker is reaping it right now
    try:
        registry.cleanup()
    finally:
        lock.release()
    for job_id in expired:
        if conn.hget(Job.key_for(job_id), "status") == RQStatus.FAILED.value.encode():
            queue("high", conn).enqueue(keys.JOB_ENDED_FUNC, {"job_id": job_id}, result_ttl=60)


def status_of(job: Job, conn: Redis) -> JobStatus:
    rq_status = job.get_status(refresh=True)
    if rq_status == RQStatus.STARTED:
        reap_abandoned(conn, job.origin)
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
        # No worker ran it, so no RQ callback fires: have a worker notify its callbacks.
        queue("high", conn).enqueue(keys.JOB_ENDED_FUNC, {"job_id": job.id}, result_ttl=60)
    elif status == RQStatus.STARTED:
        conn.set(keys.cancel_key(job.id), 1, ex=3600)


def artifact(conn: Redis, job: Job, name: str) -> tuple[bytes, str] | None:
    value = job.return_value() if job.get_status() == RQStatus.FINISHED else None
    for a in (value or {}).get("artifacts", []):
        if a["name"] == name:
            data = conn.get(keys.artifact_key(job.id, name))
            return (cast(bytes, data), a["media_type"]) if data is not None else None
    return None


async def predict(
    conn: AsyncRedis,
    settings: Settings,
    entry: ModelEntry,
    images: list[DecodedImage],
    top_k: int,
    tenant: str = ANONYMOUS,
) -> PredictResponse:
    """Queue a predict request on the model's list and wait (bounded) for the reply.

    Workers drain each model's list in batches (``workers.batching``): one request is one
    list entry, not an RQ job. A request nobody took before the deadline is taken back,
    so a worker that starts later does not compute it for nobody.
    """
    request_id = uuid.uuid4().hex
    ttl = int(settings.predict_timeout_s) + 60
    ids = [scoped_id(tenant, img.sha256) for img in images]
    item = json.dumps(
        {"id": request_id, "inputs": ids, "top_k": top_k, "deadline": time.time() + settings.predict_timeout_s}
    )
    queue_key = keys.predict_queue_key(entry.manifest.id)
    async with conn.pipeline(transaction=False) as pipe:
        for img, i in zip(images, ids, strict=True):
            pipe.set(keys.input_key(i), img.data, ex=ttl)
        pipe.rpush(queue_key, item)
        pipe.expire(queue_key, ttl)
        await pipe.execute()
    deadline = time.monotonic() + settings.predict_timeout_s
    reply = None
    while reply is None and time.monotonic() < deadline:
        # Short BLPOPs keep each Redis call under the socket timeout.
        wait = max(0.01, min(settings.redis_timeout_s * 0.6, deadline - time.monotonic()))
        reply = await conn.blpop([keys.reply_key(request_id)], timeout=wait)  # type: ignore[misc]
    if reply is None:
        await conn.lrem(queue_key, 1, item)  # type: ignore[misc]
        raise NoWorker(f"no worker answered within {settings.predict_timeout_s:g} s; are workers running?")
    data = json.loads(reply[1])
    if "error" in data:
        err = data["error"]
        exc = InspectorError(err["message"], err.get("details"))
        exc.type, exc.status = err["type"], int(err.get("status", 500))
        raise exc
    return PredictResponse.model_validate(data)
