"""Cold starts: time to ready, first request against the steady state, and worker memory.

Starts its own redis-server and API (uvicorn) on loopback, then for each model, with a
worker that warms only that model (``INSPECTOR_WARM_MODELS``):

1. **Ready, cold cache**: a worker on an empty engine cache (``INSPECTOR_CACHE_DIR`` in a
   fresh temporary directory): seconds from starting the process to ``/readyz`` 200.
2. **Ready, warm cache**: ``--runs`` restarts on the cache the first start wrote.
3. **First request**: after each ready, 10 predicts one after another (a 50 KB JPEG of
   scikit-image's cat): the first one's latency over the median of the last five
   (median over the starts).
4. **Memory** (``--jobs``; ImageNet models): the worker's resident memory (VmRSS of the
   worker process, from /proc) idle after ready, right after ``--jobs`` mixed explanation
   jobs (saliency, Integrated Gradients, Grad-CAM, DeepLift, occlusion maps...), and
   ``--settle`` seconds later.

``--base DIR`` runs the API and the workers from another checkout (e.g. ``git archive <commit> | tar
-x -C DIR``) with this venv, for a same-run baseline; it has no warm-up, so "ready" is
when its worker registers.

    python benchmarks/cold_start.py [--models efficientnet-lite0 efficientnet-lite1 digits-cnn]
                                    [--runs 5] [--jobs 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from harness import free_port, stack_env, start_stack, wait_until

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MIXED_JOBS: list[tuple[str, dict[str, Any]]] = [
    ("saliency", {}),
    ("attribution", {"method": "integrated_gradients", "n_steps": 16}),
    ("attribution", {"method": "gradcam"}),
    ("attribution", {"method": "deeplift"}),
    ("occlusion_map", {}),
    ("attribution", {"method": "input_x_gradient"}),
    ("attribution", {"method": "guided_backprop"}),
    ("attribution", {"method": "integrated_gradients", "n_steps": 32}),
    ("attribution", {"method": "gradient_shap"}),
    ("occlusion_map", {"occluder": 64}),
]


def rss_mb(pid: int) -> float:
    return memory_mb(pid)["VmRSS"]


def memory_mb(pid: int) -> dict[str, float]:
    """Resident memory of a process in MiB: all (``VmRSS``), anonymous (heap, tensors) and
    file-backed (shared libraries: torch's CUDA build maps about 300 MB of them)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            out[name] = int(value.split()[0]) / 1024
    return out


def photo(shift: int = 0) -> bytes:
    """The cat at its own 451x300 as a JPEG of quality 95 (50 KB); ``shift`` rolls it (a
    distinct upload, so identical submissions do not share a result)."""
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(np.roll(data.chelsea(), shift, axis=1)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def ready(http: httpx.Client) -> bool:
    """``/readyz`` is 200, asked on the client's keep-alive connection, as a load balancer
    asks before it sends traffic on its pool: the first predict then measures the server,
    not a new connection."""
    return http.get("/readyz", timeout=2).status_code == 200


def registered(redis_url: str) -> bool:
    from redis import Redis
    from rq import Worker

    return Worker.count(connection=Redis.from_url(redis_url)) > 0


def start_worker(env: dict[str, str], base_dir: Path | None, log: Path) -> subprocess.Popen:
    cwd = base_dir or ROOT
    env = {**env, "PYTHONPATH": str(cwd)} if base_dir else env
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "workers", "worker"], env=env, cwd=cwd, stderr=out)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def first_and_steady(http: httpx.Client, model: str, image: bytes) -> tuple[float, float]:
    """Latency (s) of the first of 10 predicts and the median of the last five."""
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        r = http.post(f"/v1/models/{model}/predict", files={"image": ("cat.jpg", image, "image/jpeg")})
        r.raise_for_status()
        times.append(time.perf_counter() - t0)
    return times[0], statistics.median(times[5:])


def run_jobs(http: httpx.Client, model: str, n: int, timeout: float) -> dict[str, int]:
    ids = []
    for i in range(n):
        kind, params = MIXED_JOBS[i % len(MIXED_JOBS)]
        r = http.post(
            f"/v1/jobs/{kind}",
            files={"image": ("cat.jpg", photo(7 * i + 1), "image/jpeg")},
            data={"model_id": model, "params": json.dumps(params)},
        )
        r.raise_for_status()
        ids.append(r.json()["id"])
    deadline = time.monotonic() + timeout
    statuses: list[str] = []
    while time.monotonic() < deadline:
        statuses = [http.get(f"/v1/jobs/{i}").json()["status"] for i in ids]
        if all(s in ("finished", "failed", "canceled") for s in statuses):
            break
        time.sleep(0.5)
    return {s: statuses.count(s) for s in sorted(set(statuses))}


def measure_model(
    model: str, env: dict[str, str], base: str, args: argparse.Namespace, cache: Path, log: Path
) -> dict[str, Any]:
    env = {**env, "INSPECTOR_WARM_MODELS": model, "INSPECTOR_CACHE_DIR": str(cache)}
    base_dir = Path(args.base) if args.base else None
    image = photo()
    out: dict[str, Any] = {"model": model, "starts": []}
    with httpx.Client(base_url=base, timeout=600) as http:
        is_ready = (lambda: registered(env["INSPECTOR_REDIS_URL"])) if base_dir else (lambda: ready(http))
        for run in range(args.runs + 1):  # the first on the empty cache
            t0 = time.perf_counter()
            proc = start_worker(env, base_dir, log)
            try:
                wait_until(is_ready, 1200, f"{model} worker")
                ready_s = time.perf_counter() - t0
                first, steady = first_and_steady(http, model, image)
                start = {"cache": "cold" if run == 0 and not args.cache else "warm", "ready_s": ready_s,
                         "first_ms": first * 1000, "steady_ms": steady * 1000,
                         "first_over_steady": first / steady}  # fmt: skip
                if run == args.runs and args.jobs and model != "digits-cnn":
                    time.sleep(2)
                    start["rss_idle_mb"] = rss_mb(proc.pid)
                    start["idle_detail_mb"] = memory_mb(proc.pid)
                    start["jobs"] = run_jobs(http, model, args.jobs, args.job_timeout)
                    start["rss_after_jobs_mb"] = rss_mb(proc.pid)
                    time.sleep(args.settle)
                    start[f"rss_after_{args.settle:g}s_mb"] = rss_mb(proc.pid)
                print(json.dumps({"model": model, **start}), flush=True)
                out["starts"].append(start)
            finally:
                stop(proc)
    warm = [s for s in out["starts"] if s["cache"] == "warm"]
    out["ready_cold_s"] = out["starts"][0]["ready_s"]
    out["ready_warm_s_median"] = statistics.median(s["ready_s"] for s in warm) if warm else None
    out["first_over_steady_median"] = statistics.median(s["first_over_steady"] for s in out["starts"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["efficientnet-lite0", "efficientnet-lite1", "digits-cnn"])
    ap.add_argument("--runs", type=int, default=5, help="restarts on the warm cache per model")
    ap.add_argument("--jobs", type=int, default=10, help="mixed jobs before the after-jobs RSS (0 = skip)")
    ap.add_argument("--job-timeout", type=float, default=900.0)
    ap.add_argument("--settle", type=float, default=30.0, help="seconds after the jobs for the last RSS")
    ap.add_argument("--models-dir", default=str(ROOT / "var" / "models"))
    ap.add_argument("--base", default="", help="run the workers from this checkout (a baseline)")
    ap.add_argument("--env", nargs="*", default=[], help="extra NAME=VALUE for the workers")
    ap.add_argument("--cache", default="", help="engine cache to start from (no cold start measured)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    redis_port, api_port = free_port(), free_port()
    env = stack_env(redis_port, args.models_dir, **dict(e.split("=", 1) for e in args.env))
    base = f"http://127.0.0.1:{api_port}"
    if args.base:  # the baseline's API too: its workers read what its API queues
        env["PYTHONPATH"] = args.base
    procs = start_stack(env, redis_port, api_port, Path(args.base) if args.base else ROOT)
    results: dict[str, Any] = {"cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg(), "models": []}
    try:
        wait_until(lambda: httpx.get(f"{base}/healthz", timeout=2).status_code == 200, 60, "API")
        with tempfile.TemporaryDirectory() as tmp:
            for model in args.models:
                cache = Path(args.cache) if args.cache else Path(tmp) / model  # empty: a cold first start
                results["models"].append(measure_model(model, env, base, args, cache, Path(tmp) / "worker.log"))
    finally:
        for p in reversed(procs):
            stop(p)
    results["load_avg_at_end"] = os.getloadavg()
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def report(r: dict[str, Any]) -> None:
    print(f"\n{r['cpus']} CPUs, load average {r['load_avg_at_start'][0]:.1f} at start, "
          f"{r['load_avg_at_end'][0]:.1f} at end (shared machine)")  # fmt: skip
    print(f"{'model':>20} {'ready cold s':>12} {'ready warm s':>12} {'first/steady':>12} "
          f"{'RSS idle MB':>11} {'after jobs':>10} {'later':>8}")  # fmt: skip
    for m in r["models"]:
        last = m["starts"][-1]
        later = next((v for k, v in last.items() if k.startswith("rss_after_") and k.endswith("s_mb")), None)
        warm = m["ready_warm_s_median"]
        print(f"{m['model']:>20} {m['ready_cold_s']:>12.1f} {warm if warm is None else round(warm, 1)!s:>12} "
              f"{m['first_over_steady_median']:>12.2f} {last.get('rss_idle_mb', float('nan')):>11.0f} "
              f"{last.get('rss_after_jobs_mb', float('nan')):>10.0f} {later or float('nan'):>8.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
