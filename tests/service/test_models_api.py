"""Models through the API: list, describe, predict (real worker, real weights)."""

import base64
import io

import numpy as np
from PIL import Image

from tests.helpers import digit_png, png, submit


def test_list_models_includes_builtins_and_user_model(client):
    r = client.get("/v1/models")
    assert r.status_code == 200
    models = {m["id"]: m for m in r.json()["models"]}
    assert {"efficientnet-lite0", "efficientnet-lite1", "digits-cnn", "resnet18-random"} <= set(models)
    lite0 = models["efficientnet-lite0"]
    assert lite0["input_size"] == [224, 224] and lite0["num_classes"] == 1000
    assert lite0["labels"][285] == "Egyptian cat"
    assert len(lite0["version"]) == 64 and lite0["gradcam_layer"] == "_conv_head"
    assert lite0["preprocessing"]["resize"] == "shorter_side_center_crop"  # the published centre crop
    digits = models["digits-cnn"]
    assert digits["has_training_set"] and digits["metrics"]["test_accuracy"] >= 0.95
    assert digits["layers"] == ["conv1", "conv2", "fc"]
    assert models["resnet18-random"]["architecture"] == "resnet18"


def test_get_one_model_and_unknown(client):
    assert client.get("/v1/models/digits-cnn").json()["input_mode"] == "L"
    r = client.get("/v1/models/nope")
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "unknown_model"
    assert "digits-cnn" in r.json()["error"]["details"]["known"]


def test_predict_chelsea_is_a_cat(client, chelsea):
    r = client.post("/v1/models/efficientnet-lite0/predict", files={"image": ("cat.png", png(chelsea), "image/png")})
    assert r.status_code == 200, r.text
    top = r.json()["predictions"][0]["top"]
    assert len(top) == 5
    assert 281 <= top[0]["index"] <= 285, top
    assert sum(t["probability"] for t in top) <= 1.0 + 1e-6


def test_predict_several_images_json_base64_and_top_k(client, chelsea):
    images = [digit_png(i) for i in range(4)]
    body = {"images_base64": [base64.b64encode(b).decode() for b, _ in images], "top_k": 2}
    r = client.post("/v1/models/digits-cnn/predict", json=body)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [len(p["top"]) for p in preds] == [2, 2, 2, 2]
    assert [p["top"][0]["index"] for p in preds] == [label for _, label in images]


def test_predict_jpeg_and_grey_inputs(client, chelsea):
    grey = np.asarray(chelsea).mean(2).astype(np.uint8)
    for data in (png(chelsea, "JPEG", quality=90), png(grey)):
        r = client.post(
            "/v1/models/efficientnet-lite0/predict", files={"image": ("x", data, "application/octet-stream")}
        )
        assert r.status_code == 200, r.text


def test_predict_decodes_a_plain_jpeg_once_in_the_worker_and_answers_a_corrupt_one_400(client, chelsea):
    """A plain JPEG reaches the worker as uploaded (``schemas.stored_images``): its answer is
    that of the same pixels sent as PNG; a truncated one gets 400 ``bad_image`` from the
    worker's decode, and a job submitting it is refused at once."""
    jpeg = png(chelsea, "JPEG", quality=95)
    pixels = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    answers = [
        client.post("/v1/models/efficientnet-lite0/predict", files={"image": ("x", data, "application/octet-stream")})
        for data in (jpeg, png(pixels))
    ]
    assert [r.status_code for r in answers] == [200, 200], answers[0].text
    tops = [r.json()["predictions"][0]["top"] for r in answers]
    assert [t["index"] for t in tops[0]] == [t["index"] for t in tops[1]]
    assert max(abs(a["probability"] - b["probability"]) for a, b in zip(*tops, strict=True)) < 1e-5
    truncated = jpeg[: len(jpeg) // 2]
    r = client.post("/v1/models/efficientnet-lite0/predict", files={"image": ("x.jpg", truncated, "image/jpeg")})
    assert r.status_code == 400 and r.json()["error"]["type"] == "bad_image", r.text
    r = submit(client, "saliency", [truncated], "efficientnet-lite0")
    assert r.status_code == 400 and r.json()["error"]["type"] == "bad_image", r.text


def test_metrics_count_requests_by_route_template_and_status(api):
    def count(text: str, route: str, status: str) -> float:
        line = f'inspector_http_requests_total{{method="GET",route="{route}",status="{status}"}} '
        return next((float(x.removeprefix(line)) for x in text.splitlines() if x.startswith(line)), 0.0)

    before = api.get("/metrics").text
    api.get("/v1/models/digits-cnn")
    api.get("/v1/models/nope")
    api.get("/v1/models/nope-again")
    after = api.get("/metrics").text
    assert count(after, "/v1/models/{model_id}", "200") == count(before, "/v1/models/{model_id}", "200") + 1
    assert count(after, "/v1/models/{model_id}", "404") == count(before, "/v1/models/{model_id}", "404") + 2
    assert 'inspector_http_request_seconds_bucket{le="0.005",method="GET",route="/v1/models/{model_id}"}' in after
