"""Kind ``occlusion_map``: occlusion sensitivity as Zeiler and Fergus (2014) draw it, and as
the occlusion paper (Amer and Wu, "Evaluating CNN Predictions using Visualization
Techniques") uses it: a grey square slides over the image, and at each position the map
records the model's probability of the target class and its most probable class.

For an image ``(C, H, W)``, an occluder of side ``s`` and stride ``d`` give a grid of
``rows = (H - s) // d + 1`` by ``cols = (W - s) // d + 1`` positions. Every occluded copy is
evaluated through ``model.forward`` (the fast forward engine) in chunks of
``model.batch_size`` copies, built chunk by chunk so memory stays at one chunk.

Artifacts per image ``i``: ``{i}-probability.npy`` ``(rows, cols)`` target-class probability,
``{i}-top_class.npy`` / ``{i}-top_probability.npy`` ``(rows, cols)`` the most probable class
and its probability, ``{i}-drop.npy`` ``(H, W)`` the drop of the target probability averaged
over the positions covering each pixel, ``{i}-heatmap.png`` (the probability map: dark where
occluding hurts), ``{i}-overlay.png`` (the drop over the image) and ``{i}-input.png`` (the
input at model size, as large as the overlay).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from schemas.attribution import OcclusionMapParams
from schemas.errors import BadParams
from workers import render
from workers.explain.attribution import input_bounds
from workers.explain.base import Artifact, Inputs, KindResult, LoadedModel, ProgressFn, no_progress


@dataclass
class OcclusionGrid:
    """The maps of one image: ``(rows, cols)`` arrays and the geometry that made them."""

    probability: np.ndarray
    top_class: np.ndarray
    top_probability: np.ndarray
    occluder: int
    stride: int

    def drop_map(self, p0: float, size: tuple[int, int]) -> np.ndarray:
        """``(H, W)``: ``p0`` minus the target probability, averaged over the occluder positions
        covering each pixel (0 where none does)."""
        total = np.zeros(size, np.float64)
        count = np.zeros(size, np.float64)
        for r in range(self.probability.shape[0]):
            for c in range(self.probability.shape[1]):
                y, x = r * self.stride, c * self.stride
                total[y : y + self.occluder, x : x + self.occluder] += p0 - self.probability[r, c]
                count[y : y + self.occluder, x : x + self.occluder] += 1
        return (total / np.maximum(count, 1)).astype(np.float32)


def geometry(params: OcclusionMapParams, h: int, w: int) -> tuple[int, int, int, int]:
    """``(occluder, stride, rows, cols)``; default occluder 1/7 of the side, stride half of it."""
    occ = params.occluder or max(1, round(min(h, w) / 7))
    if occ > min(h, w):
        raise BadParams(f"occluder {occ} px is larger than the {h}x{w} input")
    stride = params.stride or max(1, occ // 2)
    return occ, stride, (h - occ) // stride + 1, (w - occ) // stride + 1


def fill_value(params: OcclusionMapParams, image: torch.Tensor, model: LoadedModel) -> torch.Tensor:
    """The occluder's colour in the normalised input, ``(C, 1, 1)``: grey (pixel value half
    of the maximum), black (0), or the image's per-channel mean."""
    if params.fill == "mean":
        return image.mean(dim=(1, 2), keepdim=True)
    lo, hi = input_bounds(model.manifest, image.device)
    black = lo if model.manifest.preprocessing.std[0] > 0 else hi
    return black if params.fill == "black" else (lo + hi) / 2


def occlusion_grid(
    model: LoadedModel,
    image: torch.Tensor,
    target: int,
    params: OcclusionMapParams,
    progress: ProgressFn = no_progress,
    done: int = 0,
    total: int | None = None,
) -> OcclusionGrid:
    """Slide the occluder over ``image`` ``(C, H, W)``; probabilities from ``model.forward``."""
    c, h, w = image.shape
    occ, stride, rows, cols = geometry(params, h, w)
    fill = fill_value(params, image, model)
    positions = [(r * stride, q * stride) for r in range(rows) for q in range(cols)]
    chunk = params.batch_size or model.batch_size
    total = total or len(positions)
    prob, top, top_p = [], [], []
    with model.forward_only():
        for start in range(0, len(positions), chunk):
            batch_pos = positions[start : start + chunk]
            batch = image.unsqueeze(0).repeat(len(batch_pos), 1, 1, 1)
            for j, (y, x) in enumerate(batch_pos):
                batch[j, :, y : y + occ, x : x + occ] = fill
            p = model.forward(batch).float().softmax(1)
            prob.append(p[:, target].cpu())
            tp, tc = p.max(1)
            top.append(tc.cpu())
            top_p.append(tp.cpu())
            progress(done + start + len(batch_pos), total, "occlusion")
    return OcclusionGrid(
        probability=torch.cat(prob).reshape(rows, cols).numpy().astype(np.float32),
        top_class=torch.cat(top).reshape(rows, cols).numpy().astype(np.int64),
        top_probability=torch.cat(top_p).reshape(rows, cols).numpy().astype(np.float32),
        occluder=occ,
        stride=stride,
    )


def run(model: LoadedModel, inputs: Inputs, params: OcclusionMapParams, progress: ProgressFn) -> KindResult:
    t0 = time.perf_counter()
    h, w = inputs.images.shape[2:]
    occ, stride, rows, cols = geometry(params, h, w)
    per_image = rows * cols
    artifacts: list[Artifact] = []
    images: list[dict[str, Any]] = []
    for i in range(len(inputs)):
        target = int(inputs.targets[i])
        grid = occlusion_grid(
            model, inputs.images[i], target, params, progress, done=i * per_image, total=len(inputs) * per_image
        )
        p0 = float(inputs.probs[i, target])
        drop = grid.drop_map(p0, (h, w))
        r, c = np.unravel_index(int(grid.probability.argmin()), grid.probability.shape)
        predicted = int(inputs.probs[i].argmax())
        classes = Counter(int(k) for k in grid.top_class.ravel())
        images.append(
            {
                "index": i,
                "target": target,
                "label": model.manifest.labels[target],
                "probability": p0,
                "predicted": predicted,
                "min_probability": float(grid.probability[r, c]),
                "min_box": [int(r * stride), int(c * stride), int(r * stride + occ), int(c * stride + occ)],
                "max_drop": p0 - float(grid.probability.min()),
                "mean_probability": float(grid.probability.mean()),
                "changed_fraction": float((grid.top_class != predicted).mean()),
                "top_classes": [
                    {"class": k, "label": model.manifest.labels[k], "positions": n} for k, n in classes.most_common(5)
                ],
            }
        )
        artifacts += [
            Artifact(f"{i}-probability.npy", render.npy_bytes(grid.probability), "application/x-npy"),
            Artifact(f"{i}-top_class.npy", render.npy_bytes(grid.top_class), "application/x-npy"),
            Artifact(f"{i}-top_probability.npy", render.npy_bytes(grid.top_probability), "application/x-npy"),
            Artifact(f"{i}-drop.npy", render.npy_bytes(drop), "application/x-npy"),
            Artifact(f"{i}-heatmap.png", render.heatmap_png(grid.probability), "image/png"),
            Artifact(f"{i}-overlay.png", render.overlay_png(drop, inputs.display[i]), "image/png"),
            Artifact(f"{i}-input.png", render.image_png(inputs.display[i]), "image/png"),
        ]
    summary = {
        "occluder": occ,
        "stride": stride,
        "fill": params.fill,
        "grid": [rows, cols],
        "evaluations": len(inputs) * per_image,
        "runtime_s": time.perf_counter() - t0,
        "images": images,
    }
    return KindResult(summary, artifacts)
