"""What the client sends: images of any kind as upload parts, extra files, zipped folders.

An image is a path (``str`` or ``Path``), encoded bytes (PNG, JPEG... sent as they are), a
PIL image, or a numpy array: ``(H, W)`` grey, ``(H, W, C)`` with C 1, 3 or 4, or ``(C, H, W)``
with C 1 or 3; uint8 as is, floats in [0, 1] scaled by 255. PIL images and arrays are sent
as lossless PNG. A 4-D array ``(N, H, W, C)`` / ``(N, C, H, W)`` is N images.
"""

from __future__ import annotations

import io
import mimetypes
import os
import tempfile
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any, BinaryIO

import numpy as np
from PIL import Image

ImageLike = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | np.ndarray
Part = tuple[str, tuple[str, bytes, str]]
SPOOL_BYTES = 64 * 1024 * 1024  # a zipped folder stays in memory up to this, then goes to a temp file


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def array_image(arr: np.ndarray) -> Image.Image:
    """A numpy image as PIL (see the module docstring for the layouts accepted)."""
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # (C, H, W) -> (H, W, C)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise ValueError(f"an image array is (H, W), (H, W, C) or (C, H, W) with C 1, 3 or 4; got {arr.shape}")
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.floating) and not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"an image array is uint8 or float in [0, 1]; got {a.dtype}")
        if np.issubdtype(a.dtype, np.floating):
            if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
                raise ValueError("a float image array must hold values in [0, 1]")
            a = np.round(a * 255)
        elif a.min() < 0 or a.max() > 255:
            raise ValueError("an integer image array must hold values in 0..255")
        a = a.astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(a))


def image_part(image: ImageLike, index: int) -> tuple[str, bytes, str]:
    """``(filename, bytes, media type)`` of one image."""
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        return path.name, path.read_bytes(), mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if isinstance(image, bytes | bytearray | memoryview):
        return f"image-{index}", bytes(image), "application/octet-stream"
    if isinstance(image, Image.Image):
        return f"image-{index}.png", _png(image), "image/png"
    if isinstance(image, np.ndarray):
        return f"image-{index}.png", _png(array_image(image)), "image/png"
    raise TypeError(f"an image is a path, bytes, a PIL image or a numpy array; got {type(image).__name__}")


def as_image_list(images: ImageLike | Iterable[ImageLike] | None) -> list[ImageLike]:
    """One image or many, as a list (a 4-D array is N images)."""
    if images is None:
        return []
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    if isinstance(images, str | os.PathLike | bytes | bytearray | memoryview | Image.Image):
        return [images]
    return list(images)


def image_parts(images: ImageLike | Iterable[ImageLike] | None) -> list[Part]:
    return [("image", image_part(img, i)) for i, img in enumerate(as_image_list(images))]


def file_parts(files: Mapping[str, Any] | None) -> list[Part]:
    """Extra uploads by name (``training_set``, ``attribution``...): bytes, a file, a folder
    (zipped), or an array (sent as ``.npy``)."""
    parts: list[Part] = []
    for name, value in (files or {}).items():
        if isinstance(value, np.ndarray):
            buf = io.BytesIO()
            np.save(buf, value, allow_pickle=False)
            parts.append((name, (f"{name}.npy", buf.getvalue(), "application/octet-stream")))
        elif isinstance(value, str | os.PathLike) and Path(value).is_dir():  # e.g. a training_set folder
            with zip_folder(Path(value)) as f:
                parts.append((name, (f"{Path(value).name}.zip", f.read(), "application/zip")))
        elif isinstance(value, str | os.PathLike):
            parts.append((name, (Path(value).name, Path(value).read_bytes(), "application/octet-stream")))
        elif isinstance(value, bytes | bytearray | memoryview):
            parts.append((name, (name, bytes(value), "application/octet-stream")))
        else:
            raise TypeError(f"file {name!r}: bytes, a path or a numpy array; got {type(value).__name__}")
    return parts


def zip_folder(folder: Path) -> BinaryIO:
    """The folder as a zip (paths relative to it; hidden files left out), rewound. Images are
    stored, not deflated: they are compressed already and the API reads the zip faster."""
    out: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder)
            if path.is_file() and not any(part.startswith(".") for part in rel.parts):
                zf.write(path, rel.as_posix())
    out.seek(0)
    return out  # type: ignore[return-value]
