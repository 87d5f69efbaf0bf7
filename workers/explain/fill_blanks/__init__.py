"""Fill in the blanks: how a model fills masked patches of an image (papers/fill-in-the-blanks,
§3.2 Eq. 1-5, §4.1, §4.2, §4.5, §4.6); the ``fill_blanks`` kind.

For each image ``x`` ``(C, H, W)`` and its label ``y`` (the job's ``target``, default the class
predicted on the unmasked image): masks of square patches (:mod:`.masks`), the update
``dx = -gamma grad CE(f(M(x)), y)`` or an L-BFGS direction and the threshold ``T`` (:mod:`.updates`),
the prototype ``M(x) + T`` (:mod:`.prototypes`), pictures (:mod:`.figures`). Table 1's
statistics (:mod:`.statistics`) serve the ``fill_blanks_consistency`` kind.

Artifacts per image ``i``: ``{i}-update.npy`` (``E[dx]`` ``(C, H, W)``, or the ``k`` step
updates ``(k, C, H, W)``, pixel space), ``{i}-fill.npy`` (``T`` ``(C, H, W)``),
``{i}-overlay.png`` (Fig. 1), ``{i}-prototype.png`` and, for progressive masking,
``{i}-steps.png`` (Fig. 3). An image without a kept draw has none of them: its
``prototype`` is null and the summary carries a warning.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from schemas.fill_blanks import FillBlanksParams
from workers import render
from workers.explain.base import Artifact, Inputs, KindResult, LoadedModel, ProgressFn
from workers.explain.fill_blanks import figures
from workers.explain.fill_blanks.masks import masked_count, patch_grid
from workers.explain.fill_blanks.prototypes import Filled, classify, fill
from workers.explain.fill_blanks.updates import draws_per_pass

TOP_K = 5


def _label(labels: list[str], k: int | None) -> dict[str, Any] | None:
    return None if k is None else {"index": k, "name": labels[k] if k < len(labels) else str(k)}


def top(probs: torch.Tensor, labels: list[str], k: int = TOP_K) -> list[dict[str, Any]]:
    """The ``k`` most probable classes of ``probs`` ``(K,)``."""
    values, indices = probs.topk(min(k, len(probs)))
    return [
        {**(_label(labels, int(i)) or {}), "probability": round(float(v), 6)}
        for v, i in zip(values, indices, strict=True)
    ]


def image_summary(f: Filled, probs: torch.Tensor | None, labels: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "label": _label(labels, f.y),
        "draws": f.draws,
        "kept": f.kept,
        "masked_accuracy": round(f.masked_accuracy, 6),
        "masked_prediction": _label(labels, f.masked_prediction),
        "prototype": None
        if probs is None
        else {"predicted": _label(labels, int(probs.argmax())), "top": top(probs, labels)},
    }
    if f.steps is not None:
        out["steps"] = [
            {"prediction": _label(labels, p), "label": _label(labels, y)}
            for p, y in zip(f.steps.predictions, f.steps.labels, strict=True)
        ]
    return out


def artifacts(j: int, f: Filled, labels: list[str]) -> list[Artifact]:
    """The PNG and NPY files of image ``j`` (none without a prototype)."""
    if f.prototype is None or f.update is None or f.fill is None or f.masked is None or f.overlay is None:
        return []
    out = [
        Artifact(f"{j}-update.npy", render.npy_bytes(f.update.float()), "application/x-npy"),
        Artifact(f"{j}-fill.npy", render.npy_bytes(f.fill.float()), "application/x-npy"),
        Artifact(f"{j}-overlay.png", figures.overlay_png(f.overlay, f.masked), "image/png"),
        Artifact(f"{j}-prototype.png", figures.prototype_png(f.prototype), "image/png"),
    ]
    if f.steps is not None:
        captions = [labels[p][:14] if p < len(labels) else str(p) for p in f.steps.predictions]
        out.append(Artifact(f"{j}-steps.png", figures.steps_png(f.steps.masks, f.steps.images, captions), "image/png"))
    return out


def run(model: LoadedModel, inputs: Inputs, params: FillBlanksParams, progress: ProgressFn) -> KindResult:
    """The ``fill_blanks`` kind: each image filled under ``params.masking``."""
    n, c, h, w = inputs.images.shape
    params.check_image((h, w), params.masking)
    t0 = time.perf_counter()
    filled = fill(model, inputs.images, inputs.targets, params, params.masking, 0, progress)
    t1 = time.perf_counter()
    with_proto = [f for f in filled if f.prototype is not None]
    probs = dict(zip([f.index for f in with_proto], classify(model, [f.prototype for f in with_proto]), strict=True))  # type: ignore[misc]
    labels = model.manifest.labels
    arts: list[Artifact] = []
    warnings = []
    for j, f in enumerate(filled):
        arts += artifacts(j, f, labels)
        if f.prototype is None:
            warnings.append(
                f"image {j}: no kept draw in {f.draws} masks (no masked input classified as "
                f"{labels[f.y] if f.y < len(labels) else f.y}); no prototype"
            )
    grid = patch_grid((h, w), params.patch_size)
    summary: dict[str, Any] = {
        "masking": params.masking,
        "update": params.update,
        "patches": grid.n,
        "patch_size": params.patch_size,
        "masked_patches": masked_count(grid.n, params.mask_ratio) if params.masking == "random" else None,
        "draws_per_pass": draws_per_pass(model, (c, h, w), params),
        "evaluations": sum(f.draws for f in filled) * (params.bfgs_steps if params.update == "bfgs" else 1),
        "seed": params.seed,
        "warnings": warnings,
        "runtime_s": {"fill": round(t1 - t0, 4), "render": round(time.perf_counter() - t1, 4)},
        "images": [image_summary(f, probs.get(f.index), labels) for f in filled],
    }
    return KindResult(summary, arts)
