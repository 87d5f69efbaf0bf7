"""Kind ``reference_map``: how well a model's map agrees with a reference map, as the occlusion
paper (papers/occlusion-gradcam-adversarial-noise, Exp. 1, Figs 2 and 8-10) compares
occlusion and Grad-CAM maps with where people clicked.

Inputs: one image, the ``reference`` upload (``.npy`` or grey PNG of any size covering the
uploaded image, e.g. the 20x20 grid of click counts of Exp. 1; resampled bilinearly through
the model's preprocessing, :func:`schemas.regions.resample_map`, or, with
``reference_space='model'``, already at the model's input size), and the compared map ``M``
``(H, W)``:

- ``attribution``: an attribution method through the ``attribution`` kind (default Grad-CAM);
- ``occlusion``: the drop map of :mod:`workers.explain.occlusion_map` (the target probability
  minus its value with the occluder on, averaged over the positions covering each pixel);
- ``uploaded``: the ``attribution`` upload at the model's input size.

Scores (:mod:`workers.explain.map_metrics`): Pearson and Spearman correlation, IoU of the top
``f`` of both maps for each of ``iou_fractions`` (10% and 20%), the ROC AUC of ``M`` against
the reference's top ``auc_fraction`` (20%) taken as positives, and the pointing game (``M``'s
maximum inside that top region). Artifacts: ``0-side_by_side.png`` (image, reference, map),
``0-reference.npy`` and ``0-map.npy`` (both ``(H, W)`` on the model input).
"""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
from PIL import Image

from schemas.attribution import OcclusionMapParams
from schemas.errors import BadParams
from schemas.inspector import ATTRIBUTION, REFERENCE, ReferenceMapParams
from schemas.regions import decode_map, resample_map
from workers import render
from workers.explain.base import Artifact, Inputs, KindResult, LoadedModel, ProgressFn
from workers.explain.map_metrics import agreement, argmax_point, auc, pointing_game, top_mask
from workers.explain.maps import attribution_maps
from workers.explain.occlusion_map import occlusion_grid


def compare(map2d: np.ndarray, reference: np.ndarray, params: ReferenceMapParams) -> dict[str, Any]:
    """The agreement scores of ``map2d`` with ``reference`` (both ``(H, W)``)."""
    m = np.abs(map2d) if params.absolute else map2d
    positives = top_mask(reference, params.auc_fraction)
    return {
        **agreement(m, reference, params.iou_fractions),
        "auc": auc(m, positives),
        "pointing_game": pointing_game(m, positives),
        "map_max": list(argmax_point(m)),
        "reference_max": list(argmax_point(reference)),
    }


def compared_map(
    model: LoadedModel, inputs: Inputs, params: ReferenceMapParams, files: dict[str, bytes], progress: ProgressFn
) -> np.ndarray:
    """``M`` ``(H, W)`` float64 of image 0, from ``params.source``."""
    h, w = inputs.images.shape[2:]
    if params.source == "uploaded":
        if ATTRIBUTION not in files:
            raise BadParams("source='uploaded' needs an 'attribution' upload", details={"field": ATTRIBUTION})
        m = decode_map(files[ATTRIBUTION], ATTRIBUTION)
        if m.shape != (h, w):
            raise BadParams(f"attribution is {list(m.shape)}; it must be the model's input size {[h, w]}",
                            details={"field": ATTRIBUTION})  # fmt: skip
        return m
    if params.source == "occlusion":
        occ = OcclusionMapParams(occluder=params.occluder, stride=params.stride, fill=params.occlusion_fill,
                                 batch_size=params.batch_size)  # fmt: skip
        target = int(inputs.targets[0])
        grid = occlusion_grid(model, inputs.images[0], target, occ, progress)
        return grid.drop_map(float(inputs.probs[0, target]), (h, w)).astype(np.float64)
    maps = attribution_maps(model, inputs.images[:1], inputs.targets[:1], params.attribution, progress,
                            params.batch_size)  # fmt: skip
    return maps[0].astype(np.float64)


def reference_of(inputs: Inputs, params: ReferenceMapParams, files: dict[str, bytes], model: LoadedModel) -> np.ndarray:
    """The reference ``(H, W)`` float64 on the model input."""
    if REFERENCE not in files:
        raise BadParams("upload the reference map as 'reference'", details={"field": REFERENCE})
    ref = decode_map(files[REFERENCE], REFERENCE)
    h, w = inputs.images.shape[2:]
    if params.reference_space == "model":
        if ref.shape != (h, w):
            raise BadParams(f"reference is {list(ref.shape)}; with reference_space='model' it must be {[h, w]}",
                            details={"field": REFERENCE})  # fmt: skip
        return ref
    size0 = inputs.sizes[0] if inputs.sizes else (h, w)
    return resample_map(ref, size0, model.manifest.preprocessing)


def _rgb(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def run(
    model: LoadedModel, inputs: Inputs, params: ReferenceMapParams, progress: ProgressFn, context: Any = None
) -> KindResult:
    t0 = time.perf_counter()
    if len(inputs) != 1:
        raise BadParams(f"reference_map takes one image, got {len(inputs)}")
    files = getattr(context, "files", {}) or {}
    reference = reference_of(inputs, params, files, model)
    m = compared_map(model, inputs, params, files, progress)
    scores = compare(m, reference, params)
    t1 = time.perf_counter()
    target = int(inputs.targets[0])
    label = model.manifest.labels[target]
    name = params.attribution.method if params.source == "attribution" else params.source
    side = render.montage_png(
        [inputs.display[0], _rgb(render.overlay_png(reference.astype(np.float32), inputs.display[0])),
         _rgb(render.overlay_png(m.astype(np.float32), inputs.display[0]))],
        [f"image: {label[:20]}", "reference", f"{name}: r={scores['pearson'] or 0:.2f}"], cols=3, side=224,
    )  # fmt: skip
    artifacts = [
        Artifact("0-side_by_side.png", side, "image/png"),
        Artifact("0-reference.npy", render.npy_bytes(reference.astype(np.float32)), "application/x-npy"),
        Artifact("0-map.npy", render.npy_bytes(m.astype(np.float32)), "application/x-npy"),
    ]
    summary = {
        "source": params.source,
        "method": name,
        "target": target,
        "label": label,
        "probability": float(inputs.probs[0, target]),
        "reference_space": params.reference_space,
        "reference_shape": list(decode_map(files[REFERENCE], REFERENCE).shape),
        "scores": scores,
        "runtime_s": {"compute": round(t1 - t0, 4), "render": round(time.perf_counter() - t1, 4)},
    }
    return KindResult(summary, artifacts)
