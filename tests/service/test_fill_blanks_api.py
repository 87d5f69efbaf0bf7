"""``fill_blanks`` and ``fill_blanks_consistency`` end to end through the API (HTTP -> Redis ->
RQ worker -> artifacts), and the errors a client can fix, each a 4xx naming its cause."""

import csv
import io
import json

import numpy as np
import pytest
from PIL import Image

from tests.helpers import digit_png, png, submit
from tests.service.test_kinds_api import artifact, finished


@pytest.mark.parametrize("masking", ["random", "progressive"])
def test_fill_blanks_on_a_digit(client, masking):
    image, label = digit_png(3)
    params = {"masking": masking, "min_kept": 100, "max_masks": 400}
    view = finished(client, submit(client, "fill_blanks", [image], "digits-cnn", params))
    result = view["result"]["images"][0]
    assert result["label"]["index"] == label and result["prototype"]["top"][0]["probability"] > 0
    update = np.load(io.BytesIO(artifact(client, view, "0-update.npy")))
    assert update.shape == ((1, 8, 8) if masking == "random" else (4, 1, 8, 8)) and np.isfinite(update).all()
    assert np.load(io.BytesIO(artifact(client, view, "0-fill.npy"))).shape == (1, 8, 8)
    for name in ["0-overlay.png", "0-prototype.png"] + (["0-steps.png"] if masking == "progressive" else []):
        Image.open(io.BytesIO(artifact(client, view, name))).verify()


def test_no_kept_draw_finishes_with_a_null_prototype(client):
    black = png(np.zeros((8, 8), np.uint8))  # masked with zeros, it stays the same image
    predicted = client.post("/v1/models/digits-cnn/predict", files={"image": ("b.png", black, "image/png")})
    never = (predicted.json()["predictions"][0]["top"][0]["index"] + 1) % 10
    params = {"target": never, "min_kept": 5, "max_masks": 20}
    view = finished(client, submit(client, "fill_blanks", [black], "digits-cnn", params))
    assert view["result"]["images"][0]["prototype"] is None and view["result"]["warnings"]


def test_consistency_on_twenty_test_digits(client):
    params = {"limit": 20, "min_kept": 40, "max_masks": 160, "images_per_chunk": 10}
    view = finished(
        client, client.post("/v1/jobs/fill_blanks_consistency", json={"model_id": "digits-cnn", "params": params})
    )
    table = list(csv.DictReader(io.StringIO(artifact(client, view, "table1.csv").decode())))
    assert [row["masking"] for row in table] == ["random", "progressive"]
    for row in table:
        assert row["images"] == "20"
        for name in ("prototype", "masked_only", "fill_only"):
            assert 0 <= float(row[f"{name}_vs_paper_accuracy"]) <= 100
            assert row[f"{name}_vs_true_macro_f1"] != ""
    assert set(view["result"]["table1"]) == {"random", "progressive"}
    Image.open(io.BytesIO(artifact(client, view, "prototypes.png"))).verify()
    assert artifact(client, view, "confusion_progressive.csv").startswith(b"paper_label")


BAD = [
    ("fill_blanks", {"mask_ratio": 0}, "mask_ratio"),
    ("fill_blanks", {"mask_ratio": 1.0}, "mask_ratio"),
    ("fill_blanks", {"patch_size": 9}, "patch_size"),
    ("fill_blanks", {"masking": "progressive", "k": 1}, "k"),
    ("fill_blanks", {"masking": "progressive", "k": 17}, "k"),
    ("fill_blanks", {"min_kept": 500, "max_masks": 100}, "min_kept"),
    ("fill_blanks", {"target": 10}, "target"),
    ("fill_blanks_consistency", {"patch_size": 12}, "patch_size"),
]


@pytest.mark.parametrize(("kind", "params", "field"), BAD)
def test_bad_params_are_422_naming_the_field(api, kind, params, field):
    if kind == "fill_blanks":
        r = submit(api, kind, [digit_png(0)[0]], "digits-cnn", params)
    else:
        r = api.post(f"/v1/jobs/{kind}", json={"model_id": "digits-cnn", "params": params})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["type"] == "bad_params" and field in json.dumps(error), error


def test_data_sets_and_models_the_consistency_job_cannot_use(api, chelsea):
    r = api.post("/v1/jobs/fill_blanks_consistency", json={"model_id": "efficientnet-lite0", "params": {}})
    assert r.status_code == 422 and "uploaded" in r.json()["error"]["message"], r.text
    r = api.post("/v1/jobs/fill_blanks_consistency", json={"model_id": "digits-cnn", "params": {"dataset": "uploaded"}})
    assert r.status_code == 422 and "needs images" in r.json()["error"]["message"], r.text
    r = submit(api, "fill_blanks", [png(chelsea)], "no-such-model", {})
    assert r.status_code == 404 and r.json()["error"]["type"] == "unknown_model"
