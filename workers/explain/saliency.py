"""Input-gradient saliency (Simonyan, Vedaldi and Zisserman, 2014, arXiv:1312.6034).

``attribution = d f_target(x) / d x`` (absolute value by default, as Captum's ``Saliency``),
computed with Captum in chunks of ``model.grad_batch_size`` images. Input ``(N, C, H, W)``;
output per image: the raw ``(C, H, W)`` gradient (``.npy``), its 2-D map (channel
aggregation, default max of absolute values as in the paper), a heatmap and an overlay PNG.
"""

from __future__ import annotations

import time

import torch
from captum.attr import Saliency

from schemas.params import SaliencyParams
from workers import render
from workers.explain.base import Artifact, Inputs, KindResult, LoadedModel, ProgressFn


def attribute(
    model: LoadedModel, images: torch.Tensor, targets: torch.Tensor, params: SaliencyParams, progress: ProgressFn
) -> torch.Tensor:
    """Saliency of ``images`` ``(N, C, H, W)`` for ``targets`` ``(N,)`` -> ``(N, C, H, W)``."""
    chunk = params.batch_size or model.grad_batch_size
    method = Saliency(model.module)
    out = []
    for start in range(0, len(images), chunk):
        x = images[start : start + chunk].detach().clone().requires_grad_(True)
        out.append(method.attribute(x, target=targets[start : start + chunk], abs=params.abs).detach())
        progress(min(start + chunk, len(images)), len(images), "attribution")
    return torch.cat(out)


def run(model: LoadedModel, inputs: Inputs, params: SaliencyParams, progress: ProgressFn) -> KindResult:
    t0 = time.perf_counter()
    attr = attribute(model, inputs.images, inputs.targets, params, progress)
    runtime = time.perf_counter() - t0
    artifacts, images = [], []
    for i in range(len(inputs)):
        map2d = render.to_2d(attr[i], params.aggregation)
        target = int(inputs.targets[i])
        artifacts += [
            Artifact(f"{i}-attribution.npy", render.npy_bytes(attr[i]), "application/x-npy"),
            Artifact(f"{i}-map.npy", render.npy_bytes(map2d), "application/x-npy"),
            Artifact(f"{i}-heatmap.png", render.heatmap_png(map2d), "image/png"),
            Artifact(f"{i}-overlay.png", render.overlay_png(map2d, inputs.display[i]), "image/png"),
        ]
        images.append(
            {
                "target": target,
                "label": model.manifest.labels[target],
                "probability": float(inputs.probs[i, target]),
                "min": float(map2d.min()),
                "max": float(map2d.max()),
                "mean": float(map2d.mean()),
                "shape": list(attr[i].shape),
            }
        )
    return KindResult({"method": "saliency", "runtime_s": runtime, "images": images}, artifacts)
