"""The kinds' pictures (papers/fill-in-the-blanks Figs. 1-4), drawn with ``workers.render``.

Images here are pixel-space tensors ``(C, H, W)`` (values outside ``[0, 1]``, e.g. a
prototype with a -1 fill, are clipped for display).
"""

from __future__ import annotations

import numpy as np
import torch

from workers import render


def to_uint8(u: torch.Tensor | np.ndarray) -> np.ndarray:
    """Pixel-space ``(C, H, W)`` -> ``(H, W, 3)`` uint8 (grey replicated)."""
    a = u.detach().float().cpu().numpy() if isinstance(u, torch.Tensor) else np.asarray(u, np.float32)
    rgb = (np.clip(a, 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)
    return np.repeat(rgb, 3, axis=2) if rgb.shape[2] == 1 else rgb[:, :, :3]


def mask_tile(mask: torch.Tensor | np.ndarray) -> np.ndarray:
    """``(H, W)`` bool -> white where true, black elsewhere, ``(H, W, 3)`` uint8."""
    m = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    return np.repeat((m.astype(np.uint8) * 255)[..., None], 3, axis=2)


def overlay_png(update: torch.Tensor, base: torch.Tensor) -> bytes:
    """Fig. 1: the positive (red) and negative (blue) parts of ``update`` ``(C, H, W)`` (summed
    over channels) over ``base`` ``(C, H, W)``, e.g. ``M(x)``."""
    return render.signed_overlay_png(render.to_2d(update, "sum"), to_uint8(base))


def prototype_png(prototype: torch.Tensor) -> bytes:
    """The prototype ``(C, H, W)``, upscaled (nearest) to at least 224 px."""
    rgb = to_uint8(prototype)
    k = max(1, -(-224 // max(rgb.shape[:2])))
    return render.png_bytes(np.repeat(np.repeat(rgb, k, 0), k, 1))


def steps_png(masks: torch.Tensor, images: torch.Tensor, captions: list[str]) -> bytes:
    """Fig. 3 for one image: row 1 the ``k`` masks ``(k, H, W)`` (white = masked at that step),
    row 2 the part filled so far (white), row 3 the image after each step (``images``
    ``(k, C, H, W)``, pixel space), captioned with each step's prediction."""
    done = torch.cumsum(masks.to(torch.int32), 0) > 0
    return render.tile_grid_png(
        [[mask_tile(m) for m in masks], [mask_tile(d) for d in done], [to_uint8(u) for u in images]],
        row_labels=["mask M_i", "filled", "image"],
        captions=[[f"M_{i + 1}" for i in range(len(masks))], [f"{100 * (i + 1) // len(masks)}%" for i in
                  range(len(masks))], captions],
    )  # fmt: skip
