"""A whole local stack for the web page: redis-server, one worker, the API served by uvicorn
on free loopback ports (the page needs a real HTTP server, not a TestClient), and a second
API on the same Redis with an API key required. Used by ``tests/ui`` and ``benchmarks/ui.py``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from tests.conftest import _spawn_redis, free_port, start_worker

XSS_LABEL = "<img src=x onerror=alert(1)>"
XSS_MODEL = "digits-xss"
KEY = "ui-test-key-0123456789abcdef"


def ui_models_dir(models_dir: Path, into: Path) -> Path:
    """``into`` with digits-cnn and efficientnet-lite0 (links to the prepared ones) and
    ``digits-xss``: digits-cnn's weights under labels one of which is HTML (digit 7's)."""
    into.mkdir(parents=True, exist_ok=True)
    for name in ("digits-cnn", "efficientnet-lite0"):
        if not (into / name).exists():
            (into / name).symlink_to((models_dir / name).resolve(), target_is_directory=True)
    xss = into / XSS_MODEL
    if not (xss / "manifest.json").exists():
        xss.mkdir(exist_ok=True)
        manifest = json.loads((models_dir / "digits-cnn" / "manifest.json").read_text())
        manifest["id"] = XSS_MODEL
        manifest["description"] = "digits-cnn whose label of class 7 is HTML (must show as text)"
        manifest["labels"][7] = XSS_LABEL
        shutil.copy(models_dir / "digits-cnn" / manifest["weights"], xss / manifest["weights"])
        (xss / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return into


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # a thread's server leaves signals to pytest
        pass


def serve(app: object) -> tuple[str, _Server, threading.Thread]:
    """``app`` on a free loopback port in a thread; returns its base URL."""
    port = free_port()
    server = _Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))  # type: ignore[arg-type]
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    return f"http://127.0.0.1:{port}", server, thread


@dataclass
class Stack:
    url: str  # the API and page, no key
    keyed_url: str  # the same on the same Redis and worker, API key KEY required
    settings: object
    worker: subprocess.Popen


@contextmanager
def ui_stack(models_dir: Path, cache_dir: Path) -> Iterator[Stack]:
    from schemas.settings import Settings
    from service.main import create_app

    port = free_port()
    redis = _spawn_redis(port)
    servers: list[tuple[_Server, threading.Thread]] = []
    worker = None
    try:
        settings = Settings(
            redis_url=f"redis://127.0.0.1:{port}/0",
            models_dir=models_dir,
            cache_dir=cache_dir,
            device="cpu",
            predict_timeout_s=60,
            worker_heartbeat_s=1,
            worker_lost_after_s=4,
            max_upload_bytes=1_000_000,  # the bad-upload test's 413 with a small file
        )
        worker = start_worker(settings, "--preload", "digits-cnn")
        url, *srv = serve(create_app(settings))
        servers.append(tuple(srv))  # type: ignore[arg-type]
        keyed = settings.model_copy(update={"api_keys": f"ui:{hashlib.sha256(KEY.encode()).hexdigest()}"})
        keyed_url, *srv = serve(create_app(keyed))
        servers.append(tuple(srv))  # type: ignore[arg-type]
        yield Stack(url, keyed_url, settings, worker)
    finally:
        for server, thread in servers:
            server.should_exit = True
            thread.join(10)
        if worker is not None:
            worker.terminate()
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
        redis.kill()
        redis.wait(10)
