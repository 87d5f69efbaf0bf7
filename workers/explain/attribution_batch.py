"""Kind ``attribution_batch``: one attribution method over every image of a data set
(``schemas.attribution_batch``), in chunks that any idle worker takes (``workers.fanout``).

Each image's map is exactly the ``attribution`` kind's ``{i}-map.npy`` for that image sent
alone: the same decode and preprocessing (``workers.dataset_source``), the same target (its
predicted class from the forward engine, or ``target`` / its label), the same
:func:`workers.explain.attribution.attribute` call and channel aggregation.

Streaming, so that a 10,000-image data set never sits in one process or one Redis value:

- ``plan`` creates ``maps.npy`` ``(N, H, W)`` (``dtype``) on the data volume
  (``<data_dir>/jobs/<job id>/maps.npy``) unless it exists (a resumed job keeps the rows of
  its finished chunks);
- ``run_chunk`` decodes its images a batch at a time (the next batch in a background thread
  while this one is computed), writes each batch's maps into its rows of ``maps.npy``
  through a memory map, and returns its rows of the per-image table (small JSON, one hash
  field per chunk in Redis); a chunk computed twice (its worker died, or its lease lapsed)
  writes the same rows again;
- ``aggregate`` writes ``images.csv`` and ``summary.json`` from the chunks' rows.

Progress counts images (``chunk_units``).
"""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from schemas.attribution_batch import AttributionBatchParams
from schemas.datasets import job_dir_of
from schemas.settings import get_settings
from workers import render
from workers.dataset_source import DatasetSource, describe, limited, open_source, prune_job_dirs
from workers.explain.attribution import attribute
from workers.explain.base import Artifact, Inputs, KindResult, LoadedModel, ProgressFn
from workers.pipeline import JobContext, forward_in_chunks

PROGRESS_UNIT = "images"
WORKER = f"{socket.gethostname()}:{os.getpid()}"
"""Names the process that computed a chunk (the summary counts chunks per worker)."""
MAPS = "maps.npy"
COLUMNS = ["index", "file", "label", "predicted", "target", "probability", "runtime_s"]


def source_of(model: LoadedModel, params: AttributionBatchParams, context: JobContext) -> DatasetSource:
    return limited(open_source(model, params.dataset, context.datasets, context.models_dir), params.limit)


def maps_path(context: JobContext) -> Path:
    return context.data_dir / job_dir_of(context.job_id) / MAPS


def _create_maps(path: Path, shape: tuple[int, int, int], dtype: str) -> None:
    """An ``(N, H, W)`` ``.npy`` of zeros (sparse on most file systems), unless one of that
    shape and dtype is there already; created under a temporary name, then renamed."""
    if path.exists():
        try:
            existing = np.load(path, mmap_mode="r")
            if existing.shape == shape and existing.dtype == np.dtype(dtype):
                return
        except (ValueError, OSError):
            pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{time.monotonic_ns()}")
    np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=shape).flush()
    tmp.replace(path)


def write_rows(path: Path, start: int, rows: np.ndarray) -> None:
    """Write ``rows`` ``(b, H, W)`` into the ``.npy`` at ``path`` from row ``start`` on, by
    byte offset (not a memory map: on a volume shared by several hosts, e.g. NFS, whole pages
    written back from two hosts could overwrite each other's rows)."""
    with path.open("r+b") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
        data = np.ascontiguousarray(rows, dtype=dtype)
        if data.shape[1:] != tuple(shape[1:]) or start + len(data) > shape[0]:
            raise ValueError(f"rows {data.shape} at {start} do not fit {MAPS} {tuple(shape)}")
        f.seek(f.tell() + start * data[0].nbytes)
        f.write(data.tobytes())


def plan(
    model: LoadedModel, inputs: Inputs | None, params: AttributionBatchParams, context: JobContext
) -> list[dict[str, int]]:
    """Chunks of ``images_per_chunk`` consecutive images ``[{"chunk", "start", "stop"}]``;
    creates ``maps.npy`` when missing."""
    source = source_of(model, params, context)
    n = len(source)
    h, w = model.manifest.preprocessing.size
    _create_maps(maps_path(context), (n, h, w), params.dtype)
    size = params.images_per_chunk
    return [{"chunk": k, "start": s, "stop": min(n, s + size)} for k, s in enumerate(range(0, n, size))]


def chunk_units(chunk: dict[str, int]) -> int:
    return chunk["stop"] - chunk["start"]


def _targets(params: AttributionBatchParams, probs: torch.Tensor, labels: np.ndarray) -> torch.Tensor:
    predicted = probs.argmax(1)
    if params.target is not None:
        return torch.full_like(predicted, params.target)
    if params.target_from == "label":
        given = torch.from_numpy(labels).to(predicted.device)
        return torch.where(given >= 0, given, predicted)
    return predicted


def run_chunk(
    model: LoadedModel,
    inputs: Inputs | None,
    params: AttributionBatchParams,
    chunk: dict[str, int],
    progress: ProgressFn,
    context: JobContext,
) -> dict[str, Any]:
    """Maps of images ``chunk["start"]:chunk["stop"]`` into ``maps.npy``; returns the chunk's
    table rows ``{"start", "stop", "rows": [...], "seconds"}``."""
    t0 = time.perf_counter()
    source = source_of(model, params, context)
    start, stop = chunk["start"], chunk["stop"]
    path = maps_path(context)
    method = params.attribution.model_copy(update={"batch_size": params.batch_size})
    # Decode batches big enough for a forward chunk; attribute() cuts each into gradient chunks.
    batch = max(params.batch_size or model.grad_batch_size, model.batch_size)
    rows: list[dict[str, Any]] = []
    for s, x, _ in source.batches(start, stop, batch):
        t1 = time.perf_counter()
        x = x.to(model.device)
        probs = forward_in_chunks(model, x).softmax(1)
        labels = source.labels[s : s + len(x)]
        targets = _targets(params, probs, labels)
        attr = attribute(model, x, targets, method)
        write_rows(path, s, np.stack([render.to_2d(a, method.aggregation) for a in attr]))
        per_image = (time.perf_counter() - t1) / len(x)
        predicted = probs.argmax(1)
        for j in range(len(x)):
            t = int(targets[j])
            rows.append(
                {
                    "index": s + j,
                    "file": source.names[s + j],
                    "label": int(labels[j]),
                    "predicted": int(predicted[j]),
                    "target": t,
                    "probability": round(float(probs[j, t]), 6),
                    "runtime_s": round(per_image, 5),
                }
            )
        progress(s + len(x) - start, stop - start, "images")
    seconds = round(time.perf_counter() - t0, 3)
    return {"start": start, "stop": stop, "rows": rows, "seconds": seconds, "worker": WORKER}


def aggregate(
    model: LoadedModel,
    inputs: Inputs | None,
    params: AttributionBatchParams,
    results: list[dict[str, Any]],
    context: JobContext,
) -> KindResult:
    """``images.csv`` (one row per image, in data set order), ``summary.json`` and
    ``maps.npy`` (already on the data volume)."""
    labels = model.manifest.labels
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow([*COLUMNS, "label_name", "predicted_name"])
    n = labelled = correct = 0
    probability = seconds = 0.0
    for part in sorted(results, key=lambda r: r["start"]):
        for r in part["rows"]:
            writer.writerow([r[c] for c in COLUMNS] + [labels[r["label"]] if r["label"] >= 0 else "",
                                                       labels[r["predicted"]]])  # fmt: skip
            n += 1
            labelled += r["label"] >= 0
            correct += r["label"] == r["predicted"]
            probability += r["probability"]
        seconds += part["seconds"]
    h, w = model.manifest.preprocessing.size
    source = source_of(model, params, context)
    summary: dict[str, Any] = {
        **describe(source),
        "method": params.attribution.method,
        "params": params.attribution.model_dump(mode="json", exclude={"target", "batch_size"}),
        "target": params.target if params.target is not None else params.target_from,
        "maps": {"file": MAPS, "shape": [n, h, w], "dtype": params.dtype,
                 "aggregation": params.attribution.aggregation},  # fmt: skip
        "accuracy": round(correct / labelled, 6) if labelled else None,
        "mean_target_probability": round(probability / n, 6) if n else None,
        "chunks": len(results),
        "chunks_per_worker": dict(Counter(r.get("worker", "?") for r in results)),
        "chunk_seconds": round(seconds, 3),
        "images_per_s": round(n / seconds, 3) if seconds else None,
    }
    settings = get_settings()
    prune_job_dirs(context.data_dir, settings.result_ttl_s + 2 * settings.job_timeout_s)
    return KindResult(
        summary,
        [
            Artifact(MAPS, b"", "application/x-npy", path=maps_path(context)),
            Artifact("images.csv", buf.getvalue().encode(), "text/csv"),
            Artifact("summary.json", json.dumps(summary, indent=2).encode(), "application/json"),
        ],
    )


def run(model: LoadedModel, inputs: Inputs, params: AttributionBatchParams, progress: ProgressFn,
        context: JobContext) -> KindResult:  # fmt: skip
    """Every chunk in this process (for direct calls and tests): plan, run_chunk, aggregate."""
    chunks = plan(model, inputs, params, context)
    n_images = sum(chunk_units(c) for c in chunks)
    results = []
    for c in chunks:
        first = c["start"]

        def report(done: int, total: int, stage: str) -> None:
            progress(first + done, n_images, stage)  # noqa: B023 (used before the loop moves on)

        results.append(run_chunk(model, inputs, params, c, report, context))
    return aggregate(model, inputs, params, results, context)
