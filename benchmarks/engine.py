"""Eager PyTorch vs the ONNX Runtime engine, with and without the allocator settings.

For each model: images/s of eager forward, of the ONNX Runtime engine (``workers.engine``)
and of eager forward+backward to the input, at each batch size, in two child processes of
this script: one with glibc's default allocator (``MALLOC_*`` removed from the environment)
and one with ``workers.engine.ALLOCATOR_ENV`` (glibc reads them only at process start).
Each figure is the fastest of several passes after a warm-up pass (the machine may be
shared: the fastest pass is the least disturbed one); the median is shown beside it.
Also: ONNX Runtime intra-op thread counts, and the engine's cold and warm build time
(export + check + batch-size measurement, then a second start that reads the cache).

    python benchmarks/engine.py [--models efficientnet-lite0 digits-cnn] [--batches 1 8 16 32 64]
                                [--min-time 1.0] [--models-dir var/models]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def time_passes(run: Callable[[], object], min_time: float) -> tuple[float, float, float, float]:
    """Per pass: fastest and median wall seconds, minor page faults, CPU seconds (user + sys,
    all threads). One warm-up, then passes for ``min_time`` seconds (3 at least)."""
    run()
    times: list[float] = []
    before = resource.getrusage(resource.RUSAGE_SELF)
    while sum(times) < min_time or len(times) < 3:
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return min(times), statistics.median(times), (after.ru_minflt - before.ru_minflt) / len(times), cpu / len(times)


def child(args: argparse.Namespace) -> dict[str, Any]:
    """Measure in this process (its allocator is whatever the environment set at start)."""
    import torch

    from schemas.manifests import read_entry
    from workers.engine import build_engine, eager_forward, eager_grad_pass, input_shape, ort_forward
    from workers.registry import build_module, prepare_builtin_models

    prepare_builtin_models(args.models_dir, only=args.models)
    cpu = torch.device("cpu")
    intra_op = args.intra_op or os.cpu_count() or 1
    torch.set_num_threads(intra_op)
    out: dict[str, Any] = {}
    for model_id in args.models:
        entry = read_entry(args.models_dir / model_id)
        module = build_module(entry)
        shape = input_shape(entry)
        res: dict[str, Any] = {"forward": {}, "grad": {}}
        with tempfile.TemporaryDirectory() as cache:
            t0 = time.perf_counter()
            engine = build_engine(module, entry, Path(cache), cpu, intra_op_threads=intra_op)
            res["cold_build_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            build_engine(module, entry, Path(cache), cpu, intra_op_threads=intra_op)
            res["warm_build_s"] = time.perf_counter() - t0
            res.update(engine=engine.name, batch_size=engine.batch_size, grad_batch_size=engine.grad_batch_size)
            onnx_file = next((Path(cache) / "onnx").glob("*.onnx"))
            threads = sorted({*args.threads, intra_op})
            sessions = {n: ort_forward(onnx_file, cpu, n) for n in threads}
            eager, grad = eager_forward(module), eager_grad_pass(module)
            gen = torch.Generator().manual_seed(0)
            for bs in args.batches:
                x = torch.randn((bs, *shape), generator=gen)
                row = {"eager": time_passes(partial(eager, x), args.min_time)}
                for n, fwd in sessions.items():
                    row[f"onnx{n}"] = time_passes(partial(fwd, x), args.min_time)
                res["forward"][bs] = {k: per_image(bs, *v) for k, v in row.items()}
                if bs <= args.max_grad_batch:
                    res["grad"][bs] = per_image(bs, *time_passes(partial(grad, x), args.min_time))
        out[model_id] = res
    return out


def per_image(bs: int, best: float, med: float, faults: float, cpu: float) -> tuple[float, float, float, float]:
    """(images/s fastest pass, images/s median pass, page faults per pass, CPU ms per image)."""
    return bs / best, bs / med, faults, 1000 * cpu / bs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["efficientnet-lite0", "digits-cnn"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 16, 32, 64])
    ap.add_argument("--max-grad-batch", type=int, default=32, help="largest batch for forward+backward")
    ap.add_argument("--threads", nargs="+", type=int, default=[0, 1, 2], help="ONNX Runtime intra-op threads")
    ap.add_argument("--intra-op", type=int, default=0, help="torch and engine threads (0 = cores)")
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds of passes per figure")
    ap.add_argument("--models-dir", type=Path, default=ROOT / "var" / "models")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    from workers.engine import ALLOCATOR_ENV

    plain_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    runs = {}
    for label, env in (("glibc default", plain_env), ("ALLOCATOR_ENV", {**plain_env, **ALLOCATOR_ENV})):
        cmd = [sys.executable, __file__, "--child", *sys.argv[1:]]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if proc.returncode:
            raise SystemExit(f"child failed ({label}):\n{proc.stderr[-3000:]}")
        runs[label] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"[{label}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr)
    report(runs, args)


def report(runs: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    plain, tuned = runs["glibc default"], runs["ALLOCATOR_ENV"]
    cores = os.cpu_count() or 1
    intra_op = args.intra_op or cores
    load = os.getloadavg()[0]
    print(
        f"# images/s, fastest pass (median in brackets); {cores} cores, {intra_op} torch and ONNX Runtime"
        f" threads; load average {load:.1f} at the end"
    )
    onnx = f"onnx{intra_op}"  # the engine's setting
    for model_id in args.models:
        p, t = plain[model_id], tuned[model_id]
        print(
            f"\n## {model_id}: engine {t['engine']}, chosen batch {t['batch_size']} (grad {t['grad_batch_size']}),"
            f" build cold {t['cold_build_s']:.1f} s, warm {t['warm_build_s']:.2f} s"
        )
        print(
            f"{'batch':>5} | {'eager':>17} {'ONNX':>17} {'ONNX/eager':>10} | "
            f"{'eager +alloc':>17} {'ONNX +alloc':>17} {'ONNX/eager':>10} | {'alloc gain eager, ONNX':>22}"
        )
        for bs in args.batches:
            a, b = p["forward"][str(bs)], t["forward"][str(bs)]
            print(
                f"{bs:>5} | {fmt(a['eager'])} {fmt(a[onnx])} {a[onnx][0] / a['eager'][0]:>9.2f}x | "
                f"{fmt(b['eager'])} {fmt(b[onnx])} {b[onnx][0] / b['eager'][0]:>9.2f}x | "
                f"{b['eager'][0] / a['eager'][0]:>10.2f}x {b[onnx][0] / a[onnx][0]:>10.2f}x"
            )
        print("\nforward+backward to the input (eager)")
        print(f"{'batch':>5} | {'glibc default':>17} {'ALLOCATOR_ENV':>17} {'gain':>7}")
        for bs, a in p["grad"].items():
            b = t["grad"][bs]
            print(f"{bs:>5} | {fmt(a)} {fmt(b)} {b[0] / a[0]:>6.2f}x")
        print("\nminor page faults per pass, glibc default -> ALLOCATOR_ENV")
        print(f"{'batch':>5} | {'eager forward':>21} {'ONNX forward':>21} {'eager fwd+bwd':>21}")
        for bs in args.batches:
            a, b = p["forward"][str(bs)], t["forward"][str(bs)]
            cells = [f"{a['eager'][2]:>9.0f} -> {b['eager'][2]:>8.0f}", f"{a[onnx][2]:>9.0f} -> {b[onnx][2]:>8.0f}"]
            if str(bs) in p["grad"]:
                cells.append(f"{p['grad'][str(bs)][2]:>9.0f} -> {t['grad'][str(bs)][2]:>8.0f}")
            print(f"{bs:>5} | " + " ".join(cells))
        print("\nCPU ms per image (user + sys of all threads), glibc default -> ALLOCATOR_ENV")
        print(f"{'batch':>5} | {'eager forward':>21} {'ONNX forward':>21} {'eager fwd+bwd':>21}")
        for bs in args.batches:
            a, b = p["forward"][str(bs)], t["forward"][str(bs)]
            cells = [f"{a['eager'][3]:>9.1f} -> {b['eager'][3]:>8.1f}", f"{a[onnx][3]:>9.1f} -> {b[onnx][3]:>8.1f}"]
            if str(bs) in p["grad"]:
                cells.append(f"{p['grad'][str(bs)][3]:>9.1f} -> {t['grad'][str(bs)][3]:>8.1f}")
            print(f"{bs:>5} | " + " ".join(cells))
        print("\nONNX Runtime intra-op threads (ALLOCATOR_ENV; 0 = ORT's default)")
        print(f"{'batch':>5} | " + " ".join(f"{'threads ' + str(n):>17}" for n in args.threads))
        for bs in args.batches:
            print(f"{bs:>5} | " + " ".join(fmt(t["forward"][str(bs)][f"onnx{n}"]) for n in args.threads))


def fmt(v: list[float]) -> str:
    return f"{v[0]:>8.1f} ({v[1]:>6.1f})"


if __name__ == "__main__":
    main()
