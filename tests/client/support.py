"""For the client and CLI tests: a real API server (uvicorn in a subprocess), API keys, a folder of images."""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.conftest import ROOT, free_port, settings_env
from tests.helpers import digit_png


@contextlib.contextmanager
def running_api(settings, **env: str) -> Iterator[str]:
    """uvicorn serving ``service.main:app`` with ``settings`` (plus ``INSPECTOR_*`` overrides in
    ``env``); yields its URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "service.main:app", "--port", str(port), "--log-level", "warning"],
        env={**settings_env(settings), **env},
        cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the API did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def keys_file(path: Path, tenants: dict[str, dict]) -> Path:
    """A keys file where each tenant's key is ``<tenant>-key`` (with the given limits)."""
    entries = [
        {"tenant": t, "sha256": hashlib.sha256(f"{t}-key".encode()).hexdigest(), **limits}
        for t, limits in tenants.items()
    ]
    path.write_text(json.dumps({"keys": entries}))
    return path


def digits_folder(root: Path, n: int) -> Path:
    """An ImageFolder tree of ``n`` digits test images, ``<label>/<i>.png``."""
    for i in range(n):
        data, label = digit_png(i)
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        (root / str(label) / f"{i}.png").write_bytes(data)
    return root
