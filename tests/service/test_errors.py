"""Every error of the hierarchy once: its status and its JSON body (no worker needed)."""

import time
import zlib

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.helpers import digit_png, png


def error_of(r, status: int, type_: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and body["error"]["type"] == type_ and body["error"]["message"]
    return body["error"]


def post_image(api, data: bytes, url="/v1/models/digits-cnn/predict", ctype="image/png"):
    return api.post(url, files={"image": ("x", data, ctype)})


def test_not_an_image_is_415(api):
    error_of(post_image(api, b"hello, this is text"), 415, "unsupported_media_type")


def test_unsupported_format_is_415(api):
    ico = png(np.zeros((16, 16, 3), np.uint8), "ICO")
    error_of(post_image(api, ico), 415, "unsupported_media_type")


def test_truncated_or_corrupt_image_is_400(api, chelsea):
    data = png(chelsea)
    error_of(post_image(api, data[: len(data) // 2]), 400, "bad_image")
    jpeg = bytearray(png(chelsea, "JPEG"))
    error_of(post_image(api, bytes(jpeg[:600])), 400, "bad_image")
    error_of(post_image(api, b""), 400, "bad_image")


def test_decompression_bomb_is_413_before_decoding(api):
    # A 10000 x 5000 black PNG is 50 Mpx (over the 40 Mpx default) but only ~50 kB.
    width, height = 10000, 5000
    raw = zlib.compress(b"".join(b"\x00" + bytes(width // 8) for _ in range(height)), 9)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")
    assert len(bomb) < 200_000
    t0 = time.perf_counter()
    err = error_of(post_image(api, bomb), 413, "payload_too_large")
    assert "pixels" in err["message"] and time.perf_counter() - t0 < 2


def test_too_many_bytes_and_images_are_413(settings, models_dir):
    from service.main import create_app

    small = settings.model_copy(update={"max_upload_bytes": 1000, "max_images_per_request": 2})
    with TestClient(create_app(small)) as api:
        big = png(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
        error_of(post_image(api, big), 413, "payload_too_large")
        image, _ = digit_png(0)
        files = [("image", ("x", image, "image/png"))] * 3
        error_of(api.post("/v1/models/digits-cnn/predict", files=files), 413, "payload_too_large")


def test_unknown_model_job_artifact_kind_are_404(api):
    image, _ = digit_png(0)
    error_of(post_image(api, image, "/v1/models/nope/predict"), 404, "unknown_model")
    error_of(api.get("/v1/jobs/0123456789abcdef"), 404, "unknown_job")
    error_of(api.get("/v1/jobs/0123456789abcdef/artifacts/x.png"), 404, "unknown_job")
    error_of(
        api.post("/v1/jobs/nope", files={"image": ("x", image)}, data={"model_id": "digits-cnn"}), 404, "not_found"
    )
    error_of(api.get("/v2/nothing"), 404, "not_found")


@pytest.mark.parametrize(
    "params",
    ['{"abs": "maybe"}', '{"unknown_knob": 1}', '{"target": 10}', '{"target": [1, 2]}', "[1]", "not json"],
)
def test_bad_params_are_422(api, params):
    image, _ = digit_png(0)
    r = api.post("/v1/jobs/saliency", files={"image": ("x", image)}, data={"model_id": "digits-cnn", "params": params})
    error_of(r, 422, "bad_params")


def test_missing_model_id_and_wrong_content_type(api):
    image, _ = digit_png(0)
    error_of(api.post("/v1/jobs/saliency", files={"image": ("x", image)}), 422, "bad_params")
    error_of(
        api.post("/v1/jobs/saliency", content=b"x", headers={"content-type": "text/plain"}),
        415,
        "unsupported_media_type",
    )
    error_of(api.post("/v1/models/digits-cnn/predict", json={"image_base64": "!!notbase64"}), 400, "bad_image")


def test_redis_down_is_503_with_retry_after_fast(settings):
    from service.main import create_app
    from tests.conftest import free_port

    down = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    image, _ = digit_png(0)
    with TestClient(create_app(down)) as api:
        for request in (
            lambda: post_image(api, image),
            lambda: api.post("/v1/jobs/saliency", files={"image": ("x", image)}, data={"model_id": "digits-cnn"}),
            lambda: api.get("/v1/jobs/0123456789abcdef"),
        ):
            t0 = time.perf_counter()
            r = request()
            assert time.perf_counter() - t0 < 2
            error_of(r, 503, "queue_unavailable")
            assert int(r.headers["retry-after"]) > 0
        r = api.get("/readyz")
        assert r.status_code == 503 and r.json()["redis"] is False
        assert api.get("/healthz").status_code == 200
