"""Shared fixtures: prepared built-in models, a random-weight resnet18 user model, a model cache.

Models are prepared once into ``var/test-models`` (override with INSPECTOR_TEST_MODELS_DIR)
and reused across runs; preparing from scratch takes about 30 s on 2 cores.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = Path(os.environ.get("INSPECTOR_TEST_MODELS_DIR", ROOT / "var" / "test-models"))
# Exported ONNX models and measured batch sizes, kept between runs (keyed by model version).
TEST_CACHE_DIR = ROOT / "var" / "test-cache"


def write_resnet18_random(models_dir: Path) -> None:
    """A torchvision resnet18 with fixed random weights (seed 0), as a user model directory."""
    if (models_dir / "resnet18-random" / "manifest.json").exists():
        return
    import torch
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    module = torchvision.models.resnet18(num_classes=10)
    d = models_dir / "resnet18-random"
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(d / "weights.safetensors"))
    manifest = {
        "id": "resnet18-random",
        "description": "torchvision resnet18, random weights (seed 0), 10 classes: a user model",
        "architecture": "torchvision",
        "arch_name": "resnet18",
        "arch_kwargs": {"num_classes": 10},
        "weights": "weights.safetensors",
        "preprocessing": {"size": [64, 64], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "labels": [f"class-{i}" for i in range(10)],
        "gradcam_layer": "layer4",
        "layers": ["layer1", "layer2", "layer3", "layer4", "fc"],
    }
    (d / "manifest.json").write_text(json.dumps(manifest, indent=2))


@pytest.fixture(scope="session")
def models_dir() -> Path:
    from workers.registry import prepare_builtin_models

    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    prepare_builtin_models(MODELS_DIR)
    write_resnet18_random(MODELS_DIR)
    return MODELS_DIR


@pytest.fixture(scope="session")
def model_cache(models_dir: Path):
    from workers.registry import ModelCache

    return ModelCache(models_dir, TEST_CACHE_DIR, device="cpu")


@pytest.fixture(scope="session")
def chelsea():
    """``skimage.data.chelsea()``: a photo of a cat, ``(300, 451, 3)`` uint8."""
    from skimage import data

    return data.chelsea()


# --- real Redis, real workers --------------------------------------------------------------

import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)

    def start(self) -> None:
        self.process = _spawn_redis(self.port)


def _spawn_redis(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def _redis_on_free_port() -> Iterator[RedisServer]:
    port = free_port()
    server = RedisServer(port, _spawn_redis(port))
    yield server
    server.process.kill()
    server.process.wait(10)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    yield from _redis_on_free_port()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own (nothing another test left in it)."""
    yield from _redis_on_free_port()


@pytest.fixture(scope="session")
def settings(redis_server: RedisServer, models_dir: Path):
    from schemas.settings import Settings

    return Settings(
        redis_url=redis_server.url,
        models_dir=models_dir,
        cache_dir=TEST_CACHE_DIR,
        data_dir=ROOT / "var" / "test-data",
        device="cpu",
        predict_timeout_s=60,
        worker_heartbeat_s=1,
        worker_lost_after_s=4,
        # Workers warm only what a test preloads (--preload): warming every model at each
        # worker start would cost the suite minutes (tests/workers/test_warmup.py warms).
        warm_models="none",
    )


def settings_env(settings) -> dict[str, str]:
    env = dict(os.environ)
    for name, value in settings.model_dump(mode="json").items():
        env[f"INSPECTOR_{name.upper()}"] = json.dumps(value) if isinstance(value, dict | list) else str(value)
    return env


def start_worker(settings, *extra: str) -> subprocess.Popen:
    """A real worker process (``python -m workers worker``) on all queues."""
    from redis import Redis
    from rq import Worker

    conn = Redis.from_url(settings.redis_url)
    before = {w.name for w in Worker.all(connection=conn)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers", "worker", *extra], env=settings_env(settings), cwd=ROOT
    )
    from schemas import keys

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        new = {w.name for w in Worker.all(connection=conn)} - before
        # registered, and ready (workers.warmup: it takes work, so /readyz counts it)
        if any(b'"ready":true' in (conn.get(keys.warm_key(name)) or b"") for name in new):
            return proc
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}")
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("worker did not register")


@pytest.fixture(scope="session")
def worker(settings) -> Iterator[subprocess.Popen]:
    proc = start_worker(settings, "--preload", "digits-cnn")
    yield proc
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def app(settings):
    from service.main import create_app

    return create_app(settings)


@pytest.fixture
def client(app, worker):
    from fastapi.testclient import TestClient

    with TestClient(app) as c:
        yield c


@pytest.fixture
def api(app):
    """A client with no worker guarantee (for errors answered before any job runs)."""
    from fastapi.testclient import TestClient

    with TestClient(app) as c:
        yield c
