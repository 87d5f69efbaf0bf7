"""``/healthz`` latency while the API decodes big uploads (issue 20: under 50 ms during any upload).

Starts its own redis-server and API (uvicorn, no worker: the job is queued and stays so),
then posts ``--images`` images of ``--megapixels`` MP each (a flat colour with a little
noise, a few hundred KB of PNG in all: within every limit, seconds to decode) as one saliency
job, ``--rounds`` times, while a second client asks ``/healthz`` every 10 ms on its own
keep-alive connection. Prints each upload's time and the ``/healthz`` latencies during it
(median, 99th percentile, max).

    python benchmarks/healthz_under_upload.py [--images 8] [--megapixels 40] [--rounds 3]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from harness import free_port, stack_env, start_stack, stop_stack, wait_until

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def big_png(megapixels: float, seed: int) -> bytes:
    """A ``megapixels`` MP RGB PNG of a flat colour with sparse noise (compresses to ~40 KB)."""
    from PIL import Image

    side = int((megapixels * 1e6 / 1.5) ** 0.5)
    arr = np.full((side, int(side * 1.5), 3), 200, np.uint8)
    rng = np.random.default_rng(seed)
    arr[rng.integers(0, arr.shape[0], 2000), rng.integers(0, arr.shape[1], 2000)] = (10, 90, 200)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", compress_level=9)
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--megapixels", type=float, default=40.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    redis_port, api_port = free_port(), free_port()
    env = stack_env(
        redis_port, str(ROOT / "var" / "models"), INSPECTOR_MAX_IMAGE_PIXELS=str(int(args.megapixels * 1e6) + 10**6)
    )
    procs = start_stack(env, redis_port, api_port, ROOT)
    base = f"http://127.0.0.1:{api_port}"
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    try:
        wait_until(lambda: httpx.get(f"{base}/healthz", timeout=2).status_code == 200, 60, "API")
        for r in range(args.rounds):
            images = [big_png(args.megapixels, 100 * r + i) for i in range(args.images)]  # new bytes each round
            files = [("image", (f"{i}.png", b, "image/png")) for i, b in enumerate(images)]
            done, times, out = threading.Event(), [], {}

            def upload(files: list = files, done: threading.Event = done, out: dict = out) -> None:
                with httpx.Client(base_url=base, timeout=600) as c:
                    t0 = time.perf_counter()
                    out["status"] = c.post(
                        "/v1/jobs/saliency", files=files, data={"model_id": "digits-cnn"}
                    ).status_code
                    out["s"] = time.perf_counter() - t0
                done.set()

            with httpx.Client(base_url=base, timeout=30) as probe:
                probe.get("/healthz")
                thread = threading.Thread(target=upload)
                thread.start()
                while not done.is_set():
                    t = time.perf_counter()
                    probe.get("/healthz").raise_for_status()
                    times.append(time.perf_counter() - t)
                    time.sleep(0.01)
                thread.join()
            ms = np.percentile(np.array(times), [50, 99, 100]) * 1000
            print(f"round {r + 1}: {args.images} x {args.megapixels:g} MP ({sum(map(len, images)) / 1e3:.0f} KB) "
                  f"-> {out['status']} in {out['s']:.1f} s; {len(times)} /healthz: median {ms[0]:.1f} ms, "
                  f"p99 {ms[1]:.1f} ms, max {ms[2]:.1f} ms, load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    finally:
        stop_stack(procs)


if __name__ == "__main__":
    main()
