"""What U Analysis costs, against the forward limit, and the paper's sweep on digits-cnn.

1. ``u_analysis`` on efficientnet-lite0 (the cat photo, a 10% window: 11 x 11 = 121
   regions, 122 images): the analysis after the attribution (sequence, forward passes,
   U-triples) and the whole kind with its PNGs, against the *forward limit*: the N+1 images
   at the best measured throughput of ``model.forward`` over batch sizes.
2. ``u_sweep`` of the paper's grid (10 methods x 3 orders x 6 noises x 5 windows = 900
   configurations) over digits-cnn's test split (360 images, or ``--sweep-images``), in one
   process (``run``) and, with ``--processes 2``, as two workers taking chunks (each
   process one thread), against the forward limit of its evaluations and against a plain
   loop (the ``u_analysis`` computation once per image and configuration, attribution
   included, timed on ``--plain-images`` images and scaled to the sweep).
3. The U-occurrence table per hyperparameter value (the paper's Fig. 4) and per
   configuration, written to ``--out`` as JSON and CSV with the bar charts.

    python benchmarks/u_analysis.py [--sweep-images 360] [--processes 1] [--skip-lite0]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

import torch  # noqa: E402

from schemas.u_analysis import UAnalysisParams, USweepParams  # noqa: E402
from workers.explain import u_analysis as ua  # noqa: E402
from workers.explain import u_sweep  # noqa: E402
from workers.explain.base import Inputs, LoadedModel, no_progress  # noqa: E402


def model_cache(models_dir: Path) -> Any:
    from workers.registry import ModelCache, prepare_builtin_models

    models_dir.mkdir(parents=True, exist_ok=True)
    prepare_builtin_models(models_dir)
    return ModelCache(models_dir, ROOT / "var" / "cache", device="cpu")


def forward_throughput(model: LoadedModel, shape: tuple[int, ...], batch: int, seconds: float = 1.5) -> float:
    """Images per second of ``model.forward`` on batches of ``batch`` (after a warm-up)."""
    x = torch.randn(batch, *shape)
    model.forward(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 3 * batch:
        model.forward(x)
        n += batch
    return n / (time.perf_counter() - t0)


def best_throughput(model: LoadedModel, shape: tuple[int, ...], batches: list[int]) -> tuple[int, float, dict]:
    rates = {b: forward_throughput(model, shape, b) for b in batches}
    best = max(rates, key=lambda b: rates[b])
    return best, rates[best], rates


def _cpu_s() -> float:
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def median_time(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_lite0(cache: Any, repeats: int) -> dict[str, Any]:
    from PIL import Image
    from skimage import data

    from workers.registry import preprocess

    model = cache.get("efficientnet-lite0")
    x, display = preprocess([Image.fromarray(data.chelsea())], model.manifest.preprocessing)
    probs = model.forward(x).softmax(1)
    inputs = Inputs(x, display, probs.argmax(1), probs)
    t0 = time.perf_counter()
    attr = ua.compute_attribution(model, x, inputs.targets, UAnalysisParams().attribution)
    t_attr = time.perf_counter() - t0
    shape = tuple(x.shape[1:])
    best_b, best_rate, rates = best_throughput(model, shape, [1, 4, 8, 16, 25, 32, 64])
    out: dict[str, Any] = {
        "model": "efficientnet-lite0",
        "engine": model.engine_name,
        "engine_batch_size": model.batch_size,
        "forward_images_per_s": {str(b): round(r, 1) for b, r in rates.items()},
        "best_batch": best_b,
        "attribution_s (saliency)": round(t_attr, 3),
        "cases": [],
    }
    h, w = int(shape[1]), int(shape[2])
    n_rows = ua.Grid(h, w, ua.window_pixels((h, w), None, 0.10)).n + 1
    rows = torch.randn(n_rows, *shape)

    def limit_run(batch: int) -> None:  # the N+1 images alone through the engine
        for i in range(0, n_rows, batch):
            model.forward(rows[i : i + batch])

    stub = dataclasses.replace(model, forward=lambda b: torch.zeros(len(b), model.num_classes))
    for noise in ("zeros", "gaussian", "blur"):
        params = UAnalysisParams(window_fraction=0.10, order="decreasing", noise=noise, batch_size=best_b)
        at_engine = params.model_copy(update={"batch_size": None})
        agg = params.aggregation or params.attribution.aggregation
        # the machine is shared: time the limit right before each run and take ratios per repeat
        ratios: dict[str, list[float]] = {"analysis": [], "analysis_engine_batch": [], "kind_with_pngs": []}
        limits = []
        for _ in range(repeats):
            for name, fn in (
                ("analysis", lambda p=params, a=agg: ua.analyse(model, x, inputs.targets, attr, p, a)),
                ("analysis_engine_batch", lambda p=at_engine, a=agg: ua.analyse(model, x, inputs.targets, attr, p, a)),
                ("kind_with_pngs", lambda p=params: ua.run(model, inputs, p, no_progress, attribution=attr.numpy())),
            ):
                limit = median_time(lambda: limit_run(best_b), 1)
                ratios[name].append(median_time(fn, 1) / limit)
                limits.append(limit)
        # what the analysis adds to the forward passes, measured with the forward stubbed out
        overhead = median_time(lambda p=params, a=agg: ua.analyse(stub, x, inputs.targets, attr, p, a), repeats)
        out["cases"].append(
            {
                "noise": noise,
                "images": n_rows,
                "overhead_s (forward stubbed)": round(overhead, 4),
                "overhead_over_limit (median limit)": round(overhead / statistics.median(limits), 3),
                "forward_limit_s (median)": round(statistics.median(limits), 3),
                **{f"{k}_ratio (median)": round(statistics.median(v), 3) for k, v in ratios.items()},
                **{f"{k}_ratios": [round(r, 3) for r in v] for k, v in ratios.items()},
            }
        )
    return out


def _worker(args: tuple[str, dict, list[dict], int]) -> list[dict]:
    """One 'worker' process: load the model once, take its chunks (one thread)."""
    models_dir, params_json, chunks, threads = args
    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    from workers.registry import ModelCache

    model = ModelCache(Path(models_dir), ROOT / "var" / "cache", device="cpu").get("digits-cnn")
    params = USweepParams.model_validate(params_json)
    return [u_sweep.run_chunk(model, None, params, c, no_progress) for c in chunks]


def bench_sweep(cache: Any, args: argparse.Namespace) -> dict[str, Any]:
    model = cache.get("digits-cnn")
    params = USweepParams(limit=args.sweep_images, images_per_chunk=args.chunk, batch_size=args.sweep_batch)
    batch = params.batch_size or model.batch_size
    best_b, best_rate, rates = best_throughput(model, (1, 8, 8), [16, 64, 256, 1024, 4096])
    t0, cpu0 = time.perf_counter(), _cpu_s()
    if args.processes == 1:
        result = u_sweep.run(model, None, params, no_progress)
    else:
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        plan = u_sweep.plan(model, None, params)
        shares = [plan[i :: args.processes] for i in range(args.processes)]
        with ProcessPoolExecutor(args.processes, mp_context=get_context("spawn")) as pool:
            jobs = [(str(args.models_dir), params.model_dump(mode="json"), s, 1) for s in shares]
            partials = [p for part in pool.map(_worker, jobs) for p in part]
        result = u_sweep.aggregate(model, None, params, partials)
    wall, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
    s = result.summary
    rows, naive = s["evaluations"], s["evaluations_without_sharing"]

    # the plain loop: the u_analysis computation per image and configuration, attribution included
    images, labels = u_sweep.dataset(model, params, None)
    k = min(args.plain_images, len(images))
    cfgs = u_sweep.configs(params)
    methods = dict(zip(params.method_keys, params.methods, strict=True))
    wins = u_sweep.window_sizes(params, (8, 8))
    t1 = time.perf_counter()
    for j in range(k):
        for i, cfg in enumerate(cfgs):
            m = methods[cfg.method]
            p = UAnalysisParams(window_px=wins[i % len(wins)], order=cfg.order, noise=cfg.noise, seed=params.seed)  # type: ignore[arg-type]
            a = ua.compute_attribution(model, images[j : j + 1], labels[j : j + 1], m)
            ua.analyse(model, images[j : j + 1], labels[j : j + 1], a, p, m.aggregation, first_index=j)
    plain_per_image = (time.perf_counter() - t1) / k if k else float("nan")
    plain_total = plain_per_image * s["images"]
    return {
        "model": "digits-cnn",
        "engine": model.engine_name,
        "torch_threads": torch.get_num_threads(),
        "processes": args.processes,
        "images": s["images"],
        "configurations": s["configurations"],
        "batch_size": batch,
        "wall_s": round(wall, 2),
        "cpu_s (this process and its children)": round(cpu, 1),
        "load_avg_after": os.getloadavg(),
        "stage_seconds (summed over chunks)": s["stage_seconds"],
        "evaluations": rows,
        "evaluations_without_sharing": naive,
        "forward_images_per_s": {str(b): round(r) for b, r in rates.items()},
        "forward_limit_of_evaluations_s": round(rows / best_rate, 2),
        "ratio_to_forward_limit": round(wall / (rows / best_rate), 3),
        "forward_limit_without_sharing_s": round(naive / best_rate, 2),
        "plain_loop_images_timed": k,
        "plain_loop_s_per_image": round(plain_per_image, 2),
        "plain_loop_estimated_s": round(plain_total, 1),
        "speedup_over_plain_loop": round(plain_total / wall, 1),
        "accuracy": s["accuracy"],
        "u_occurrence_pct": s["u_occurrence_pct"],
        "by_hyperparameter": s["by_hyperparameter"],
        "window_px": s["window_px"],
        "_result": result,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-dir", type=Path, default=ROOT / "var" / "test-models")
    ap.add_argument("--out", type=Path, default=ROOT / "var" / "bench" / "u_analysis")
    ap.add_argument("--sweep-images", type=int, default=360)
    ap.add_argument("--chunk", type=int, default=40, help="images per chunk")
    ap.add_argument("--sweep-batch", type=int, default=None, help="forward batch of the sweep (default: engine's)")
    ap.add_argument("--processes", type=int, default=1, help="worker processes for the sweep (1 thread each if > 1)")
    ap.add_argument("--plain-images", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-lite0", action="store_true")
    ap.add_argument("--skip-sweep", action="store_true")
    args = ap.parse_args()
    cache = model_cache(args.models_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg()}
    if not args.skip_lite0:
        report["u_analysis"] = bench_lite0(cache, args.repeats)
        print(json.dumps(report["u_analysis"], indent=1))
    if not args.skip_sweep:
        sweep = bench_sweep(cache, args)
        result = sweep.pop("_result")
        report["u_sweep"] = sweep
        for a in result.artifacts:
            (args.out / a.name).write_bytes(a.data)
        print(json.dumps({k: v for k, v in sweep.items() if k != "by_hyperparameter"}, indent=1))
        print("\nU occurrence (%) per hyperparameter value")
        for hp, values in sweep["by_hyperparameter"].items():
            print(f"  {hp:7s} " + "  ".join(f"{v}: {pct:.1f}" for v, pct in values.items()))
    report["load_avg_at_end"] = os.getloadavg()
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    loads = f"start {report['load_avg_at_start']}, end {report['load_avg_at_end']}"
    print(f"\nload average: {loads}; written to {args.out}")


if __name__ == "__main__":
    main()
