"""Turning attribution arrays into what a person looks at: 2-D maps, heatmap and overlay PNGs.

Shared by every kind that returns a map (attribution, occlusion, U Analysis, ...).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image

from schemas.params import Aggregation


def to_2d(attr: torch.Tensor | np.ndarray, aggregation: Aggregation) -> np.ndarray:
    """``(C, H, W)`` attribution -> ``(H, W)`` float32 map by channel aggregation."""
    a = attr.detach().float().cpu().numpy() if isinstance(attr, torch.Tensor) else np.asarray(attr, np.float32)
    if a.ndim == 2:
        a = a[None]
    if aggregation == "sum":
        out = a.sum(0)
    elif aggregation == "abs_sum":
        out = np.abs(a).sum(0)
    elif aggregation == "positive":
        out = np.clip(a, 0, None).sum(0)
    else:
        out = np.abs(a).max(0)
    return out.astype(np.float32)


def normalise(map2d: np.ndarray) -> tuple[np.ndarray, bool]:
    """Scale a 2-D map for display: ``[0, 1]`` when non-negative, ``[-1, 1]`` (by max |v|) when
    signed. Returns the scaled map and whether it is signed. A constant map becomes zeros."""
    signed = bool((map2d < 0).any() and (map2d > 0).any())
    if signed:
        m = float(np.abs(map2d).max())
        return (map2d / m if m > 0 else map2d * 0), True
    lo, hi = float(map2d.min()), float(map2d.max())
    if hi - lo <= 0:
        return np.zeros_like(map2d), False
    if lo >= 0:
        return map2d / hi, False
    return (map2d - lo) / (hi - lo), False


def _colour(map2d: np.ndarray) -> np.ndarray:
    """``(H, W)`` map -> ``(H, W, 3)`` uint8: 'inferno' for magnitudes, 'RdBu_r' for signed."""
    scaled, signed = normalise(map2d)
    if signed:
        rgba = colormaps["RdBu_r"]((scaled + 1) / 2)
    else:
        rgba = colormaps["inferno"](scaled)
    return (rgba[..., :3] * 255).astype(np.uint8)


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def npy_bytes(array: np.ndarray | torch.Tensor) -> bytes:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _fit(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize ``(h, w, 3)`` uint8 to ``size`` = (H, W) (nearest for tiny maps keeps cells crisp)."""
    if rgb.shape[:2] == size:
        return rgb
    resample = Image.Resampling.NEAREST if min(rgb.shape[:2]) < 32 else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), resample))


def heatmap_png(map2d: np.ndarray, min_side: int = 224) -> bytes:
    """Colour-mapped PNG of a 2-D map, upscaled (nearest) so small maps stay visible."""
    rgb = _colour(map2d)
    h, w = rgb.shape[:2]
    k = max(1, -(-min_side // max(h, w)))
    return png_bytes(_fit(rgb, (h * k, w * k)))


def image_png(image: np.ndarray, min_side: int = 224) -> bytes:
    """``image`` (``(H, W, 3)`` uint8, the input at model size) as a PNG upscaled exactly as
    :func:`overlay_png` upscales it, so a page can lay the heatmap over it pixel for pixel."""
    h, w = image.shape[:2]
    k = max(1, -(-min_side // max(h, w)))
    return png_bytes(_fit(image, (h * k, w * k)))


def overlay_png(map2d: np.ndarray, image: np.ndarray, alpha: float = 0.55, min_side: int = 224) -> bytes:
    """The heatmap blended over ``image`` (``(H, W, 3)`` uint8), weighted by the map's magnitude
    so unimportant regions show the image itself."""
    h, w = image.shape[:2]
    k = max(1, -(-min_side // max(h, w)))
    size = (h * k, w * k)
    base = _fit(image, size).astype(np.float32)
    colour = _fit(_colour(map2d), size).astype(np.float32)
    scaled, _ = normalise(map2d)
    weight = _fit((np.abs(scaled) * 255).astype(np.uint8)[..., None].repeat(3, 2), size)[..., :1] / 255.0
    out = base * (1 - alpha * weight) + colour * (alpha * weight)
    return png_bytes(out.clip(0, 255).astype(np.uint8))
