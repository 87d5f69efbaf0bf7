"""The `inspector` CLI against a real API server (uvicorn) and the session's worker."""

import json
import subprocess
import sys

import numpy as np
import pytest

from service.cli import main
from tests.client.support import digits_folder, running_api
from tests.conftest import ROOT, settings_env
from tests.helpers import digit_png


@pytest.fixture(scope="module")
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


def test_cli_datasets_upload_list_show_delete_and_explain_over_a_dataset(api_url, tmp_path, capsys):
    """In-process (``main(argv)``, the same code as the console script) to spare interpreter starts."""

    def cli(*args: str) -> str:
        main([*args, "--url", api_url])
        return capsys.readouterr().out

    folder = digits_folder(tmp_path / "digits", 12)
    info = json.loads(cli("datasets", "upload", str(folder), "--name", "cli-digits"))
    assert info["images"] == 12 and info["name"] == "cli-digits"
    assert any(info["id"] in line and "cli-digits" in line for line in cli("datasets", "list").splitlines())

    params = json.dumps({"images_per_chunk": 6})
    cli("explain", "attribution_batch", "--dataset", info["id"], "--model", "digits-cnn", "--params", params,
        "--out", str(tmp_path / "out"))  # fmt: skip
    assert np.load(tmp_path / "out" / "maps.npy").shape == (12, 8, 8)

    assert sum(json.loads(cli("datasets", "show", info["id"]))["class_counts"].values()) == 12
    cli("datasets", "delete", info["id"])
    with pytest.raises(SystemExit) as gone:
        cli("datasets", "show", info["id"])
    assert "unknown_dataset" in str(gone.value.code)
