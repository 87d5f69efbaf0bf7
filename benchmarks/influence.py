"""Influence functions on digits-cnn: time to score all 1,437 training points for one test
image, per solver, cold and warm, against captum.influence on the same model.

For each solver (exact, cg, lissa, arnoldi) and layer set (``fc``; all three layers):

- cold: empty caches (no training gradients, Jacobians or factorisations), one test image
  (after one throwaway solve, so that the process's start-up is not counted);
- warm: the next test image, caches filled by the cold run (what a second request costs);
- disk: a fresh process's view: memory caches emptied, the on-disk gradient cache kept;
- pearson: agreement with ``exact`` per layer on the warm image (min over layers).

Each time is wall clock, with the process's CPU time beside it (``*_cpu_s``: on a shared
machine the dependable figure; with ``--threads 1`` it is the work done). The load average
is printed at the start and the end.

Captum (0.9.0): ``NaiveInfluenceFunction`` (explicit Hessian) and ``ArnoldiInfluenceFunction``
on the same layers; cold = construction + one test image, warm = a second test image. Captum
treats the requested layers as one block (not layer-wise), so it is compared with our
``exact`` only for the single ``fc`` layer; its Hessian is of the summed loss, so its
``hessian_reg`` is our damping times n.

    python benchmarks/influence.py [--threads 2] [--device cpu] [--skip-captum] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LAYER_SETS = {"fc": ["fc"], "all": ["conv1", "conv2", "fc"]}


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models-dir", type=Path, default=ROOT / "var" / "test-models")
    ap.add_argument("--solvers", default="exact,cg,lissa,arnoldi",
                    help="also 'lissa_last': LiSSA's last iterate (lissa_tail=0), as Koh and Liang")
    ap.add_argument("--layer-sets", default="fc,all")
    ap.add_argument("--skip-captum", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from schemas.influence import InfluenceParams
    from workers.datasets import load_training_set
    from workers.explain import influence as inf
    from workers.models.digits import load_split
    from workers.registry import ModelCache, prepare_builtin_models

    prepare_builtin_models(args.models_dir, only=["digits-cnn"])
    cache_root = Path(tempfile.mkdtemp(prefix="influence-bench-"))
    model = ModelCache(args.models_dir, cache_root / "models", device=args.device, onnx=False).get("digits-cnn")
    train = load_training_set(model.manifest, None)
    _, _, x_te, y_te = load_split()
    dev = model.device
    images = [(torch.from_numpy(x_te[i : i + 1])[:, None].to(dev), torch.from_numpy(y_te[i : i + 1]).to(dev))
              for i in (0, 1)]
    load_start = os.getloadavg()
    print(f"device={dev} threads={torch.get_num_threads()} training points={len(train)} "
          f"load average {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}")

    def run(params: InfluenceParams, store: inf.GradientStore, i: int) -> tuple[float, float, inf.InfluenceScores]:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        res = inf.compute_influence(model, train, images[i][0], images[i][1], params, store=store)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, time.process_time() - c0, res

    # One throwaway solve first: imports, torch.func's first calls and allocator warm-up are a
    # process's start-up, not a cold cache; without it the first row measured pays for them.
    warm_up = InfluenceParams(layers=["fc"], solver="cg", hessian_samples=64)
    inf.compute_influence(model, train, images[0][0], images[0][1], warm_up, store=inf.GradientStore(None))
    inf._factors.clear()

    rows = []
    for set_name in args.layer_sets.split(","):
        layers = LAYER_SETS[set_name]
        exact_warm: np.ndarray | None = None
        for solver in args.solvers.split(","):
            # 'lissa_last': Koh and Liang's last iterate (no averaging of the recursion's tail)
            extra = {"lissa_tail": 0.0} if solver == "lissa_last" else {}
            params = InfluenceParams(layers=layers, solver=solver.removesuffix("_last"), exact_max_params=5000,
                                     **extra)
            disk = cache_root / f"{set_name}-{solver}"
            inf._factors.clear()
            store = inf.GradientStore(disk)
            cold, cold_cpu, _ = run(params, store, 0)
            warm, warm_cpu, res = run(params, store, 1)
            inf._factors.clear()
            disk_s, disk_cpu, _ = run(params, inf.GradientStore(disk), 1)
            if solver == "exact":
                exact_warm = res.scores
            agree = (min(pearson(res.scores[0, li], exact_warm[0, li]) for li in range(len(layers)))
                     if exact_warm is not None else None)
            row = {
                "layers": set_name, "impl": "ours", "solver": solver, "cold_s": cold, "warm_s": warm,
                "disk_s": disk_s, "cold_cpu_s": cold_cpu, "warm_cpu_s": warm_cpu, "disk_cpu_s": disk_cpu,
                "pearson_vs_exact": agree, "sound": res.sound(0),
                "iterations": [r.iterations[0] for r in res.reports],
                "residual": [round(r.residual[0], 6) for r in res.reports],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        if not args.skip_captum:
            rows.extend(captum_rows(model, train, images, layers, set_name, exact_warm))

    load_end = os.getloadavg()
    print()
    print(f"load average at the end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")
    print("times in s, wall (CPU)")
    print(f"{'layers':6} {'impl':7} {'solver':8} {'cold':>16} {'warm':>16} {'disk':>16} {'pearson':>8}  sound")

    def cell(r: dict, k: str) -> str:
        if r.get(f"{k}_s") is None:
            return ""
        return f"{r[f'{k}_s']:.2f} ({r[f'{k}_cpu_s']:.2f})"

    for r in rows:
        p = "" if r.get("pearson_vs_exact") is None else f"{r['pearson_vs_exact']:.4f}"
        print(f"{r['layers']:6} {r['impl']:7} {r['solver']:8} {cell(r, 'cold'):>16} {cell(r, 'warm'):>16} "
              f"{cell(r, 'disk'):>16} {p:>8}  {r.get('sound', '')}")
    if args.json:
        summary = {"device": str(dev), "threads": torch.get_num_threads(), "load_start": load_start,
                   "load_end": load_end, "rows": rows}
        args.json.write_text(json.dumps(summary, indent=1))


def captum_rows(model, train, images, layers, set_name, exact_warm) -> list[dict]:  # type: ignore[no-untyped-def]
    """captum.influence Naive (fc only: its explicit Hessian of all layers is 5,130^2 by
    autograd) and Arnoldi on a copy of the model (Captum switches requires_grad on)."""
    from captum.influence import NaiveInfluenceFunction
    from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction  # not re-exported
    from torch import nn
    from torch.utils.data import TensorDataset

    n, damping = len(train), 0.01
    dev = model.device
    data = TensorDataset(train.images(slice(0, n)).to(dev), torch.from_numpy(train.labels).to(dev))
    common = dict(checkpoint="unused", checkpoints_load_func=lambda m, path: 1.0, layers=layers,
                  loss_fn=nn.CrossEntropyLoss(reduction="none"), batch_size=n)
    impls = {"arnoldi": lambda mod: ArnoldiInfluenceFunction(
        mod, data, hessian_reg=damping * n, projection_dim=100, arnoldi_dim=200, **common)}
    if set_name == "fc":
        impls["naive"] = lambda mod: NaiveInfluenceFunction(
            mod, data, hessian_reg=damping * n, projection_dim=330, hessian_inverse_tol=1e-12, **common)
    out = []
    for name, build in impls.items():
        module = copy.deepcopy(model.module)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                fn = build(module)
                fn.influence(images[0])
                cold, cold_cpu = time.perf_counter() - t0, time.process_time() - c0
                t0, c0 = time.perf_counter(), time.process_time()
                scores = fn.influence(images[1]).cpu().numpy() * n
                warm, warm_cpu = time.perf_counter() - t0, time.process_time() - c0
            except Exception as e:  # report, do not hide, what Captum cannot do here
                print(f"captum {name} on {set_name}: {type(e).__name__}: {e}")
                continue
        agree = pearson(scores[0], exact_warm[0, 0]) if set_name == "fc" and exact_warm is not None else None
        row = {"layers": set_name, "impl": "captum", "solver": name, "cold_s": cold, "warm_s": warm,
               "cold_cpu_s": cold_cpu, "warm_cpu_s": warm_cpu, "disk_s": None, "pearson_vs_exact": agree}
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


if __name__ == "__main__":
    main()
