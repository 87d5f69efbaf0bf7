"""Load test on loopback: batched predicts under concurrency, and job throughput per worker.

Starts its own redis-server (free port), the API (uvicorn, one process) and workers
(``python -m workers worker``), all on 127.0.0.1, then:

1. **Batched forward limit** of the model, in this process: images/s of the model's
   forward engine on batches of ``predict_max_batch`` preprocessed images (what a worker's
   batcher runs), with and without the preprocessing (decode + resize) the worker also does;
   with ONNX Runtime's threads spinning between batches and not, before and after the
   predict levels: the fastest of the four is the limit.
2. **Predicts** with one worker: a lean asyncio HTTP/1.1 client with C keep-alive
   connections (C = 1, 8, 32), each posting one photo (JPEG, or ``--format PNG``) as
   multipart and waiting for its answer, for ``--duration``
   seconds per level: requests/s, p50/p99 latency, errors, mean batch size seen, and the
   CPU milliseconds per request of each process (this client, the API, the worker, Redis;
   from /proc), beside the forward's own CPU per image: on a machine shared with other
   work, where rates swing with the load, CPU per request is the steadier figure, and on
   one box the client and the API take CPU from the forward.
3. **Jobs**: ``--jobs`` saliency jobs (distinct inputs) submitted at once, with 1 and then
   2 workers: jobs/s from the first submit to the last terminal state, and every accepted
   job checked through the API to have reached a terminal state (nothing lost).

4. ``--plain``: instead of 1-3, the outside client's view (issue 20): python-requests, one
   keep-alive ``Session`` per client thread, and the lean client, each posting the
   model-sized photo and a 50 KB JPEG (the cat at its own 451x300, not pre-sized to the
   model), interleaved at each ``--clients`` level: which of client and image costs what.

Bounded: about ``3 * duration + 60`` seconds plus the job phases (each capped at
``--job-timeout``). Prints a table and writes JSON with ``--json``.

    python benchmarks/load.py [--model efficientnet-lite0] [--duration 10] [--jobs 40]
    python benchmarks/load.py --plain --clients 8 32 [--duration 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from harness import Connection, free_port, multipart_request, stack_env, start_stack, wait_until

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc; all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs), q)) if xs else float("nan")


def model_image(model_id: str, models_dir: Path, fmt: str = "JPEG") -> bytes:
    """A real photo (scikit-image's cat) at the model's input size, as JPEG (what cameras
    and browsers send; quality 90) or PNG."""
    from PIL import Image
    from skimage import data

    from schemas.manifests import ModelRegistry

    h, w = ModelRegistry(models_dir).get(model_id).manifest.preprocessing.size
    buf = io.BytesIO()
    Image.fromarray(data.chelsea()).resize((w, h)).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def photo_50kb() -> bytes:
    """The outside client's upload: scikit-image's cat at its own size (451x300) as a JPEG
    of quality 95, 50 KB, as a camera or browser would send it (not pre-sized to the model)."""
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def requests_load(
    base: str, model_id: str, image: bytes, clients: int, seconds: float, pids: dict[str, int] | None = None
) -> dict[str, Any]:
    """The plain outside client: ``clients`` threads, each with its own python-requests
    keep-alive ``Session``, posting the image as multipart (``files=``) and waiting for the
    answer, for ``seconds``. Its own CPU per request is in ``client_cpu_ms``; with ``pids``
    (name -> process), each process's CPU milliseconds per answered request too."""
    import threading

    import requests

    url = f"{base}/v1/models/{model_id}/predict"
    latencies: list[float] = []
    errors: dict[str, int] = {}
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    stop_at: list[float] = []

    def one_client() -> None:
        with requests.Session() as http:
            start.wait()
            while time.perf_counter() < stop_at[0]:
                t0 = time.perf_counter()
                try:
                    r = http.post(url, files={"image": ("cat.jpg", image, "image/jpeg")}, timeout=60)
                    key = None if r.status_code == 200 else str(r.status_code)
                except requests.RequestException as e:
                    key = type(e).__name__
                with lock:
                    if key is None:
                        latencies.append(time.perf_counter() - t0)
                    else:
                        errors[key] = errors.get(key, 0) + 1

    threads = [threading.Thread(target=one_client) for _ in range(clients)]
    for t in threads:
        t.start()
    stop_at.append(time.perf_counter() + seconds)
    pids = pids or {}
    cpu0 = {name: cpu_s(pid) for name, pid in pids.items()}
    c0, t0 = own_cpu_s(), time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    took = time.perf_counter() - t0
    n = max(len(latencies), 1)
    cpu_ms = {name: (cpu_s(pid) - cpu0[name]) / n * 1000 for name, pid in pids.items()}
    return {
        "client": "requests",
        "clients": clients,
        "requests": len(latencies),
        "req_per_s": len(latencies) / took,
        "p50_ms": pct(latencies, 50) * 1000,
        "p99_ms": pct(latencies, 99) * 1000,
        "client_cpu_ms": (own_cpu_s() - c0) / n * 1000,
        "cpu_ms_per_request": cpu_ms | {"client": (own_cpu_s() - c0) / n * 1000},
        "errors": errors,
    }


def forward_limit(
    model_id: str, image: bytes, batch: int, seconds: float, env: dict[str, str], spin_wait: bool = True
) -> dict[str, Any]:
    """Images/s of the worker's batched path, in this process (same engine and cache)."""
    import torch

    from schemas.settings import Settings
    from service.images import decode_image
    from workers.pipeline import decode, forward_in_chunks
    from workers.registry import ModelCache, preprocess

    s = Settings(**{k[len("INSPECTOR_"):].lower(): v for k, v in env.items() if k.startswith("INSPECTOR_")})
    if s.intra_op_threads:
        torch.set_num_threads(s.intra_op_threads)
    model = ModelCache.from_settings(s, spin_wait=spin_wait).get(model_id)
    stored = decode_image(image, s.max_upload_bytes, s.max_image_pixels).data  # what the API stores
    x, _ = preprocess([decode(stored)] * batch, model.manifest.preprocessing)
    forward_in_chunks(model, x)  # warm-up
    out: dict[str, Any] = {"engine": model.engine_name, "chunk": model.batch_size, "spin_wait": spin_wait}
    for name, with_pre in (("forward", False), ("preprocess+forward", True)):
        n, t0, c0 = 0, time.perf_counter(), own_cpu_s()
        while time.perf_counter() - t0 < seconds:
            if with_pre:
                x, _ = preprocess([decode(stored) for _ in range(batch)], model.manifest.preprocessing)
            forward_in_chunks(model, x).softmax(1)
            n += batch
        out[name] = n / (time.perf_counter() - t0)
        out[f"{name} cpu_ms"] = (own_cpu_s() - c0) / n * 1000
    return out


async def predict_load(
    base: str,
    model_id: str,
    image: bytes,
    clients: int,
    seconds: float,
    pids: dict[str, int] | None = None,
    media_type: str = "image/jpeg",
) -> dict[str, Any]:
    """``clients`` concurrent clients (one connection each) for ``seconds``; with ``pids``
    (name -> process), the CPU milliseconds each process (and this client) spent per answered
    request."""
    host, port = base.removeprefix("http://").split(":")
    request = multipart_request(host, int(port), f"/v1/models/{model_id}/predict", image, "x", media_type)
    latencies: list[float] = []
    batches: list[int] = []
    errors: dict[str, int] = {}
    connections = [await Connection.open(host, int(port)) for _ in range(clients)]
    stop = time.perf_counter() + seconds
    pids = pids or {}
    cpu0 = {name: cpu_s(pid) for name, pid in pids.items()} | {"client": own_cpu_s()}

    async def one_client(conn: Connection) -> None:
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            try:
                status, body = await conn.post(request)
            except (OSError, asyncio.IncompleteReadError) as e:
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                return
            if status == 200:
                latencies.append(time.perf_counter() - t0)
                batches.append(json.loads(body)["batch_size"])
            else:
                errors[str(status)] = errors.get(str(status), 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*[one_client(c) for c in connections])
    took = time.perf_counter() - t0
    cpu1 = {name: cpu_s(pid) for name, pid in pids.items()} | {"client": own_cpu_s()}
    for c in connections:
        c.close()
    n = max(len(latencies), 1)
    return {
        "cpu_ms_per_request": {name: (cpu1[name] - cpu0[name]) / n * 1000 for name in cpu0},
        "clients": clients,
        "requests": len(latencies),
        "req_per_s": len(latencies) / took,
        "p50_ms": pct(latencies, 50) * 1000,
        "p99_ms": pct(latencies, 99) * 1000,
        "mean_batch": statistics.fmean(batches) if batches else 0.0,
        "errors": errors,
    }


def job_phase(base: str, redis_url: str, n: int, offset: int, timeout: float) -> dict[str, Any]:
    """Submit n distinct digits-cnn saliency jobs at once; time them to a terminal state."""
    from redis import Redis
    from rq.job import Job
    from rq.serializers import JSONSerializer

    from tests.helpers import digit_png

    conn = Redis.from_url(redis_url)
    accepted: list[str] = []
    refused = 0
    t0 = time.perf_counter()
    with httpx.Client(base_url=base, timeout=60) as http:
        for i in range(n):
            image, _ = digit_png(offset + i)
            r = http.post("/v1/jobs/saliency", files={"image": ("x.png", image, "image/png")},
                          data={"model_id": "digits-cnn", "params": json.dumps({"aggregation": "sum"})})  # fmt: skip
            if r.status_code in (200, 202):
                accepted.append(r.json()["id"])
            else:
                refused += 1
        terminal = {"finished", "failed", "canceled", "stopped"}
        pending = set(accepted)
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            jobs = Job.fetch_many(sorted(pending), connection=conn, serializer=JSONSerializer)
            pending -= {j.id for j in jobs if j is not None and j.get_status(refresh=False) in terminal}
            time.sleep(0.05)
        took = time.perf_counter() - t0
        final = [http.get(f"/v1/jobs/{i}").json()["status"] for i in accepted]  # through the API
    counts = {s: final.count(s) for s in sorted(set(final))}
    return {
        "jobs": n,
        "accepted": len(accepted),
        "refused": refused,
        "seconds": took,
        "jobs_per_s": len(accepted) / took,
        "statuses": counts,
        "lost": sum(1 for s in final if s not in terminal),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet-lite0")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per concurrency level")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--jobs", type=int, default=40)
    ap.add_argument("--job-timeout", type=float, default=120.0)
    ap.add_argument("--models-dir", default=str(ROOT / "var" / "models"))
    ap.add_argument("--json", default="")
    ap.add_argument("--format", choices=["JPEG", "PNG"], default="JPEG", help="of the posted photo")
    ap.add_argument(
        "--plain",
        action="store_true",
        help="only the outside-client comparison: python-requests threads and the lean client, each posting "
        "the model-sized photo and a 50 KB JPEG, at each --clients level, interleaved, in one run",
    )
    ap.add_argument("--rounds", type=int, default=2, help="--plain: alternations of the two clients per level")
    args = ap.parse_args()

    redis_port, api_port = free_port(), free_port()
    cache = os.environ.get("INSPECTOR_CACHE_DIR", str(ROOT / "var" / "cache"))
    env = stack_env(redis_port, args.models_dir, INSPECTOR_CACHE_DIR=cache)
    env.setdefault("INSPECTOR_WARM_MODELS", "none")  # workers warm what they preload, nothing else
    base = f"http://127.0.0.1:{api_port}"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    procs = start_stack(env, redis_port, api_port, ROOT)

    def start_worker() -> None:
        procs.append(subprocess.Popen([sys.executable, "-m", "workers", "worker", "--preload", args.model,
                                       "digits-cnn"], env=env, cwd=ROOT, **quiet))  # fmt: skip

    results: dict[str, Any] = {"model": args.model, "cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg()}
    try:
        start_worker()
        wait_until(lambda: httpx.get(f"{base}/readyz", timeout=2).status_code == 200, 300, "API + worker")
        image = model_image(args.model, Path(args.models_dir), args.format)
        media_type = f"image/{args.format.lower()}"
        from schemas.settings import Settings

        max_batch = Settings().predict_max_batch
        if args.plain:
            pids = {"api": procs[1].pid, "worker": procs[2].pid, "redis": procs[0].pid}
            results["plain"] = plain_comparison(base, args, image, media_type, pids)
        else:
            print(f"batched forward limit of {args.model} (batch {max_batch}), in-process ...", flush=True)
            def measure_limits() -> list[dict[str, Any]]:
                secs = min(args.duration, 8.0)
                return [forward_limit(args.model, image, max_batch, secs, env, spin) for spin in (True, False)]

            limits = measure_limits()
            print(json.dumps(limits), flush=True)
            asyncio.run(predict_load(base, args.model, image, 4, 3.0, media_type=media_type))  # warm-up
            results["predict"] = []
            for c in args.clients:
                pids = {"api": procs[1].pid, "worker": procs[2].pid, "redis": procs[0].pid}
                row = asyncio.run(predict_load(base, args.model, image, c, args.duration, pids, media_type))
                results["predict"].append(row)
                print(json.dumps(row), flush=True)
            # Again after the load levels: on a shared machine the fastest of the four is the limit.
            limits += measure_limits()
            print(json.dumps(limits[2:]), flush=True)
            results["limit"] = dict(max(limits, key=lambda lim: lim["forward"]))
            # Decoding on the main thread competes with spinning engine threads: its best may differ.
            best_pre = max(limits, key=lambda lim: lim["preprocess+forward"])
            results["limit"].update({k: best_pre[k] for k in ("preprocess+forward", "preprocess+forward cpu_ms")})
            results["limit"]["preprocess+forward spin_wait"] = best_pre["spin_wait"]
            results["jobs"] = {}
            for n_workers, offset in ((1, 0), (2, 100)):
                if n_workers == 2:
                    from redis import Redis
                    from rq import Worker

                    start_worker()
                    redis = Redis.from_url(env["INSPECTOR_REDIS_URL"])
                    wait_until(lambda r=redis: Worker.count(connection=r) >= 2, 300, "second worker")
                row = job_phase(base, env["INSPECTOR_REDIS_URL"], args.jobs, offset, args.job_timeout)
                results["jobs"][n_workers] = row
                print(json.dumps({"workers": n_workers, **row}), flush=True)
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
    results["load_avg_at_end"] = os.getloadavg()
    if args.plain:
        report_plain(results)
    else:
        report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def plain_comparison(
    base: str, args: argparse.Namespace, image: bytes, media_type: str, pids: dict[str, int]
) -> list[dict[str, Any]]:
    """Per ``--clients`` level, ``--rounds`` times, each client with each photo: the lean
    asyncio client and python-requests threads, the model-sized photo (what load.py has
    reported) and the 50 KB one; interleaved so that a change in the machine's load hits all."""
    photo = photo_50kb()
    asyncio.run(predict_load(base, args.model, image, 4, 3.0, media_type=media_type))  # warm-up
    rows = []
    for c in args.clients:
        for _ in range(args.rounds):
            for client in ("asyncio", "requests"):
                for upload, mt in ((image, media_type), (photo, "image/jpeg")):
                    if client == "asyncio":
                        row = asyncio.run(predict_load(base, args.model, upload, c, args.duration, pids, mt))
                        row["client"] = "asyncio"
                    else:
                        row = requests_load(base, args.model, upload, c, args.duration, pids)
                    row.update(image_bytes=len(upload), load_avg=os.getloadavg()[0])
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


def report_plain(r: dict[str, Any]) -> None:
    print(f"\nmodel {r['model']}, {r['cpus']} CPUs, load average {r['load_avg_at_start'][0]:.1f} at start")
    names = ("client", "api", "worker", "redis")
    print("CPU ms per answered request of each process (all its threads; /proc), and their sum")
    print(f"{'client':>9} {'image':>8} {'clients':>7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'load':>5} "
          + " ".join(f"{n:>7}" for n in names) + f" {'sum':>7}  errors")  # fmt: skip
    for row in r["plain"]:
        cpu = row["cpu_ms_per_request"]
        print(f"{row['client']:>9} {row['image_bytes']:>8} {row['clients']:>7} {row['req_per_s']:>8.1f} "
              f"{row['p50_ms']:>8.1f} {row['p99_ms']:>8.1f} {row['load_avg']:>5.1f} "
              + " ".join(f"{cpu[n]:>7.2f}" for n in names) + f" {sum(cpu[n] for n in names):>7.2f}  "
              f"{row['errors'] or '-'}")  # fmt: skip


def report(r: dict[str, Any]) -> None:
    lim = r["limit"]
    print(f"\nmodel {r['model']}, {r['cpus']} CPUs, load average {r['load_avg_at_start'][0]:.1f} at start "
          f"(shared machine), engine {lim['engine']} (chunk {lim['chunk']}, spin_wait {lim['spin_wait']})")  # fmt: skip
    print(f"batched forward limit: {lim['forward']:.1f} img/s forward only, "
          f"{lim['preprocess+forward']:.1f} img/s with decode+preprocess "
          f"(spin_wait {lim['preprocess+forward spin_wait']})")  # fmt: skip
    print("limit/achieved: the forward-only limit (and the decode+preprocess+forward one) over req/s")
    print(f"{'clients':>7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6} {'limit/achieved':>15}  errors")
    for row in r["predict"]:
        rate = row["req_per_s"] or float("nan")
        ratios = f"{lim['forward'] / rate:.2f} ({lim['preprocess+forward'] / rate:.2f})"
        print(f"{row['clients']:>7} {row['req_per_s']:>8.1f} {row['p50_ms']:>8.1f} {row['p99_ms']:>8.1f} "
              f"{row['mean_batch']:>6.1f} {ratios:>15}  {row['errors'] or '-'}")  # fmt: skip
    fwd_cpu = lim["forward cpu_ms"]
    print(f"\nCPU ms per request (all threads of each process; the forward alone: {fwd_cpu:.1f} ms per image)")
    names = list(r["predict"][0]["cpu_ms_per_request"])
    print(f"{'clients':>7} " + " ".join(f"{n:>8}" for n in names) + f" {'total':>8} {'total/forward':>14}")
    for row in r["predict"]:
        cpu = row["cpu_ms_per_request"]
        total = sum(cpu.values())
        print(f"{row['clients']:>7} " + " ".join(f"{cpu[n]:>8.1f}" for n in names)
              + f" {total:>8.1f} {total / fwd_cpu:>14.2f}")  # fmt: skip
    for n, row in r["jobs"].items():
        print(f"jobs, {n} worker(s): {row['accepted']}/{row['jobs']} accepted, {row['jobs_per_s']:.1f} jobs/s, "
              f"statuses {row['statuses']}, lost {row['lost']}")  # fmt: skip


if __name__ == "__main__":
    main()
