"""``inspector run`` stops cleanly (issue 20's acceptance): Ctrl-C, i.e. SIGINT to its whole
process group, ends the API, the worker (and its RQ scheduler) and Redis, every process
with exit code 0 and no traceback in the output. Real processes throughout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import TEST_CACHE_DIR, free_port


def _descendants(pid: int) -> set[int]:
    out: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            children = [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            continue
        out.update(children)
        todo.extend(children)
    return out


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\x00")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_ctrl_c_stops_api_worker_and_redis_in_order_with_exit_0_and_no_traceback(
    models_dir: Path, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INSPECTOR_")}
    port = free_port()
    env.update(
        INSPECTOR_MODELS_DIR=str(models_dir),
        INSPECTOR_CACHE_DIR=str(TEST_CACHE_DIR),
        INSPECTOR_DEVICE="cpu",
        INSPECTOR_WARM_MODELS="digits-cnn",
        INSPECTOR_API_PORT=str(port),
        MALLOC_TOP_PAD_="268435456",  # as the Makefile exports it
    )
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from service.cli import main; main(['run'])"],
            cwd=tmp_path,  # var/redis goes here
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as a shell gives `inspector run`
        )
    try:
        deadline = time.monotonic() + 240
        while "is ready at" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        children = _descendants(proc.pid)
        assert len(children) >= 4, "redis, worker (+ its scheduler), api"
        # The workers' allocator settings reach the workers, not the API (service.devserver.api_env).
        environ = {pid: _environ(pid) for pid in children}
        cmdlines = {pid: Path(f"/proc/{pid}/cmdline").read_bytes() for pid in children}
        api = [pid for pid, c in cmdlines.items() if b"uvicorn" in c]
        worker = [pid for pid, c in cmdlines.items() if b"workers\x00worker" in c]
        assert api and worker, cmdlines
        assert all("MALLOC_TOP_PAD_" not in environ[pid] for pid in api)
        assert all(environ[pid].get("MALLOC_TOP_PAD_") == "268435456" for pid in worker)
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    assert "Traceback" not in text and "Error" not in text.split("is ready at")[1], text[-3000:]
    order = [text.index(f"stopping {name}...") for name in ("api", "worker", "redis")]
    assert order == sorted(order), "API first, then the worker, then Redis"
    deadline = time.monotonic() + 10
    while left := [pid for pid in children if _running(pid)]:
        assert time.monotonic() < deadline, f"still running: {left}"
        time.sleep(0.1)
