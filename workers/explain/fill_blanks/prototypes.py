"""Prototypes of a batch of images under one masking, and the controls of §4.3.

For each image: the update, the fill ``T``, the masked input ``M(x)``, the prototype
``M(x) + T`` (Eq. 3) and the fill alone (``T`` on the fill image: no unmasked pixel), all in
pixel space, with the label the prototype was filled for.

- random (§4.1): ``E[dx]`` of the kept draws; ``M`` is the first kept draw, ``T = T(M~(E[dx]))``.
- progressive (§4.2): ``M`` is the first step's mask; ``T`` the union of the step fills; the
  prototype is the image after the ``k`` steps (equal to the fill alone: no pixel is left).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from schemas.fill_blanks import FillKnobs
from workers.explain.base import LoadedModel, ProgressFn, no_progress
from workers.explain.fill_blanks import masks as mk
from workers.explain.fill_blanks.updates import draws_per_pass, progressive_fill, random_fill, threshold
from workers.explain.u_analysis import PixelSpace
from workers.pipeline import forward_in_chunks


@dataclass
class Steps:
    """Progressive masking's steps of one image: ``masks`` ``(k, H, W)`` bool, ``images``
    ``(k, C, H, W)`` after each step (pixel space), ``predictions`` / ``labels`` ``(k,)``."""

    masks: torch.Tensor
    images: torch.Tensor
    predictions: list[int]
    labels: list[int]


@dataclass
class Filled:
    """One image under one masking. ``update``: ``E[dx]`` ``(C, H, W)`` (random) or the step
    updates ``M~_i(dx_i)`` ``(k, C, H, W)`` (progressive); ``masked_prediction``: ``f(M(x))``,
    the paper's label of the prototype (§4.3). Tensors are None when no draw was kept."""

    index: int
    masking: str
    y: int
    draws: int
    kept: int
    masked_accuracy: float
    update: torch.Tensor | None = None
    fill: torch.Tensor | None = None
    masked: torch.Tensor | None = None
    prototype: torch.Tensor | None = None
    fill_only: torch.Tensor | None = None
    masked_prediction: int | None = None
    overlay: torch.Tensor | None = None
    steps: Steps | None = None


def fill(
    model: LoadedModel,
    images: torch.Tensor,
    ys: torch.Tensor,
    params: FillKnobs,
    masking: str,
    first_index: int = 0,
    progress: ProgressFn = no_progress,
) -> list[Filled]:
    """Every image of ``images`` ``(N, C, H, W)`` (model space) filled for its label ``ys``
    ``(N,)`` (random, and progressive with ``step_label='target'``); image ``j`` is number
    ``first_index + j`` for its masks."""
    n, c, h, w = images.shape
    params.check_image((h, w), masking)
    grid = mk.patch_grid((h, w), params.patch_size)
    space = PixelSpace.of(model.manifest.preprocessing, c)
    per_pass = draws_per_pass(model, (c, h, w), params)
    zs = torch.stack([mk.fill_image(x, params.fill, grid, space) for x in images])
    if masking == "random":
        out = []
        for j in range(n):
            stage = f"{masking} masks, image {j + 1}/{n}: kept draws"
            y = int(ys[j])
            rf = random_fill(
                model, images[j], zs[j], y, params, grid, first_index + j, space, per_pass, progress, stage
            )
            out.append(Filled(first_index + j, masking, y, rf.draws, rf.kept, rf.masked_accuracy))
            if rf.update is not None and rf.mask is not None:
                x_pix, z_pix, mask = space.to_pixels(images[j]), space.to_pixels(zs[j]), rf.mask[None]
                t = threshold(rf.update[None], mask, params)[0]
                masked = mk.apply(x_pix, z_pix, mask)[0]
                out[-1].update, out[-1].fill, out[-1].masked = rf.update, t, masked
                out[-1].prototype, out[-1].fill_only = masked + t, z_pix + t
                out[-1].masked_prediction = rf.masked_prediction
                out[-1].overlay = rf.update * mask
        return out
    pf = progressive_fill(
        model, images, zs, ys, params, grid, list(range(first_index, first_index + n)), space, per_pass, progress
    )
    out = []
    for j in range(n):
        masks = torch.from_numpy(mk.pixels(grid, pf.steps[j][None] == np.arange(params.k)[:, None]))
        steps = Steps(masks, pf.images[j, 1:], pf.predictions[j].tolist(), pf.labels[j].tolist())
        t = pf.fills[j].sum(0)
        updates = pf.updates[j]
        peak = updates.flatten(1).abs().amax(1).clamp(min=1e-30)[:, None, None, None]
        accuracy = float(np.mean(pf.predictions[j] == int(ys[j])))
        out.append(
            Filled(
                first_index + j, masking, int(pf.labels[j, 0]), params.k, params.k, accuracy, updates, t,
                pf.first_masked[j], pf.images[j, -1], space.to_pixels(zs[j]) + t, int(pf.predictions[j, 0]),
                (updates / peak).sum(0), steps,
            )
        )  # fmt: skip
    return out


def classify(model: LoadedModel, pixels: list[torch.Tensor], batch_size: int | None = None) -> torch.Tensor:
    """Softmax probabilities ``(M, K)`` of pixel-space images ``(C, H, W)`` through the forward engine."""
    if not pixels:
        return torch.zeros(0, model.num_classes)
    space = PixelSpace.of(model.manifest.preprocessing, pixels[0].shape[0])
    x = space.to_model(torch.stack(pixels)).to(model.device)
    with model.forward_only():
        return forward_in_chunks(model, x, batch_size).softmax(1).cpu()
