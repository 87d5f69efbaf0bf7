"""What fill-in-the-blanks costs against its limit, and the runs docs/fill_blanks.md reports.

Cases (each the kind's own code on the model as the worker loads it, ``ModelCache``):

- ``fill_blanks`` random masking on digits-cnn (``--digits-images`` test digits, ``--min-kept``
  kept draws each: the paper's 10,000 by default) and on efficientnet-lite0 (the cat photo,
  ``--lite0-min-kept``, with ``EXAMPLES["random"]``'s 16 px patches and mean fill: with the
  defaults no draw is kept), PNGs included;
- ``fill_blanks_consistency`` on digits-cnn's first ``--consistency-images`` test digits,
  both maskings (``--consistency-min-kept``), in one process.

The *limit* of a case is its model evaluations at the best throughput measured in this run:
forward+backward passes to the input (``workers.engine.eager_grad_pass``, eager PyTorch) at
the best of ``--grad-batches``, plus the forward-only classifications of prototypes and
controls at the best of the forward engine. ``paired`` divides by the same evaluations timed
right after the case (raw passes at the best batch size): on a machine shared with other
jobs the load drifts between the throughput measurement and a case minutes later.

    python benchmarks/fill_blanks.py [--digits-images 2] [--min-kept 10000] [--lite0-min-kept 200]
                                     [--consistency-images 8] [--consistency-min-kept 2000]
                                     [--skip-lite0] [--json out.json]
    python benchmarks/fill_blanks.py --table1 docs/fill_blanks/table1 [--processes 4]  # Table 1, 360 digits
    python benchmarks/fill_blanks.py --example docs/fill_blanks/lite0   # efficientnet-lite0, chelsea
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

import torch  # noqa: E402

from benchmarks.attributions import best_throughput  # noqa: E402
from benchmarks.u_analysis import model_cache  # noqa: E402
from schemas.fill_blanks import FillBlanksConsistencyParams, FillBlanksParams  # noqa: E402
from workers.engine import eager_grad_pass  # noqa: E402
from workers.explain import fill_blanks, fill_blanks_consistency  # noqa: E402
from workers.explain.base import Inputs, KindResult, LoadedModel, no_progress  # noqa: E402


def digits_inputs(model: LoadedModel, n: int) -> Inputs:
    from workers.models.digits import load_split

    _, _, x, _ = load_split()
    xs = torch.from_numpy(x[:n])[:, None]
    probs = model.forward(xs).softmax(1)
    display = [(xi[0].numpy()[..., None].repeat(3, 2) * 255).astype("uint8") for xi in xs]
    return Inputs(xs, display, probs.argmax(1), probs)


def chelsea_inputs(model: LoadedModel) -> Inputs:
    from PIL import Image
    from skimage import data

    from workers.registry import preprocess

    x, display = preprocess([Image.fromarray(data.chelsea())], model.manifest.preprocessing)
    probs = model.forward(x).softmax(1)
    return Inputs(x, display, probs.argmax(1), probs)


class Limit:
    """Best throughputs of one model in this run, and raw passes timed on demand."""

    def __init__(self, model: LoadedModel, grad_batches: list[int], fwd_batches: list[int], seconds: float) -> None:
        self.model = model
        shape = (1 if model.manifest.preprocessing.mode == "L" else 3, *model.manifest.preprocessing.size)
        self.grad = eager_grad_pass(model.module)
        self.grad_ips, self.grad_bs, _, _ = best_throughput(self.grad, shape, grad_batches, seconds)
        with model.forward_only():
            self.fwd_ips, self.fwd_bs, _, _ = best_throughput(model.forward, shape, fwd_batches, seconds / 2)
        self.xg = torch.randn(self.grad_bs, *shape)

    def seconds(self, grad_evals: int, fwd_evals: int) -> float:
        return grad_evals / self.grad_ips + fwd_evals / self.fwd_ips

    def paired_grad_s(self, seconds: float = 3.0) -> float:
        """Seconds per forward+backward image now (raw passes at the best batch size)."""
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or done < 2 * self.grad_bs:
            self.grad(self.xg)
            done += self.grad_bs
        return (time.perf_counter() - t0) / done

    def describe(self) -> dict[str, Any]:
        return {
            "grad_images_per_s": round(self.grad_ips, 1),
            "grad_best_batch": self.grad_bs,
            "forward_images_per_s": round(self.fwd_ips, 1),
            "forward_best_batch": self.fwd_bs,
        }


def case(
    name: str, limit: Limit, fn: Callable[[], KindResult], counts: Callable[[KindResult], tuple[int, int]]
) -> dict[str, Any]:  # noqa: E501
    load = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    result = fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    grad_evals, fwd_evals = counts(result)
    bound = limit.seconds(grad_evals, fwd_evals)
    paired = grad_evals * limit.paired_grad_s() + fwd_evals / limit.fwd_ips
    row = {
        "case": name,
        "grad_evaluations": grad_evals,
        "forward_evaluations": fwd_evals,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "limit_s": round(bound, 2),
        "ratio_to_limit": round(wall / bound, 3),
        "paired_limit_s": round(paired, 2),
        "ratio_to_paired": round(wall / paired, 3),
        "load_1min": round(load, 2),
    }
    print(json.dumps(row), flush=True)
    return row


def fill_counts(result: KindResult) -> tuple[int, int]:
    s = result.summary
    return s["evaluations"], sum(img["prototype"] is not None for img in s["images"])


def consistency_counts(result: KindResult) -> tuple[int, int]:
    s = result.summary
    return s["evaluations"], s["images"] + sum(3 * t["prototypes"] for t in s["table1"].values())


def write(result: KindResult, out: Path, extra: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for a in result.artifacts:
        (out / a.name).write_bytes(a.data)
    (out / "summary.json").write_text(json.dumps({**result.summary, **extra}, indent=1))


def progress_printer() -> Callable[[int, int, str], None]:
    last = [0.0]

    def report(done: int, total: int, stage: str) -> None:
        if time.monotonic() - last[0] > 30:
            last[0] = time.monotonic()
            print(time.strftime("%H:%M:%S"), done, total, stage, os.getloadavg(), flush=True)

    return report


TABLE1 = {"ablation": {"mask_ratios": [0.25, 0.5, 0.75], "patch_sizes": [1, 2, 4]}, "images_per_chunk": 20}


def _chunk_process(args: tuple[str, dict[str, Any], dict[str, Any], str]) -> str:
    """One process (one thread): one chunk of the Table 1 job, its partial written to a file."""
    models_dir, params_json, chunk, path = args
    torch.set_num_threads(1)
    cache = model_cache(Path(models_dir))
    params = FillBlanksConsistencyParams.model_validate(params_json)
    partial = fill_blanks_consistency.run_chunk(cache.get("digits-cnn"), None, params, chunk, no_progress)
    Path(path).write_text(json.dumps(partial))
    print(time.strftime("%H:%M:%S"), "chunk", chunk["chunk"], "done", os.getloadavg(), flush=True)
    return path


def table1(cache: Any, out: Path, models_dir: Path, processes: int) -> None:
    """The whole test split (360 digits), both maskings, the paper's knobs, Fig. 4's ablation;
    chunks in ``processes`` processes (as that many one-thread workers would share them), each
    partial kept in ``out/partials`` (a rerun computes only the missing ones)."""
    from multiprocessing import get_context

    model = cache.get("digits-cnn")
    params = FillBlanksConsistencyParams.model_validate(TABLE1)
    chunks = fill_blanks_consistency.plan(model, None, params)
    (out / "partials").mkdir(parents=True, exist_ok=True)
    paths = [out / "partials" / f"{c['chunk']}.json" for c in chunks]
    todo = [
        (str(models_dir), params.model_dump(mode="json"), c, str(p))
        for c, p in zip(chunks, paths, strict=True)
        if not p.exists()
    ]
    todo.sort(key=lambda t: -int(t[2].get("ablation", 0)))  # the longest chunk first
    load, t0 = os.getloadavg(), time.perf_counter()
    with get_context("spawn").Pool(processes) as pool:
        for _ in pool.imap_unordered(_chunk_process, todo):
            pass
    partials = [json.loads(p.read_text()) for p in paths]
    result = fill_blanks_consistency.aggregate(model, None, params, partials)
    extra = {
        "wall_s": round(time.perf_counter() - t0, 1),
        "processes": processes,
        "chunks_run": len(todo),
        "load_avg_start": load,
        "load_avg_end": os.getloadavg(),
    }
    write(result, out, {**extra, "params": params.model_dump(mode="json")})
    print(json.dumps(result.summary["table1"], indent=1), extra)


EXAMPLES: dict[str, dict[str, Any]] = {
    # the defaults: 25% of 2 px patches set to black; every such draw reads "Persian cat"
    "defaults": {"masking": "random", "min_kept": 200, "max_masks": 400},
    # the paper's 14 x 14 patch grid (28 px MNIST, 2 px patches) on 224 px: 16 px patches; the
    # fill is the normalisation mean, i.e. the mask's product with the *normalised* input
    "random": {"masking": "random", "min_kept": 200, "max_masks": 2000, "patch_size": 16, "fill": "dataset_mean"},
    "progressive": {"masking": "progressive", "patch_size": 16, "fill": "dataset_mean"},
}


def example(cache: Any, out: Path) -> None:
    """efficientnet-lite0 on the cat photo: ``EXAMPLES`` (200 kept draws for random masking)."""
    model = cache.get("efficientnet-lite0")
    inputs = chelsea_inputs(model)
    for name, knobs in EXAMPLES.items():
        params = FillBlanksParams.model_validate(knobs)
        t0 = time.perf_counter()
        result = fill_blanks.run(model, inputs, params, progress_printer())
        extra = {"wall_s": round(time.perf_counter() - t0, 1), "load_avg": os.getloadavg()}
        write(result, out / name, {**extra, "params": params.model_dump(mode="json")})
        print(name, json.dumps(result.summary["images"][0])[:400], extra, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-dir", type=Path, default=ROOT / "var" / "models")
    ap.add_argument("--digits-images", type=int, default=2)
    ap.add_argument("--min-kept", type=int, default=10_000)
    ap.add_argument("--lite0-min-kept", type=int, default=200)
    ap.add_argument("--consistency-images", type=int, default=8)
    ap.add_argument("--consistency-min-kept", type=int, default=2000)
    ap.add_argument("--grad-batches", type=int, nargs="+", default=[64, 256, 1024, 4096])
    ap.add_argument("--lite0-grad-batches", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    ap.add_argument("--measure-s", type=float, default=6.0, help="seconds of passes per throughput measurement")
    ap.add_argument("--skip-lite0", action="store_true")
    ap.add_argument("--table1", type=Path, help="run Table 1 on the whole test split, write its files here")
    ap.add_argument("--example", type=Path, help="run the efficientnet-lite0 example, write its files here")
    ap.add_argument("--processes", type=int, default=1, help="--table1: chunks in this many processes")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    cache = model_cache(args.models_dir)
    if args.table1 or args.example:
        if args.table1:
            table1(cache, args.table1, args.models_dir, args.processes)
        if args.example:
            example(cache, args.example)
        return

    report: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_avg_start": os.getloadavg(),
    }
    digits = cache.get("digits-cnn")
    limit = Limit(digits, args.grad_batches, [16, 64, 256, 1024], args.measure_s)
    report["digits-cnn"] = limit.describe()
    inputs = digits_inputs(digits, args.digits_images)
    params = FillBlanksParams(min_kept=args.min_kept, max_masks=4 * args.min_kept)
    rows = [
        case(
            "fill_blanks random, digits-cnn",
            limit,
            lambda: fill_blanks.run(digits, inputs, params, no_progress),
            fill_counts,
        )
    ]
    cparams = FillBlanksConsistencyParams(
        limit=args.consistency_images, min_kept=args.consistency_min_kept, max_masks=4 * args.consistency_min_kept
    )
    rows.append(
        case(
            "fill_blanks_consistency (both maskings), digits-cnn",
            limit,
            lambda: fill_blanks_consistency.run(digits, None, cparams, no_progress),
            consistency_counts,
        )
    )
    if not args.skip_lite0:
        lite0 = cache.get("efficientnet-lite0")
        lim = Limit(lite0, args.lite0_grad_batches, [1, 4, 8, 16, 32], args.measure_s)
        report["efficientnet-lite0"] = lim.describe()
        chelsea = chelsea_inputs(lite0)
        lp = FillBlanksParams.model_validate({**EXAMPLES["random"], "min_kept": args.lite0_min_kept})
        rows.append(
            case(
                "fill_blanks random, efficientnet-lite0",
                lim,
                lambda: fill_blanks.run(lite0, chelsea, lp, no_progress),
                fill_counts,
            )
        )
    report["cases"] = rows
    report["load_avg_end"] = os.getloadavg()
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
