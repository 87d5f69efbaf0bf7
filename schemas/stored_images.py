"""How an input image is stored for the workers: the contract between the API, which writes
it (``service.images``), and the workers, which read it (``workers.pipeline.decode``).

An upload is decoded and normalised to 8-bit RGB once, in the API. Up to
``RAW_MAX_PIXELS`` it is stored raw, as a NumPy ``.npy`` array ``(H, W, 3)`` uint8: writing
and reading it cost a copy, where a PNG round trip (encode in the API, decode in the
worker) cost more CPU per image than a batched efficientnet-lite0 forward on 2 cores. Larger
images are stored as PNG (zlib level 1), about half the bytes of raw for photos, so Redis
memory stays bounded for the biggest uploads. Readers tell the two apart by their magic
bytes; any PNG (also one written by an older API) is read.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
"""The Pillow formats an uploaded image is decoded with (Pillow's other plugins stay off)."""
RAW_MAX_PIXELS = 4_000_000  # 12 MB raw; above it, PNG
NPY_MAGIC = b"\x93NUMPY"


def encode_rgb(img: Image.Image) -> bytes:
    """Bytes to store for an RGB image (raw ``.npy`` or PNG, by size)."""
    if img.width * img.height <= RAW_MAX_PIXELS:
        buf = io.BytesIO()
        np.save(buf, np.asarray(img.convert("RGB"), dtype=np.uint8), allow_pickle=False)
        return buf.getvalue()
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_rgb(data: bytes) -> Image.Image:
    """The stored image back as a loaded PIL image (RGB)."""
    if data[: len(NPY_MAGIC)] == NPY_MAGIC:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"stored image array is {arr.dtype} {arr.shape}, not (H, W, 3) uint8")
        return Image.fromarray(arr, "RGB")
    img = Image.open(io.BytesIO(data), formats=("PNG",))
    img.load()
    return img
