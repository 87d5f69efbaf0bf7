"""Readiness that tells the truth (issue 20's acceptance): a worker with an empty engine
cache keeps ``/readyz`` at 503 while it warms, then 200; restarted with the cache kept it
is ready again without exporting or measuring; a model no worker has warm still answers,
saying how long it waited (``cold_start_s``); a model added while running is warmed in the
background and flips to warm. Real redis-server, real worker processes."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import ROOT, TEST_CACHE_DIR, settings_env
from tests.helpers import digit_png


def _spawn_worker(settings, log: Path) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "workers", "worker"], env=settings_env(settings), cwd=ROOT, stderr=out
        )


def _healthcheck(settings) -> int:
    done = subprocess.run([sys.executable, "-m", "workers", "ready"], env=settings_env(settings), cwd=ROOT, timeout=60)
    return done.returncode


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _poll_ready(api: TestClient, proc: subprocess.Popen, timeout: float = 240) -> tuple[float, list[dict]]:
    """Poll /readyz until 200; returns the seconds it took and every 503 body seen."""
    t0 = time.monotonic()
    not_ready = []
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, f"the worker exited with {proc.returncode}"
        r = api.get("/readyz")
        if r.status_code == 200:
            return time.monotonic() - t0, not_ready
        assert r.status_code == 503
        not_ready.append(r.json())
        time.sleep(0.1)
    raise AssertionError(f"not ready after {timeout} s: {not_ready[-1:]}")


@pytest.fixture
def own_settings(settings, own_redis, tmp_path) -> Iterator:
    yield settings.model_copy(
        update={"redis_url": own_redis.url, "cache_dir": tmp_path / "cache", "warm_models": "digits-cnn"}
    )


def test_readyz_is_503_until_the_models_are_warm_and_a_restart_with_the_cache_is_ready_at_once(
    own_settings, tmp_path: Path
) -> None:
    from service.main import create_app

    log = tmp_path / "worker.log"
    with TestClient(create_app(own_settings)) as api:
        assert api.get("/readyz").status_code == 503  # no worker yet
        proc = _spawn_worker(own_settings, log)
        try:
            cold_s, seen = _poll_ready(api, proc)
            assert any(body.get("warming") for body in seen), "503 while the worker warms (empty cache)"
            body = api.get("/readyz").json()
            (name,) = body["models"]["digits-cnn"]
            assert body["workers"] == {"high": 1, "default": 1, "low": 1} and body["warming"] == {}
            info = api.get("/v1/models/digits-cnn").json()
            assert info["warm"] is True and info["warm_workers"] == [name]
            assert api.get("/v1/models/resnet18-random").json()["warm"] is False  # not asked to warm it
            assert _healthcheck(own_settings) == 0, "python -m workers ready: the compose/k8s probe"
        finally:
            _stop(proc)
        assert api.get("/readyz").status_code == 503, "a stopped worker withdraws its warm state"
        assert _healthcheck(own_settings) == 1
        cached = sorted(p.suffix for p in (own_settings.cache_dir / "onnx").iterdir())
        assert cached == [".json", ".lock", ".onnx"]
        mtime = next((own_settings.cache_dir / "onnx").glob("*.json")).stat().st_mtime_ns

        proc = _spawn_worker(own_settings, log)  # restart, cache kept
        try:
            warm_s, _ = _poll_ready(api, proc)
            r = api.post("/v1/models/digits-cnn/predict", files={"image": ("d.png", digit_png(3)[0])})
            assert r.status_code == 200 and r.json()["cold_start_s"] is None, "warm: the request waited for nothing"
        finally:
            _stop(proc)
    text = log.read_text()
    assert text.count("warmed digits-cnn") == 2, text[-3000:]
    assert "batch sizes 0.0 s" in text.split("warmed digits-cnn")[2], "the restart measured nothing"
    assert next((own_settings.cache_dir / "onnx").glob("*.json")).stat().st_mtime_ns == mtime
    assert "Traceback" not in text
    print(f"ready after {cold_s:.1f} s (empty cache), {warm_s:.1f} s (cache kept)")


def test_a_cold_model_still_answers_and_a_model_added_while_running_is_warmed(
    own_settings, models_dir: Path, tmp_path: Path
) -> None:
    from service.main import create_app

    models = tmp_path / "models"
    models.mkdir()
    for name in ("digits-cnn", "efficientnet-lite0", "efficientnet-lite1"):  # built-ins present: nothing to prepare
        (models / name).symlink_to(models_dir / name)
    s = own_settings.model_copy(
        update={"models_dir": models, "cache_dir": TEST_CACHE_DIR, "warm_models": "digits-later"}
    )
    with TestClient(create_app(s)) as api:
        proc = _spawn_worker(s, tmp_path / "worker.log")
        try:
            _poll_ready(api, proc)  # nothing of what it warms is there yet: ready at once
            assert api.get("/v1/models/digits-cnn").json()["warm"] is False
            image = {"image": ("d.png", digit_png(5)[0])}
            first = api.post("/v1/models/digits-cnn/predict", files=image).json()
            assert first["cold_start_s"] > 0, "the request waited for the load, and says so"
            second = api.post("/v1/models/digits-cnn/predict", files=image).json()
            assert second["cold_start_s"] is None and second["predictions"] == first["predictions"]

            later = models / "digits-later"
            later.mkdir()
            shutil.copy(models_dir / "digits-cnn" / "weights.safetensors", later)
            manifest = json.loads((models_dir / "digits-cnn" / "manifest.json").read_text())
            (later / "manifest.json").write_text(json.dumps({**manifest, "id": "digits-later"}))
            deadline = time.monotonic() + 120
            # 404 until the API's registry rescans (every 3 s), then cold, then warm
            while (r := api.get("/v1/models/digits-later")).status_code != 200 or not r.json()["warm"]:
                assert r.status_code in (200, 404)
                assert time.monotonic() < deadline, "the added model was not warmed in the background"
                time.sleep(0.25)
            assert r.json()["warm_workers"] == api.get("/readyz").json()["models"]["digits-later"]
        finally:
            _stop(proc)
