"""The generic job machinery end to end, on the `saliency` kind (real Redis, real worker)."""

import io
import json

import numpy as np
from PIL import Image

from tests.helpers import digit_png, png, submit, wait_for


def test_saliency_job_end_to_end(client):
    image, label = digit_png(3)
    r = submit(client, "saliency", [image], "digits-cnn", {"target": label})
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] in ("queued", "started", "finished")
    view, seen = wait_for(client, job["id"])
    assert view["status"] == "finished", view
    assert seen[-1] == "finished" and all(s in ("queued", "started", "finished") for s in seen)
    assert view["progress"] == {"done": 1, "total": 1, "stage": "done"}
    assert view["created_at"] <= view["started_at"] <= view["ended_at"]
    summary = view["result"]["images"][0]
    assert summary["target"] == label and summary["label"] == str(label)
    assert 0 < summary["probability"] <= 1 and summary["max"] > 0
    names = {a["name"]: a for a in view["artifacts"]}
    assert set(names) == {"0-attribution.npy", "0-map.npy", "0-heatmap.png", "0-overlay.png", "0-input.png"}
    raw = np.load(io.BytesIO(client.get(names["0-attribution.npy"]["url"]).content))
    assert raw.shape == (1, 8, 8) and np.isfinite(raw).all() and (raw >= 0).all()
    for name in ("0-heatmap.png", "0-overlay.png", "0-input.png"):
        r = client.get(names[name]["url"])
        assert r.headers["content-type"] == "image/png"
        img = Image.open(io.BytesIO(r.content))
        img.verify()
        assert img.size[0] >= 224
    assert client.get(f"/v1/jobs/{job['id']}/artifacts/nope.png").json()["error"]["type"] == "unknown_artifact"


def test_saliency_on_efficientnet_has_input_shape(client, chelsea):
    r = submit(client, "saliency", [png(chelsea)], "efficientnet-lite0", wait=120)
    assert r.status_code == 200, r.text
    view = r.json()
    assert 281 <= view["result"]["images"][0]["target"] <= 285  # default target: predicted class
    raw = np.load(io.BytesIO(client.get(f"/v1/jobs/{view['id']}/artifacts/0-attribution.npy").content))
    assert raw.shape == (3, 224, 224)
    # The published preprocessing: the centred 262 x 262 square (0.875 of the 300 rows) of the 451 x 300 photo.
    region = {"left": 95, "top": 19, "width": 262, "height": 262, "resize": "shorter_side_center_crop"}
    assert view["result"]["input_regions"] == [region]


def test_identical_submissions_are_deduplicated(client):
    image, _ = digit_png(5)
    first = submit(client, "saliency", [image], "digits-cnn", {"aggregation": "sum"}, wait=60)
    assert first.status_code == 200 and first.json()["deduplicated"] is False
    again = submit(client, "saliency", [image], "digits-cnn", {"aggregation": "sum"})
    assert again.status_code == 200, "a finished identical job is served at once"
    assert again.json()["id"] == first.json()["id"] and again.json()["deduplicated"] is True
    other = submit(client, "saliency", [image], "digits-cnn", {"aggregation": "positive"})
    assert other.json()["id"] != first.json()["id"]


def slow_job(client, chelsea, seed: int):
    """A saliency job of 16 efficientnet images one by one: seconds of work, many progress reports."""
    img = np.roll(chelsea, seed, axis=1)
    return submit(client, "saliency", [png(img)] * 16, "efficientnet-lite0", {"batch_size": 1})


def test_cancel_queued_and_running_jobs(client, chelsea):
    running = slow_job(client, chelsea, 1).json()
    queued = slow_job(client, chelsea, 2).json()
    wait_for(client, running["id"], until=("started",))
    r = client.delete(f"/v1/jobs/{queued['id']}")
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    client.delete(f"/v1/jobs/{running['id']}")
    view, _ = wait_for(client, running["id"])
    assert view["status"] == "canceled" and view["error"]["type"] == "canceled"
    assert view["progress"]["done"] < 16
    # A canceled job can be submitted again and runs afresh under the same id.
    again = slow_job(client, chelsea, 2).json()
    assert again["id"] == queued["id"] and again["status"] in ("queued", "started")
    client.delete(f"/v1/jobs/{again['id']}")
    wait_for(client, again["id"])


def test_sse_stream_reports_progress_and_ends_at_terminal_status(client):
    image, _ = digit_png(7)
    job = submit(client, "saliency", [image], "digits-cnn", {"aggregation": "abs_sum"}).json()
    events = []
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in r.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                events.append((event, json.loads(line.split(":", 1)[1])))
    assert events[-1][0] == "end" and events[-1][1]["status"] == "finished"
    assert events[-1][1]["result"]["images"][0]["max"] > 0
    assert all(e == "progress" for e, _ in events[:-1])


def test_methods_catalogue_lists_kinds_with_schemas(client):
    kinds = {k["kind"]: k for k in client.get("/v1/methods").json()["kinds"]}
    saliency = kinds["saliency"]
    assert saliency["queue"] == "high"
    props = saliency["params_schema"]["properties"]
    assert props["abs"]["default"] is True and props["aggregation"]["default"] == "max_abs"
    assert "target" in props and "batch_size" in props


def test_the_resize_choice_and_the_region_each_result_covers(client):
    """digits-cnn stretches (its manifest's default): a 16 x 8 upload, a digit in its centre
    8 x 8 square and black around it, is covered whole. The job's ``resize:
    shorter_side_center_crop`` covers that square only (left 4), where the model sees exactly
    the digit and names it."""
    from PIL import Image

    from workers.models.digits import load_split

    _, _, x_te, y_te = load_split()
    wide = np.zeros((8, 16), np.uint8)
    wide[:, 4:12] = (x_te[0] * 255).round().astype(np.uint8)
    image = png(Image.fromarray(wide))
    whole = submit(client, "saliency", [image], "digits-cnn", wait=60).json()
    assert whole["result"]["input_regions"] == [{"left": 0, "top": 0, "width": 16, "height": 8, "resize": "stretch"}]
    crop = submit(client, "saliency", [image], "digits-cnn", {"resize": "shorter_side_center_crop"}, wait=60).json()
    region = {"left": 4, "top": 0, "width": 8, "height": 8, "resize": "shorter_side_center_crop"}
    assert crop["status"] == "finished" and crop["result"]["input_regions"] == [region]
    assert crop["result"]["images"][0]["target"] == int(y_te[0])
