"""What HTTP + Redis (+ the batching worker) add to a predict, over calling the model in the worker process.

Starts its own redis-server (free port), one worker and the API (uvicorn), then times
N sequential predicts of one digits-cnn image (a) through HTTP and (b) by calling the
worker's predict function directly in this process on the stored image (same decode,
preprocess, forward; the API's upload check and decode count as overhead).
Prints p50/p95 of both and of the difference (the service's overhead). The client is the
lean one of ``harness`` (one keep-alive connection), so its own cost is not counted.

    python benchmarks/overhead.py [-n 200] [--model digits-cnn]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from harness import Connection, free_port, multipart_request, wait_until

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs), q))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=200)
    ap.add_argument("--model", default="digits-cnn")
    args = ap.parse_args()

    from tests.helpers import digit_png

    image, _ = digit_png(0)
    redis_port, api_port = free_port(), free_port()
    env = dict(os.environ, INSPECTOR_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0", INSPECTOR_DEVICE="cpu")
    env.setdefault("INSPECTOR_WARM_MODELS", "none")  # the worker warms what it preloads, nothing else
    procs = [
        subprocess.Popen(["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"],
                         stdout=subprocess.DEVNULL),
        subprocess.Popen([sys.executable, "-m", "workers", "worker", "--preload", args.model], env=env, cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen([sys.executable, "-m", "uvicorn", "service.main:app", "--port", str(api_port),
                          "--log-level", "warning"], env=env, cwd=ROOT),
    ]  # fmt: skip
    try:
        base = f"http://127.0.0.1:{api_port}"
        wait_until(lambda: httpx.get(f"{base}/readyz", timeout=1).status_code == 200, 60, "API + worker")
        from service.images import decode_image
        from workers.tasks import predict_images

        stored = decode_image(image, 1 << 24, 1 << 24).data  # the worker reads what the API stored

        host, port = "127.0.0.1", api_port
        request = multipart_request(host, port, f"/v1/models/{args.model}/predict", image, "x.png", "image/png")

        async def timed() -> tuple[list[float], list[float]]:
            conn = await Connection.open(host, port)
            for _ in range(10):  # warm-up: connections, model load, code paths
                assert (await conn.post(request))[0] == 200
                predict_images(args.model, [stored], 5)
            api_ms, direct_ms = [], []
            for _ in range(args.n):
                t0 = time.perf_counter()
                status, body = await conn.post(request)
                api_ms.append((time.perf_counter() - t0) * 1000)
                assert status == 200, body
                t0 = time.perf_counter()
                predict_images(args.model, [stored], 5)
                direct_ms.append((time.perf_counter() - t0) * 1000)
            conn.close()
            return api_ms, direct_ms

        api_ms, direct_ms = asyncio.run(timed())
        over = [a - d for a, d in zip(api_ms, direct_ms, strict=True)]
        print(f"predict on {args.model}, {args.n} sequential requests, one worker, CPU")
        print(f"{'':24}{'p50 ms':>10}{'p95 ms':>10}")
        for name, xs in (("through HTTP + Redis", api_ms), ("direct in worker code", direct_ms),
                         ("overhead (difference)", over)):  # fmt: skip
            print(f"{name:24}{pct(xs, 50):10.2f}{pct(xs, 95):10.2f}")
        print(f"overhead p50 {statistics.median(over):.2f} ms (target < 10 ms)")
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            p.wait(30)


if __name__ == "__main__":
    main()
