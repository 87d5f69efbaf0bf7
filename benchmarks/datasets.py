"""Data sets and data-set jobs: what ``attribution_batch`` costs against its evaluations, how
long an upload takes, and how much memory a worker holds during a long job.

1. ``batch``: ``attribution_batch`` with saliency over ``--images`` JPEG photos (crops of the
   photos bundled with scikit-image, 256-400 px, so every image is decoded and resized) in a
   data set zip, run as one worker runs it (``plan``, every ``run_chunk``, ``aggregate``;
   decode in the background thread of ``workers.dataset_source``), against the limit
   measured in the same run: the forward evaluations (the engine, to pick each image's
   predicted class) at the best images/s of ``model.forward`` over batch sizes plus the
   forward+backward evaluations at the best images/s of eager forward+backward to the input
   (``benchmarks.attributions.best_throughput``). Decoding alone is timed too (what the
   overlap hides).
2. ``upload``: ``POST /v1/datasets`` of a ``--upload-mb`` zip to a real API (uvicorn, a
   redis-server of its own), streamed from disk by httpx: the time to the 201 (received,
   hashed, written to the data volume, checked).
3. ``rss``: the resident memory of the process (sampled every 50 ms) while it runs an
   ``attribution_batch`` job over ``--rss-images`` images chunk by chunk (``--rss-model``).

    flock /tmp/bench.lock python benchmarks/datasets.py [--images 1000] [--model efficientnet-lite0]
        [--upload-mb 100] [--rss-images 10000] [--rss-model efficientnet-lite0] [--parts batch upload rss]
        [--models-dir var/models] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.attributions import best_throughput  # noqa: E402
from benchmarks.harness import free_port, wait_until  # noqa: E402

PHOTOS = ("chelsea", "astronaut", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "cat")


def photo_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """``n`` JPEGs: random crops (256-400 px a side) of scikit-image's photos."""
    from PIL import Image
    from skimage import data

    rng = np.random.default_rng(seed)
    sources = [getattr(data, name)() for name in PHOTOS]
    out = []
    for i in range(n):
        a = sources[i % len(sources)]
        a = a[:, :, None].repeat(3, 2) if a.ndim == 2 else a[:, :, :3]
        h, w = rng.integers(256, 400, 2)
        h, w = min(h, a.shape[0]), min(w, a.shape[1])
        top, left = rng.integers(0, a.shape[0] - h + 1), rng.integers(0, a.shape[1] - w + 1)
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(a[top : top + h, left : left + w])).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_zip(path: Path, images: list[bytes], classes: int = 10, stored: bool = True) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED) as zf:
        for i, b in enumerate(images):
            zf.writestr(f"class-{i % classes}/{i:05d}.jpg", b)


class RssSampler:
    """The process's resident memory (``/proc/self/statm``), sampled in a thread."""

    def __init__(self, every_s: float = 0.05) -> None:
        self.every_s, self.samples, self._stop = every_s, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now_mb() -> float:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.now_mb())
            time.sleep(self.every_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()


def run_job(model: Any, archive: Path, data_dir: Path, job_id: str, params: dict[str, Any],
            after_chunk: Any = None) -> tuple[Any, float]:  # fmt: skip
    """``attribution_batch`` as one worker runs it; returns (result, wall seconds)."""
    from schemas.attribution_batch import AttributionBatchParams
    from workers.explain import attribution_batch as kind
    from workers.explain.base import no_progress
    from workers.pipeline import JobContext

    ds = "ds_" + "0" * 32
    context = JobContext(data_dir / "cache", data_dir / "models", job_id=job_id, data_dir=data_dir,
                         datasets={ds: archive})  # fmt: skip
    p = AttributionBatchParams.model_validate({"dataset": ds, **params})
    t0 = time.perf_counter()
    chunks = kind.plan(model, None, p, context)
    results = []
    for c in chunks:
        results.append(kind.run_chunk(model, None, p, c, no_progress, context))
        if after_chunk is not None:
            after_chunk(c)
    result = kind.aggregate(model, None, p, results, context)
    return result, time.perf_counter() - t0


def part_batch(args: argparse.Namespace, tmp: Path, out: dict[str, Any]) -> None:
    import torch

    from workers.dataset_source import zip_listing
    from workers.datasets import _read_zip_images
    from workers.registry import ModelCache

    model = ModelCache(Path(args.models_dir), Path(args.cache_dir), device=args.device).get(args.model)
    archive = tmp / "photos.zip"
    write_zip(archive, photo_jpegs(args.images))
    h, w = model.manifest.preprocessing.size

    def grad(x: torch.Tensor) -> None:
        x = x.detach().requires_grad_(True)
        model.module(x)[:, 0].sum().backward()

    def fwd(x: torch.Tensor) -> None:
        model.forward(x)

    fwd_ips, fwd_bs, _, _ = best_throughput(fwd, (3, h, w), [8, 16, 32], args.min_time)
    grad_ips, grad_bs, _, _ = best_throughput(grad, (3, h, w), [4, 8, 16], args.min_time)
    # decode + preprocess alone, as the job reads the zip (batches of the gradient batch size)
    members = zip_listing(archive).members
    t0 = time.perf_counter()
    for s in range(0, len(members), model.grad_batch_size):
        _read_zip_images(archive, members[s : s + model.grad_batch_size], model.manifest.preprocessing)
    decode_s = time.perf_counter() - t0
    # The job's gradient chunk: --batch-size, or "measured" (the worker's own measurement,
    # model.grad_batch_size), or "best" (the best of this run's limit measurement).
    chunk = {"measured": None, "best": grad_bs}.get(args.batch_size, None)
    chunk = int(args.batch_size) if args.batch_size.isdigit() else chunk
    params = {"images_per_chunk": 64, "dtype": "float16", "batch_size": chunk}
    before = RssSampler.now_mb()
    with RssSampler() as sampler:
        _, wall = run_job(model, archive, tmp, "bench-batch", params)
    n = args.images
    limit_grad = n / grad_ips
    limit = n / fwd_ips + limit_grad
    out["batch"] = {
        "model": args.model, "images": n, "engine": model.engine_name,
        "measured_grad_batch_size": model.grad_batch_size, "job_batch_size": chunk or model.grad_batch_size,
        "forward_batch_size": model.batch_size,
        "fwd_ips": round(fwd_ips, 2), "fwd_best_batch": fwd_bs, "grad_ips": round(grad_ips, 2),
        "grad_best_batch": grad_bs, "limit_fwd_plus_grad_s": round(limit, 2), "limit_grad_only_s": round(limit_grad, 2),
        "decode_alone_s": round(decode_s, 2), "job_s": round(wall, 2), "job_over_limit": round(wall / limit, 3),
        "job_over_grad_only": round(wall / limit_grad, 3), "rss_before_mb": round(before, 1),
        "rss_peak_mb": round(max(sampler.samples), 1),
    }  # fmt: skip
    print(json.dumps(out["batch"]), flush=True)


def part_upload(args: argparse.Namespace, tmp: Path, out: dict[str, Any]) -> None:
    import httpx

    archive = tmp / "upload.zip"
    rng = np.random.default_rng(1)
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        i = 0
        while archive.stat().st_size < args.upload_mb * 1_000_000:
            zf.writestr(f"class-{i % 10}/{i:05d}.jpg", rng.integers(0, 256, 50_000, dtype=np.uint8).tobytes())
            i += 1
            zf.fp.flush()  # type: ignore[union-attr]
    size = archive.stat().st_size
    redis_port, api_port = free_port(), free_port()
    env = {**os.environ, "INSPECTOR_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
           "INSPECTOR_DATA_DIR": str(tmp / "data"), "INSPECTOR_MODELS_DIR": args.models_dir}  # fmt: skip
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"],
                             stdout=subprocess.DEVNULL)  # fmt: skip
    api = subprocess.Popen([sys.executable, "-m", "uvicorn", "service.main:app", "--port", str(api_port)],
                           env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{api_port}"
        wait_until(lambda: httpx.get(f"{url}/healthz").status_code == 200, 60, "api")
        times = []
        for k in range(args.upload_rounds):
            with archive.open("rb") as f:
                t0 = time.perf_counter()
                r = httpx.post(f"{url}/v1/datasets?name=bench", content=f, timeout=120,
                               headers={"Content-Type": "application/zip"})  # fmt: skip
                times.append(time.perf_counter() - t0)
            assert r.status_code in (200, 201), r.text
            if k + 1 < args.upload_rounds:  # a fresh upload each round, not the known-bytes answer
                assert httpx.delete(f"{url}/v1/datasets/{r.json()['id']}").status_code == 204
    finally:
        api.terminate()
        redis.terminate()
        api.wait(10)
        redis.wait(10)
    out["upload"] = {"bytes": size, "images": r.json()["images"], "seconds": [round(t, 3) for t in times],
                     "best_s": round(min(times), 3), "mb_per_s": round(size / 1e6 / min(times), 1)}  # fmt: skip
    print(json.dumps(out["upload"]), flush=True)


def part_rss(args: argparse.Namespace, tmp: Path, out: dict[str, Any]) -> None:
    from workers.registry import ModelCache

    model = ModelCache(Path(args.models_dir), Path(args.cache_dir), device=args.device).get(args.rss_model)
    archive = tmp / "many.zip"
    base = photo_jpegs(200, seed=3)
    write_zip(archive, [base[i % len(base)] for i in range(args.rss_images)])
    marks: list[tuple[int, float]] = []
    before = RssSampler.now_mb()
    with RssSampler() as sampler:
        _, wall = run_job(model, archive, tmp, "bench-rss", {"images_per_chunk": 64},
                          after_chunk=lambda c: marks.append((c["stop"], RssSampler.now_mb())))  # fmt: skip
    quarter = [mb for stop, mb in marks if stop <= args.rss_images // 4]
    out["rss"] = {
        "model": args.rss_model, "images": args.rss_images, "seconds": round(wall, 1),
        "rss_before_mb": round(before, 1), "rss_peak_mb": round(max(sampler.samples), 1),
        "rss_after_first_quarter_mb": round(max(quarter), 1) if quarter else None,
        "rss_at_end_mb": round(marks[-1][1], 1),
        "maps_npy_bytes": (tmp / "jobs" / "bench-rss" / "maps.npy").stat().st_size,
    }  # fmt: skip
    print(json.dumps(out["rss"]), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["batch", "upload", "rss"], choices=["batch", "upload", "rss"])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--model", default="efficientnet-lite0")
    ap.add_argument("--upload-mb", type=float, default=100)
    ap.add_argument("--upload-rounds", type=int, default=3)
    ap.add_argument("--rss-images", type=int, default=10_000)
    ap.add_argument("--rss-model", default="efficientnet-lite0")
    ap.add_argument("--models-dir", default=str(ROOT / "var" / "models"))
    ap.add_argument("--cache-dir", default=str(ROOT / "var" / "cache"), help="engine exports, batch sizes")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", default="best", help="the job's gradient chunk: best (of this run), measured, N")
    ap.add_argument("--min-time", type=float, default=3.0, help="seconds per batch size when measuring the limit")
    ap.add_argument("--json")
    args = ap.parse_args()
    out: dict[str, Any] = {"load_average_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="bench-datasets-") as d:
        for part in args.parts:
            {"batch": part_batch, "upload": part_upload, "rss": part_rss}[part](args, Path(d), out)
    out["load_average_end"] = os.getloadavg()
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
