"""Masks of square patches (papers/fill-in-the-blanks §3.2, §4.1, §4.2).

An image ``(C, H, W)`` is tiled by ``patch_size`` squares from the top-left corner in raster
order (``u_analysis.Grid``: a narrower last row/column when the side is not a multiple), so
every pixel lies in exactly one patch. A mask is a set of patches: ``(P,)`` bool over the
patches, or ``(H, W)`` bool over the pixels (``pixels``). Masked pixels take the fill image's
values: ``M(x) = where(mask, z, x)``.

- Random masking (§4.1): each draw masks ``round(mask_ratio x P)`` patches, uniformly among
  all such sets (the ``m`` smallest of ``P`` uniform keys). The draws of an image come from
  one generator, ``rng_for(seed, image, STREAM_MASKS)``, consumed in draw order: draw ``d`` is
  the same mask whatever the number of draws per pass.
- Progressive masking (§4.2): ``k`` disjoint masks covering the image; mask ``i`` holds the
  ``i``-th of ``k`` near-equal runs (``np.array_split``) of a seeded random permutation of
  the patches (``partition='random'``) or of the raster order (``'raster'``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from schemas.errors import BadParams
from schemas.fill_blanks import Fill
from schemas.u_analysis import NoiseParams
from workers.explain.u_analysis import Grid, PixelSpace, noise_image, rng_for

STREAM_MASKS, STREAM_PARTITION = 11, 12
"""Random streams per image, apart from ``u_analysis``'s (1-3)."""


def patch_grid(size: tuple[int, int], patch_size: int) -> Grid:
    """The patches of an image of ``size`` (H, W) pixels."""
    h, w = size
    if patch_size > min(h, w):
        raise BadParams(f"patch_size {patch_size} is over the image side ({h}x{w})", details={"field": "patch_size"})
    return Grid(h, w, patch_size)


def masked_count(n_patches: int, mask_ratio: float) -> int:
    """``round(mask_ratio x n_patches)``, halves rounded up (at least one patch, or BadParams)."""
    m = min(n_patches, math.floor(mask_ratio * n_patches + 0.5))
    if m < 1:
        raise BadParams(
            f"mask_ratio {mask_ratio} of {n_patches} patches masks no patch", details={"field": "mask_ratio"}
        )
    return m


class RandomMasks:
    """The stream of random masks of one image: ``next(b)`` -> ``(b, P)`` bool, ``m`` patches each."""

    def __init__(self, grid: Grid, n_masked: int, rng: np.random.Generator) -> None:
        self.grid, self.m, self.rng = grid, n_masked, rng

    @classmethod
    def of(cls, grid: Grid, mask_ratio: float, seed: int, index: int) -> RandomMasks:
        return cls(grid, masked_count(grid.n, mask_ratio), rng_for(seed, index, STREAM_MASKS))

    def next(self, b: int) -> np.ndarray:
        keys = self.rng.random((b, self.grid.n))
        chosen = np.argpartition(keys, self.m - 1, axis=1)[:, : self.m]
        out = np.zeros((b, self.grid.n), dtype=bool)
        np.put_along_axis(out, chosen, True, axis=1)
        return out


def partition(grid: Grid, k: int, how: str, seed: int, index: int) -> np.ndarray:
    """``(P,)`` int64: the step ``0..k-1`` whose mask holds each patch (``k`` near-equal sets)."""
    if k > grid.n:
        raise BadParams(f"k={k} is over the number of patches ({grid.n})", details={"field": "k"})
    order = rng_for(seed, index, STREAM_PARTITION).permutation(grid.n) if how == "random" else np.arange(grid.n)
    step = np.empty(grid.n, dtype=np.int64)
    for i, part in enumerate(np.array_split(order, k)):
        step[part] = i
    return step


def pixels(grid: Grid, patch_masks: np.ndarray) -> np.ndarray:
    """Patch masks ``(..., P)`` bool -> pixel masks ``(..., H, W)`` bool."""
    return patch_masks[..., grid.labels()]


def fill_image(x: torch.Tensor, fill: Fill, grid: Grid, space: PixelSpace) -> torch.Tensor:
    """The fill ``z`` ``(C, H, W)`` in model input space for the model input ``x`` ``(C, H, W)``
    (``u_analysis.noise_image``: the same pixel-space values as its noises of these names)."""
    return noise_image(x, fill, NoiseParams(), grid, space, 0)


def apply(x: torch.Tensor, z: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``M(x)``: ``x`` ``(C, H, W)`` or ``(B, C, H, W)`` with the pixels of ``masks`` ``(B, H, W)``
    bool taken from ``z`` (same shape as ``x``): ``(B, C, H, W)``."""
    return torch.where(masks[:, None], z, x)
