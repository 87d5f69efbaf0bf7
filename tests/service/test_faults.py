"""Faults with their own Redis: no worker, a worker killed mid-job, Redis stopped."""

import os
import signal
import subprocess
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.conftest import start_worker
from tests.helpers import digit_png, png, submit, wait_for


@pytest.fixture
def own_env(own_redis, settings):
    """A Redis of the test's own, and settings that point at it."""
    return own_redis, settings.model_copy(update={"redis_url": own_redis.url, "predict_timeout_s": 1.0})


def test_predict_without_worker_is_503_no_worker(own_env):
    from service.main import create_app

    _, s = own_env
    image, _ = digit_png(0)
    with TestClient(create_app(s)) as api:
        assert api.get("/readyz").status_code == 503
        t0 = time.perf_counter()
        r = api.post("/v1/models/digits-cnn/predict", files={"image": ("x", image)})
        assert r.status_code == 503 and r.json()["error"]["type"] == "no_worker"
        assert "retry-after" in r.headers and time.perf_counter() - t0 < 3


def test_killed_worker_job_becomes_failed_worker_lost(own_env, chelsea):
    from service.main import create_app

    _, s = own_env
    proc = start_worker(s)
    with TestClient(create_app(s)) as api:
        assert api.get("/readyz").status_code == 200
        images = [png(np.roll(chelsea, 3, axis=0))] * 16
        job = submit(api, "saliency", images, "efficientnet-lite0", {"batch_size": 1}).json()
        wait_for(api, job["id"], until=("started",))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        killed_at = time.monotonic()
        view, _ = wait_for(api, job["id"], timeout=60)
        took = time.monotonic() - killed_at
        assert view["status"] == "failed" and view["error"]["type"] == "worker_lost", view
        assert took < 60
        print(f"worker_lost reported {took:.1f} s after SIGKILL")


def test_redis_stopped_then_restarted(own_env):
    """Redis down -> 503 with Retry-After within 2 s; back up -> the API answers again."""
    from service.main import create_app

    server, s = own_env
    with TestClient(create_app(s)) as api:
        assert api.get("/v1/jobs/0123456789abcdef").status_code == 404
        server.stop()
        t0 = time.perf_counter()
        r = api.get("/v1/jobs/0123456789abcdef")
        assert r.status_code == 503 and r.headers["retry-after"]
        assert time.perf_counter() - t0 < 2
        server.start()
        assert api.get("/v1/jobs/0123456789abcdef").status_code == 404
        assert subprocess.run(["redis-cli", "-p", str(server.port), "ping"], capture_output=True).returncode == 0
