"""Turning attribution arrays into what a person looks at: 2-D maps, heatmap and overlay PNGs.

Shared by every kind that returns a map (attribution, occlusion, U Analysis, ...).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

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


def png_bytes(rgb: np.ndarray, compress_level: int = 6) -> bytes:
    """PNG of an ``(H, W, 3)`` uint8 image; ``compress_level`` 1 encodes noisy images several
    times faster than Pillow's default 6, for a few per cent more bytes."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=compress_level)
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
    return png_bytes(_fit(rgb, _display_size(rgb, min_side)))


def _display_size(image: np.ndarray, min_side: int) -> tuple[int, int]:
    """``(H, W)`` of ``image`` upscaled by a whole factor until its longer side is ``min_side``."""
    h, w = image.shape[:2]
    k = max(1, -(-min_side // max(h, w)))
    return h * k, w * k


def image_png(image: np.ndarray, min_side: int = 224) -> bytes:
    """``image`` (``(H, W, 3)`` uint8, the input at model size) as a PNG upscaled exactly as
    :func:`overlay_png` upscales it, so a page can lay the heatmap over it pixel for pixel."""
    return png_bytes(_fit(image, _display_size(image, min_side)))


def overlay_png(map2d: np.ndarray, image: np.ndarray, alpha: float = 0.55, min_side: int = 224) -> bytes:
    """The heatmap blended over ``image`` (``(H, W, 3)`` uint8), weighted by the map's magnitude
    so unimportant regions show the image itself."""
    return png_bytes(overlay_rgb(map2d, image, alpha, min_side))


def overlay_rgb(map2d: np.ndarray, image: np.ndarray, alpha: float = 0.55, min_side: int = 224) -> np.ndarray:
    """:func:`overlay_png` as an ``(H', W', 3)`` uint8 array (upscaled to ``min_side``)."""
    size = _display_size(image, min_side)
    base = _fit(image, size).astype(np.float32)
    colour = _fit(_colour(map2d), size).astype(np.float32)
    scaled, _ = normalise(map2d)
    weight = _fit((np.abs(scaled) * 255).astype(np.uint8)[..., None].repeat(3, 2), size)[..., :1] / 255.0
    out = base * (1 - alpha * weight) + colour * (alpha * weight)
    return out.clip(0, 255).astype(np.uint8)


def figure_png(draw: Callable[[Any], None], size: tuple[float, float], dpi: int = 100) -> bytes:
    """A matplotlib figure of ``size`` inches drawn by ``draw(fig)``, as PNG (Agg, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=dpi)
    FigureCanvasAgg(fig)
    draw(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def csv_bytes(header: list[str], rows: list[list[Any]]) -> bytes:
    """A CSV table (header row first) as UTF-8 bytes."""
    import csv

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode()


def montage_png(images: list[np.ndarray], titles: list[str], cols: int = 6, side: int = 160) -> bytes:
    """``(H, W, 3)`` uint8 images in rows of ``cols``, each scaled to ``side`` pixels with its
    title under it (:func:`tile_grid_png`; stored with light compression, as these grids are
    written per job)."""
    rows: list[list[np.ndarray | None]] = [list(images[k : k + cols]) for k in range(0, len(images), cols)]
    captions = [titles[k : k + cols] for k in range(0, len(titles), cols)]
    return tile_grid_png(rows, captions=captions, tile_side=side, compress_level=1)


def top_bars_png(
    original: list[dict[str, Any]], panels: list[tuple[str, list[dict[str, Any]]]], cols: int = 4
) -> bytes:
    """Top-k probabilities of an original image beside those of each changed version (the
    Model Inspector's bar plots, Fig. 5): one panel per version listing its top-k classes, each
    with two bars from 0 to 1, the version's (red) and the original's probability of that class
    (blue). Entries are ``{"index", "label", "probability"}``. Drawn with Pillow (a panel costs
    a millisecond where a matplotlib subplot costs tens)."""
    from PIL import ImageDraw

    p0 = {c["index"]: c["probability"] for c in original}
    k = max((len(top) for _, top in panels), default=1)
    pw, row, head, label_w = 300, 16, 14, 130
    ph = head + k * row + 4
    cols = max(1, min(cols, len(panels)))
    rows = -(-len(panels) // cols)
    sheet = Image.new("RGB", (cols * pw, rows * ph), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    bar_w = pw - label_w - 40
    for n, (name, top) in enumerate(panels):
        r, c = divmod(n, cols)
        x0, y0 = c * pw, r * ph
        draw.text((x0 + 4, y0 + 1), name[:48], fill=(0, 0, 0))
        for j, cls in enumerate(top):
            y = y0 + head + j * row
            draw.text((x0 + 4, y + 2), f"{cls['label'][:20]}", fill=(40, 40, 40))
            bars = ((0, cls["probability"], (214, 39, 40)), (7, p0.get(cls["index"], 0.0), (31, 119, 180)))
            for dy, value, colour in bars:
                right = x0 + label_w + max(1, round(bar_w * value))
                draw.rectangle((x0 + label_w, y + dy, right, y + dy + 5), fill=colour)
            draw.text((x0 + label_w + bar_w + 4, y + 2), f"{cls['probability']:.2f}", fill=(0, 0, 0))
    return png_bytes(np.asarray(sheet))


def signed_overlay_png(map2d: np.ndarray, image: np.ndarray, alpha: float = 0.85, min_side: int = 224) -> bytes:
    """A signed map over ``image`` (``(H, W, 3)`` uint8, shown in grey): positive values red,
    negative blue, opacity by ``|v| / max|v|`` (the fill-in-the-blanks paper's Fig. 1). Unlike
    ``overlay_png``, a map of one sign keeps its colour (red stays red)."""
    size = _display_size(image, min_side)
    grey = image.astype(np.float32).mean(2, keepdims=True).repeat(3, 2)
    base = _fit(grey.astype(np.uint8), size).astype(np.float32)
    m = float(np.abs(map2d).max())
    scaled = map2d / m if m > 0 else np.zeros_like(map2d)
    red, blue = np.array([220.0, 20, 20]), np.array([20.0, 60, 230])
    colour = np.where(scaled[..., None] >= 0, red, blue)
    weight = (alpha * np.abs(scaled))[..., None]
    out = base * (1 - _fit((weight * 255).astype(np.uint8).repeat(3, 2), size) / 255.0)
    out += _fit((colour * weight).astype(np.uint8), size)
    return png_bytes(out.clip(0, 255).astype(np.uint8))


def tile_grid_png(
    tiles: list[list[np.ndarray | None]],
    row_labels: list[str] | None = None,
    captions: list[list[str]] | None = None,
    title: str = "",
    tile_side: int = 96,
    compress_level: int = 6,
) -> bytes:
    """Images in a grid: ``tiles[r][c]`` ``(h, w, 3)`` uint8 (None: an empty cell), each scaled to
    about ``tile_side`` pixels (nearest for small images), a caption under each (as many
    characters as fit), a label left of each row and a title on top (PIL's default font: cheap,
    no figure). The one grid of images every kind draws."""
    from PIL import ImageDraw

    rows, cols = len(tiles), max(len(r) for r in tiles)
    cell_w, cap_h = tile_side + 8, 14
    label_w = 8 + 7 * max((len(s) for s in row_labels or []), default=0)
    top = 18 if title else 4
    out = Image.new("RGB", (label_w + cols * cell_w, top + rows * (tile_side + cap_h + 6)), "white")
    draw = ImageDraw.Draw(out)
    if title:
        draw.text((4, 3), title, fill="black")
    for r, row in enumerate(tiles):
        y = top + r * (tile_side + cap_h + 6)
        if row_labels:
            draw.text((4, y + tile_side // 2 - 5), row_labels[r], fill="black")
        for c, tile in enumerate(row):
            x = label_w + c * cell_w + 4
            if tile is not None:
                h, w = tile.shape[:2]
                s = tile_side / max(h, w)
                fitted = _fit(tile, (max(1, round(h * s)), max(1, round(w * s))))
                out.paste(Image.fromarray(fitted), (x, y))
            if captions and c < len(captions[r]):
                draw.text((x, y + tile_side + 2), captions[r][c][: max(20, tile_side // 6)], fill="black")
    return png_bytes(np.asarray(out), compress_level)
