"""RQ entry points: the thin layer between Redis jobs and the kind modules.

``run_job`` (every explanation kind) and ``predict`` (synchronous, on the ``high`` queue)
take JSON payloads (RQ's JSONSerializer; never pickles) and return JSON. Inputs and
artifacts are read from and written to Redis (``schemas.keys``); progress and errors go to
the job's meta.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch
from pydantic import BaseModel, ValidationError
from redis import Redis
from rq import Queue, get_current_job
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException

from schemas import keys
from schemas.datasets import dataset_path_of
from schemas.errors import BadParams, InspectorError, JobFailure
from schemas.jobs import ClassScore, JobPayload, Prediction, PredictResponse
from schemas.kinds import KINDS
from schemas.settings import get_settings
from workers.budget import MEMORY
from workers.explain.base import Artifact, Inputs, JobCanceled, KindResult, LoadedModel
from workers.fanout import ChunkBoard, work_through
from workers.outage import REDIS_DOWN, through_outage
from workers.pipeline import JobContext, decode, execute, forward_in_chunks, kind_module, load_inputs, with_regions
from workers.registry import ModelCache, preprocess

log = logging.getLogger(__name__)
MAX_HELPERS = 16  # helper jobs a chunked job enqueues; each exits at once when nothing is left
_models: ModelCache | None = None


def model_cache() -> ModelCache:
    """The process-wide model cache (models stay loaded between jobs: workers do not fork)."""
    global _models
    if _models is None:
        _models = ModelCache.from_settings(get_settings())
    return _models


class RedisProgress:
    """Progress callback writing ``{done, total, stage}`` to the job's meta (at most every
    ``interval`` seconds, always on a new stage) and raising ``JobCanceled`` on cancel.
    Best effort: while Redis is unreachable reports are skipped and the job goes on."""

    def __init__(self, job: Job, interval: float = 0.25) -> None:
        self.job, self.interval = job, interval
        self._last, self._stage = 0.0, ""

    def __call__(self, done: int, total: int, stage: str) -> None:
        now = time.monotonic()
        if stage == self._stage and now - self._last < self.interval and done < total:
            return
        self._last, self._stage = now, stage
        try:
            canceled = self.job.connection.exists(keys.cancel_key(self.job.id))
            if not canceled:
                self.job.meta["progress"] = {"done": done, "total": total, "stage": stage}
                self.job.save_meta()
        except REDIS_DOWN as e:
            log.warning("job %s: progress %d/%d (%s) not reported: %s", self.job.id, done, total, stage, e)
            return
        if canceled:
            raise JobCanceled(self.job.id)


def fetch_inputs(conn: Redis, ids: list[str]) -> list[bytes]:
    """The stored uploads with these sha256 ids (``schemas.keys.input_key``), in order."""
    if not ids:
        return []
    data = conn.mget([keys.input_key(i) for i in ids])
    if any(d is None for d in data):
        raise JobFailure("the job's uploads expired before it ran", type="input_expired")
    return cast(list[bytes], data)


def _store(job: Job, kind: str, artifacts: list[Artifact], ttl: int) -> None:
    with job.connection.pipeline() as pipe:
        for a in artifacts:
            if a.path is None:  # files on the data volume stay there
                pipe.set(keys.artifact_key(job.id, a.name), a.data, ex=ttl)
        pipe.execute()
    # A kind that counts its own units (PROGRESS_UNIT, e.g. images) ends at all of them done.
    counted = hasattr(kind_module(kind), "PROGRESS_UNIT")
    total = int((job.meta.get("progress") or {}).get("total") or 0) if counted else 0
    job.meta["progress"] = {"done": total or 1, "total": total or 1, "stage": "done"}
    job.save_meta()


def _fail(job: Job, error: InspectorError | JobCanceled | Exception, kind: str, status: str, seconds: float) -> None:
    """Record the job's error in its meta and count it (``status``: failed or canceled)."""
    if isinstance(error, InspectorError):
        body = {"type": error.type, "message": error.message, "details": error.details}
    elif isinstance(error, JobCanceled):
        body = {"type": "canceled", "message": "the job was canceled", "details": None}
    elif isinstance(error, JobTimeoutException):  # raised into the job by RQ's death penalty
        body = {"type": "timeout", "message": f"the job exceeded its time limit ({job.timeout} s)", "details": None}
    else:
        body = {"type": "internal", "message": f"{type(error).__name__}: {error}", "details": None}
    job.meta["error"] = body
    job.save_meta()
    _count(job.connection, kind, status, seconds)


def _count(conn: Redis, kind: str, status: str, seconds: float) -> None:
    with conn.pipeline() as p:
        p.hincrby(keys.STATS_KEY, f"jobs:{kind}:{status}", 1)
        p.hincrbyfloat(keys.STATS_KEY, f"seconds:{kind}", seconds)
        p.execute()


def _prepare(conn: Redis, p: JobPayload, job_id: str) -> tuple[BaseModel, list[bytes], JobContext]:
    """Validated params, input images and context of a job payload."""
    settings = get_settings()
    spec = KINDS.get(p.kind)
    if spec is None:
        raise BadParams(f"unknown job kind {p.kind!r}")
    try:
        params = spec.params.model_validate(p.params)
    except ValidationError as e:
        raise BadParams("invalid params", details=json.loads(e.json(include_url=False))) from None
    pngs = fetch_inputs(conn, p.inputs)
    files = dict(zip(p.files, fetch_inputs(conn, list(p.files.values())), strict=True))
    datasets = {i: settings.data_dir / dataset_path_of(sha) for i, sha in p.datasets.items()}
    context = JobContext(
        settings.cache_dir,
        settings.models_dir,
        files,
        job_id=job_id,
        data_dir=settings.data_dir,
        datasets=datasets,
        other_models=p.other_models,
    )
    return params, pngs, context


def _board(conn: Redis, job_id: str, n_chunks: int) -> ChunkBoard:
    s = get_settings()
    return ChunkBoard(conn, job_id, n_chunks, lease_s=2 * s.worker_lost_after_s, ttl_s=s.result_ttl_s)


def _chunk_runner(
    module: Any, model: LoadedModel, inputs: Inputs, params: BaseModel, chunks: list[dict[str, Any]],
    context: JobContext, check: Callable[[], None],
) -> Callable[[int, Callable[[], None]], dict[str, Any]]:
    def compute(i: int, renew: Callable[[], None]) -> dict[str, Any]:
        def progress(done: int, total: int, stage: str) -> None:
            renew()
            check()

        return module.run_chunk(model, inputs, params, chunks[i], progress, context)

    return compute


def _run_chunked(
    job: Job, p: JobPayload, params: BaseModel, pngs: list[bytes], context: JobContext, progress: RedisProgress
) -> KindResult:
    """A kind with ``plan``/``run_chunk``/``aggregate``: share its chunks with idle workers
    (``workers.fanout``) and aggregate their results."""
    module = kind_module(p.kind)
    model = model_cache().get(p.model_id, p.model_version)
    inputs = load_inputs(model, pngs, params)
    chunks = module.plan(model, inputs, params, context)
    board = _board(job.connection, job.id, len(chunks))
    todo = board.start(json.dumps(chunks, sort_keys=True))
    q = Queue(job.origin, connection=job.connection, serializer=JSONSerializer)
    for _ in range(min(todo - 1, MAX_HELPERS)):
        q.enqueue(keys.HELP_JOB_FUNC, {"parent": job.id, **p.model_dump()}, job_timeout=job.timeout,
                  result_ttl=60, failure_ttl=get_settings().result_ttl_s)  # fmt: skip

    # Progress in the kind's unit (e.g. images) when it says how many a chunk holds, else chunks.
    units = [module.chunk_units(c) for c in chunks] if hasattr(module, "chunk_units") else [1] * len(chunks)
    unit = getattr(module, "PROGRESS_UNIT", "chunks")

    def report() -> None:
        progress(sum(units[i] for i in board.done_ids()), sum(units), unit)

    report()
    work_through(board, _chunk_runner(module, model, inputs, params, chunks, context, report), report)
    progress(sum(units), sum(units), "aggregating")
    return with_regions(module.aggregate(model, inputs, params, board.results(), context), inputs)


def help_job(payload: dict[str, Any]) -> dict[str, Any]:
    """Take chunks of a parent job (``payload["parent"]``) until none is left."""
    job = get_current_job()
    assert job is not None
    conn: Redis = job.connection
    parent = payload.pop("parent")
    p = JobPayload.model_validate(payload)
    params, pngs, context = _prepare(conn, p, parent)
    module = kind_module(p.kind)
    model = model_cache().get(p.model_id, p.model_version)
    inputs = load_inputs(model, pngs, params)
    chunks = module.plan(model, inputs, params, context)
    board = _board(conn, parent, len(chunks))
    n = 0

    def check() -> None:
        if conn.exists(keys.cancel_key(parent)):
            raise JobCanceled(parent)

    def counted() -> None:
        nonlocal n
        n += 1

    work_through(board, _chunk_runner(module, model, inputs, params, chunks, context, check), counted,
                 wait_for_others=False)  # fmt: skip
    return {"parent": parent, "chunks_done": n}


def run_job(payload: dict[str, Any]) -> dict[str, Any]:
    """Run one explanation job; returns ``{"summary": {...}, "artifacts": [{name, media_type, size}]}``."""
    job = get_current_job()
    assert job is not None, "run_job runs inside an RQ job"
    conn: Redis = job.connection
    settings = get_settings()
    t0 = time.perf_counter()
    p = JobPayload.model_validate(payload)
    outage_s = settings.redis_outage_s
    try:
        params, pngs, context = through_outage(lambda: _prepare(conn, p, job.id), outage_s, f"job {job.id} inputs")
        progress = RedisProgress(job)
        with MEMORY.applied(int(job.meta.get("memory_mb") or 0)):
            _note_cold_start(job, model_cache().get_timed(p.model_id, p.model_version)[1])
            if hasattr(kind_module(p.kind), "run_chunk"):
                result = _run_chunked(job, p, params, pngs, context, progress)
            else:
                result = execute(model_cache(), p.kind, p.model_id, p.model_version, pngs, params, progress, context)
        store = partial(_store, job, p.kind, result.artifacts, settings.result_ttl_s)
        through_outage(store, outage_s, f"job {job.id} result")
    except Exception as e:
        if not isinstance(e, InspectorError | JobCanceled):
            log.exception("job %s (%s) failed", job.id, p.kind)
        status = "canceled" if isinstance(e, JobCanceled) else "failed"
        fail = partial(_fail, job, e, p.kind, status, time.perf_counter() - t0)
        through_outage(fail, 0 if isinstance(e, REDIS_DOWN) else outage_s, f"job {job.id} error")
        raise
    count = partial(_count, conn, p.kind, "finished", time.perf_counter() - t0)
    through_outage(count, outage_s, f"job {job.id} count")
    return {"summary": result.summary, "artifacts": [_link(a, settings.data_dir) for a in result.artifacts]}


def _link(a: Artifact, data_dir: Path) -> dict[str, Any]:
    """An artifact as the job's result lists it; ``file``: its path under ``data_dir``."""
    link: dict[str, Any] = {"name": a.name, "media_type": a.media_type, "size": a.size}
    if a.path is not None:
        link["file"] = a.path.relative_to(data_dir).as_posix()
    return link


def _note_cold_start(job: Job, seconds: float) -> None:
    """``meta.cold_start_s``: the job waited this long for its model to load and warm."""
    if seconds > 0.05:
        job.meta["cold_start_s"] = round(seconds, 3)
        job.save_meta()


def predict_images(model_id: str, pngs: list[bytes], top_k: int) -> PredictResponse:
    """Top-k classes of each image (PNG bytes), through the model's fast forward engine."""
    t0 = time.perf_counter()
    model = model_cache().get(model_id)
    x, _ = preprocess([decode(b) for b in pngs], model.manifest.preprocessing)
    probs = forward_in_chunks(model, x.to(model.device)).softmax(1)
    return PredictResponse(
        model_id=model_id,
        model_version=model.version,
        predictions=top_predictions(probs, model.manifest.labels, top_k),
        runtime_ms=(time.perf_counter() - t0) * 1000,
        batch_size=len(pngs),
    )


def top_predictions(probs: torch.Tensor, labels: list[str], top_k: int) -> list[Prediction]:
    """The ``top_k`` classes of each row of ``probs`` ``(N, K)``."""
    values, indices = probs.topk(min(top_k, probs.shape[1]), dim=1)
    return [
        Prediction(
            top=[
                ClassScore(index=int(i), label=labels[int(i)], probability=float(v))
                for v, i in zip(vals, idxs, strict=True)
            ]
        )
        for vals, idxs in zip(values.cpu(), indices.cpu(), strict=True)
    ]
