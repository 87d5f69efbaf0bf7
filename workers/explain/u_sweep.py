"""U Analysis sweeps: a data set x a grid of attribution methods, orders, noises and window
sizes, and the U occurrence (% of images with at least one U-triple) per configuration and
per hyperparameter value: the experiments of papers/u-analysis-and-model-inspector
(section 5.1, "10 different interpretability methods, 3 sorting types, 6 noise types, and 5
different patch sizes, resulting in 900 runs for each dataset", and Fig. 4).

Each configuration of each image is exactly the ``u_analysis`` kind on that image (same
regions, order, noise and seeds: image number = its index in the data set), with the
image's label as the target (its predicted class when it has none). The data set is the
``dataset`` param (``workers.dataset_source``): an uploaded data set (each chunk reads only
its own images from the zip), the model's registered data (``model:<split>``; ``test`` and
``train`` as before), or the request's images (``uploaded``, labels = ``target``). The work is
split for child jobs:

- ``plan_sweep(params, n_images)``: the chunks of images (``images_per_chunk`` each);
- ``run_sweep_chunk(model, images, labels, params, progress, first_index)``: a JSON-able
  partial result of one chunk (counts per configuration), independent of the other chunks,
  so a restarted sweep recomputes only the chunks without a stored partial;
- ``aggregate_sweep(partials, params)``: the sums, percentages, CSV/JSON and bar charts;

and ``plan`` / ``run_chunk`` / ``aggregate`` wrap them for ``workers.fanout`` (chunks shared
by idle workers through Redis), ``run`` does all in one process.

Inside a chunk, each image's attribution is computed once per method and reused by every
order, noise and window; sequences that are identical whatever the configuration says are
evaluated once (``random`` order ignores the method; two windows that round to the same
pixel size; two noises giving the same image, e.g. ``zeros`` and ``dataset_mean`` when the
normalisation mean is 0), as are ``x_0`` (the image) and ``x_N`` (the noise image), shared by
all sequences; all remaining rows of the chunk go through ``model.forward`` together, in
chunks of ``params.batch_size or model.batch_size``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from schemas.errors import BadParams
from schemas.u_analysis import USweepParams
from workers import render
from workers.dataset_source import DatasetSource, limited, open_source
from workers.explain.base import Artifact, Inputs, KindResult, LoadedModel, ProgressFn, no_progress
from workers.explain.u_analysis import (
    STREAM_ORDER,
    Grid,
    PixelSpace,
    SequenceSpec,
    compute_attribution,
    evaluate_sequences,
    noise_image,
    region_importance,
    region_order,
    region_ranks,
    rng_for,
    window_pixels,
)
from workers.pipeline import JobContext, forward_in_chunks

HYPERPARAMETERS = ("method", "order", "noise", "window")
PARTIAL_VERSION = 1


@dataclass(frozen=True)
class Config:
    """One configuration of the grid; ``window`` as given (a fraction or pixels)."""

    method: str
    order: str
    noise: str
    window: float | int

    @property
    def key(self) -> str:
        return f"{self.method}/{self.order}/{self.noise}/{self.window}"


def configs(params: USweepParams) -> list[Config]:
    """The grid in its fixed order: methods x orders x noises x windows (last fastest)."""
    return [
        Config(m, o, nz, w)
        for m in params.method_keys
        for o in params.orders
        for nz in params.noises
        for _, w in params.windows
    ]


def grid_fingerprint(params: USweepParams) -> str:
    """sha256 of everything that decides a chunk's counts (not the chunking or batch size):
    partials of different grids are never mixed."""
    fields = params.model_dump(mode="json", exclude={"images_per_chunk", "batch_size", "limit", "dataset"})
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


class DatasetChoice(Protocol):
    """Params naming a data set as ``u_sweep`` does (also ``adversarial``, ``noise_images``)."""

    @property
    def dataset(self) -> str | None: ...

    @property
    def limit(self) -> int | None: ...


class DatasetParams(DatasetChoice, Protocol):
    """What ``plan_sweep`` reads: a data-set kind's params cut into chunks (``u_sweep``,
    ``fill_blanks_consistency``)."""

    @property
    def images_per_chunk(self) -> int: ...


def plan_sweep(params: DatasetParams, n_images: int) -> list[dict[str, int]]:
    """Chunks of ``params.images_per_chunk`` consecutive images:
    ``[{"chunk": k, "first_index": s, "n_images": m}]`` (``first_index`` seeds the images)."""
    size = params.images_per_chunk
    return [
        {"chunk": k, "first_index": s, "n_images": min(size, n_images - s)}
        for k, s in enumerate(range(0, n_images, size))
    ]


def window_sizes(params: USweepParams, size: tuple[int, int]) -> list[int]:
    """The window side in pixels of each window of the grid for images of ``size`` (H, W)."""
    return [
        window_pixels(size, int(v) if unit == "px" else None, float(v) if unit == "fraction" else None)
        for unit, v in params.windows
    ]


def _count_u(predicted: np.ndarray, target: int) -> int:
    """Number of U-triples (gaps between consecutive correct predictions) of a sequence."""
    correct = np.flatnonzero(predicted == target)
    return int(np.count_nonzero(np.diff(correct) > 1))


def run_sweep_chunk(
    model: LoadedModel,
    images: torch.Tensor,
    labels: torch.Tensor,
    params: USweepParams,
    progress: ProgressFn = no_progress,
    first_index: int = 0,
) -> dict[str, Any]:
    """The counts of one chunk: ``images`` ``(n, C, H, W)`` in model input space, ``labels``
    ``(n,)`` (the targets), image ``j`` seeded as number ``first_index + j``.

    Returns JSON-able ``{"version", "fingerprint", "first_index", "n_images", "n_correct",
    "window_px", "with_u", "with_u_correct", "triples", "rows", "naive_rows", "seconds",
    "stage_seconds"}``,
    the last lists of per-configuration counts in ``configs(params)`` order: images with a U,
    images with a U among those whose ``x_0`` is classified correctly, and U-triples.
    """
    t0 = time.perf_counter()
    n, c, h, w = images.shape
    labels = labels.to(torch.long).cpu()
    keys, grid_cfgs = params.method_keys, configs(params)
    wins = window_sizes(params, (h, w))
    grids = {px: Grid(h, w, px) for px in set(wins)}
    no_rank = {px: np.zeros(g.n, dtype=np.int32) for px, g in grids.items()}  # x_0 (step 0), x_N (step 1)
    space = PixelSpace.of(model.manifest.preprocessing, c)
    batch = params.batch_size or model.batch_size

    maps: dict[str, np.ndarray] = {}  # method key -> (n, H, W)
    for k, (key, method) in enumerate(zip(keys, params.methods, strict=True)):
        attr = compute_attribution(model, images, labels.to(images.device), method, batch_size=params.batch_size)
        agg = params.aggregation or method.aggregation
        maps[key] = np.stack([render.to_2d(a, agg) for a in attr])
        progress(k + 1, len(keys), "attribution")

    t_attr = time.perf_counter()
    specs: list[SequenceSpec] = []
    # per image: row of x_0, and per config: (z row, interior spec index or -1, n regions)
    x0_spec: list[int] = []
    plan: list[list[tuple[int, int]]] = []
    naive_rows = 0
    for j in range(n):
        index, x, target = first_index + j, images[j], int(labels[j])
        x0_spec.append(len(specs))
        specs.append(SequenceSpec(x, x, grids[wins[0]], no_rank[wins[0]], np.array([0]), target))
        z_rows: dict[bytes, int] = {}  # noise image digest -> spec index of its x_N row
        noise_of: dict[tuple[str, int], tuple[bytes, torch.Tensor]] = {}
        seqs: dict[tuple[int, bytes, bytes], int] = {}
        orders: dict[tuple[str, str, int], np.ndarray] = {}
        row_plan = []
        for cfg, px in zip(grid_cfgs, [wins[i % len(wins)] for i in range(len(grid_cfgs))], strict=True):
            grid = grids[px]
            naive_rows += grid.n + 1
            if (cfg.noise, px) not in noise_of:
                z = noise_image(x, cfg.noise, params, grid, space, index)  # type: ignore[arg-type]
                digest = hashlib.sha1(z.cpu().numpy().tobytes()).digest()
                noise_of[(cfg.noise, px)] = (digest, z)
                if digest not in z_rows:
                    z_rows[digest] = len(specs)
                    specs.append(SequenceSpec(x, z, grid, no_rank[px], np.array([1]), target))
            digest, z = noise_of[(cfg.noise, px)]
            okey = ("" if cfg.order == "random" else cfg.method, cfg.order, px)
            if okey not in orders:
                imp = region_importance(maps[cfg.method][j], grid) if cfg.order != "random" else np.zeros(grid.n)
                orders[okey] = region_order(imp, cfg.order, rng_for(params.seed, index, STREAM_ORDER, px))  # type: ignore[arg-type]
            order = orders[okey]
            skey = (px, order.tobytes(), digest)
            if skey not in seqs:
                if grid.n > 1:
                    seqs[skey] = len(specs)
                    specs.append(SequenceSpec(x, z, grid, region_ranks(order), np.arange(1, grid.n), target))
                else:
                    seqs[skey] = -1
            row_plan.append((z_rows[digest], seqs[skey]))
        plan.append(row_plan)
    rows = sum(len(s.steps) for s in specs)
    progress(0, rows, "evaluating")
    t_plan = time.perf_counter()
    predicted, _ = evaluate_sequences(model, specs, batch, progress, "evaluating", need_probability=False)
    t_eval = time.perf_counter()

    starts = np.concatenate([[0], np.cumsum([len(s.steps) for s in specs])])
    with_u = np.zeros(len(grid_cfgs), dtype=np.int64)
    with_u_correct = np.zeros(len(grid_cfgs), dtype=np.int64)
    triples = np.zeros(len(grid_cfgs), dtype=np.int64)
    n_correct = 0
    for j in range(n):
        target = int(labels[j])
        p0 = predicted[starts[x0_spec[j]]]
        correct0 = bool(p0 == target)
        n_correct += correct0
        counted: dict[tuple[int, int], int] = {}
        for k, pair in enumerate(plan[j]):
            if pair not in counted:
                z_spec, seq_spec = pair
                interior = predicted[starts[seq_spec] : starts[seq_spec + 1]] if seq_spec >= 0 else predicted[:0]
                counted[pair] = _count_u(np.concatenate([[p0], interior, [predicted[starts[z_spec]]]]), target)
            u = counted[pair]
            triples[k] += u
            with_u[k] += u > 0
            with_u_correct[k] += u > 0 and correct0
    return {
        "version": PARTIAL_VERSION,
        "fingerprint": grid_fingerprint(params),
        "first_index": first_index,
        "n_images": n,
        "n_correct": n_correct,
        "window_px": wins,
        "with_u": with_u.tolist(),
        "with_u_correct": with_u_correct.tolist(),
        "triples": triples.tolist(),
        "rows": rows,
        "naive_rows": naive_rows,
        "seconds": round(time.perf_counter() - t0, 3),
        "stage_seconds": {
            "attribution": round(t_attr - t0, 3),
            "planning": round(t_plan - t_attr, 3),
            "evaluation": round(t_eval - t_plan, 3),
            "counting": round(time.perf_counter() - t_eval, 3),
        },
    }


def _bar_png(title: str, values: dict[str, float]) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(4.0, 0.6 * len(values) + 1.5), 3.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    names = list(values)
    bars = ax.bar(range(len(names)), [values[k] for k in names], color="tab:blue")
    ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("U occurrence (%)")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(0, max([*values.values(), 1.0]) * 1.18)
    fig.subplots_adjust(left=0.12, right=0.98, bottom=0.32, top=0.9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def aggregate_sweep(partials: list[dict[str, Any]], params: USweepParams) -> KindResult:
    """Sum the chunks' counts (any order; each image counted once) into the sweep's result:
    U occurrence per configuration (``configs.csv``, ``configs.json``) and per hyperparameter
    value (``by_hyperparameter.csv``, ``u_occurrence_<hyperparameter>.png``: the paper's
    Fig. 4), the model's accuracy on the images, and the cost."""
    if not partials:
        raise BadParams("no chunk results to aggregate")
    fp = grid_fingerprint(params)
    cfgs = configs(params)
    seen: set[int] = set()
    for p in partials:
        if p.get("version") != PARTIAL_VERSION or p.get("fingerprint") != fp or len(p["with_u"]) != len(cfgs):
            raise BadParams(
                "a chunk result belongs to another sweep grid", details={"first_index": p.get("first_index")}
            )
        idx = set(range(p["first_index"], p["first_index"] + p["n_images"]))
        if idx & seen:
            raise BadParams("chunk results overlap", details={"first_index": p["first_index"]})
        seen |= idx
    n = sum(p["n_images"] for p in partials)
    n_correct = sum(p["n_correct"] for p in partials)
    with_u = np.sum([p["with_u"] for p in partials], axis=0)
    with_u_correct = np.sum([p["with_u_correct"] for p in partials], axis=0)
    triples = np.sum([p["triples"] for p in partials], axis=0)
    window_px = partials[0]["window_px"]

    unit = params.windows[0][0]
    rows = []
    for k, cfg in enumerate(cfgs):
        rows.append(
            {
                "method": cfg.method,
                "order": cfg.order,
                "noise": cfg.noise,
                "window": cfg.window,
                "window_unit": unit,
                "window_px": window_px[k % len(window_px)],
                "images": n,
                "images_with_u": int(with_u[k]),
                "u_occurrence_pct": round(100.0 * with_u[k] / n, 4),
                "u_occurrence_correct_pct": round(100.0 * with_u_correct[k] / n_correct, 4) if n_correct else None,
                "triples": int(triples[k]),
            }
        )
    by: dict[str, dict[str, float]] = {}
    for hp in HYPERPARAMETERS:
        groups: dict[str, list[int]] = {}
        for k, cfg in enumerate(cfgs):
            groups.setdefault(str(getattr(cfg, hp)), []).append(k)
        by[hp] = {v: round(100.0 * float(with_u[ks].sum()) / (n * len(ks)), 4) for v, ks in groups.items()}

    csv_buf = io.StringIO()
    writer = csv.DictWriter(csv_buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    hp_buf = io.StringIO()
    hp_writer = csv.writer(hp_buf)
    hp_writer.writerow(["hyperparameter", "value", "u_occurrence_pct"])
    for hp, values in by.items():
        for v, pct in values.items():
            hp_writer.writerow([hp, v, pct])
    seconds = sum(p["seconds"] for p in partials)
    stages = {k: round(sum(p["stage_seconds"][k] for p in partials), 3) for k in partials[0]["stage_seconds"]}
    evaluations = sum(p["rows"] for p in partials)
    summary = {
        "images": n,
        "accuracy": round(n_correct / n, 6),
        "configurations": len(cfgs),
        "u_occurrence_pct": round(100.0 * float(with_u.sum()) / (n * len(cfgs)), 4),
        "by_hyperparameter": by,
        "window_px": dict(zip([str(w) for _, w in params.windows], window_px, strict=True)),
        "evaluations": evaluations,
        "evaluations_without_sharing": sum(p["naive_rows"] for p in partials),
        "chunk_seconds": round(seconds, 3),
        "stage_seconds": stages,
        "chunks": len(partials),
    }
    artifacts = [
        Artifact("configs.csv", csv_buf.getvalue().encode(), "text/csv"),
        Artifact("configs.json", json.dumps(rows).encode(), "application/json"),
        Artifact("by_hyperparameter.csv", hp_buf.getvalue().encode(), "text/csv"),
    ]
    titles = {
        "method": "attribution method",
        "order": "noise window order",
        "noise": "type of noise",
        "window": f"noise window size ({'fraction of the side' if unit == 'fraction' else 'px'})",
    }
    for hp in HYPERPARAMETERS:
        png = _bar_png(f"U occurrence by {titles[hp]} ({n} images)", by[hp])
        artifacts.append(Artifact(f"u_occurrence_{hp}.png", png, "image/png"))
    return KindResult(summary, artifacts)


def source(
    model: LoadedModel, params: DatasetChoice, inputs: Inputs | None, context: JobContext | None = None
) -> DatasetSource:
    """The swept data set (its first ``limit`` images): an uploaded data set
    (``workers.dataset_source``), the model's registered data, or the request's images with
    their targets (``dataset='uploaded'``)."""
    if params.dataset == "uploaded":
        if inputs is None or len(inputs) == 0:
            raise BadParams("dataset='uploaded' needs images")
        images, targets = inputs.images, inputs.targets.cpu().numpy().astype(np.int64)

        def load(index: np.ndarray) -> tuple[torch.Tensor, list[np.ndarray]]:
            return images[torch.from_numpy(index).to(images.device)], []

        src = DatasetSource("uploaded", [f"upload/{i}" for i in range(len(targets))], targets, load)
    elif params.dataset is None:
        raise BadParams("no dataset named", details={"field": "dataset"})
    else:
        datasets, models_dir = (context.datasets, context.models_dir) if context is not None else ({}, Path())
        src = open_source(model, params.dataset, datasets, models_dir)
    return limited(src, params.limit)


def chunk_data(model: LoadedModel, src: DatasetSource, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``start:stop`` ``(n, C, H, W)`` on the model's device and their labels ``(n,)``:
    an image without a label (a flat data set) is swept for its predicted class."""
    images, _ = src.load(start, stop)
    images = images.to(model.device)
    labels = torch.from_numpy(src.labels[start:stop].copy())
    if (labels < 0).any():
        predicted = forward_in_chunks(model, images).argmax(1).cpu()
        labels = torch.where(labels >= 0, labels, predicted)
    return images, labels


def dataset(
    model: LoadedModel, params: DatasetChoice, inputs: Inputs | None, context: JobContext | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every swept image ``(n, C, H, W)`` in model input space and its label ``(n,)`` (for
    small sets and tests; jobs read a chunk at a time)."""
    src = source(model, params, inputs, context)
    return chunk_data(model, src, 0, len(src))


def run(
    model: LoadedModel, inputs: Inputs | None, params: USweepParams, progress: ProgressFn,
    context: JobContext | None = None,
) -> KindResult:
    """The ``u_sweep`` kind in one process: every chunk of ``plan_sweep``, then
    ``aggregate_sweep``. ``inputs`` may be None (or empty) unless ``dataset='uploaded'``."""
    t0 = time.perf_counter()
    src = source(model, params, inputs, context)
    chunks = plan_sweep(params, len(src))
    partials = []
    for ch in chunks:
        s, m = ch["first_index"], ch["n_images"]

        def chunk_progress(done: int, total: int, stage: str, _k: int = ch["chunk"]) -> None:
            progress(done, total, f"chunk {_k + 1}/{len(chunks)}: {stage}")

        images, labels = chunk_data(model, src, s, s + m)
        partials.append(run_sweep_chunk(model, images, labels, params, chunk_progress, s))
    result = aggregate(model, inputs, params, partials)
    result.summary["runtime_s"] = round(time.perf_counter() - t0, 3)
    return result


# --- the job machinery's chunked-kind interface (workers.fanout) ----------------------------


def plan(
    model: LoadedModel, inputs: Inputs | None, params: USweepParams, context: JobContext | None = None
) -> list[dict[str, int]]:
    """``plan_sweep`` over the job's data set."""
    return plan_sweep(params, len(source(model, params, inputs, context)))


def run_chunk(
    model: LoadedModel,
    inputs: Inputs | None,
    params: USweepParams,
    chunk: dict[str, int],
    progress: ProgressFn,
    context: JobContext | None = None,
) -> dict[str, Any]:
    """``run_sweep_chunk`` on the images of one chunk of ``plan`` (only they are read)."""
    s, m = chunk["first_index"], chunk["n_images"]
    images, labels = chunk_data(model, source(model, params, inputs, context), s, s + m)
    return run_sweep_chunk(model, images, labels, params, progress, s)


def aggregate(
    model: LoadedModel, inputs: Inputs | None, params: USweepParams, results: list[dict[str, Any]], context: Any = None
) -> KindResult:
    """``aggregate_sweep`` of every chunk's result."""
    result = aggregate_sweep(results, params)
    result.summary["dataset"] = params.dataset
    result.summary["labels"] = _labels_source(params)
    return result


def _labels_source(params: USweepParams) -> str:
    if params.dataset in ("test", "train") or params.dataset.startswith("model:"):
        return f"{params.dataset.removeprefix('model:')} split"
    if params.dataset != "uploaded":
        return "the data set's classes (predicted class for images without one)"
    return "given (target)" if params.target is not None else "predicted (no target given)"
