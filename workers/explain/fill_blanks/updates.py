"""Update terms and the threshold T (papers/fill-in-the-blanks §3.2 Eq. 2-5, §4.1, §4.2, §4.5).

- ``dx`` (Eq. 2) is ``-gamma * grad_u CE(f(M(x)), y)``, the gradient with respect to the
  pixel-space image ``u`` (``x = a u + b``: ``grad_u = a * grad_x``), for every row of a batch
  in one forward+backward pass. ``update='bfgs'`` (§4.5) runs ``bfgs_steps`` BFGS iterations
  per row from ``u_0 = M(x)`` (the whole image, step ``gamma``, no line search; the inverse
  Hessian approximation ``H`` kept as its curvature pairs, two-loop recursion, ``H_0 = (s.y /
  y.y) I`` of the first pair; ``bfgs_history`` = L-BFGS; a pair with ``s.y <= 0`` is skipped)
  and returns ``gamma * p``, the direction ``p = -H g`` (the paper's ``B_t p_t = -grad L``)
  at the last iterate: one iteration is the gradient step.
- ``T`` (Eq. 4) keeps the masked pixels only (``M~(dx)``), optionally their positive part,
  normalises them (``max_abs``: ``v / max|v|``; ``minmax``: ``(v - min) / (max - min)``, over
  the masked pixels of each row) and binarises at ``threshold`` (``max_abs`` with both signs
  gives -1/0/+1).
- Random masking: ``E[dx]`` (Eq. 5) is the mean of the kept draws' masked updates ``M~_i(dx_i)``.
  Draws run ``draws_per_pass`` at a time; the first ``min_kept`` kept draws in draw order
  count, so the result does not depend on the pass size.
- Progressive masking: step ``i`` masks ``M_i`` of the current image, predicts, and writes
  ``fill + T_i(dx_i)`` into ``M_i``'s pixels; the images of a batch step together.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from schemas.fill_blanks import FillKnobs
from workers.explain.base import LoadedModel, ProgressFn, no_progress
from workers.explain.fill_blanks import masks as mk
from workers.explain.u_analysis import Grid, PixelSpace

Labels = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]
"""The classes ``(B,)`` of a batch's loss, or a function of its predictions ``(B,)`` giving them."""

PASS_ELEMENTS = 1 << 18
"""Automatic draws per pass: at least this many input values per pass (tiny images batch many
draws: digits-cnn's 8x8 runs 4,096), and at least the model's measured gradient batch."""


def draws_per_pass(model: LoadedModel, shape: tuple[int, ...], params: FillKnobs) -> int:
    if params.draws_per_pass is not None:
        return params.draws_per_pass
    return max(model.grad_batch_size, min(4096, PASS_ELEMENTS // max(1, math.prod(shape))))


def _loss_grad(
    module: torch.nn.Module, xm: torch.Tensor, labels: Labels
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_x CE (B, C, H, W), predictions (B,), labels used (B,))`` of a model-space batch."""
    xm = xm.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = module(xm)
        pred = logits.detach().argmax(1)
        y = labels(pred) if callable(labels) else labels
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), xm)
    return grad, pred, y


def update(
    model: LoadedModel, xm: torch.Tensor, labels: Labels, params: FillKnobs, space: PixelSpace
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx (B, C, H, W) pixel space, f(M(x)) (B,), labels (B,))`` for the masked inputs ``xm``
    ``(B, C, H, W)`` (model space): the gradient step, or the L-BFGS direction (module doc)."""
    a = space.a.to(xm.device)
    grad, pred, y = _loss_grad(model.module, xm, labels)
    g = grad * a
    if params.update == "gradient" or params.bfgs_steps == 1:
        return -params.gamma * g, pred, y
    b = xm.shape[0]
    u = space.to_pixels(xm).reshape(b, -1)
    g = g.reshape(b, -1)
    history: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for t in range(params.bfgs_steps):
        p = -_two_loop(g, history, first_pair_scale=params.bfgs_history is None)
        if t == params.bfgs_steps - 1:
            return params.gamma * p.reshape(xm.shape), pred, y
        u_next = u + params.gamma * p
        g_next = _loss_grad(model.module, space.to_model(u_next.reshape(xm.shape)), y)[0].reshape(b, -1)
        g_next = g_next * a.expand(xm.shape[1:]).reshape(1, -1)
        s, yy = u_next - u, g_next - g
        sy = (s * yy).sum(1)
        rho = torch.where(sy > 1e-12, 1.0 / sy.clamp(min=1e-12), torch.zeros_like(sy))
        history = [*history, (s, yy, rho)][-(params.bfgs_history or len(history) + 1) :]
        u, g = u_next, g_next
    raise AssertionError("unreachable")  # pragma: no cover


def _two_loop(
    g: torch.Tensor, history: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], first_pair_scale: bool
) -> torch.Tensor:
    """``H g`` ``(B, n)`` by the two-loop recursion, row by row (Nocedal & Wright Alg. 7.4), with
    ``H_0 = (s.y / y.y) I`` from the first pair (with every pair kept: the BFGS matrix itself,
    N&W eq. 6.20) or from the latest (L-BFGS, N&W eq. 7.20)."""
    q = g.clone()
    alphas = []
    for s, y, rho in reversed(history):
        alpha = rho * (s * q).sum(1)
        q -= alpha[:, None] * y
        alphas.append(alpha)
    if history:
        s, y, rho = history[0] if first_pair_scale else history[-1]
        yy = (y * y).sum(1)
        scale = torch.where((rho > 0) & (yy > 0), (s * y).sum(1) / yy.clamp(min=1e-30), torch.ones_like(yy))
        q = scale[:, None] * q
    for (s, y, rho), alpha in zip(history, reversed(alphas), strict=True):
        beta = rho * (y * q).sum(1)
        q += s * (alpha - beta)[:, None]
    return q


def threshold(dx: torch.Tensor, mask: torch.Tensor, params: FillKnobs) -> torch.Tensor:
    """``T(dx)`` (Eq. 4) ``(B, C, H, W)`` for updates ``dx`` ``(B, C, H, W)`` and masks ``(B, H, W)``
    bool: zero outside the mask; normalised (and binarised) over each row's masked values."""
    m = mask[:, None].expand_as(dx)
    v = torch.where(m, dx, torch.zeros_like(dx))
    if params.sign == "positive":
        v = v.clamp(min=0)
    flat, mflat = v.reshape(len(v), -1), m.reshape(len(v), -1)
    if params.normalize == "max_abs":
        scale = flat.abs().amax(1)
        n = flat / torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]
    else:
        lo = torch.where(mflat, flat, torch.full_like(flat, math.inf)).amin(1)
        hi = torch.where(mflat, flat, torch.full_like(flat, -math.inf)).amax(1)
        span = hi - lo
        n = (flat - lo[:, None]) / torch.where(span > 0, span, torch.ones_like(span))[:, None]
        n = torch.where(span[:, None] > 0, n, torch.zeros_like(n))
    if params.binarize:
        if params.normalize == "max_abs" and params.sign == "both":
            n = torch.sign(n) * (n.abs() >= params.threshold)
        else:
            n = (n >= params.threshold).to(n.dtype)
    return torch.where(mflat, n, torch.zeros_like(n)).reshape(dx.shape)


# ---------------------------------------------------------------------------------------------
# random masking (§4.1)


@dataclass
class RandomFill:
    """One image's random draws. ``update``: ``E[dx]`` ``(C, H, W)`` pixel space (None when no
    draw was kept); ``mask``: the first kept draw's pixels ``(H, W)`` bool, ``masked_prediction``
    its ``f(M(x))``."""

    draws: int
    kept: int
    correct: int
    update: torch.Tensor | None
    mask: torch.Tensor | None
    masked_prediction: int | None

    @property
    def masked_accuracy(self) -> float:
        return self.correct / self.draws if self.draws else 0.0


def random_fill(
    model: LoadedModel,
    x: torch.Tensor,
    z: torch.Tensor,
    y: int,
    params: FillKnobs,
    grid: Grid,
    index: int,
    space: PixelSpace,
    per_pass: int,
    progress: ProgressFn = no_progress,
    stage: str = "draws",
) -> RandomFill:
    """Random draws of image ``x`` ``(C, H, W)`` (model space, fill ``z``, number ``index`` for its
    masks) until ``min_kept`` are kept or ``max_masks`` drawn, ``per_pass`` per pass."""
    draws_of = mk.RandomMasks.of(grid, params.mask_ratio, params.seed, index)
    label = torch.tensor([y], device=x.device)
    total = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    draws = kept = correct = 0
    first: tuple[torch.Tensor, int] | None = None
    while kept < params.min_kept and draws < params.max_masks:
        b, need = min(per_pass, params.max_masks - draws), params.min_kept - kept
        if not params.keep_correct:
            b = min(b, need)
        elif kept:  # about the draws still needed at the rate seen so far
            b = min(b, max(8, math.ceil(1.1 * need * draws / kept)))
        elif not draws:  # a first guess: half the draws kept
            b = min(b, 2 * need + 8)
        pix = torch.from_numpy(mk.pixels(grid, draws_of.next(b))).to(x.device)
        dx, pred, _ = update(model, mk.apply(x, z, pix), label.expand(b), params, space)
        ok = pred == y
        use = ok.clone() if params.keep_correct else torch.ones_like(ok)
        rows = torch.nonzero(use).flatten()
        cut = int(rows[need - 1]) + 1 if len(rows) >= need else b
        use[cut:] = False
        draws, correct, kept = draws + cut, correct + int(ok[:cut].sum()), kept + int(use.sum())
        if first is None and len(rows):
            first = (pix[int(rows[0])], int(pred[int(rows[0])]))
        weight = (pix & use[:, None, None])[:, None].to(dx.dtype)
        total += (dx * weight).sum(0, dtype=torch.float64)
        progress(min(kept, params.min_kept), params.min_kept, stage)
    mean = (total / kept).to(torch.float32) if kept else None
    return RandomFill(draws, kept, correct, mean, first[0] if first else None, first[1] if first else None)


# ---------------------------------------------------------------------------------------------
# progressive masking (§4.2)


@dataclass
class ProgressiveFill:
    """Images ``(N, ...)`` filled in ``k`` steps. ``steps`` ``(N, P)``: the step masking each patch;
    ``predictions`` / ``labels`` ``(N, k)``: ``f(M_i(x_{i-1}))`` and the label of step ``i``'s
    update; ``updates`` / ``fills`` ``(N, k, C, H, W)``: ``M~_i(dx_i)`` and ``T_i``, pixel space;
    ``images`` ``(N, k + 1, C, H, W)``: ``x_0 = x`` and the image after each step, pixel space
    (``images[:, k]``, the prototype, holds no original pixel); ``first_masked``
    ``(N, C, H, W)``: ``M_1(x)``, pixel space."""

    steps: np.ndarray
    predictions: np.ndarray
    labels: np.ndarray
    updates: torch.Tensor
    fills: torch.Tensor
    images: torch.Tensor
    first_masked: torch.Tensor


def progressive_fill(
    model: LoadedModel,
    xs: torch.Tensor,
    zs: torch.Tensor,
    ys: torch.Tensor,
    params: FillKnobs,
    grid: Grid,
    indices: list[int],
    space: PixelSpace,
    per_pass: int,
    progress: ProgressFn = no_progress,
    stage: str = "progressive steps",
) -> ProgressiveFill:
    """Progressive filling of images ``xs`` ``(N, C, H, W)`` (model space; fills ``zs``; targets
    ``ys`` ``(N,)`` for ``step_label='target'``; image numbers ``indices`` for the partitions)."""
    parts = [_progressive(model, xs[s : s + per_pass], zs[s : s + per_pass], ys[s : s + per_pass], params,
                          grid, indices[s : s + per_pass], space, progress, stage, (s, len(xs)))
             for s in range(0, len(xs), per_pass)]  # fmt: skip
    return ProgressiveFill(
        np.concatenate([p.steps for p in parts]),
        np.concatenate([p.predictions for p in parts]),
        np.concatenate([p.labels for p in parts]),
        torch.cat([p.updates for p in parts]),
        torch.cat([p.fills for p in parts]),
        torch.cat([p.images for p in parts]),
        torch.cat([p.first_masked for p in parts]),
    )


def _progressive(
    model: LoadedModel, xs: torch.Tensor, zs: torch.Tensor, ys: torch.Tensor, params: FillKnobs, grid: Grid,
    indices: list[int], space: PixelSpace, progress: ProgressFn, stage: str, at: tuple[int, int],
) -> ProgressiveFill:  # fmt: skip
    n, k = len(xs), params.k
    steps = np.stack([mk.partition(grid, k, params.partition, params.seed, i) for i in indices])
    cur = space.to_pixels(xs)
    z_pix = space.to_pixels(zs)
    images, updates, fills, preds, labels = [cur], [], [], [], []
    first: list[torch.Tensor] = []  # the first step's labels, once known

    def label_of(pred: torch.Tensor) -> torch.Tensor:
        if params.step_label == "target":
            return ys
        return first[0] if params.step_label == "first" and first else pred

    for i in range(k):
        mask = torch.from_numpy(mk.pixels(grid, steps == i)).to(xs.device)
        masked = mk.apply(cur, z_pix, mask)
        if i == 0:
            first_masked = masked
        dx, pred, y = update(model, space.to_model(masked), label_of, params, space)
        first.append(y)
        dx = dx * mask[:, None]
        t = threshold(dx, mask, params)
        cur = torch.where(mask[:, None], z_pix + t, cur)
        images.append(cur)
        updates.append(dx)
        fills.append(t)
        preds.append(pred)
        labels.append(y)
        progress(at[0] + (i + 1) * n // k, at[1], stage)
    return ProgressiveFill(
        steps,
        torch.stack(preds, 1).cpu().numpy(),
        torch.stack(labels, 1).cpu().numpy(),
        torch.stack(updates, 1),
        torch.stack(fills, 1),
        torch.stack(images, 1),
        first_masked,
    )
