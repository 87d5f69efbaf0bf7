"""Data sets as resources (``/v1/datasets``): the contract between the API, which stores and
checks them, the workers, which decode them, and clients.

A data set is a zip uploaded once and named by an id in the params of data-set-wide jobs
(``attribution_batch``, ``u_sweep``, ``compare``, ``influence``'s ``training_set``):

- *ImageFolder* layout, ``<class>/<image>`` (images may sit in subfolders of their class
  folder; one top-level folder around the class folders is stripped), with the checks of
  ``schemas.training_zip``; the class of an image is its folder;
- or *flat*: images only (any folders, no class), with an optional ``labels.csv`` at the top
  level, ``file,label`` rows (a header row ``file,label`` is optional), ``file`` the
  member's path in the zip and ``label`` a class name.

Ids. An upload is stored once under its sha256 (content-addressed, ``<data_dir>/datasets/
<sha256>.zip``); its id is ``ds_`` + 32 hex digits of ``sha256("<tenant>:<sha256>")``, so the
same bytes uploaded again by the same tenant give the same id (and the same jobs), while two
tenants never share an id. A model's registered data (its manifest's ``training_set``, and
digits-cnn's test split) are listed beside the uploads as read-only data sets with the id
``model:<model_id>/<split>``; in a job's params, ``model:<split>`` names a split of the job's
own model.

Classes and labels. A data set's ``classes`` are strings (folder names, or the distinct
``labels.csv`` labels); a job maps them to its model's label indices with
:func:`class_index`: by name when every class is one of the model's labels, else by index
when every class is an integer below the number of labels, else in sorted order when there
are as many classes as labels (torchvision's ImageFolder convention), else 422. Images with
no label (flat, no ``labels.csv`` row) have label ``-1``: jobs that need one explain the
predicted class instead.
"""

from __future__ import annotations

import csv
import io
import re
import zipfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Literal

from pydantic import BaseModel, Field

from schemas.errors import BadParams, PayloadTooLarge
from schemas.training_zip import (
    IMAGE_EXTENSIONS,
    check_members,
    class_prefix,
    imagefolder_order,
    member_names,
    open_zip,
)

DATASET_ID_PATTERN = r"^ds_[0-9a-f]{32}$"
MODEL_SPLIT_PATTERN = r"^model:(?:(?P<model>[a-z0-9][a-z0-9._-]{0,63})/)?(?P<split>train|test)$"
DATASET_REF_PATTERN = r"^(ds_[0-9a-f]{32}|model:([a-z0-9][a-z0-9._-]{0,63}/)?(train|test))$"
"""What a job's ``dataset`` (or ``influence``'s ``training_set``) may be: an uploaded data
set's id, or ``model:[<model_id>/]<split>``."""
LABELS_CSV = "labels.csv"
WHAT = "dataset"
"""How error messages name the upload (``the dataset zip has ...``)."""
UPLOAD_FIELD = "file"
"""The multipart field of ``POST /v1/datasets`` (a raw ``application/zip`` body works too)."""

Layout = Literal["imagefolder", "flat"]


def is_model_split(ref: str) -> bool:
    return ref.startswith("model:")


def parse_model_split(ref: str) -> tuple[str | None, str]:
    """``model:[<model_id>/]<split>`` -> ``(model_id or None, split)``; ValueError otherwise."""
    m = re.match(MODEL_SPLIT_PATTERN, ref)
    if m is None:
        raise ValueError(f"{ref!r} is not model:[<model_id>/]<split>")
    return m.group("model"), m.group("split")


def class_index(classes: list[str], labels: list[str]) -> dict[str, int] | None:
    """Label index of each of a data set's ``classes`` for a model with ``labels`` (see the
    module docstring); None when no rule applies."""
    if not classes:
        return {}
    if all(c in labels for c in classes):
        return {c: labels.index(c) for c in classes}
    if all(c.isdigit() and int(c) < len(labels) for c in classes):
        return {c: int(c) for c in classes}
    if len(classes) == len(labels):
        return {c: i for i, c in enumerate(sorted(classes))}
    return None


class DatasetInfo(BaseModel):
    """A data set as ``POST /v1/datasets`` (201) and ``GET /v1/datasets`` answer it."""

    id: str = Field(description="ds_<32 hex> for uploads; model:<model_id>/<split> for a model's registered data")
    name: str = Field(description="the upload's name (?name= or the file name), or the model's split")
    images: int = Field(description="number of images")
    classes: list[str] = Field(description="class names, sorted ([] for a flat zip without labels.csv)")
    bytes: int = Field(description="size of the stored zip (0 for registered data)")
    sha256: str = Field(description="sha256 of the zip's bytes (registered data: of their contents)")
    created_at: datetime | None = None
    layout: Layout = "imagefolder"
    labelled: int = Field(0, description="images with a label")
    read_only: bool = Field(False, description="a model's registered data: cannot be deleted")
    model_id: str | None = Field(None, description="the model whose registered data this is")


class DatasetDetail(DatasetInfo):
    """``GET /v1/datasets/{id}``: with the number of images per class."""

    class_counts: dict[str, int] = Field(default_factory=dict, description="class name -> images")
    unlabelled: int = Field(0, description="images without a label")
    uncompressed_bytes: int = Field(0, description="sum of the members' declared uncompressed sizes")
    jobs: list[str] = Field(default_factory=list, description="queued or running jobs using it")


class DatasetList(BaseModel):
    datasets: list[DatasetInfo]
    bytes_used: int = Field(description="bytes of the tenant's uploads (their quota counts these)")
    bytes_quota: int = Field(description="max_dataset_bytes: the tenant's quota of stored bytes")
    count_quota: int = Field(description="max_datasets: the tenant's quota of data sets")


class StoredDataset(BaseModel):
    """What Redis keeps about an uploaded data set (``schemas.keys.dataset_key``): metadata
    only; the images stay in the zip on the data volume."""

    info: DatasetInfo
    tenant: str
    class_counts: dict[str, int] = Field(default_factory=dict)
    uncompressed_bytes: int = 0

    def detail(self, jobs: list[str] | None = None) -> DatasetDetail:
        return DatasetDetail(
            **self.info.model_dump(),
            class_counts=self.class_counts,
            unlabelled=self.info.images - self.info.labelled,
            uncompressed_bytes=self.uncompressed_bytes,
            jobs=jobs or [],
        )


def dataset_path_of(sha256: str) -> str:
    """Where an upload lives, relative to ``settings.data_dir``."""
    return f"datasets/{sha256}.zip"


def job_dir_of(job_id: str) -> str:
    """Where a data-set job's large artifacts (``maps.npy``) live, relative to ``data_dir``."""
    return f"jobs/{job_id}"


# --- the zip check (stdlib only: the API and the workers run the same code) -----------------

MAX_LABELS_CSV_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ZipDataset:
    """A checked data set zip: image ``members`` (zip names) in sample order, each image's
    ``labels`` entry (a class name, or None), the sorted ``classes``."""

    layout: Layout
    members: list[str]
    labels: list[str | None]
    classes: list[str]
    uncompressed_bytes: int

    def class_counts(self) -> dict[str, int]:
        counts = {c: 0 for c in self.classes}
        for label in self.labels:
            if label is not None:
                counts[label] += 1
        return counts

    def label_indices(self, model_labels: list[str]) -> list[int] | None:
        """Each image's label index for a model (-1: no label); None when the classes fit
        none of :func:`class_index`'s rules."""
        mapping = class_index(self.classes, model_labels)
        if mapping is None:
            return None
        return [-1 if c is None else mapping[c] for c in self.labels]


def _read_labels_csv(data: bytes | str | Path | IO[bytes], member: zipfile.ZipInfo) -> dict[str, str]:
    if member.file_size > MAX_LABELS_CSV_BYTES:
        raise PayloadTooLarge(
            f"{LABELS_CSV} declares {member.file_size} bytes; the limit is {MAX_LABELS_CSV_BYTES}",
            details={"limit": MAX_LABELS_CSV_BYTES},
        )
    try:
        with zipfile.ZipFile(io.BytesIO(data) if isinstance(data, bytes) else data) as zf:
            with zf.open(member) as f:
                raw = f.read(MAX_LABELS_CSV_BYTES + 1)  # zipfile also stops at the declared size
        text = raw.decode("utf-8-sig")
    except (zipfile.BadZipFile, UnicodeDecodeError, OSError, EOFError) as e:
        raise BadParams(f"{LABELS_CSV} cannot be read: {e}") from None
    out: dict[str, str] = {}
    for i, row in enumerate(csv.reader(io.StringIO(text))):
        if not row or (i == 0 and [c.strip().lower() for c in row[:2]] == ["file", "label"]):
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise BadParams(f"{LABELS_CSV} row {i + 1} is not 'file,label'", details={"row": i + 1})
        name = "/".join(p for p in row[0].strip().split("/") if p not in ("", "."))
        if name in out:
            raise BadParams(f"{LABELS_CSV} names {name!r} twice", details={"row": i + 1})
        out[name] = row[1].strip()
    return out


def check_dataset_zip(
    data: bytes | str | Path | IO[bytes], max_images: int, max_uncompressed_bytes: int
) -> ZipDataset:
    """Check an uploaded data set zip (layout in the module docstring) against the limits;
    raises ``BadParams`` (422) or ``PayloadTooLarge`` (413) like a training set upload.
    Reads the central directory, and ``labels.csv`` when there is one; no image is
    decompressed."""
    infos = open_zip(data, WHAT)
    files, total = check_members(infos, max_images, max_uncompressed_bytes, WHAT)
    csv_parts = [p for p in files if p[-1] == LABELS_CSV and len(p) <= 2]
    images = [p for p in files if p[-1].lower().endswith(IMAGE_EXTENSIONS)]
    if not images:
        raise BadParams(f"the {WHAT} zip holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    if len(images) > max_images:
        raise PayloadTooLarge(
            f"the {WHAT} zip holds {len(images)} images; the limit is {max_images}",
            details={"limit": max_images},
        )
    names = member_names(infos, {"/".join(p) for p in images}, WHAT)
    if csv_parts:
        if len(csv_parts) > 1:
            raise BadParams(f"the {WHAT} zip has {len(csv_parts)} {LABELS_CSV} files; give one, at the top")
        base = csv_parts[0][:-1]  # "" or the one folder it sits in, which file names are relative to
        info = next(i for i in infos if "/".join(p for p in i.filename.split("/") if p not in ("", ".")) ==
                    "/".join(csv_parts[0]))  # fmt: skip
        given = _read_labels_csv(data, info)
        ordered = sorted("/".join(p) for p in images)
        rel = {n: n[len(base[0]) + 1 :] if base and n.startswith(base[0] + "/") else n for n in ordered}
        unknown = sorted(set(given) - set(rel.values()))
        if unknown:
            raise BadParams(
                f"{LABELS_CSV} names {len(unknown)} files that are not images of the zip, e.g. {unknown[0]!r}",
                details={"files": unknown[:20]},
            )
        labels = [given.get(rel[n]) for n in ordered]
        return ZipDataset(
            "flat", [names[n] for n in ordered], labels, sorted({x for x in labels if x is not None}), total
        )
    prefix = class_prefix(files)
    in_classes = [p for p in images if len(p) - prefix >= 2]
    if in_classes and len(in_classes) < len(images):
        loose = next("/".join(p) for p in images if len(p) - prefix < 2)
        raise BadParams(
            f"the {WHAT} zip mixes class folders with images outside them (e.g. {loose!r}): lay it out as "
            f"<class>/<image>, or flat with a {LABELS_CSV}",
            details={"member": loose},
        )
    if not in_classes:  # flat, unlabelled
        ordered = sorted("/".join(p) for p in images)
        return ZipDataset("flat", [names[n] for n in ordered], [None] * len(ordered), [], total)
    ordered_parts = imagefolder_order(in_classes, prefix)
    return ZipDataset(
        "imagefolder",
        [names["/".join(p)] for p in ordered_parts],
        [p[prefix] for p in ordered_parts],
        sorted({p[prefix] for p in in_classes}),
        total,
    )


# --- params of data-set-wide jobs ---------------------------------------------------------

DATASET_FIELD_DESCRIPTION = (
    "the data set to run over: an uploaded data set's id (ds_..., POST /v1/datasets) or "
    "model:<split> (the model's registered data: train, and test for digits-cnn)"
)


class DatasetParams(BaseModel):
    """``dataset`` and ``limit``: the fields every kind that runs over a data set takes."""

    dataset: str | None = Field(None, pattern=DATASET_REF_PATTERN, description=DATASET_FIELD_DESCRIPTION)
    limit: int | None = Field(None, ge=1, description="use only the first `limit` images of the data set")


def dataset_refs(params: BaseModel) -> list[str]:
    """The data set references a job's params make (``dataset``, ``training_set``)."""
    out = []
    for name in ("dataset", "training_set"):
        value = getattr(params, name, None)
        if isinstance(value, str) and re.match(DATASET_REF_PATTERN, value):
            out.append(value)
    return out
