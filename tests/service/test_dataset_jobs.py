"""Data-set jobs through the API with real workers: ``attribution_batch`` over a 300-image
upload equal to ``attribution`` image by image, ``u_sweep`` over it, a data set in use
(409), the results as one zip; two workers sharing a batch, one SIGKILLed mid-way."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import time
import zipfile

import numpy as np
import pytest
import torch
from redis import Redis

from schemas.attribution import AttributionParams
from service.images import decode_image
from tests.conftest import start_worker
from tests.helpers import digit_png, noise_images, png, upload_dataset, wait_for, zip_of
from workers import render
from workers.explain import attribution
from workers.pipeline import load_inputs

MODEL = "resnet18-random"
BATCH = 8
SALIENCY = AttributionParams.model_validate({"method": "saliency"})


def folder_zip(n: int, seed: int) -> tuple[bytes, list[bytes]]:
    """``n`` random 16x16 PNGs in ten class folders named like resnet18-random's labels;
    the images in sample order (classes by name, files sorted)."""
    images = noise_images(n, size=16, seed=seed)
    members = {f"class-{i % 10}/{i:04d}.png": b for i, b in enumerate(images)}
    order = sorted(members)
    return zip_of(members), [members[m] for m in order]


def run_batch(client, dataset: str, params: dict, timeout: float = 300):
    r = client.post("/v1/jobs/attribution_batch", json={"model_id": MODEL, "params": {"dataset": dataset, **params}})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def artifact(client, view: dict, name: str) -> bytes:
    url = next(a["url"] for a in view["artifacts"] if a["name"] == name)
    r = client.get(url)
    assert r.status_code == 200, r.text
    return r.content


def reference_maps(model, images: list[bytes], method: dict, targets: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Each image sent alone through the ``attribution`` kind's code (the API's decode, the
    worker's preprocessing, ``attribute`` and the channel aggregation of ``run``) for the
    given target; and each image's own probabilities (its predicted class is the kind's
    default target)."""
    params = AttributionParams.model_validate(method)
    maps, probs = [], []
    for b, t in zip(images, targets, strict=True):
        inputs = load_inputs(model, [decode_image(b, 1 << 24, 10**8).data], params)
        attr = attribution.attribute(model, inputs.images, torch.tensor([t]), params)
        maps.append(render.to_2d(attr[0], params.aggregation))
        probs.append(inputs.probs[0].cpu().numpy())
    return np.stack(maps), np.stack(probs)


def check_targets(rows: list[dict[str, str]], probs: np.ndarray) -> None:
    """The batch's targets are each image's predicted class alone, except where two classes
    tie to within float noise (batching changes the last bits of the logits)."""
    top2 = np.sort(probs, axis=1)[:, -2:]
    for row, p, (second, first) in zip(rows, probs, top2, strict=True):
        if first - second > 1e-5:
            assert int(row["target"]) == int(np.argmax(p)), row


def test_attribution_batch_and_u_sweep_over_an_uploaded_set(client, model_cache):
    archive, images = folder_zip(300, seed=7)
    ds = upload_dataset(client, archive, name="noise-300").json()
    assert ds["images"] == 300 and len(ds["classes"]) == 10
    job = run_batch(client, ds["id"], {"dtype": "float32", "images_per_chunk": 50, "batch_size": BATCH})
    busy = client.delete(f"/v1/datasets/{ds['id']}")
    assert busy.status_code == 409 and busy.json()["error"]["type"] == "dataset_in_use"
    view, _ = wait_for(client, job, timeout=600)
    assert view["status"] == "finished", view
    assert view["progress"]["total"] == 300 and view["result"]["images"] == 300
    maps = np.load(io.BytesIO(artifact(client, view, "maps.npy")))
    rows = list(csv.DictReader(io.StringIO(artifact(client, view, "images.csv").decode())))
    assert maps.shape == (300, 64, 64) and maps.dtype == np.float32
    assert [int(r["index"]) for r in rows] == list(range(300))
    assert [int(r["label"]) for r in rows] == [k for k in range(10) for _ in range(30)]  # folders named as labels
    targets = [int(r["target"]) for r in rows]
    model = model_cache.get(MODEL)
    expected, probs = reference_maps(model, images, {"method": "saliency"}, targets)
    check_targets(rows, probs)
    close = np.abs(maps - expected).max(axis=(1, 2)) <= 1e-5
    # oneDNN rounds a convolution's last bits differently for a batch of 8 than for one image,
    # and ReLU/max-pool ties of a random-weight model can turn that into a visible difference:
    # such an image equals, to 1e-5, the same computation on its own batch of the job.
    assert close.mean() >= 0.9, np.flatnonzero(~close)
    for i in np.flatnonzero(~close):
        start = i // 50 * 50 + (i % 50) // BATCH * BATCH  # chunks of 50, batches of BATCH inside them
        stop = min(start + BATCH, i // 50 * 50 + 50)
        x = load_inputs(model, [decode_image(b, 1 << 24, 10**8).data for b in images[start:stop]], SALIENCY).images
        attr = attribution.attribute(model, x, torch.tensor(targets[start:stop]), SALIENCY)
        np.testing.assert_allclose(maps[i], render.to_2d(attr[i - start], "max_abs"), rtol=0, atol=1e-5)
    # ... and through the API, one request per image, for a few of them
    for i in np.flatnonzero(close)[[0, 150, -1]]:
        files = [("image", ("x.png", images[i], "image/png"))]
        r = client.post("/v1/jobs/attribution?wait=60", files=files,
                        data={"model_id": MODEL, "params": json.dumps({"method": "saliency"})})  # fmt: skip
        assert r.status_code == 200, r.text
        single = np.load(io.BytesIO(artifact(client, r.json(), "0-map.npy")))
        np.testing.assert_allclose(maps[i], single, rtol=0, atol=1e-5)
        assert int(rows[i]["target"]) == r.json()["result"]["images"][0]["target"]
    # the whole result as one zip
    bundle = zipfile.ZipFile(io.BytesIO(client.get(f"/v1/jobs/{job}/download").content))
    assert {"maps.npy", "images.csv", "summary.json", "result.json"} <= set(bundle.namelist())
    assert np.array_equal(np.load(io.BytesIO(bundle.read("maps.npy"))), maps)

    grid = {"dataset": ds["id"], "limit": 40, "methods": [{"method": "saliency"}], "orders": ["decreasing"],
            "noises": ["zeros"], "window_fractions": [0.5], "images_per_chunk": 20}  # fmt: skip
    r = client.post("/v1/jobs/u_sweep", json={"model_id": MODEL, "params": grid})
    assert r.status_code == 202, r.text
    sweep, _ = wait_for(client, r.json()["id"], timeout=300)
    assert sweep["status"] == "finished", sweep
    assert sweep["result"]["images"] == 40 and sweep["result"]["configurations"] == 1
    assert client.delete(f"/v1/datasets/{ds['id']}").status_code == 204


def test_two_workers_share_a_batch_and_survive_a_kill(client, settings, model_cache):
    """200 images in chunks of 10; the second worker is SIGKILLed once it finished a chunk:
    its chunk in progress goes back on the list when its lease lapses, and every image is
    in the result exactly once, with the same maps as one process computes."""
    archive, images = folder_zip(200, seed=11)
    ds = upload_dataset(client, archive, name="noise-200").json()["id"]
    conn = Redis.from_url(settings.redis_url)
    second = start_worker(settings)
    method = {"method": "integrated_gradients", "n_steps": 4}
    try:
        job = run_batch(client, ds, {"dtype": "float32", "images_per_chunk": 10, "attribution": method})
        done_key = f"inspector:chunks:{job}:done"
        deadline = time.monotonic() + 300
        killed = None
        while time.monotonic() < deadline and killed is None:
            workers = {json.loads(v)["worker"] for v in conn.hvals(done_key)}
            if any(w.endswith(f":{second.pid}") for w in workers):
                os.kill(second.pid, signal.SIGKILL)
                killed = {"done_before": conn.hlen(done_key)}
            time.sleep(0.05)
        assert killed is not None, "the second worker never finished a chunk"
        view, _ = wait_for(client, job, timeout=600)
    finally:
        second.kill()
        second.wait(10)
    assert view["status"] == "finished", view
    assert killed["done_before"] < 20, "killed only after the last chunk: not mid-way"
    per_worker = view["result"]["chunks_per_worker"]
    assert len(per_worker) == 2 and sum(per_worker.values()) == 20, per_worker
    rows = list(csv.DictReader(io.StringIO(artifact(client, view, "images.csv").decode())))
    assert [int(r["index"]) for r in rows] == list(range(200))
    maps = np.load(io.BytesIO(artifact(client, view, "maps.npy")))
    assert (np.abs(maps).sum(axis=(1, 2)) > 0).all()  # every row written
    sample = [0, 57, 123, 199]
    targets = [int(rows[i]["target"]) for i in sample]
    expected, _ = reference_maps(model_cache.get(MODEL), [images[i] for i in sample], method, targets)
    np.testing.assert_allclose(maps[sample], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", ["digits_split", "flat_upload"])
def test_flat_sets_and_digits_splits(client, case):
    """digits-cnn over its registered test split (``model:test``), and flat uploads."""
    if case == "digits_split":
        r = client.post("/v1/jobs/attribution_batch",
                        json={"model_id": "digits-cnn", "params": {"dataset": "model:test", "limit": 30}})  # fmt: skip
        view, _ = wait_for(client, r.json()["id"], timeout=120)
        assert view["status"] == "finished", view
        assert view["result"]["images"] == 30 and view["result"]["accuracy"] > 0.8
        return
    archive = zip_of({"a.png": noise_images(1, 8)[0], "b.png": noise_images(1, 8, 1)[0], "labels.csv": b"a.png,3\n"})
    ds = upload_dataset(client, archive).json()
    assert ds["layout"] == "flat" and ds["labelled"] == 1
    r = client.post("/v1/jobs/attribution_batch", json={"model_id": "digits-cnn",
                    "params": {"dataset": ds["id"], "target_from": "label"}})  # fmt: skip
    view, _ = wait_for(client, r.json()["id"], timeout=120)
    assert view["status"] == "finished", view
    rows = list(csv.DictReader(io.StringIO(artifact(client, view, "images.csv").decode())))
    assert rows[0]["target"] == "3" and rows[1]["label"] == "-1" and rows[1]["target"] == rows[1]["predicted"]


def test_influence_on_a_data_set_equals_the_zip_upload_and_compare_over_a_split(client):
    """The same zip as a ``training_set`` upload and as a data set id: the same scores."""
    from workers.models.digits import load_split

    x, y, _, _ = load_split()
    members = {}
    for k in range(10):
        for j, i in enumerate(np.flatnonzero(y == k)[:3]):
            members[f"{k}/{j}.png"] = png((x[i] * 255).round().astype(np.uint8))
    archive = zip_of(members)
    image, label = digit_png(15)
    params = {"layers": ["fc"], "solver": "exact", "target": label, "top_k": 3}
    files = [("image", ("t.png", image, "image/png")), ("training_set", ("train.zip", archive, "application/zip"))]
    r = client.post("/v1/jobs/influence", files=files, data={"model_id": "digits-cnn", "params": json.dumps(params)})
    as_zip, _ = wait_for(client, r.json()["id"], timeout=300)
    ds = upload_dataset(client, archive).json()["id"]
    r = client.post("/v1/jobs/influence", files=files[:1],
                    data={"model_id": "digits-cnn", "params": json.dumps({**params, "training_set": ds})})  # fmt: skip
    as_id, _ = wait_for(client, r.json()["id"], timeout=300)
    assert as_zip["status"] == as_id["status"] == "finished", (as_zip, as_id)
    assert as_id["result"]["training_set"]["size"] == 30
    assert np.array_equal(np.load(io.BytesIO(artifact(client, as_zip, "scores.npy"))),
                          np.load(io.BytesIO(artifact(client, as_id, "scores.npy"))))  # fmt: skip
    r = client.post("/v1/jobs/compare", json={"model_id": "digits-cnn", "params": {
        "dataset": "model:test", "limit": 3, "methods": [{"method": "saliency"}, {"method": "input_x_gradient"}],
        "sensitivity_max": None, "infidelity": None}})  # fmt: skip
    view, _ = wait_for(client, r.json()["id"], timeout=120)
    assert view["status"] == "finished", view
    assert len(view["result"]["images"]) == 3 and [m["method"] for m in view["result"]["methods"]] == [
        "saliency", "input_x_gradient"]  # fmt: skip
