"""The `inspector` CLI against a real API server (uvicorn) and the session's worker."""

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.client.support import digits_folder, running_api
from tests.conftest import ROOT, settings_env
from tests.helpers import digit_png


@pytest.fixture
def api_url(settings, worker):
    with running_api(settings) as url:
        yield url


def inspector(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_cli_predict_and_explain_save_artifacts(api_url, settings, tmp_path):
    image, label = digit_png(11)
    path = tmp_path / "digit.png"
    path.write_bytes(image)
    env = settings_env(settings)
    out = inspector("predict", str(path), "--model", "digits-cnn", "--top-k", "3", "--url", api_url, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == str(path) and len(lines) == 4 and lines[1].split()[1] == str(label)

    params = json.dumps({"aggregation": "positive"})
    out = inspector("explain", "saliency", str(path), "--model", "digits-cnn", "--params", params,
                    "--out", str(tmp_path / "out"), "--url", api_url, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr
    saved = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"result.json", "0-heatmap.png", "0-overlay.png", "0-attribution.npy"} <= saved
    assert json.loads((tmp_path / "out" / "result.json").read_text())["status"] == "finished"

    bad = inspector("explain", "saliency", str(path), "--model", "nope", "--url", api_url, env=env)
    assert bad.returncode != 0 and "unknown_model" in bad.stderr


def test_cli_datasets_upload_list_show_delete_and_explain_over_a_dataset(api_url, settings, tmp_path):
    env = settings_env(settings)
    folder = digits_folder(tmp_path / "digits", 12)
    out = inspector("datasets", "upload", str(folder), "--name", "cli-digits", "--url", api_url, env=env)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["images"] == 12 and info["name"] == "cli-digits"
    listed = inspector("datasets", "list", "--url", api_url, env=env)
    assert listed.returncode == 0
    assert any(info["id"] in line and "cli-digits" in line for line in listed.stdout.splitlines())

    params = json.dumps({"images_per_chunk": 6})
    out = inspector("explain", "attribution_batch", "--dataset", info["id"], "--model", "digits-cnn",
                    "--params", params, "--out", str(tmp_path / "out"), "--url", api_url, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert np.load(tmp_path / "out" / "maps.npy").shape == (12, 8, 8)

    shown = inspector("datasets", "show", info["id"], "--url", api_url, env=env)
    assert sum(json.loads(shown.stdout)["class_counts"].values()) == 12
    assert inspector("datasets", "delete", info["id"], "--url", api_url, env=env).returncode == 0
    gone = inspector("datasets", "show", info["id"], "--url", api_url, env=env)
    assert gone.returncode != 0 and "unknown_dataset" in gone.stderr
