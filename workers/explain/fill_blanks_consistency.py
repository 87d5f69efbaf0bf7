"""Consistency of the prototypes (papers/fill-in-the-blanks §4.3, Table 1; §4.4, Fig. 4): the
``fill_blanks_consistency`` kind.

For every image of a data set (the model's test or train split, or uploaded images with
their labels, as ``u_sweep``) and every masking: the prototype ``M(x) + T`` filled for ``y``
(``update_label``: the true label, or the class predicted on the unmasked image), and two
controls that say whether the fill carries information: ``M(x)`` alone, and ``T`` alone on
the fill image (no unmasked pixel). The model classifies all three; Table 1 scores
(accuracy, macro-F1, weighted-F1, percent) each against the paper's label (the prediction on
the masked input, ``f(M(x))``) and against the true label. An image without a kept draw has
no prototype and is left out of the scores (counted in ``no_prototype``).

The work is shared by workers as ``u_sweep``'s (``workers.fanout``): ``plan`` cuts the data
set into chunks of ``images_per_chunk`` (``u_sweep.plan_sweep``) plus one chunk for the
ablation when asked; ``run_chunk`` returns a JSON partial (per-image predictions, one
prototype tile per class); ``aggregate`` scores them and writes ``table1.csv`` /
``table1.json``, ``confusion_<masking>.csv`` (paper's label x prototype prediction),
``prototypes.png`` (Fig. 2: one prototype per class and masking) and ``ablation.png``
(Fig. 4: the prototypes of one image per masking ratio x patch size).
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from schemas.errors import BadParams
from schemas.fill_blanks import FillBlanksConsistencyParams, check_masks
from workers import render
from workers.explain.base import Artifact, Inputs, KindResult, LoadedModel, ProgressFn, no_progress
from workers.explain.fill_blanks import figures, statistics
from workers.explain.fill_blanks.prototypes import classify, fill
from workers.explain.u_sweep import dataset, plan_sweep
from workers.pipeline import forward_in_chunks

PARTIAL_VERSION = 1
INPUTS = ("prototype", "masked_only", "fill_only")
"""What the model classifies: ``M(x) + T``, and the controls ``M(x)`` and ``T`` alone."""
REFERENCES = ("paper", "true")
MAX_CLASS_TILES = 20
"""Fig. 2 shows at most this many classes (the lowest class indices present)."""


def fingerprint(params: FillBlanksConsistencyParams) -> str:
    """sha256 of what decides a chunk's content: partials of other knobs are never mixed."""
    fields = params.model_dump(mode="json", exclude={"images_per_chunk", "batch_size", "draws_per_pass", "limit"})
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _tile(u: torch.Tensor) -> dict[str, Any]:
    rgb = figures.to_uint8(u)
    return {"shape": list(rgb.shape), "data": base64.b64encode(rgb.tobytes()).decode()}


def _untile(t: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(t["data"]), dtype=np.uint8).reshape(t["shape"])


def update_labels(
    model: LoadedModel, images: torch.Tensor, labels: torch.Tensor, params: FillBlanksConsistencyParams
) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: E501
    """``(y (n,), predictions on the unmasked images (n,))``."""
    with model.forward_only():
        predicted = forward_in_chunks(model, images, params.batch_size).argmax(1).cpu()
    return (labels.cpu() if params.update_label == "true" else predicted), predicted


def run_consistency_chunk(
    model: LoadedModel,
    images: torch.Tensor,
    labels: torch.Tensor,
    params: FillBlanksConsistencyParams,
    progress: ProgressFn = no_progress,
    first_index: int = 0,
) -> dict[str, Any]:
    """The partial of one chunk: ``images`` ``(n, C, H, W)`` (model space), true ``labels`` ``(n,)``,
    image ``j`` numbered ``first_index + j``. JSON-able: per masking a row per image
    (``true``, ``y``, ``paper`` label, the three predictions or None, draws, kept) and the
    prototype tile of the first image of each class ``y``."""
    t0 = time.perf_counter()
    ys, unmasked = update_labels(model, images, labels, params)
    rows: dict[str, list[dict[str, Any]]] = {}
    tiles: dict[str, dict[str, Any]] = {}
    evaluations = 0
    for masking in params.maskings:

        def step(done: int, total: int, stage: str, _m: str = masking) -> None:
            progress(done, total, f"{_m}: {stage}")

        filled = fill(model, images, ys.to(images.device), params, masking, first_index, step)
        evaluations += sum(f.draws for f in filled) * (params.bfgs_steps if params.update == "bfgs" else 1)
        done = [f for f in filled if f.prototype is not None]
        shown = [getattr(f, name) for f in done for name in ("prototype", "masked", "fill_only")]
        predicted = classify(model, shown, params.batch_size).argmax(1).reshape(len(done), 3).tolist()
        by_index = {f.index: p for f, p in zip(done, predicted, strict=True)}
        rows[masking], tiles[masking] = [], {}
        for j, f in enumerate(filled):
            p = by_index.get(f.index, [None] * 3)
            rows[masking].append(
                {
                    "index": f.index, "true": int(labels[j]), "y": f.y, "paper": f.masked_prediction,
                    "unmasked": int(unmasked[j]), **dict(zip(INPUTS, p, strict=True)),
                    "draws": f.draws, "kept": f.kept, "masked_accuracy": round(f.masked_accuracy, 6),
                }
            )  # fmt: skip
            if f.prototype is not None and str(f.y) not in tiles[masking]:
                tiles[masking][str(f.y)] = {"index": f.index, **_tile(f.prototype)}
    return {
        "version": PARTIAL_VERSION,
        "fingerprint": fingerprint(params),
        "first_index": first_index,
        "n_images": len(images),
        "rows": rows,
        "tiles": tiles,
        "evaluations": evaluations,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def run_ablation(
    model: LoadedModel, image: torch.Tensor, label: int, params: FillBlanksConsistencyParams, index: int,
    progress: ProgressFn = no_progress,
) -> dict[str, Any]:  # fmt: skip
    """§4.4, Fig. 4: random-masking prototypes of one image ``(C, H, W)`` for every
    ``ablation.mask_ratios`` x ``ablation.patch_sizes``, as tiles with their prediction."""
    assert params.ablation is not None
    ys, _ = update_labels(model, image[None], torch.tensor([label]), params)
    cells = []
    ratios, patches = params.ablation.mask_ratios, params.ablation.patch_sizes
    for r, ratio in enumerate(ratios):
        for c, patch in enumerate(patches):
            knobs = params.model_copy(update={"mask_ratio": ratio, "patch_size": patch})
            f = fill(model, image[None], ys.to(image.device), knobs, "random", index)[0]
            pred = None if f.prototype is None else int(classify(model, [f.prototype]).argmax())
            cells.append(
                {"mask_ratio": ratio, "patch_size": patch, "draws": f.draws, "kept": f.kept, "predicted": pred,
                 "tile": None if f.prototype is None else _tile(f.prototype)}
            )  # fmt: skip
            progress(r * len(patches) + c + 1, len(ratios) * len(patches), "ablation")
    return {"version": PARTIAL_VERSION, "fingerprint": fingerprint(params), "ablation": cells, "y": int(ys[0])}


# --- aggregation ------------------------------------------------------------------------------


def _check(partials: list[dict[str, Any]], params: FillBlanksConsistencyParams) -> None:
    fp, seen = fingerprint(params), set[int]()
    for p in partials:
        if p.get("version") != PARTIAL_VERSION or p.get("fingerprint") != fp:
            raise BadParams(
                "a chunk result belongs to another job's params", details={"first_index": p.get("first_index")}
            )
        if "ablation" in p:
            continue
        idx = set(range(p["first_index"], p["first_index"] + p["n_images"]))
        if idx & seen:
            raise BadParams("chunk results overlap", details={"first_index": p["first_index"]})
        seen |= idx


def table(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Table 1's scores for one masking: per input (prototype and controls) and reference label."""
    done = [r for r in rows if r["prototype"] is not None]
    out: dict[str, Any] = {
        "images": len(rows),
        "prototypes": len(done),
        "no_prototype": len(rows) - len(done),
        "masked_accuracy": round(100.0 * float(np.mean([r["masked_accuracy"] for r in rows])), 2) if rows else None,
        "paper_label_is_true_label": round(100.0 * float(np.mean([r["paper"] == r["true"] for r in done])), 2)
        if done else None,
    }  # fmt: skip
    for name in INPUTS:
        out[name] = {ref: statistics.scores([r[name] for r in done], [r[ref] for r in done]) for ref in REFERENCES}
    return out


def _table_csv(tables: Mapping[str, dict[str, Any]]) -> bytes:
    head = ["masking", "images", "prototypes", "no_prototype", "masked_accuracy"]
    cols = [f"{i}_vs_{ref}_{m}" for i in INPUTS for ref in REFERENCES for m in ("accuracy", "macro_f1", "weighted_f1")]
    rows = [
        [masking, *(t[h] for h in head[1:])]
        + [t[i][ref][m] for i in INPUTS for ref in REFERENCES for m in ("accuracy", "macro_f1", "weighted_f1")]
        for masking, t in tables.items()
    ]
    return render.csv_bytes(head + cols, rows)


def _confusion_csv(rows: list[dict[str, Any]], labels: list[str]) -> bytes:
    done = [r for r in rows if r["prototype"] is not None]
    classes = sorted({r["paper"] for r in done} | {r["prototype"] for r in done})
    at = {k: i for i, k in enumerate(classes)}
    m = statistics.confusion([at[r["prototype"]] for r in done], [at[r["paper"]] for r in done], len(classes))
    name = [labels[k] if k < len(labels) else str(k) for k in classes]
    table = [[k, *row] for k, row in zip(name, m.tolist(), strict=True)]
    return render.csv_bytes(["paper_label \\ prototype_prediction", *name], table)


def _prototypes_png(partials: list[dict[str, Any]], maskings: Sequence[str], labels: list[str]) -> bytes:
    """Fig. 2: per masking (row), the prototype of the first image of each class (column)."""
    best: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in maskings}
    for p in partials:
        for m, by_class in p.get("tiles", {}).items():
            for k, t in by_class.items():
                if int(k) not in best[m] or t["index"] < best[m][int(k)]["index"]:
                    best[m][int(k)] = t
    classes = sorted({k for m in maskings for k in best[m]})[:MAX_CLASS_TILES]
    tiles = [[_untile(best[m][k]) if k in best[m] else None for k in classes] for m in maskings]
    names = [labels[k] if k < len(labels) else str(k) for k in classes]
    return render.tile_grid_png(tiles, list(maskings), [names] * len(maskings), "prototype per class (Fig. 2)")


def _ablation_png(part: dict[str, Any], params: FillBlanksConsistencyParams, labels: list[str]) -> bytes:
    assert params.ablation is not None
    cells = part["ablation"]
    cols = len(params.ablation.patch_sizes)
    tiles = [
        [None if c["tile"] is None else _untile(c["tile"]) for c in cells[r : r + cols]]
        for r in range(0, len(cells), cols)
    ]
    names = ["-" if c["predicted"] is None else labels[c["predicted"]][:10] for c in cells]
    captions = [
        [f"{c['patch_size']}px: {name}" for c, name in zip(cells[r : r + cols], names[r : r + cols], strict=True)]
        for r in range(0, len(cells), cols)
    ]
    rows = [f"eta {r:g}" for r in params.ablation.mask_ratios]
    y = part["y"]
    title = f"image {params.ablation.image} filled for {labels[y] if y < len(labels) else y} (Fig. 4)"
    return render.tile_grid_png(tiles, rows, captions, title)


def aggregate_consistency(
    partials: list[dict[str, Any]], params: FillBlanksConsistencyParams, labels: list[str]
) -> KindResult:
    """Table 1 of every chunk's rows (any order; each image once), with its files."""
    if not partials:
        raise BadParams("no chunk results to aggregate")
    _check(partials, params)
    chunks = sorted((p for p in partials if "ablation" not in p), key=lambda p: p["first_index"])
    rows = {m: [r for p in chunks for r in p["rows"][m]] for m in params.maskings}
    tables: dict[str, dict[str, Any]] = {m: table(rows[m]) for m in params.maskings}
    first = rows[params.maskings[0]]
    summary: dict[str, Any] = {
        "images": len(first),
        "unmasked_accuracy": round(100.0 * float(np.mean([r["unmasked"] == r["true"] for r in first])), 2),
        "update_label": params.update_label,
        "table1": tables,
        "evaluations": sum(p["evaluations"] for p in chunks),
        "chunk_seconds": round(sum(p["seconds"] for p in chunks), 3),
        "chunks": len(partials),
    }
    artifacts = [
        Artifact("table1.csv", _table_csv(tables), "text/csv"),
        Artifact("table1.json", json.dumps(tables, indent=1).encode(), "application/json"),
        Artifact("rows.json", json.dumps(rows).encode(), "application/json"),
        Artifact("prototypes.png", _prototypes_png(chunks, params.maskings, labels), "image/png"),
    ]
    artifacts += [Artifact(f"confusion_{m}.csv", _confusion_csv(rows[m], labels), "text/csv") for m in params.maskings]
    ablation = [p for p in partials if "ablation" in p]
    if ablation:
        artifacts.append(Artifact("ablation.png", _ablation_png(ablation[0], params, labels), "image/png"))
        summary["ablation"] = [{k: v for k, v in c.items() if k != "tile"} for c in ablation[0]["ablation"]]
    return KindResult(summary, artifacts)


# --- the job machinery's chunked-kind interface (workers.fanout) ------------------------------


def plan(
    model: LoadedModel, inputs: Inputs | None, params: FillBlanksConsistencyParams, context: Any = None
) -> list[dict[str, int]]:
    """``u_sweep.plan_sweep`` over the job's data set, plus ``{"ablation": 1, ...}`` when asked."""
    images, _ = dataset(model, params, inputs)
    h, w = images.shape[2:]
    for masking in params.maskings:
        params.check_image((h, w), masking)
    if params.ablation is not None:  # fail before any chunk runs
        for patch in params.ablation.patch_sizes:
            for ratio in params.ablation.mask_ratios:
                check_masks(patch, ratio, params.k, (h, w), "random")
    chunks = plan_sweep(params, len(images))
    if params.ablation is not None:
        if params.ablation.image >= len(images):
            raise BadParams(
                f"ablation.image {params.ablation.image} is past the data set ({len(images)} images)",
                details={"field": "ablation.image"},
            )
        chunks.append({"chunk": len(chunks), "first_index": params.ablation.image, "n_images": 1, "ablation": 1})
    return chunks


def run_chunk(
    model: LoadedModel, inputs: Inputs | None, params: FillBlanksConsistencyParams, chunk: dict[str, int],
    progress: ProgressFn, context: Any = None,
) -> dict[str, Any]:  # fmt: skip
    images, labels = dataset(model, params, inputs)
    s, m = chunk["first_index"], chunk["n_images"]
    if chunk.get("ablation"):
        return run_ablation(model, images[s], int(labels[s]), params, s, progress)
    return run_consistency_chunk(model, images[s : s + m], labels[s : s + m], params, progress, s)


def aggregate(
    model: LoadedModel, inputs: Inputs | None, params: FillBlanksConsistencyParams, results: list[dict[str, Any]],
    context: Any = None,
) -> KindResult:  # fmt: skip
    result = aggregate_consistency(results, params, model.manifest.labels)
    result.summary["dataset"] = params.dataset
    return result


def run(
    model: LoadedModel, inputs: Inputs | None, params: FillBlanksConsistencyParams, progress: ProgressFn
) -> KindResult:
    """The kind in one process: every chunk of ``plan``, then ``aggregate``."""
    t0 = time.perf_counter()
    chunks = plan(model, inputs, params)
    partials = []
    for ch in chunks:

        def chunk_progress(done: int, total: int, stage: str, _k: int = ch["chunk"]) -> None:
            progress(done, total, f"chunk {_k + 1}/{len(chunks)}: {stage}")

        partials.append(run_chunk(model, inputs, params, ch, chunk_progress))
    result = aggregate(model, inputs, params, partials)
    result.summary["runtime_s"] = round(time.perf_counter() - t0, 3)
    return result
