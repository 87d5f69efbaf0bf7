"""Decoding and validating uploaded images with Pillow (no torch).

Only PNG, JPEG, WebP, BMP, TIFF and GIF are decoded (Pillow's other plugins are off).
Checks, in order: byte size (413) -> format (415) -> pixel count from the header, before
decoding (413: decompression bombs) -> full decode (400 when corrupt or truncated). Then
EXIF orientation is applied and every mode becomes 8-bit RGB: palette and grey as RGB,
alpha composited on white, 16-bit and 32-bit integer images scaled by their type's range,
float images clipped to [0, 1]. The normalised image is stored for the workers as
``schemas.stored_images`` says (a plain JPEG as uploaded, else raw up to 4 MP, PNG above).
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from schemas.errors import BadImage, PayloadTooLarge, UnsupportedMedia
from schemas.stored_images import UPLOAD_FORMATS, encode_rgb, is_plain_jpeg, to_rgb

Image.MAX_IMAGE_PIXELS = None  # our own limit is applied before decoding, from settings


@dataclass(frozen=True)
class DecodedImage:
    data: bytes  # as stored for the workers (schemas.stored_images): a plain JPEG as uploaded, else 8-bit RGB
    sha256: str  # of the uploaded bytes
    width: int
    height: int
    format: str


def _signature_of_upload_format(data: bytes) -> bool:
    """Whether ``data`` starts like a file of one of the upload formats (Pillow's own check
    of each format's magic bytes, without parsing anything after them)."""
    Image.init()
    return any(accept is not None and accept(data[:16]) for fmt in UPLOAD_FORMATS for _, accept in [Image.OPEN[fmt]])


def open_image(data: bytes, max_bytes: int, max_pixels: int) -> Image.Image:
    """The upload opened (its header read, nothing decoded yet), after the checks that come
    before decoding: byte size, format, pixel count."""
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"image is {len(data)} bytes; the limit is {max_bytes}", details={"limit": max_bytes})
    if not data:
        raise BadImage("empty image file")
    try:
        img = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
    except UnidentifiedImageError:
        if _signature_of_upload_format(data):  # a PNG whose header chunk fails its CRC, say
            raise BadImage("corrupt image: its signature is that of a supported format, its header is broken") from None
        raise UnsupportedMedia(
            "not an image, or a format that is not supported", details={"supported": list(UPLOAD_FORMATS)}
        ) from None
    except (OSError, ValueError, SyntaxError) as e:
        raise BadImage(f"cannot read image: {e}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
            details={"limit": max_pixels},
        )
    if width == 0 or height == 0:
        raise BadImage("image has no pixels")
    return img


def finish_image(img: Image.Image, data: bytes, verify: bool = True) -> DecodedImage:
    """Decode an image :func:`open_image` opened from ``data`` and normalise it for storage.

    A plain JPEG is stored as uploaded (``schemas.stored_images``); ``verify=False`` then
    skips decoding it here, for a caller whose worker decodes it at once and answers a
    corrupt one with 400 itself (predicts)."""
    fmt = img.format or "?"
    sha256 = hashlib.sha256(data).hexdigest()
    if is_plain_jpeg(img):
        if verify:
            try:
                img.load()
            except (OSError, ValueError, SyntaxError, EOFError) as e:
                raise BadImage(f"corrupt or truncated image: {e}") from None
        return DecodedImage(data, sha256, img.width, img.height, fmt)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
            ImageOps.exif_transpose(img, in_place=True)
            rgb = to_rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, EOFError) as e:
        raise BadImage(f"corrupt or truncated image: {e}") from None
    return DecodedImage(encode_rgb(rgb), sha256, rgb.width, rgb.height, fmt)


def decode_image(data: bytes, max_bytes: int, max_pixels: int) -> DecodedImage:
    """Check, decode and normalise one upload (the module doc's checks, in order)."""
    return finish_image(open_image(data, max_bytes, max_pixels), data)
