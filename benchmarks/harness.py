"""What the service benchmarks share: free ports, waiting for readiness, and a lean HTTP/1.1
client (keep-alive connections that post prepared bytes).

A load generator must cost little next to what it measures: on the same two cores,
httpx's client took about as much CPU per request as the API itself (5-7 ms), and its
latency counted as the service's.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``check`` (connection errors count as not yet) until true, or exit."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"{what} not ready after {timeout:.0f} s")


def stack_env(redis_port: int, models_dir: str, **extra: str) -> dict[str, str]:
    """The environment of the benchmarks' API and workers: this one, the workers' allocator
    settings, the Redis on ``redis_port``, CPU, ``models_dir``, then ``extra``."""
    from workers.allocator import ALLOCATOR_ENV

    return {
        **os.environ,
        **ALLOCATOR_ENV,
        "INSPECTOR_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "INSPECTOR_DEVICE": "cpu",
        "INSPECTOR_MODELS_DIR": models_dir,
        **extra,
    }


def start_stack(env: dict[str, str], redis_port: int, api_port: int, cwd: Path) -> list[subprocess.Popen]:
    """``[redis-server, uvicorn]`` on loopback (no persistence; the API at ``api_port``, with
    ``env`` less the workers' allocator settings, as ``inspector run`` starts it): what the
    service benchmarks start before their workers."""
    from service.devserver import api_env

    return [
        subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen([sys.executable, "-m", "uvicorn", "service.main:app", "--host", "127.0.0.1",
                          "--port", str(api_port), "--log-level", "warning"], env=api_env(env), cwd=cwd),
    ]  # fmt: skip


def stop_stack(procs: list[subprocess.Popen]) -> None:
    """Terminate what :func:`start_stack` (and the benchmark after it) started, last first."""
    for p in reversed(procs):
        p.terminate()
    for p in procs:
        p.wait(30)


class Connection:
    """One keep-alive HTTP/1.1 connection that posts a prepared request and reads the answer
    (a response with a Content-Length, as uvicorn sends for JSON)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        return cls(*await asyncio.open_connection(host, port))

    async def post(self, request: bytes) -> tuple[int, bytes]:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length = next(int(v) for k, _, v in (x.partition(":") for x in lines[1:]) if k.lower() == "content-length")
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


def multipart_request(host: str, port: int, path: str, image: bytes, filename: str, media_type: str) -> bytes:
    """The bytes of ``POST path`` with ``image`` as the multipart field ``image``."""
    boundary = "inspector-load-boundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
        f"Content-Type: {media_type}\r\n\r\n"
    ).encode() + image + f"\r\n--{boundary}--\r\n".encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: multipart/form-data; boundary={boundary}"
        f"\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body
