"""The Model Inspector kinds ``robustness``, ``signal`` and ``reference_map`` through the API:
end to end (HTTP -> Redis -> RQ worker -> artifacts) and the bad inputs answered before queueing."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from tests.helpers import digit_png, png, wait_for


def post(client, kind: str, params: dict, files: dict[str, tuple[str, bytes, str]] | None = None, image: bytes = b""):
    image = image or digit_png(3)[0]
    parts = [("image", ("digit.png", image, "image/png"))]
    parts += [(name, f) for name, f in (files or {}).items()]
    return client.post(f"/v1/jobs/{kind}", files=parts, data={"model_id": "digits-cnn", "params": json.dumps(params)})


def finished(client, r) -> dict:
    assert r.status_code in (200, 202), r.text
    view, _ = wait_for(client, r.json()["id"], timeout=180)
    assert view["status"] == "finished", view
    return view


def artifact(client, view: dict, name: str) -> bytes:
    r = client.get({a["name"]: a["url"] for a in view["artifacts"]}[name])
    assert r.status_code == 200
    return r.content


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_robustness_on_the_background_end_to_end(client) -> None:
    params = {"transforms": [{"name": "gaussian_noise", "severity": 3}, {"name": "vertical_shuffle", "severity": 1}],
              "apply_to": "background", "region": {"rect": [2, 0, 6, 8]}}  # fmt: skip
    view = finished(client, post(client, "robustness", params))
    rows = view["result"]["images"][0]["transforms"]
    assert [r["key"] for r in rows] == ["gaussian_noise-3", "vertical_shuffle-1"]
    csv = artifact(client, view, "robustness.csv").decode().splitlines()
    assert len(csv) == 3
    Image.open(io.BytesIO(artifact(client, view, "0-bars.png"))).verify()
    Image.open(io.BytesIO(artifact(client, view, "0-vertical_shuffle-1.png"))).verify()


def test_signal_with_a_polygon_and_with_a_mask_end_to_end(client) -> None:
    params = {"region": {"polygon": [[1, 1], [7, 1], [4, 7]]}, "fills": ["black", "brick"], "rfs_samples": 2,
              "random_draws": 1}  # fmt: skip
    view = finished(client, post(client, "signal", params))
    image = view["result"]["images"][0]
    assert 0 < image["region"]["fraction"] < 1 and image["map"]["method"] == "gradcam"
    assert [f["fill"] for f in image["fills"]] == ["black", "brick"]
    assert artifact(client, view, "signal.csv").startswith(b"image,analysis")
    mask = np.zeros((8, 8), np.uint8)
    mask[2:6, 2:6] = 255
    params = {"fills": ["white"], "rfs_samples": 2, "random_draws": 1}
    view = finished(client, post(client, "signal", params, {"signal_mask": ("mask.png", png(mask), "image/png")}))
    assert view["result"]["images"][0]["region"] == {"pixels": 16, "fraction": 0.25}


def test_reference_map_end_to_end(client) -> None:
    clicks = np.zeros((20, 20))
    clicks[4:16, 6:14] = 3
    view = finished(
        client,
        post(client, "reference_map", {}, {"reference": ("clicks.npy", npy(clicks), "application/octet-stream")}),
    )
    scores = view["result"]["scores"]
    assert set(scores) >= {"pearson", "spearman", "iou_top10", "iou_top20", "auc", "pointing_game"}
    Image.open(io.BytesIO(artifact(client, view, "0-side_by_side.png"))).verify()


MASK = np.zeros((8, 8), np.uint8)
MASK[2:5, 2:5] = 255


def error(r, status: int, type_: str = "bad_params") -> dict:
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert body["type"] == type_ and body["message"]
    return body


@pytest.mark.parametrize(
    ("kind", "params", "files", "field"),
    [
        ("robustness", {"transforms": [{"name": "fog", "severity": 1}]}, None, "name"),
        ("robustness", {"transforms": [{"name": "shot_noise", "severity": 6}]}, None, "severity"),
        ("robustness", {"transforms": [{"name": "patch_shuffle", "severity": 4}]}, None, "transforms.0.severity"),
        ("robustness", {"apply_to": "background"}, None, "region"),
        ("robustness", {}, {"signal_mask": png(MASK)}, "signal_mask"),
        ("signal", {"region": {"polygon": [[0, 0], [5, 5]]}}, None, "region"),
        ("signal", {"region": {"rect": [4, 4, 4, 6]}}, None, "region"),
        ("signal", {"region": {"rect": [20, 20, 30, 30]}}, None, "region"),
        ("signal", {"region": {"rect": [0, 0, 8, 8]}}, None, "region"),
        ("signal", {}, None, "region"),
        ("signal", {}, {"signal_mask": png(np.zeros((9, 8), np.uint8))}, "signal_mask"),
        ("reference_map", {}, {"reference": npy(np.array([[0.0, np.nan]]))}, "reference"),
        ("reference_map", {}, None, "reference"),
        ("reference_map", {"source": "uploaded"}, {"reference": npy(np.ones((4, 4)))}, "attribution"),
    ],
)  # fmt: skip
def test_bad_params_name_the_field(api, kind, params, files, field) -> None:
    uploads = {k: (k, v, "application/octet-stream") for k, v in (files or {}).items()}
    body = error(post(api, kind, params, uploads), 422)
    assert field in json.dumps(body["details"]), body


def test_a_mask_that_is_not_an_image_or_is_corrupt(api) -> None:
    error(post(api, "signal", {}, {"signal_mask": ("m.png", b"not an image at all", "image/png")}), 415,
          "unsupported_media_type")  # fmt: skip
    error(post(api, "signal", {}, {"signal_mask": ("m.png", png(MASK)[:50], "image/png")}), 400, "bad_image")
