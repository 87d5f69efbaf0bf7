"""A corpus of bad inputs: each gets its own 4xx (status and error type), never a 500 or a
hang, and the service keeps serving afterwards (a real predict still works)."""

import base64
import io
import json
import struct
import time
import zlib

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.helpers import digit_png, png

MAX_BYTES = 300_000


def chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def png_of_size(width: int, height: int, idat: bytes) -> bytes:
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])  # 8-bit grey
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png_bomb() -> bytes:
    """8000 x 8000 = 64 Mpx of zeros in ~60 kB (over the 40 Mpx default)."""
    row = b"\x00" + bytes(8000)
    return png_of_size(8000, 8000, zlib.compress(row * 8000, 9))


def gif_bomb() -> bytes:
    """A GIF whose header claims 65535 x 65535 (4.3 Gpx)."""
    small = png(np.zeros((4, 4, 3), np.uint8), "GIF")
    return small[:6] + struct.pack("<HH", 65535, 65535) + small[10:]


def tiff_bomb() -> bytes:
    img = Image.new("L", (1, 1))
    buf = io.BytesIO()
    img.save(buf, "TIFF")
    data = bytearray(buf.getvalue())
    # Patch ImageWidth (256) and ImageLength (257) in the first IFD to 100000 x 100000.
    (ifd,) = struct.unpack_from("<I", data, 4)
    (n,) = struct.unpack_from("<H", data, ifd)
    for i in range(n):
        at = ifd + 2 + 12 * i
        tag, typ = struct.unpack_from("<HH", data, at)
        if tag in (256, 257):
            struct.pack_into("<HHII", data, at, tag, 4, 1, 100_000)  # LONG
    return bytes(data)


def jpeg_header_bomb(chelsea) -> bytes:
    data = bytearray(png(chelsea, "JPEG"))
    at = data.index(b"\xff\xc0")  # SOF0: length(2) precision(1) height(2) width(2)
    struct.pack_into(">HH", data, at + 5, 65000, 65000)
    return bytes(data)


def corrupt_png(chelsea) -> bytes:
    data = bytearray(png(chelsea))
    at = data.index(b"IDAT") + 200
    data[at : at + 64] = bytes(64)  # zeros in the compressed stream: CRC and zlib both break
    return bytes(data)


def bad_header_crc(photo: bytes) -> bytes:
    """A valid PNG whose IHDR chunk's CRC (bytes 29-32) is wrong."""
    data = bytearray(photo)
    data[29] ^= 0xFF
    return bytes(data)


@pytest.fixture(scope="module")
def strict(settings):
    from service.main import create_app

    s = settings.model_copy(
        update={"max_upload_bytes": MAX_BYTES, "max_images_per_request": 4, "webhook_secret": "s",
                "predict_timeout_s": 5}  # fmt: skip
    )
    with TestClient(create_app(s)) as api:
        yield api


def predict_with(data: bytes, ctype: str = "image/png"):
    return lambda api: api.post("/v1/models/digits-cnn/predict", files={"image": ("x", data, ctype)})


def job_with(**data):
    image, _ = digit_png(0)
    return lambda api: api.post("/v1/jobs/saliency", files={"image": ("x.png", image, "image/png")},
                                data={"model_id": "digits-cnn", **data})  # fmt: skip


def raw_post(content: bytes, ctype: str | None):
    headers = {"content-type": ctype} if ctype else {}
    return lambda api: api.post("/v1/jobs/saliency", content=content, headers=headers)


def job_json(body: bytes | str):
    content = body.encode() if isinstance(body, str) else body
    return lambda api: api.post("/v1/jobs/saliency", content=content, headers={"content-type": "application/json"})


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def corpus(chelsea):
    digit, _ = digit_png(0)
    photo = png(chelsea)
    noise = png(np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8))
    return [
        # images
        ("zero-byte file", predict_with(b""), 400, "bad_image"),
        ("truncated PNG", predict_with(photo[: len(photo) // 2]), 400, "bad_image"),
        ("truncated JPEG", predict_with(png(chelsea, "JPEG")[:600]), 400, "bad_image"),
        ("corrupt PNG stream", predict_with(corrupt_png(chelsea)), 400, "bad_image"),
        # Pillow cannot identify these two, but they start with a PNG's signature: a PNG that is
        # truncated or whose header is broken is a corrupt image (400), not another format.
        ("PNG signature only", predict_with(photo[:8]), 400, "bad_image"),
        ("PNG of 0 x 0 pixels", predict_with(png_of_size(0, 0, zlib.compress(b""))), 400, "bad_image"),
        ("PNG header with a wrong CRC", predict_with(bad_header_crc(photo)), 400, "bad_image"),
        ("random bytes", predict_with(np.random.default_rng(1).bytes(5000)), 415, "unsupported_media_type"),
        ("text as an image", predict_with(b"hello, world", "text/plain"), 415, "unsupported_media_type"),
        ("SVG", predict_with(b'<svg xmlns="http://www.w3.org/2000/svg"/>', "image/svg+xml"), 415,
         "unsupported_media_type"),
        ("PDF", predict_with(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\n", "application/pdf"), 415,
         "unsupported_media_type"),
        ("PNG decompression bomb", predict_with(png_bomb()), 413, "payload_too_large"),
        ("GIF header bomb", predict_with(gif_bomb(), "image/gif"), 413, "payload_too_large"),
        ("TIFF header bomb", predict_with(tiff_bomb(), "image/tiff"), 413, "payload_too_large"),
        ("JPEG header bomb", predict_with(jpeg_header_bomb(chelsea), "image/jpeg"), 413, "payload_too_large"),
        ("image over the byte limit", predict_with(noise), 413, "payload_too_large"),
        ("too many images", lambda api: api.post("/v1/models/digits-cnn/predict",
                                                 files=[("image", ("x", digit, "image/png"))] * 5),
         413, "payload_too_large"),
        # content types and bodies
        ("text/plain body", raw_post(b"x", "text/plain"), 415, "unsupported_media_type"),
        ("XML body", raw_post(b"<a/>", "application/xml"), 415, "unsupported_media_type"),
        ("no content type", raw_post(b"abc", None), 415, "unsupported_media_type"),
        ("multipart without boundary", raw_post(b"--x\r\n", "multipart/form-data"), 422, "bad_params"),
        ("image as a text field", lambda api: api.post(
            "/v1/jobs/saliency", files={"image": (None, "abc"), "model_id": (None, "digits-cnn")}), 422, "bad_params"),
        ("JSON array", job_json("[1, 2]"), 422, "bad_params"),
        ("JSON null", job_json("null"), 422, "bad_params"),
        ("broken JSON", job_json('{"model_id": '), 422, "bad_params"),
        ("non-UTF-8 JSON", job_json(b'{"model_id": "\xff\xfe"}'), 422, "bad_params"),
        ("JSON unknown field",
         job_json(json.dumps({"model_id": "digits-cnn", "image_base64": b64(digit), "colour": 1})), 422, "bad_params"),
        ("JSON base64 not base64", job_json(json.dumps({"model_id": "digits-cnn", "image_base64": "%%%"})),
         400, "bad_image"),
        ("JSON base64 of text", job_json(json.dumps({"model_id": "digits-cnn", "image_base64": b64(b"plain text")})),
         415, "unsupported_media_type"),
        ("multipart unknown field", job_with(colour="red"), 422, "bad_params"),
        ("non-UTF-8 params", lambda api: api.post(
            "/v1/jobs/saliency",
            content=b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n\r\n" + digit
            + b"\r\n--b\r\nContent-Disposition: form-data; name=\"params\"\r\n\r\n{\"abs\": \"\xff\xfe\"}\r\n--b--\r\n",
            headers={"content-type": "multipart/form-data; boundary=b"}), 422, "bad_params"),
        # params: unknown, huge, negative
        ("unknown param", job_with(params='{"colour": 1}'), 422, "bad_params"),
        ("huge params text", job_with(params=json.dumps({"abs": "x" * 2_000_000})), 422, "bad_params"),
        ("huge batch size", job_with(params='{"batch_size": 1e30}'), 422, "bad_params"),
        ("huge target", job_with(params='{"target": 100000000000000000000}'), 422, "bad_params"),
        ("negative batch size", job_with(params='{"batch_size": -4}'), 422, "bad_params"),
        ("negative target", job_with(params='{"target": -1}'), 422, "bad_params"),
        ("negative top_k", lambda api: api.post("/v1/models/digits-cnn/predict", files={"image": ("x", digit)},
                                                data={"top_k": "-1"}), 422, "bad_params"),
        ("huge top_k", lambda api: api.post("/v1/models/digits-cnn/predict", files={"image": ("x", digit)},
                                            data={"top_k": "99999999999999999999"}), 422, "bad_params"),
        ("negative wait", lambda api: api.post("/v1/jobs/saliency?wait=-1", files={"image": ("x", digit)},
                                               data={"model_id": "digits-cnn"}), 422, "bad_params"),
        ("huge model id", job_with(model_id="m" * 100_000), 404, "unknown_model"),
        ("unknown kind", lambda api: api.post("/v1/jobs/%00nope", files={"image": ("x", digit)}), 404, "not_found"),
        ("malformed job id", lambda api: api.get("/v1/jobs/..%2F..%2Fetc"), 404, "not_found"),
        ("job id with odd characters", lambda api: api.get("/v1/jobs/a;b*c"), 404, "unknown_job"),
        # headers and callbacks
        ("non-ASCII Idempotency-Key", lambda api: api.post(
            "/v1/jobs/saliency", files={"image": ("x", digit)}, data={"model_id": "digits-cnn"},
            headers={b"Idempotency-Key": b"caf\xe9"}), 422, "bad_params"),
        ("callback to loopback", job_with(callback_url="http://127.0.0.1:9/hook"), 422, "bad_params"),
        ("callback not http", job_with(callback_url="file:///etc/passwd"), 422, "bad_params"),
        ("callback with credentials", job_with(callback_url="https://u:p@example.com/h"), 422, "bad_params"),
        ("callback bad port", job_with(callback_url="https://example.com:99999/h"), 422, "bad_params"),
        ("callback on a predict", lambda api: api.post("/v1/models/digits-cnn/predict", files={"image": ("x", digit)},
                                                       data={"callback_url": "https://example.com/h"}),
         422, "bad_params"),
        # body size
        ("Content-Length over the limit", lambda api: api.post("/v1/jobs/saliency", content=b"x",
                                                               headers={"content-type": "application/json",
                                                                        "content-length": str(10**12)}),
         413, "payload_too_large"),
        ("chunked body over the limit", lambda api: api.post(
            "/v1/jobs/saliency", content=(b"x" * 65536 for _ in range(64)),
            headers={"content-type": "application/json"}), 413, "payload_too_large"),
    ]  # fmt: skip


def test_each_bad_input_gets_its_4xx_and_the_service_keeps_serving(strict, chelsea, worker):
    results = []
    for name, send, status, type_ in corpus(chelsea):
        t0 = time.perf_counter()
        r = send(strict)
        took = time.perf_counter() - t0
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        got = (r.status_code, body.get("error", {}).get("type"))
        results.append((name, got, (status, type_), took))
    wrong = [(n, got, want) for n, got, want, _ in results if got != want]
    assert not wrong, "\n".join(f"{n}: got {g}, expected {w}" for n, g, w in wrong)
    slow = [(n, round(t, 2)) for n, _, _, t in results if t > 3]
    assert not slow, f"bad inputs must be refused fast: {slow}"
    # Still serving: a real predict.
    image, label = digit_png(4)
    r = strict.post("/v1/models/digits-cnn/predict", files={"image": ("x.png", image, "image/png")})
    assert r.status_code == 200 and r.json()["predictions"][0]["top"][0]["index"] == label
    assert strict.get("/healthz").status_code == 200
