"""How an input image is stored for the workers: the contract between the API, which writes
it (``service.images``), and the workers, which read it (``workers.pipeline.decode``).

An upload is decoded and normalised to 8-bit RGB in the API. A plain JPEG (8-bit RGB, no
EXIF rotation, up to ``RAW_MAX_PIXELS``: what cameras and browsers send) is stored as
uploaded: decoding it again in the worker gives the same pixels (the same libjpeg), and its
bytes are about an eighth of raw ones, which Redis, the API and the worker would otherwise
copy (``is_plain_jpeg``). Anything else up to ``RAW_MAX_PIXELS`` is stored raw, as a NumPy
``.npy`` array ``(H, W, 3)`` uint8: writing and reading it cost a copy, where a PNG round
trip (encode in the API, decode in the worker) cost more CPU per image than a batched
efficientnet-lite0 forward on 2 cores. Larger images are stored as PNG (zlib level 1),
about half the bytes of raw for photos, so Redis memory stays bounded for the biggest
uploads. Readers tell the three apart by their magic bytes; any PNG (also one written by an
older API) is read.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
"""The Pillow formats an uploaded image is decoded with (Pillow's other plugins stay off)."""
RAW_MAX_PIXELS = 4_000_000  # 12 MB raw; above it, PNG
NPY_MAGIC = b"\x93NUMPY"
JPEG_MAGIC = b"\xff\xd8\xff"
EXIF_ORIENTATION = 0x0112


def is_plain_jpeg(img: Image.Image) -> bool:
    """Whether an opened upload may be stored as uploaded: a JPEG that decodes to 8-bit RGB
    needing no rotation, up to ``RAW_MAX_PIXELS`` (see the module doc). A JPEG whose EXIF
    cannot be read is not (the normal path reports it)."""
    if img.format != "JPEG" or img.mode != "RGB" or img.width * img.height > RAW_MAX_PIXELS:
        return False
    try:
        return img.getexif().get(EXIF_ORIENTATION, 1) == 1
    except Exception:  # Pillow raises several types on a malformed EXIF block
        return False


def to_rgb(img: Image.Image) -> Image.Image:
    """Any decoded image as 8-bit RGB, as the API stores uploads: palette and grey as RGB,
    alpha composited on white, 16-bit and 32-bit integer images scaled by their type's
    range, float images clipped to [0, 1] (EXIF orientation is the caller's). An RGB image
    is returned as it is, not copied."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img, dtype=np.uint16)
        return Image.fromarray((arr >> 8).astype(np.uint8)).convert("RGB")
    if img.mode == "I":
        arr = np.asarray(img, dtype=np.int64)
        top = 65535 if arr.max(initial=0) <= 65535 else 2**31 - 1
        return Image.fromarray((np.clip(arr, 0, top) * 255 // top).astype(np.uint8)).convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        return Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8)).convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def encode_rgb(img: Image.Image) -> bytes:
    """Bytes to store for an RGB image (raw ``.npy`` or PNG, by size)."""
    if img.width * img.height <= RAW_MAX_PIXELS:
        # np.save's bytes, written as its header and the pixels (two copies, not five).
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": "|u1", "fortran_order": False, "shape": (img.height, img.width, 3)}
        )
        return header.getvalue() + img.convert("RGB").tobytes()
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_rgb(data: bytes) -> Image.Image:
    """The stored image back as a loaded PIL image (RGB). ``OSError`` when a stored JPEG is
    corrupt or truncated (the predict path stores uploads it has not decoded yet)."""
    if data[: len(JPEG_MAGIC)] == JPEG_MAGIC:
        img = Image.open(io.BytesIO(data), formats=("JPEG",))
        img.load()
        if img.mode != "RGB":
            raise ValueError(f"stored JPEG is {img.mode}, not RGB")
        return img
    if data[: len(NPY_MAGIC)] == NPY_MAGIC:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"stored image array is {arr.dtype} {arr.shape}, not (H, W, 3) uint8")
        return Image.fromarray(arr, "RGB")
    img = Image.open(io.BytesIO(data), formats=("PNG",))
    img.load()
    return img
