"""Data sets on the API side: receive an upload (streamed to the data volume while hashed),
check it, store it content-addressed, list, read and delete a tenant's data sets, and the
references jobs take to them (``schemas.datasets`` is the contract).

Storage: ``<data_dir>/datasets/<sha256>.zip``, written by the API (a temporary file in
``<data_dir>/tmp`` renamed into place once checked), read by the workers; Redis keeps only
the metadata (``schemas.keys.dataset_key``). One zip serves every tenant that uploaded the
same bytes; it is removed with the last data set stored in it.

Quotas per tenant: ``max_datasets`` data sets and ``max_dataset_bytes`` stored bytes (an
upload bigger than the whole quota is a 413 while it arrives; one that would pass the
tenant's total a 429 ``quota_exceeded``, which deleting a data set clears).

A data set is not deleted while a queued or running job uses it (409 ``dataset_in_use``):
``reference`` records each job that names it, under the same per-tenant lock ``delete``
takes, so a job submitted during a delete either sees the data set gone (404) or keeps it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

from pydantic import BaseModel
from redis import Redis
from rq.job import Job
from rq.job import JobStatus as RQStatus
from rq.serializers import JSONSerializer
from starlette.datastructures import UploadFile
from starlette.requests import Request

from schemas import keys
from schemas.datasets import (
    DATASET_ID_PATTERN,
    UPLOAD_FIELD,
    DatasetDetail,
    DatasetInfo,
    DatasetParams,
    StoredDataset,
    ZipDataset,
    check_dataset_zip,
    class_index,
    dataset_path_of,
    dataset_refs,
    is_model_split,
    parse_model_split,
)
from schemas.errors import BadParams, DatasetInUse, PayloadTooLarge, QuotaExceeded, UnknownDataset, UnsupportedMedia
from schemas.manifests import ModelEntry, ModelRegistry
from schemas.settings import Settings
from schemas.training_zip import IMAGE_EXTENSIONS

BLOCK = 1 << 20
DIGITS_SPLITS = {"train": 1437, "test": 360}
"""Sizes of the built-in ``sklearn-digits`` splits (``workers.models.digits.load_split``)."""
QUOTA_RETRY_S = 60
ACTIVE = (RQStatus.QUEUED, RQStatus.STARTED, RQStatus.DEFERRED, RQStatus.SCHEDULED)


def dataset_id_for(tenant: str, sha256: str) -> str:
    """``ds_`` + 32 hex: the same bytes by the same tenant give the same id."""
    return "ds_" + hashlib.sha256(f"{tenant}:{sha256}".encode()).hexdigest()[:32]


class Received(BaseModel):
    """An upload written to a temporary file of the data volume."""

    path: Path
    sha256: str
    size: int
    name: str


def _name(text: str | None, fallback: str) -> str:
    name = (text or "").strip() or fallback
    name = re.sub(r"[\x00-\x1f]", "", name)[:200]
    return name.removesuffix(".zip") or fallback


class _Sink:
    """A temporary file in ``<data_dir>/tmp`` that hashes and counts what is written."""

    def __init__(self, settings: Settings) -> None:
        tmp = settings.data_dir / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="upload-", suffix=".zip", dir=tmp)
        self.file = os.fdopen(fd, "wb")
        self.path = Path(name)
        self.hash = hashlib.sha256()
        self.size = 0
        self.limit = settings.max_dataset_bytes

    def write(self, block: bytes) -> None:
        self.size += len(block)
        if self.size > self.limit:
            raise PayloadTooLarge(
                f"the data set upload is over the limit of {self.limit} bytes (max_dataset_bytes)",
                details={"limit": self.limit},
            )
        self.hash.update(block)
        self.file.write(block)

    def discard(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


async def receive(request: Request, settings: Settings, name: str | None) -> Received:
    """Stream the body (a raw ``application/zip`` body, or multipart with a ``file`` field and
    an optional ``name``) to a temporary file, hashing it; never held in memory."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > settings.max_dataset_bytes + BLOCK:
        raise PayloadTooLarge(
            f"the data set upload of {length} bytes is over the limit of {settings.max_dataset_bytes} bytes",
            details={"limit": settings.max_dataset_bytes},
        )
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    sink = _Sink(settings)
    try:
        if ctype in ("application/zip", "application/x-zip-compressed", "application/octet-stream"):
            async for block in _stream(request):
                sink.write(block)
            fallback = "dataset"
        elif ctype == "multipart/form-data":
            try:
                form = await request.form(max_files=1, max_fields=4)
            except (PayloadTooLarge, UnsupportedMedia):
                raise
            except Exception as e:
                raise BadParams(f"cannot parse the multipart body: {getattr(e, 'detail', e)}") from None
            upload = form.get(UPLOAD_FIELD)
            if not isinstance(upload, UploadFile):
                raise BadParams(f"send the zip as the multipart file field {UPLOAD_FIELD!r}")
            for field in form.keys():
                if field not in (UPLOAD_FIELD, "name"):
                    raise BadParams(f"unknown field {field!r}", details={"accepted": [UPLOAD_FIELD, "name"]})
            while block := await upload.read(BLOCK):
                sink.write(block)
            form_name = form.get("name")
            name = name or (form_name if isinstance(form_name, str) else None)
            fallback = upload.filename or "dataset"
        else:
            raise UnsupportedMedia(
                f"content type {ctype or 'none'!r}; send application/zip or multipart/form-data (field 'file')",
                details={"supported": ["application/zip", "multipart/form-data"]},
            )
        sink.file.close()
    except BaseException:
        sink.discard()
        raise
    if sink.size == 0:
        sink.discard()
        raise BadParams("the data set upload is empty")
    return Received(path=sink.path, sha256=sink.hash.hexdigest(), size=sink.size, name=_name(name, fallback))


async def _stream(request: Request) -> AsyncIterator[bytes]:
    async for block in request.stream():
        if block:
            yield block


def check(received: Received, settings: Settings) -> ZipDataset:
    """The zip's structure (``schemas.datasets.check_dataset_zip``); the file goes on failure."""
    try:
        return check_dataset_zip(received.path, settings.max_dataset_images, settings.max_dataset_uncompressed_bytes)
    except BaseException:
        received.path.unlink(missing_ok=True)
        raise


def _stored(conn: Redis, dataset_id: str) -> StoredDataset | None:
    raw = conn.get(keys.dataset_key(dataset_id))
    return StoredDataset.model_validate_json(cast(bytes, raw)) if raw is not None else None


def _tenant_sets(conn: Redis, tenant: str) -> list[StoredDataset]:
    ids = sorted(x.decode() for x in cast(set[bytes], conn.smembers(keys.tenant_datasets_key(tenant))))
    if not ids:
        return []
    raws = conn.mget([keys.dataset_key(i) for i in ids])
    return [StoredDataset.model_validate_json(r) for r in raws if r is not None]


def store(
    conn: Redis, settings: Settings, tenant: str, received: Received, listing: ZipDataset
) -> tuple[DatasetInfo, bool]:
    """Store a checked upload for ``tenant``; returns its info and whether it is new (an
    upload of bytes the tenant already stored returns that data set)."""
    dataset_id = dataset_id_for(tenant, received.sha256)
    target = settings.data_dir / dataset_path_of(received.sha256)
    try:
        with conn.lock(keys.dataset_lock_key(tenant), timeout=30, blocking_timeout=10):
            existing = _stored(conn, dataset_id)
            if existing is not None:
                return existing.info, False
            owned = _tenant_sets(conn, tenant)
            if len(owned) >= settings.max_datasets:
                raise QuotaExceeded(
                    f"the tenant has {len(owned)} data sets; the limit is {settings.max_datasets} "
                    "(delete one to upload another)",
                    QUOTA_RETRY_S,
                    details={"limit": settings.max_datasets},
                )
            used = sum(s.info.bytes for s in owned)
            if used + received.size > settings.max_dataset_bytes:
                raise QuotaExceeded(
                    f"the tenant's data sets take {used} bytes; this upload of {received.size} would pass the "
                    f"quota of {settings.max_dataset_bytes} (delete one to upload another)",
                    QUOTA_RETRY_S,
                    details={"limit": settings.max_dataset_bytes, "used": used},
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(received.path, target)  # content-addressed: an existing file has the same bytes
            info = DatasetInfo(
                id=dataset_id,
                name=received.name,
                images=len(listing.members),
                classes=listing.classes,
                bytes=received.size,
                sha256=received.sha256,
                created_at=datetime.now(UTC),
                layout=listing.layout,
                labelled=sum(label is not None for label in listing.labels),
            )
            record = StoredDataset(
                info=info, tenant=tenant, class_counts=listing.class_counts(),
                uncompressed_bytes=listing.uncompressed_bytes,
            )  # fmt: skip
            with conn.pipeline(transaction=True) as pipe:
                pipe.set(keys.dataset_key(dataset_id), record.model_dump_json())
                pipe.sadd(keys.tenant_datasets_key(tenant), dataset_id)
                pipe.sadd(keys.dataset_blob_key(received.sha256), dataset_id)
                pipe.execute()
            return info, True
    finally:
        received.path.unlink(missing_ok=True)


def get(conn: Redis, tenant: str, dataset_id: str) -> StoredDataset:
    """The tenant's data set; another tenant's reads as unknown, exactly like a missing one."""
    record = _stored(conn, dataset_id) if re.match(DATASET_ID_PATTERN, dataset_id) else None
    if record is None or record.tenant != tenant:
        raise UnknownDataset(f"no data set {dataset_id!r}")
    return record


def active_jobs(conn: Redis, dataset_id: str) -> list[str]:
    """Jobs that name the data set and are queued or running (ended ones are forgotten)."""
    key = keys.dataset_jobs_key(dataset_id)
    out = []
    for raw in cast(set[bytes], conn.smembers(key)):
        job_id = raw.decode()
        try:
            status = Job.fetch(job_id, connection=conn, serializer=JSONSerializer).get_status()
        except Exception:  # NoSuchJobError: expired or deleted
            status = None
        if status in ACTIVE:
            out.append(job_id)
        else:
            conn.srem(key, job_id)
    return sorted(out)


def delete(conn: Redis, settings: Settings, tenant: str, dataset_id: str) -> None:
    """Delete the tenant's data set (409 while a queued or running job uses it); the zip goes
    with the last data set stored in it."""
    if is_model_split(dataset_id):
        raise BadParams(f"{dataset_id!r} is a model's registered data: read-only")
    with conn.lock(keys.dataset_lock_key(tenant), timeout=30, blocking_timeout=10):
        record = get(conn, tenant, dataset_id)
        jobs = active_jobs(conn, dataset_id)
        if jobs:
            raise DatasetInUse(
                f"data set {dataset_id!r} is used by {len(jobs)} queued or running job(s); cancel them or wait",
                details={"jobs": jobs[:100]},
            )
        sha = record.info.sha256
        with conn.pipeline(transaction=True) as pipe:
            pipe.delete(keys.dataset_key(dataset_id), keys.dataset_jobs_key(dataset_id))
            pipe.srem(keys.tenant_datasets_key(tenant), dataset_id)
            pipe.srem(keys.dataset_blob_key(sha), dataset_id)
            pipe.scard(keys.dataset_blob_key(sha))
            left = pipe.execute()[-1]
        if not left:
            (settings.data_dir / dataset_path_of(sha)).unlink(missing_ok=True)


# --- a model's registered data as read-only data sets ---------------------------------------


def _folder_counts(root: Path) -> dict[str, int]:
    """Images per class folder of an ImageFolder directory (pure Python, nothing read)."""
    counts: dict[str, int] = {}
    if not root.is_dir():
        return counts
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        counts[d.name] = sum(
            1 for _, _, files in os.walk(d) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)
        )
    return counts


def registered(entry: ModelEntry) -> list[DatasetDetail]:
    """The model's registered data as read-only data sets: ``model:<id>/train`` (and
    ``model:<id>/test`` for the built-in digits)."""
    m = entry.manifest
    ts = m.training_set
    if ts is None:
        return []
    out = []
    if ts.kind == "builtin":
        splits = DIGITS_SPLITS if ts.name == "sklearn-digits" else {}
        for split, n in splits.items():
            out.append(
                DatasetDetail(
                    id=f"model:{m.id}/{split}", name=f"{ts.name} {split} split", images=n, classes=list(m.labels),
                    bytes=0, sha256=hashlib.sha256(f"builtin:{ts.name}:{split}".encode()).hexdigest(),
                    read_only=True, model_id=m.id, labelled=n,
                )
            )  # fmt: skip
    elif ts.path:
        counts = _folder_counts((entry.directory / ts.path).resolve())
        n = sum(counts.values())
        out.append(
            DatasetDetail(
                id=f"model:{m.id}/train", name=f"{m.id} training set ({ts.path})", images=n, classes=sorted(counts),
                bytes=0, sha256=hashlib.sha256(json.dumps(counts, sort_keys=True).encode()).hexdigest(),
                read_only=True, model_id=m.id, labelled=n, class_counts=counts,
            )
        )  # fmt: skip
    return out


def list_all(conn: Redis, registry: ModelRegistry, tenant: str) -> tuple[list[DatasetInfo], int]:
    """The tenant's uploads (newest first) then every model's registered data; and the bytes
    the uploads take."""
    owned = sorted(_tenant_sets(conn, tenant), key=lambda s: s.info.created_at or datetime.min, reverse=True)
    infos: list[DatasetInfo] = [s.info for s in owned]
    for entry in registry.entries().values():
        infos += [DatasetInfo(**d.model_dump(exclude={"class_counts", "unlabelled", "uncompressed_bytes", "jobs"}))
                  for d in registered(entry)]  # fmt: skip
    return infos, sum(s.info.bytes for s in owned)


def detail(conn: Redis, registry: ModelRegistry, tenant: str, dataset_id: str) -> DatasetDetail:
    if is_model_split(dataset_id):
        try:
            model_id, split = parse_model_split(dataset_id)
        except ValueError:
            raise UnknownDataset(f"no data set {dataset_id!r}") from None
        for entry in registry.entries().values():
            for d in registered(entry):
                if d.id == f"model:{model_id}/{split}":
                    return d
        raise UnknownDataset(f"no data set {dataset_id!r} (registered data are named model:<model_id>/<split>)")
    record = get(conn, tenant, dataset_id)
    return record.detail(active_jobs(conn, dataset_id))


# --- jobs naming data sets ---------------------------------------------------------------


def resolve(
    conn: Redis, registry: ModelRegistry, tenant: str, entry: ModelEntry, params: BaseModel
) -> dict[str, str]:
    """Check the data sets a job's params name (the tenant's; a training set's classes must
    fit the model's labels; a registered split the model has) and return ``{id: sha256}`` of the uploads for
    the job's payload. 404 ``unknown_dataset``, 422 ``bad_params``."""
    out: dict[str, str] = {}
    for ref in dataset_refs(params):
        if is_model_split(ref):
            model_id, split = parse_model_split(ref)
            if model_id is not None and model_id != entry.manifest.id:
                raise BadParams(
                    f"{ref!r} is registered data of another model; name it model:{split} with model "
                    f"{model_id!r}, or upload it as a data set",
                )
            if f"model:{entry.manifest.id}/{split}" not in {d.id for d in registered(entry)}:
                raise UnknownDataset(
                    f"model {entry.manifest.id!r} has no registered {split!r} data",
                    details={"registered": [d.id for d in registered(entry)]},
                )
            continue
        record = get(conn, tenant, ref)
        # Only a training set needs labels; other kinds explain unmapped images' predicted class.
        labels = entry.manifest.labels
        if ref == getattr(params, "training_set", None) and class_index(record.info.classes, labels) is None:
            raise BadParams(
                f"data set {ref!r} has {len(record.info.classes)} classes, which match the model's labels neither "
                f"by name, nor as indices, nor by count ({len(entry.manifest.labels)})",
                details={"classes": record.info.classes[:100], "labels": entry.manifest.labels[:100]},
            )
        out[ref] = record.info.sha256
    return out


def check_job(
    conn: Redis, registry: ModelRegistry, tenant: str, entry: ModelEntry, params: BaseModel, n_images: int,
    files: dict[str, bytes] | None = None,
) -> dict[str, str]:
    """The data-set checks of a submission: images or a data set, not both (and not neither,
    for ``compare``); a ``training_set`` id or a ``training_set`` zip, not both; then
    :func:`resolve`. Returns ``{id: sha256}`` of the uploads the job uses."""
    dataset = getattr(params, "dataset", None)
    named = dataset is not None and dataset not in ("test", "train", "uploaded")
    if named and n_images:
        raise BadParams(f"give images or a dataset, not both ({n_images} images and dataset {dataset!r})")
    if isinstance(params, DatasetParams) and dataset is None and not n_images:
        raise BadParams("give images or a dataset (POST /v1/datasets, or model:<split>)")
    if getattr(params, "training_set", None) is not None and files and "training_set" in files:
        raise BadParams("give a training_set data set id or a training_set zip, not both")
    return resolve(conn, registry, tenant, entry, params)


def submit_using(
    conn: Redis, tenant: str, datasets: dict[str, str], submit: Callable[[], tuple[Job, bool]]
) -> tuple[Job, bool]:
    """Run ``submit`` (which enqueues the job) while holding the tenant's data set lock, and
    record that the job uses ``datasets`` so they are not deleted under it: a delete either
    happens before (the job gets a 404) or sees the job (409)."""
    if not datasets:
        return submit()
    with conn.lock(keys.dataset_lock_key(tenant), timeout=30, blocking_timeout=10):
        for dataset_id in datasets:
            get(conn, tenant, dataset_id)
        job, reused = submit()
        for dataset_id in datasets:
            conn.sadd(keys.dataset_jobs_key(dataset_id), job.id)
        return job, reused
