"""The images of a data set, read a range at a time, for data-set-wide jobs
(``attribution_batch``, ``u_sweep``, ``compare``; ``influence``'s ``training_set``).

A job names its data set (``schemas.datasets``) as

- an uploaded data set's id (``ds_...``): the zip on the data volume
  (``<data_dir>/datasets/<sha256>.zip``, the sha256 in the job's payload), listed with the
  API's own check (``schemas.datasets.check_dataset_zip``, cached per zip) and decoded with
  the training set code (``workers.datasets._read_zip_images``: the API's formats, pixel
  limit and RGB normalisation) a range at a time: a 10,000-image set never sits in memory;
- ``model:<split>`` / ``model:<model_id>/<split>`` (``test`` and ``train`` are accepted as
  in ``u_sweep``'s first version): the model's registered data (``workers.datasets``).

:meth:`DatasetSource.batches` decodes the next batch in a background thread while the
caller computes on the current one (Pillow's decoders and torch's kernels release the
GIL), so decoding costs little wall time next to a forward+backward pass.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from schemas.datasets import ZipDataset, check_dataset_zip, is_model_split, parse_model_split
from schemas.errors import BadParams, JobFailure
from schemas.settings import get_settings
from workers.explain.base import Inputs, LoadedModel

if TYPE_CHECKING:
    from workers.datasets import TrainingSetData

Loader = Callable[[np.ndarray], tuple[torch.Tensor, list[np.ndarray]]]
"""Image indices -> ``(images (b, C, H, W) float32 CPU, b display arrays (H, W, 3) uint8)``."""


@dataclass
class DatasetSource:
    """``n`` images of a data set for one model: ``names`` (the zip member or
    ``<split>/<index>``), ``labels`` ``(n,)`` int64 label indices (-1: none), and a loader."""

    ref: str
    names: list[str]
    labels: np.ndarray
    loader: Loader

    def __len__(self) -> int:
        return len(self.names)

    def load(self, start: int, stop: int) -> tuple[torch.Tensor, list[np.ndarray]]:
        """Images ``start:stop``, preprocessed for the model: ``((b, C, H, W), display)``."""
        return self.loader(np.arange(start, stop))

    def batches(self, start: int, stop: int, size: int) -> Iterator[tuple[int, torch.Tensor, list[np.ndarray]]]:
        """``(first index, images, display)`` over ``start:stop`` in batches of ``size``; the
        next batch is decoded in a background thread while the caller works on this one."""
        bounds = [(s, min(stop, s + size)) for s in range(start, stop, max(1, size))]
        if not bounds:
            return
        with ThreadPoolExecutor(1, thread_name_prefix="decode") as pool:
            pending = pool.submit(self.load, *bounds[0])
            for k, (s, _) in enumerate(bounds):
                x, display = pending.result()
                if k + 1 < len(bounds):
                    pending = pool.submit(self.load, *bounds[k + 1])
                yield s, x, display


@lru_cache(maxsize=8)
def _listing(path: str, size: int, mtime_ns: int, max_images: int, max_bytes: int) -> ZipDataset:
    return check_dataset_zip(path, max_images, max_bytes)


def zip_listing(path: Path) -> ZipDataset:
    """The API's check of a stored zip, run again here (cached while the file is unchanged)."""
    s = get_settings()
    try:
        st = path.stat()
    except FileNotFoundError:
        raise JobFailure(
            f"the data set's zip {path.name} is missing from the data volume ({path.parent}); is "
            "INSPECTOR_DATA_DIR the same volume for the API and the workers?",
            type="dataset_missing",
        ) from None
    return _listing(str(path), st.st_size, st.st_mtime_ns, s.max_dataset_images, s.max_dataset_uncompressed_bytes)


def _uploaded(model: LoadedModel, ref: str, path: Path, need_labels: bool) -> DatasetSource:
    from workers.datasets import _read_zip_images

    listing = zip_listing(path)
    labels = listing.label_indices(model.manifest.labels)
    if labels is None and need_labels:
        raise BadParams(f"data set {ref!r}: its classes match the model's labels neither by name, index nor count")
    if labels is None:  # classes of another label set: the images count as unlabelled
        labels = [-1] * len(listing.members)
    pre = model.manifest.preprocessing
    members = listing.members

    def load(index: np.ndarray) -> tuple[torch.Tensor, list[np.ndarray]]:
        return _read_zip_images(path, [members[i] for i in index], pre)

    return DatasetSource(ref, list(members), np.asarray(labels, dtype=np.int64), load)


def _registered(model: LoadedModel, ref: str, split: str, models_dir: Path) -> DatasetSource:
    ts = model.manifest.training_set
    if ts is not None and ts.kind == "builtin" and ts.name == "sklearn-digits":
        from workers.explain.u_analysis import PixelSpace
        from workers.models.digits import load_split

        x_tr, y_tr, x_te, y_te = load_split()
        x, y = (x_te, y_te) if split == "test" else (x_tr, y_tr)
        space = PixelSpace.of(model.manifest.preprocessing, 1)
        images = space.to_model(torch.from_numpy(x)[:, None])
        grey = np.round(x * 255).astype(np.uint8)

        def load_digits(index: np.ndarray) -> tuple[torch.Tensor, list[np.ndarray]]:
            return images[torch.from_numpy(index)], [np.repeat(grey[i][..., None], 3, -1) for i in index]

        return DatasetSource(ref, [f"{split}/{i:04d}" for i in range(len(y))], y.astype(np.int64), load_digits)
    if ts is None or split != "train":
        raise BadParams(
            f"model {model.id!r} has no built-in data set or registered {split!r} data; upload one "
            "(POST /v1/datasets) and name its id"
        )
    from workers.datasets import load_training_set

    data = load_training_set(model.manifest, models_dir / model.id)
    names = [str(p.name) for p in data.paths] if data.paths else [f"train/{i:05d}" for i in range(len(data))]

    def load_folder(index: np.ndarray) -> tuple[torch.Tensor, list[np.ndarray]]:
        return data.images(index), [data.display(int(i)) for i in index]

    return DatasetSource(ref, names, data.labels.astype(np.int64), load_folder)


def open_source(
    model: LoadedModel, ref: str, datasets: dict[str, Path], models_dir: Path, need_labels: bool = False
) -> DatasetSource:
    """The data set ``ref`` for ``model``; ``datasets`` maps the job's uploaded data set ids to
    their zips (``JobContext.datasets``). An uploaded set whose classes fit none of the model's
    labels (``schemas.datasets.class_index``) is unlabelled (-1), or refused with
    ``need_labels``."""
    if ref in ("test", "train"):
        ref = f"model:{ref}"
    if is_model_split(ref):
        model_id, split = parse_model_split(ref)
        if model_id is not None and model_id != model.id:
            raise BadParams(f"{ref!r} is registered data of another model than {model.id!r}")
        return _registered(model, ref, split, models_dir)
    if ref not in datasets:
        raise BadParams(f"data set {ref!r} was not resolved for this job")
    return _uploaded(model, ref, datasets[ref], need_labels)


def limited(source: DatasetSource, limit: int | None) -> DatasetSource:
    """The first ``limit`` images of ``source`` (all when None)."""
    if limit is None or limit >= len(source):
        return source
    return DatasetSource(source.ref, source.names[:limit], source.labels[:limit], source.loader)


_prune_lock = threading.Lock()
_pruned_at = 0.0


def prune_job_dirs(data_dir: Path, max_age_s: float, every_s: float = 600.0) -> None:
    """Remove data-set jobs' artifact folders (``<data_dir>/jobs/<id>``) not touched for
    ``max_age_s`` (their job's result has expired), at most every ``every_s`` per process."""
    global _pruned_at
    with _prune_lock:
        if time.monotonic() - _pruned_at < every_s:
            return
        _pruned_at = time.monotonic()
    root = data_dir / "jobs"
    if not root.is_dir():
        return
    now = time.time()
    for d in root.iterdir():
        try:
            if d.is_dir() and now - d.stat().st_mtime > max_age_s:
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            continue


def describe(source: DatasetSource) -> dict[str, Any]:
    return {"dataset": source.ref, "images": len(source), "labelled": int((source.labels >= 0).sum())}


def dataset_inputs(model: LoadedModel, params: Any, context: Any, default_limit: int) -> Inputs:
    """The first ``params.limit`` (default ``default_limit``) images of ``params.dataset`` as
    a kind's ``Inputs`` (for kinds that hold their images at once, e.g. ``compare``),
    with targets resolved as for uploaded images."""
    from workers.pipeline import forward_in_chunks, resolve_targets

    src = open_source(model, params.dataset, context.datasets, context.models_dir)
    src = limited(src, params.limit or default_limit)
    x, display = src.load(0, len(src))
    x = x.to(model.device)
    probs = forward_in_chunks(model, x).softmax(1)
    return Inputs(x, display, resolve_targets(params.target, probs), probs)


def training_set_of(model: LoadedModel, ref: str, context: Any) -> TrainingSetData:
    """An uploaded data set as ``influence``'s training set (``workers.datasets.TrainingSetData``):
    every image needs a label that maps to the model's (422 otherwise); read from the zip on
    the data volume, in memory when its tensors fit ``MAX_IN_MEMORY_BYTES``."""
    import hashlib

    from workers.datasets import MAX_IN_MEMORY_BYTES, TrainingSetData

    src = open_source(model, ref, context.datasets, context.models_dir, need_labels=True)
    if (src.labels < 0).any():
        raise BadParams(
            f"data set {ref!r} has {int((src.labels < 0).sum())} images without a label; a training set needs "
            "one per image (ImageFolder, or a labels.csv row for every image)"
        )
    pre = model.manifest.preprocessing
    path = context.datasets[ref]
    h = hashlib.sha256(b"dataset\0" + path.name.encode() + pre.model_dump_json().encode())
    h.update(src.labels.tobytes())
    data = TrainingSetData(
        labels=src.labels, fingerprint=h.hexdigest(), source=f"dataset:{ref}", archive=path,  # type: ignore[arg-type]
        members=list(src.names), preprocessing=pre,
    )  # fmt: skip
    c = 1 if pre.mode == "L" else 3
    if len(src) * c * pre.size[0] * pre.size[1] * 4 <= MAX_IN_MEMORY_BYTES:
        x, display = src.load(0, len(src))
        data.tensor, data._display = x, np.stack(display)
    return data
