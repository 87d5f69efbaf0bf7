"""``inspector run`` / ``make run``: Redis, the built-in models, one worker and the API.

Uses ``INSPECTOR_REDIS_URL`` when it is set, else starts ``redis-server`` from PATH on a
free port (data under ``var/redis``). Ctrl-C (or SIGTERM) stops the API, then the worker
(warm shutdown: the running job finishes), then Redis.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from schemas.settings import Settings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with code {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{what} did not start in {timeout:g} s")


def run(settings: Settings) -> None:
    procs: list[tuple[str, subprocess.Popen]] = []
    env = dict(os.environ)

    def stop(*_: object) -> None:
        for name, proc in reversed(procs):
            if proc.poll() is None:
                print(f"stopping {name}...", file=sys.stderr)
                proc.send_signal(signal.SIGTERM if name != "api" else signal.SIGINT)
        for name, proc in reversed(procs):
            try:
                proc.wait(settings.job_timeout_s if name == "worker" else 15)
            except subprocess.TimeoutExpired:
                proc.kill()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        if "redis_url" not in settings.model_fields_set:
            port = _free_port()
            data = Path("var/redis")
            data.mkdir(parents=True, exist_ok=True)
            redis = subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
                 "--appendonly", "yes", "--save", "", "--maxmemory-policy", "noeviction"],
                stdout=subprocess.DEVNULL,
            )  # fmt: skip
            procs.append(("redis", redis))
            _wait_port(port, redis, "redis-server")
            env["INSPECTOR_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
        print("preparing the built-in models (first time: about a minute)...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "workers", "prepare"], env=env, check=True)
        procs.append(("worker", subprocess.Popen([sys.executable, "-m", "workers", "worker"], env=env)))
        api = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "service.main:app", "--host", settings.api_host,
             "--port", str(settings.api_port)],
            env=env,
        )  # fmt: skip
        procs.append(("api", api))
        _wait_port(settings.api_port, api, "the API")
        url = f"http://{settings.api_host}:{settings.api_port}"
        print(
            f"""
Model Inspector is running at {url}  (docs: {url}/docs, Redis: {env.get('INSPECTOR_REDIS_URL', settings.redis_url)})

  open {url}/ in a browser: the inspector page (pick a model, an image and an analysis)

  python -c "import skimage.io, skimage.data; skimage.io.imsave('cat.png', skimage.data.chelsea())"
  curl -F image=@cat.png {url}/v1/models/efficientnet-lite0/predict
  curl -F image=@cat.png -F model_id=efficientnet-lite0 '{url}/v1/jobs/saliency?wait=60'

Ctrl-C stops everything.
""",
            file=sys.stderr,
        )
        while all(p.poll() is None for _, p in procs):
            time.sleep(0.5)
        dead = [name for name, p in procs if p.poll() is not None]
        print(f"{', '.join(dead)} exited; stopping the rest", file=sys.stderr)
        stop()
    except KeyboardInterrupt:
        stop()
