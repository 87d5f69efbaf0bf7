"""``inspector run`` / ``make run``: Redis, the built-in models, one worker and the API.

Uses ``INSPECTOR_REDIS_URL`` when it is set, else starts ``redis-server`` from PATH on a
free port (data under ``var/redis``). It says the service is running once ``/readyz``
answers 200, i.e. once the worker has warmed its models (``workers.warmup``).

Stopping: Ctrl-C (SIGINT), SIGTERM or SIGHUP stops the API first (no new requests), then
the worker (warm shutdown: the running job finishes), then Redis, each waited for, and
exits 0. The children run in process groups of their own, so the terminal's Ctrl-C reaches
only this process and the order holds (were Redis to get it at the same time as the
worker, the worker would lose its connection mid-shutdown). A second Ctrl-C kills what is
left at once and exits 130.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from schemas.settings import Settings

FORCED_EXIT = 130


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def api_env(env: dict[str, str]) -> dict[str, str]:
    """The API's environment: ``env`` without glibc's ``MALLOC_*`` tunables (the Makefile
    exports the workers' allocator settings, ``workers.allocator``, to everything it starts).
    They keep freed memory on the heap for a worker's next batch; in the API they would keep
    a big upload's decoded pixels resident, and make the next big decode zero heap pages
    (holding the GIL, in Pillow) that a fresh mapping gets zeroed for free."""
    return {k: v for k, v in env.items() if not k.startswith("MALLOC_")}


class DevServer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.stopping = False  # first signal: stop in order
        self.env = dict(os.environ)

    # --- signals ---

    def _signal(self, signum: int, frame: object) -> None:
        if self.stopping:  # second Ctrl-C: force
            _say("forced stop: killing what is left")
            for _, proc in self.procs:
                if proc.poll() is None:
                    proc.kill()
            os._exit(FORCED_EXIT)
        self.stopping = True

    def _sleep(self, seconds: float) -> None:
        """Sleep unless a stop was asked for."""
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.1, deadline - time.monotonic()))

    # --- children ---

    def spawn(self, name: str, argv: list[str], **kwargs: object) -> subprocess.Popen:
        env = api_env(self.env) if name == "api" else self.env
        proc = subprocess.Popen(argv, env=env, process_group=0, **kwargs)  # type: ignore[call-overload]
        self.procs.append((name, proc))
        return proc

    def _check_alive(self) -> None:
        dead = [name for name, p in self.procs if p.poll() is not None and name != "prepare"]
        if dead:
            _say(f"{', '.join(dead)} exited; stopping the rest")
            self.stopping = True

    def _wait_for(self, what: str, ok: object, timeout: float) -> bool:
        """Poll ``ok()`` until true; False on a stop request, a dead child or the timeout."""
        deadline = time.monotonic() + timeout
        while not self.stopping and time.monotonic() < deadline:
            if ok():  # type: ignore[operator]
                return True
            self._check_alive()
            self._sleep(0.25)
        if not self.stopping:
            _say(f"{what} not ready after {timeout:g} s; stopping")
            self.stopping = True
        return False

    def stop(self) -> int:
        """API, then worker, then Redis: each asked to stop and waited for. Returns 0 when
        every child exited 0, else 1 (and says which did not)."""
        grace = {"api": 15.0, "worker": float(self.settings.job_timeout_s), "redis": 30.0, "prepare": 10.0}
        for name, proc in reversed(self.procs):
            if proc.poll() is not None:
                continue
            _say(f"stopping {name}...")
            proc.send_signal(signal.SIGINT if name == "api" else signal.SIGTERM)
            try:
                proc.wait(grace[name])
            except subprocess.TimeoutExpired:
                _say(f"{name} did not stop in {grace[name]:g} s: killing it")
                proc.kill()
                proc.wait()
        failed = [f"{name} (exit {p.returncode})" for name, p in self.procs if p.returncode != 0]
        _say("stopped" if not failed else f"stopped; not cleanly: {', '.join(failed)}")
        return 1 if failed else 0

    # --- the run ---

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._signal)
        s = self.settings
        if "redis_url" not in s.model_fields_set:
            port = _free_port()
            data = Path("var/redis")
            data.mkdir(parents=True, exist_ok=True)
            self.spawn(
                "redis",
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
                 "--appendonly", "yes", "--save", "", "--maxmemory-policy", "noeviction"],
                stdout=subprocess.DEVNULL,
            )  # fmt: skip
            self._wait_for("redis-server", lambda: _port_open(port), 60)
            self.env["INSPECTOR_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
        if not self.stopping:
            _say("preparing the built-in models (first time: about a minute)...")
            prepare = self.spawn("prepare", [sys.executable, "-m", "workers", "prepare"])
            self._wait_for("preparing the models", lambda: prepare.poll() is not None, 600)
            if prepare.poll() not in (None, 0):
                _say(f"preparing the models failed (exit {prepare.returncode})")
                self.stopping = True
        if not self.stopping:
            self.spawn("worker", [sys.executable, "-m", "workers", "worker"])
            self.spawn(
                "api",
                [sys.executable, "-m", "uvicorn", "service.main:app", "--host", s.api_host, "--port", str(s.api_port)],
            )
            url = f"http://{s.api_host}:{s.api_port}"
            _say("warming the worker's models (first time: a minute or two; then seconds)...")
            t0 = time.monotonic()
            if self._wait_for("the service", lambda: _ready(url), 1800):
                _say(_banner(url, self.env.get("INSPECTOR_REDIS_URL", s.redis_url), time.monotonic() - t0))
        while not self.stopping:
            self._check_alive()
            self._sleep(0.5)
        return self.stop()


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
            return bool(json.load(r).get("ready"))
    except (OSError, ValueError):  # connection refused, 503 (HTTPError), a half-started API
        return False


def _banner(url: str, redis_url: str, seconds: float) -> str:
    return f"""
Model Inspector is ready at {url} after {seconds:.0f} s (docs: {url}/docs, Redis: {redis_url})

  open {url}/ in a browser: the inspector page (pick a model, an image and an analysis)

  python -c "import skimage.io, skimage.data; skimage.io.imsave('cat.png', skimage.data.chelsea())"
  curl -F image=@cat.png {url}/v1/models/efficientnet-lite0/predict
  curl -F image=@cat.png -F model_id=efficientnet-lite0 '{url}/v1/jobs/saliency?wait=60'

Ctrl-C stops everything (a second Ctrl-C forces).
"""


def run(settings: Settings) -> None:
    raise SystemExit(DevServer(settings).run())
