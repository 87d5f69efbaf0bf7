"""Image decoding rules (service side, Pillow only)."""

import io

import numpy as np
import pytest
from PIL import Image

from schemas.errors import BadImage, PayloadTooLarge, UnsupportedMedia
from schemas.stored_images import NPY_MAGIC, RAW_MAX_PIXELS, decode_rgb, to_rgb
from service.images import decode_image, finish_image, open_image
from tests.helpers import png

LIMITS = {"max_bytes": 10_000_000, "max_pixels": 10_000_000}


def rgb_of(data: bytes) -> np.ndarray:
    out = decode_image(data, **LIMITS)
    img = decode_rgb(out.data)  # as the workers read it
    assert img.mode == "RGB"
    return np.asarray(img)


def test_exif_orientation_is_applied():
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255  # left half white
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = rgb_of(png(img, "JPEG", exif=exif, quality=95))
    assert out.shape == (40, 20, 3)
    assert out[:20].mean() > 200 and out[20:].mean() < 50  # white half now on top


def test_grey_palette_rgba_and_16bit_become_rgb():
    grey = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (4, 1))
    out = rgb_of(png(grey))
    assert (out[..., 0] == grey).all() and (out[..., 1] == grey).all()

    pal = Image.fromarray(np.full((4, 4, 3), (10, 200, 30), np.uint8)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert tuple(rgb_of(png(pal))[0, 0]) == (10, 200, 30)

    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:2, :, 3] = 255  # top opaque red, bottom transparent -> white
    out = rgb_of(png(rgba))
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[3, 3]) == (255, 255, 255)

    deep = Image.fromarray(np.full((4, 4), 65535 // 2, np.uint16))
    assert deep.mode.startswith("I;16")
    out = rgb_of(png(deep))
    assert abs(int(out[0, 0, 0]) - 127) <= 1


def test_limits_and_bad_bytes():
    with pytest.raises(PayloadTooLarge):
        decode_image(png(np.zeros((10, 10), np.uint8)), max_bytes=10, max_pixels=1000)
    with pytest.raises(PayloadTooLarge):
        decode_image(png(np.zeros((40, 40), np.uint8)), max_bytes=10_000, max_pixels=1000)
    with pytest.raises(UnsupportedMedia):
        decode_image(b"not an image at all" + b"\x00" * 10, **LIMITS)
    with pytest.raises(BadImage):  # a GIF's signature, then garbage: a corrupt GIF, not another format
        decode_image(b"GIF89a-not-really" + b"\x00" * 10, **LIMITS)
    with pytest.raises(BadImage):
        decode_image(png(np.zeros((64, 64, 3), np.uint8))[:60], **LIMITS)


def test_same_bytes_same_hash_and_stored_bytes():
    data = png(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    a, b = decode_image(data, **LIMITS), decode_image(data, **LIMITS)
    assert a.sha256 == b.sha256 and a.data == b.data and (a.width, a.height) == (4, 4)


def test_stored_raw_up_to_the_limit_png_above_both_read_back_exactly():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    stored = decode_image(png(small), **LIMITS).data
    assert stored.startswith(NPY_MAGIC) and np.array_equal(np.asarray(decode_rgb(stored)), small)
    side = int(RAW_MAX_PIXELS**0.5) + 1  # just over the raw limit
    big = np.zeros((side, side, 3), np.uint8)
    big[::7, ::3] = (200, 10, 90)
    stored = decode_image(png(big), max_bytes=10**9, max_pixels=10**8).data
    assert stored.startswith(b"\x89PNG") and len(stored) < big.nbytes // 10
    assert np.array_equal(np.asarray(decode_rgb(stored)), big)


def test_a_plain_jpeg_is_stored_as_uploaded_and_read_back_as_the_api_decoded_it(chelsea):
    """``schemas.stored_images``: an RGB JPEG with no EXIF rotation is stored as its upload
    bytes (an eighth of raw), and the workers' decode gives the pixels the API's gave."""
    data = png(chelsea, "JPEG", quality=95)
    out = decode_image(data, **LIMITS)
    assert out.data == data and (out.width, out.height) == (451, 300) and out.format == "JPEG"
    assert np.array_equal(np.asarray(decode_rgb(out.data)), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    # Rotated by EXIF, grey: normalised by the API and stored raw, as before.
    img = Image.fromarray(chelsea)
    exif = img.getexif()
    exif[0x0112] = 6
    rotated = decode_image(png(img, "JPEG", exif=exif), **LIMITS)
    assert rotated.data.startswith(NPY_MAGIC) and (rotated.width, rotated.height) == (300, 451)
    grey = decode_image(png(np.asarray(chelsea).mean(2).astype(np.uint8), "JPEG"), **LIMITS)
    assert grey.data.startswith(NPY_MAGIC) and np.asarray(decode_rgb(grey.data)).shape == (300, 451, 3)


def test_a_truncated_jpeg_is_refused_when_verified_and_fails_the_workers_decode_when_not(chelsea):
    """Predicts store a plain JPEG without decoding it (``verify=False``): the worker's decode
    then raises, which the batcher answers 400 (tests/service/test_models_api.py)."""
    data = png(chelsea, "JPEG", quality=95)
    truncated = data[: len(data) // 2]
    with pytest.raises(BadImage, match="truncated"):
        decode_image(truncated, **LIMITS)
    stored = finish_image(open_image(truncated, **LIMITS), truncated, verify=False)
    assert stored.data == truncated
    with pytest.raises(OSError):
        decode_rgb(stored.data)


def test_to_rgb_returns_an_rgb_image_itself():
    img = Image.new("RGB", (3, 2), (1, 2, 3))
    assert to_rgb(img) is img
    assert to_rgb(Image.new("L", (3, 2), 9)).mode == "RGB"
