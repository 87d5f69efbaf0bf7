"""Regions, masks and maps given in the pixels of the *uploaded* image, mapped through the
model's preprocessing onto its input grid (shared by the Model Inspector kinds: ``signal``,
``robustness`` with ``apply_to``, ``reference_map``, and any kind that takes a region or a
map over the uploaded image).

Coordinates are continuous pixel coordinates of the uploaded image: ``x`` to the right, ``y``
down, pixel ``(i, j)`` covers ``[j, j+1) x [i, i+1)``, so ``rect [0, 0, W0, H0]`` is the whole
image. A model-input pixel belongs to a region when the centre of the uploaded-image area it
comes from does: the same geometry as ``workers.registry.preprocess`` (the upload's region
:func:`schemas.models.crop_box` says, the whole image for ``stretch``, resized to the input),
so a region outside the crop holds no model pixel.

Pure numpy + Pillow (no torch): the API runs the same checks before queueing that the worker
runs again.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.errors import BadImage, BadParams, UnsupportedMedia
from schemas.models import Preprocessing, crop_box

NPY_MAGIC = b"\x93NUMPY"


class Region(BaseModel):
    """One shape in pixels of the uploaded image: exactly one of ``rect``, ``circle``,
    ``polygon`` (the Model Inspector's three signal formats, §4.3)."""

    model_config = ConfigDict(extra="forbid")

    rect: tuple[float, float, float, float] | None = Field(None, description="[x0, y0, x1, y1], x1 > x0, y1 > y0")
    circle: tuple[float, float, float] | None = Field(None, description="[cx, cy, r], r > 0")
    polygon: list[tuple[float, float]] | None = Field(None, description="[[x, y], ...], at least 3 vertices")

    @model_validator(mode="after")
    def _one_shape(self) -> Region:
        given = [k for k in ("rect", "circle", "polygon") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of rect, circle, polygon (got {given or 'none'})")
        if self.rect is not None:
            x0, y0, x1, y1 = self.rect
            if not (x1 > x0 and y1 > y0):
                raise ValueError("empty rect: need x1 > x0 and y1 > y0")
        if self.circle is not None and not self.circle[2] > 0:
            raise ValueError("empty circle: need r > 0")
        if self.polygon is not None:
            if len(self.polygon) < 3:
                raise ValueError(f"a polygon needs at least 3 points, got {len(self.polygon)}")
            p = np.asarray(self.polygon, np.float64)
            area = 0.5 * abs(float(np.dot(p[:, 0], np.roll(p[:, 1], 1)) - np.dot(p[:, 1], np.roll(p[:, 0], 1))))
            if area <= 0:
                raise ValueError("empty polygon: its area is 0")
        return self


def source_coords(size0: tuple[int, int], pre: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """``(ys (H,), xs (W,))`` float64: where the centre of each model-input row / column lies in
    the uploaded image of ``size0 = (H0, W0)`` pixels (continuous coordinates)."""
    h, w = pre.size
    h0, w0 = size0
    left, top, right, bottom = crop_box(w0, h0, pre)
    xs = left + (np.arange(w) + 0.5) * ((right - left) / w)
    ys = top + (np.arange(h) + 0.5) * ((bottom - top) / h)
    return ys, xs


def region_mask(region: Region, size0: tuple[int, int], pre: Preprocessing) -> np.ndarray:
    """``(H, W)`` bool on the model input: the pixels whose source centre lies in ``region``."""
    ys, xs = source_coords(size0, pre)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    if region.rect is not None:
        x0, y0, x1, y1 = region.rect
        return (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
    if region.circle is not None:
        cx, cy, r = region.circle
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    from matplotlib.path import Path

    assert region.polygon is not None
    inside = Path(np.asarray(region.polygon, np.float64)).contains_points(np.stack([xx.ravel(), yy.ravel()], 1))
    return inside.reshape(xx.shape)


def upload_mask(mask0: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """An uploaded ``(H0, W0)`` bool mask on the model input ``(H, W)`` (nearest source pixel)."""
    ys, xs = source_coords(mask0.shape[:2], pre)  # type: ignore[arg-type]
    iy = np.clip(np.floor(ys).astype(np.int64), 0, mask0.shape[0] - 1)
    ix = np.clip(np.floor(xs).astype(np.int64), 0, mask0.shape[1] - 1)
    return mask0[iy[:, None], ix[None, :]]


def resample_map(map0: np.ndarray, size0: tuple[int, int], pre: Preprocessing) -> np.ndarray:
    """A map of any shape ``(h, w)`` covering the whole uploaded image of ``size0`` (e.g. a
    20x20 grid of click counts) on the model input ``(H, W)``, float64, bilinear."""
    from scipy.ndimage import map_coordinates

    ys, xs = source_coords(size0, pre)
    hr, wr = map0.shape
    yr = ys * (hr / size0[0]) - 0.5
    xr = xs * (wr / size0[1]) - 0.5
    yy, xx = np.meshgrid(yr, xr, indexing="ij")
    return map_coordinates(np.asarray(map0, np.float64), [yy, xx], order=1, mode="nearest")


def check_region_mask(mask: np.ndarray, field: str) -> None:
    """BadParams naming ``field`` when the mapped region holds no model pixel (outside the
    crop, or thinner than a pixel) or every pixel (no context left to compare with)."""
    n = int(mask.sum())
    if n == 0:
        raise BadParams(
            f"{field} holds no pixel of the model input (outside the image, or outside the preprocessing's crop)",
            details={"field": field},
        )
    if n == mask.size:
        raise BadParams(f"{field} covers the whole model input: nothing is left outside it", details={"field": field})


def _open(data: bytes, field: str) -> Image.Image:
    if not data:
        raise BadImage(f"{field}: empty file", details={"field": field})
    try:
        img = Image.open(io.BytesIO(data), formats=("PNG", "BMP", "TIFF", "WEBP", "GIF", "JPEG"))
    except UnidentifiedImageError:
        raise UnsupportedMedia(f"{field} is not an image (send a PNG)", details={"field": field}) from None
    except (OSError, ValueError, SyntaxError) as e:
        raise BadImage(f"{field}: cannot read image: {e}", details={"field": field}) from None
    try:
        img.load()
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise BadImage(f"{field}: corrupt or truncated image: {e}", details={"field": field}) from None
    return img


def decode_mask(data: bytes, size0: tuple[int, int], field: str = "signal_mask") -> np.ndarray:
    """An uploaded mask image as ``(H0, W0)`` bool (grey value > 127 is inside; transparent
    pixels are outside). 415 when it is not an image, 400 when corrupt, 422 (naming
    ``field``) when its size is not the uploaded image's ``size0 = (H0, W0)``."""
    img = _open(data, field)
    if (img.height, img.width) != tuple(size0):
        raise BadParams(
            f"{field} is {img.width}x{img.height}; it must be the image's size {size0[1]}x{size0[0]}",
            details={"field": field, "size": [img.width, img.height], "expected": [size0[1], size0[0]]},
        )
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA"))
        return (rgba[..., 3] > 127) & (np.asarray(img.convert("L")) > 127)
    return np.asarray(img.convert("L")) > 127


def decode_map(data: bytes, field: str) -> np.ndarray:
    """An uploaded map as ``(h, w)`` float64: a ``.npy`` array (2-D, or 3-D with one leading
    channel axis, summed) or a grey image (its values 0-255). 422 naming ``field`` for a
    non-numeric or NaN/inf array, 415/400 for an image that is not one / is corrupt."""
    if data[: len(NPY_MAGIC)] == NPY_MAGIC:
        try:
            a = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise BadParams(f"{field} is not a readable .npy array: {e}", details={"field": field}) from None
        if a.dtype.kind not in "fiub":
            raise BadParams(f"{field} must be numeric, not {a.dtype}", details={"field": field})
        a = np.asarray(a, np.float64)
        while a.ndim > 2 and a.shape[0] == 1:
            a = a[0]
        if a.ndim == 3:
            a = a.sum(0)
        if a.ndim != 2 or min(a.shape) < 1:
            raise BadParams(f"{field} must be a 2-D map, got shape {list(a.shape)}", details={"field": field})
    else:
        a = np.asarray(_open(data, field).convert("L"), np.float64)
    if not np.isfinite(a).all():
        raise BadParams(f"{field} has NaN or infinite values", details={"field": field})
    return a
