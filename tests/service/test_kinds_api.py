"""Every explanation kind end to end through the API: HTTP -> Redis -> RQ worker -> artifacts."""

import io
import json

import numpy as np
from PIL import Image

from tests.helpers import digit_png, submit, wait_for


def finished(client, r, timeout=300):
    assert r.status_code in (200, 202), r.text
    view, _ = wait_for(client, r.json()["id"], timeout=timeout)
    assert view["status"] == "finished", view
    return view


def artifact(client, view, name):
    links = {a["name"]: a["url"] for a in view["artifacts"]}
    r = client.get(links[name])
    assert r.status_code == 200
    return r.content


def test_attribution_job_with_quality_score(client):
    image, label = digit_png(2)
    params = {
        "method": "integrated_gradients",
        "n_steps": 16,
        "target": label,
        "sensitivity_max": {"n_perturb_samples": 4},
    }
    view = finished(client, submit(client, "attribution", [image], "digits-cnn", params))
    summary = json.dumps(view["result"])
    assert "sensitivity_max" in summary
    raw = np.load(io.BytesIO(artifact(client, view, "0-attribution.npy")))
    assert raw.shape == (1, 8, 8) and np.isfinite(raw).all()
    Image.open(io.BytesIO(artifact(client, view, "0-overlay.png"))).verify()


def test_unsupported_method_is_422_before_queueing(client):
    image, _ = digit_png(2)
    r = submit(client, "attribution", [image], "digits-cnn", {"method": "gradcam", "layer": "no_such_layer"})
    assert r.status_code == 422 and r.json()["error"]["type"] in ("bad_params", "unsupported_method"), r.text


def test_occlusion_map_and_compare_jobs(client):
    image, _ = digit_png(4)
    view = finished(client, submit(client, "occlusion_map", [image], "digits-cnn", {}))
    assert any(a["name"].endswith(".png") for a in view["artifacts"])
    methods = [{"method": "saliency"}, {"method": "occlusion"}]
    view = finished(client, submit(client, "compare", [image], "digits-cnn", {"methods": methods}))
    names = {a["name"] for a in view["artifacts"]}
    assert any(n.endswith(".csv") for n in names) and any(n.endswith(".png") for n in names)


def test_u_analysis_with_uploaded_attribution_map(client):
    image, label = digit_png(6)
    attribution = np.random.default_rng(0).random((8, 8)).astype(np.float32)
    buf = io.BytesIO()
    np.save(buf, attribution)
    files = [("image", ("d.png", image, "image/png")), ("attribution", ("a.npy", buf.getvalue(), "application/x-npy"))]
    params = {"target": label, "window_px": 2, "order": "decreasing", "noise": "zeros"}
    r = client.post("/v1/jobs/u_analysis", files=files, data={"model_id": "digits-cnn", "params": json.dumps(params)})
    view = finished(client, r)
    assert "triples" in json.dumps(view["result"])
    assert any(a["name"].endswith(".png") for a in view["artifacts"])
    # an upload the kind does not accept is refused
    r = client.post("/v1/jobs/saliency", files=files, data={"model_id": "digits-cnn"})
    assert r.status_code == 422


def test_small_u_sweep_on_digits_test_split(client):
    params = {
        "limit": 12,
        "images_per_chunk": 4,
        "methods": [{"method": "saliency"}, {"method": "input_x_gradient"}],
        "orders": ["decreasing", "random"],
        "noises": ["zeros", "uniform"],
        "window_px": [2, 4],
    }
    r = client.post("/v1/jobs/u_sweep", json={"model_id": "digits-cnn", "params": params})
    view = finished(client, r)
    text = json.dumps(view["result"])
    assert "accuracy" in text
    names = {a["name"] for a in view["artifacts"]}
    assert any(n.endswith(".csv") for n in names) and any(n.endswith(".png") for n in names)
    assert view["progress"]["total"] >= 1


def test_influence_job_on_digits(client):
    image, label = digit_png(9)
    params = {"layers": ["fc"], "solver": "exact", "top_k": 4}
    view = finished(client, submit(client, "influence", [image], "digits-cnn", params), timeout=600)
    text = json.dumps(view["result"])
    assert "fc" in text
    names = {a["name"] for a in view["artifacts"]}
    assert any(n.endswith(".npy") for n in names) and any(n.endswith(".png") for n in names)
    scores = np.load(io.BytesIO(artifact(client, view, "scores.npy")))  # (images, layers + total, train points)
    assert scores.shape[-1] == 1437 and np.isfinite(scores).all()
    r = submit(client, "influence", [image], "efficientnet-lite0", params)
    assert r.status_code == 422 or wait_for(client, r.json()["id"])[0]["error"]["type"] == "bad_params"
