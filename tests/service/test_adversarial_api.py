"""The ``adversarial`` and ``noise_images`` kinds through the API: end to end (HTTP -> Redis ->
RQ worker -> artifacts), transfer models in the job's identity, and the bad inputs answered
before queueing."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from schemas.inspector import AdversarialParams
from schemas.kinds import KINDS
from schemas.manifests import ModelRegistry
from service import jobs
from service.images import decode_image
from tests.helpers import digit_png, submit
from tests.service.test_inspector_api import artifact, finished


def post_json(client, kind: str, params: dict, model_id: str = "digits-cnn"):
    return client.post(f"/v1/jobs/{kind}", json={"model_id": model_id, "params": params})


def test_adversarial_image_and_data_set_end_to_end(client) -> None:
    image, label = digit_png(7)
    view = finished(client, submit(client, "adversarial", [image], "digits-cnn", {"epsilon": 32, "target": label}))
    img = view["result"]["images"][0]
    (row,) = img["models"]
    assert row["model"] == "digits-cnn" and img["linf_png"] <= 32 + 1e-3
    assert {"p_original_before", "p_original_after", "fooled", "fooled_float", "gradcam"} <= set(row)
    adv = np.asarray(Image.open(io.BytesIO(artifact(client, view, "0-adversarial.png"))), np.int16)
    orig = np.asarray(Image.open(io.BytesIO(image)), np.int16)
    assert adv.shape == (8, 8) and np.abs(adv - orig).max() <= 32
    assert np.load(io.BytesIO(artifact(client, view, "0-digits-cnn-gradcam.npy"))).shape == (4, 8, 8)
    params = {"dataset": "test", "limit": 40, "attack": "ifgsm", "steps": 3, "epsilon": 32}
    view = finished(client, post_json(client, "adversarial", params))
    (success,) = view["result"]["success"]
    assert success["images"] == 40 and 0 <= success["success_rate_png"] <= 1
    assert artifact(client, view, "success.csv").decode().splitlines()[0].startswith("model,role,images,considered")


def test_noise_images_end_to_end(client) -> None:
    view = finished(client, post_json(client, "noise_images", {"count": 2, "seed": 4}))
    assert len(view["result"]["images"]) == 2
    Image.open(io.BytesIO(artifact(client, view, "noise.png"))).verify()
    again = post_json(client, "noise_images", {"count": 2, "seed": 4})
    assert again.json()["id"] == view["id"] and again.json()["deduplicated"]
    params = {"noise": "uap", "dataset": "test", "limit": 10, "xi": 48, "max_passes": 1}
    view = finished(client, post_json(client, "noise_images", params))
    assert 0 <= view["result"]["uap"]["fooling_rate_heldout"] <= 1
    assert np.load(io.BytesIO(artifact(client, view, "uap.npy"))).shape == (1, 8, 8)


@pytest.mark.parametrize(
    ("kind", "params", "status", "error", "field"),
    [
        ("adversarial", {"epsilon": 256}, 422, "bad_params", "epsilon"),
        ("adversarial", {"epsilon": -0.5}, 422, "bad_params", "epsilon"),
        ("adversarial", {"transfer_models": ["no-such-model"]}, 404, "unknown_model", None),
        ("adversarial", {"transfer_models": ["efficientnet-lite0"]}, 422, "bad_params", "transfer_models"),
        ("adversarial", {"transfer_models": ["digits-cnn"]}, 422, "bad_params", "transfer_models"),
        ("adversarial", {"adv_target": 10}, 422, "bad_params", "adv_target"),
        ("noise_images", {"noise": "uap"}, 422, "bad_params", "dataset"),
        ("noise_images", {"noise": "uap", "dataset": "uploaded"}, 422, "bad_params", "dataset"),
    ],
)
def test_bad_params_before_queueing(api, kind, params, status, error, field) -> None:
    image = [digit_png(1)[0]] if kind == "adversarial" else []
    r = submit(api, kind, image, "digits-cnn", params) if image else post_json(api, kind, params)
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert body["type"] == error
    if field is not None:
        assert field in json.dumps(body), body


def test_no_image_and_registered_splits_are_checked_before_queueing(api) -> None:
    r = post_json(api, "adversarial", {"epsilon": 8})
    assert r.status_code == 422 and "dataset" in r.text
    r = post_json(api, "adversarial", {"dataset": "test"}, model_id="efficientnet-lite0")
    assert r.status_code == 422 and "no built-in data set" in r.text
    r = submit(api, "noise_images", [digit_png(1)[0]], "digits-cnn", {})
    assert r.status_code == 422 and "takes no image" in r.text


def test_transfer_models_versions_enter_the_job_identity(models_dir) -> None:
    """Two submissions alike but for a transfer model's version are two jobs; the same
    versions are one job."""
    registry = ModelRegistry(models_dir)
    entry = registry.get("efficientnet-lite0")
    spec_params = AdversarialParams(transfer_models=["efficientnet-lite1"])
    image = decode_image(digit_png(1)[0], 10**7, 10**8)
    others = jobs.other_models(KINDS["adversarial"], entry, spec_params, registry)
    assert others == {"efficientnet-lite1": registry.get("efficientnet-lite1").version}
    one = jobs.job_id_for("adversarial", entry, [image], spec_params, {}, others=others)
    assert one == jobs.job_id_for("adversarial", entry, [image], spec_params, {}, others=dict(others))
    stale = {"efficientnet-lite1": "0" * 64}
    assert one != jobs.job_id_for("adversarial", entry, [image], spec_params, {}, others=stale)
