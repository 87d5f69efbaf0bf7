"""What each attribution method costs, against Captum called directly and against the limit.

For one model (default ``efficientnet-lite0`` at its 224x224 input, the cat photo) and every
method of the ``attribution`` kind, with the method's params (defaults, or small ones with
``--quick``):

- ``ours``: :func:`workers.explain.attribution.attribute` on the model as the worker loads it
  (``ModelCache``: the forward engine and the measured batch sizes), warm (models prepared
  for rule-based methods are built before timing; their one-off build time is listed apart);
- ``captum``: Captum's class called directly on the eager module with its default batching
  (``internal_batch_size=None``, ``perturbations_per_eval=1``) and the same method params;
- ``limit``: the model evaluations the method needs divided by the best throughput measured
  in this run: forward evaluations at the best images/s of ``model.forward`` over batch sizes,
  forward+backward evaluations at the best images/s of eager forward+backward to the input
  (parameter gradients off). Gradient-pass counts follow the algorithm (IG: ``n_steps``,
  DeepLift: input and baseline, LRP: one forward plus one forward+backward...); forward
  counts are those Captum actually evaluates (counted).

The process re-executes itself with ``workers.allocator.ALLOCATOR_ENV`` (glibc reads the
malloc settings only at start) unless ``--default-allocator``.

    python benchmarks/attributions.py [--quick] [--model efficientnet-lite0] [--methods ig ...]
                                      [--models-dir var/models] [--device cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

QUICK = {
    "n_steps": 8,
    "nt_samples": 2,
    "n_samples": 8,
    "n_segments": 16,
    "superpixels": "grid",
}
QUICK_PER_METHOD = {
    "shapley_value_sampling": {"n_samples": 2},
    "kernel_shap": {"n_samples": 40},
    "lime": {"n_samples": 40},
}


def best_throughput(run: Any, shape: tuple[int, ...], sizes: list[int], min_time: float) -> tuple[float, int]:
    """(best images/s, its batch size): the fastest of several passes per size after a warm-up."""
    import torch

    best = (0.0, 1)
    for bs in sizes:
        x = torch.randn((bs, *shape), generator=torch.Generator().manual_seed(bs))
        run(x)
        times: list[float] = []
        while sum(times) < min_time or len(times) < 3:
            t0 = time.perf_counter()
            run(x)
            times.append(time.perf_counter() - t0)
        best = max(best, (bs / min(times), bs))
    return best


def gradient_passes(p: Any, n: int) -> tuple[int, int]:
    """(forward, forward+backward) evaluations a gradient method needs for ``n`` images."""
    m = p.method
    per = {
        "integrated_gradients": (0, p.n_steps if m == "integrated_gradients" else 0),
        "noise_tunnel": (0, getattr(p, "nt_samples", 0) * getattr(p, "n_steps", 0)),
        "gradient_shap": (0, getattr(p, "n_samples", 0)),
        "deeplift": (0, 2),
        "deeplift_shap": (0, 2 * len(getattr(p, "baselines", []))),
        "guided_gradcam": (0, 2),
        "lrp": (1, 1),
    }.get(m, (0, 0) if m in FORWARD else (0, 1))
    return per[0] * n, per[1] * n


def captum_default(model: Any, module: Any, x: Any, t: Any, p: Any) -> Any:
    """Captum's class on the eager module with its default batching and ``p``'s method params."""
    from captum import attr as ca

    from workers.explain.attribution import input_range, make_baseline, superpixel_mask

    m = p.method
    xs = x.clone().requires_grad_(m not in FORWARD)
    base = make_baseline(getattr(p, "baseline", "zero"), x, model.manifest, getattr(p, "blur_sigma", 0.1), p.seed)
    layer = getattr(p, "layer", None) or model.manifest.gradcam_layer
    if m == "saliency":
        return ca.Saliency(module).attribute(xs, target=t)
    if m == "input_x_gradient":
        return ca.InputXGradient(module).attribute(xs, target=t)
    if m == "integrated_gradients":
        return ca.IntegratedGradients(module).attribute(xs, baselines=base, target=t, n_steps=p.n_steps)
    if m == "noise_tunnel":
        nt = ca.NoiseTunnel(ca.IntegratedGradients(module))
        stdev = p.noise_level * input_range(model.manifest)
        # nt_samples_batch_size=1: Captum's default (all samples at once) hands IG
        # nt_samples x n_steps images in one batch (500 at the defaults: tens of GB)
        return nt.attribute(
            xs, nt_type=p.nt_type, nt_samples=p.nt_samples, nt_samples_batch_size=1, stdevs=stdev,
            baselines=base, target=t, n_steps=p.n_steps,
        )  # fmt: skip
    dist = None
    if hasattr(p, "baselines"):
        dist = torch_cat(
            [make_baseline(k, x, model.manifest, p.blur_sigma, p.seed, i) for i, k in enumerate(p.baselines)]
        )
    if m == "gradient_shap":
        return ca.GradientShap(module).attribute(xs, baselines=dist, n_samples=p.n_samples, stdevs=p.stdevs, target=t)
    if m == "deeplift":
        return ca.DeepLift(module).attribute(xs, baselines=base, target=t)
    if m == "deeplift_shap":
        return ca.DeepLiftShap(module).attribute(xs, baselines=dist, target=t)
    if m == "guided_backprop":
        return ca.GuidedBackprop(module).attribute(xs, target=t)
    if m == "deconvolution":
        return ca.Deconvolution(module).attribute(xs, target=t)
    if m == "gradcam":
        return ca.LayerGradCam(module, module.get_submodule(layer)).attribute(xs, target=t, relu_attributions=True)
    if m == "guided_gradcam":
        return ca.GuidedGradCam(module, module.get_submodule(layer)).attribute(xs, target=t)
    if m == "lrp":
        return ca.LRP(module).attribute(xs, target=t)
    if m == "occlusion":
        from workers.explain.attribution import _window

        w, s = _window(p, *x.shape[2:])
        c = x.shape[1]
        return ca.Occlusion(module).attribute(
            xs, sliding_window_shapes=(c, w, w), strides=(c, s, s), baselines=base, target=t
        )
    mask = superpixel_mask(x, p)
    kw = {"baselines": base, "target": t, "feature_mask": mask}
    if m == "feature_ablation":
        return ca.FeatureAblation(module).attribute(xs, **kw)
    if m == "shapley_value_sampling":
        return ca.ShapleyValueSampling(module).attribute(xs, n_samples=p.n_samples, **kw)
    if m == "kernel_shap":
        return ca.KernelShap(module).attribute(xs, n_samples=p.n_samples, **kw)
    return ca.Lime(module).attribute(xs, n_samples=p.n_samples, **kw)


def torch_cat(tensors: list[Any]) -> Any:
    import torch

    return torch.cat(tensors)


FORWARD = ("occlusion", "feature_ablation", "shapley_value_sampling", "kernel_shap", "lime")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small steps/samples (minutes instead of tens of minutes)")
    ap.add_argument("--model", default="efficientnet-lite0")
    ap.add_argument("--methods", nargs="*", help="default: all")
    ap.add_argument("--models-dir", type=Path, default=ROOT / "var" / "models")
    ap.add_argument("--cache-dir", type=Path, default=None, help="engine cache (default: a temporary directory)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = as torch chooses)")
    ap.add_argument("--no-captum", action="store_true", help="skip the direct Captum runs")
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds per throughput measurement")
    ap.add_argument(
        "--batch-sizes",
        choices=["engine", "measured"],
        default="engine",
        help="chunk sizes: the engine's (as a worker runs) or the best measured in this run",
    )
    ap.add_argument("--repeat", type=int, default=1, help="runs per method and side; the fastest counts")
    ap.add_argument("--json", type=Path, help="write the table here too")
    ap.add_argument("--default-allocator", action="store_true", help="do not re-exec with ALLOCATOR_ENV")
    args = ap.parse_args()

    from workers.allocator import ALLOCATOR_ENV

    missing = {k: v for k, v in ALLOCATOR_ENV.items() if k not in os.environ}
    if missing and not args.default_allocator:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **missing})

    import numpy as np
    import torch
    from PIL import Image
    from skimage import data

    from schemas.attribution import METHODS, AttributionParams
    from workers.engine import eager_grad_pass
    from workers.explain import rules
    from workers.explain.attribution import attribute
    from workers.registry import ModelCache, prepare_builtin_models, preprocess

    if args.threads:
        torch.set_num_threads(args.threads)
    prepare_builtin_models(args.models_dir, only=[args.model])
    cache_dir = args.cache_dir or Path(tempfile.mkdtemp(prefix="attr-bench-"))
    t0 = time.perf_counter()
    model = ModelCache(args.models_dir, cache_dir, args.device).get(args.model)
    load_s = time.perf_counter() - t0
    x, _ = preprocess([Image.fromarray(data.chelsea())], model.manifest.preprocessing)
    x = x.to(model.device)
    t = model.forward(x).argmax(1)
    shape = tuple(x.shape[1:])
    dev = model.device
    sizes = [1, 4, 8, 16, 32]
    fwd_ips, fwd_bs = best_throughput(lambda b: model.forward(b.to(dev)), shape, sizes, args.min_time)
    grad = eager_grad_pass(model.module)
    grad_ips, grad_bs = best_throughput(lambda b: grad(b.to(dev)), shape, sizes[:4], args.min_time)
    if args.batch_sizes == "measured":
        model = dataclasses.replace(model, batch_size=fwd_bs, grad_batch_size=grad_bs)
    print(f"# {args.model} {shape} on {dev} (torch threads {torch.get_num_threads()}), engine {model.engine_name} "
          f"(batch {model.batch_size}, grad batch {model.grad_batch_size}), loaded in {load_s:.1f} s")  # fmt: skip
    print(
        f"# best forward {fwd_ips:.1f} img/s (batch {fwd_bs}); "
        f"best forward+backward {grad_ips:.1f} img/s (batch {grad_bs})"
    )
    print(f"# allocator env: {'set' if all(k in os.environ for k in ALLOCATOR_ENV) else 'glibc default'}; "
          f"{'quick' if args.quick else 'default'} params")  # fmt: skip

    prep: dict[str, float] = {}
    for family in ("guided", "deeplift"):
        t0 = time.perf_counter()
        rules.prepare(model, family, keep=model.manifest.gradcam_layer if family == "guided" else None)
        prep[family] = time.perf_counter() - t0
    print(
        f"# rule-prepared copies, built once per model version: "
        f"guided {prep['guided']:.1f} s, deeplift {prep['deeplift']:.1f} s"
    )

    for _ in range(2):  # warm-up: first backward passes allocate
        attribute(model, x, t, AttributionParams.model_validate({"method": "saliency"}))
    rows: list[dict[str, Any]] = []
    header = (
        f"{'method':24s} {'evals f/fb':>11s} {'limit s':>8s} {'ours s':>8s} {'captum s':>9s} "
        f"{'ours/captum':>11s} {'ours/limit':>10s}"
    )
    print(header)
    for name in args.methods or list(METHODS):
        fields = METHODS[name].model_fields
        kw: dict[str, Any] = {}
        if args.quick:
            kw = {k: v for k, v in QUICK.items() if k in fields} | QUICK_PER_METHOD.get(name, {})
        p = AttributionParams.model_validate({"method": name, **kw})
        counted = [0]

        def counting(b: torch.Tensor, f: Any = model.forward, n: list[int] = counted) -> torch.Tensor:
            n[0] += int(b.shape[0])
            return f(b)

        counting_model = dataclasses.replace(model, forward=counting)
        row: dict[str, Any] = {"method": name}
        try:
            times = []
            for _ in range(args.repeat):
                counted[0] = 0
                t0 = time.perf_counter()
                attribute(counting_model, x, t, p)
                times.append(time.perf_counter() - t0)
            row["ours_s"] = min(times)
        except Exception as e:  # noqa: BLE001 - the table reports it
            row["error"] = f"{type(e).__name__}: {e}"[:90]
        n_fwd, n_grad = gradient_passes(p, len(x))
        if name in FORWARD:
            n_fwd = counted[0]
        row.update(forward_evals=n_fwd, grad_evals=n_grad, limit_s=n_fwd / fwd_ips + n_grad / grad_ips)
        if not args.no_captum and "error" not in row:
            module = copy.deepcopy(model.module)
            try:
                times = []
                for _ in range(args.repeat):
                    with torch.random.fork_rng():
                        torch.manual_seed(0)
                        np.random.seed(0)
                        t0 = time.perf_counter()
                        captum_default(model, module, x, t, p)
                        times.append(time.perf_counter() - t0)
                row["captum_s"] = min(times)
            except Exception as e:  # noqa: BLE001
                row["captum_error"] = f"{type(e).__name__}"
        rows.append(row)
        if "error" in row:
            print(f"{name:24s} {row['error']}")
            continue
        ours, lim, cap = row["ours_s"], row["limit_s"], row.get("captum_s")
        cap_s = f"{cap:9.2f}" if cap else "        -"
        ratio = f"{ours / cap:11.2f}" if cap else "          -"
        print(
            f"{name:24s} {n_fwd:>5d}/{n_grad:<5d} {lim:8.2f} {ours:8.2f} {cap_s} {ratio} {ours / lim:10.2f}", flush=True
        )
    if args.json:
        summary = {"model": args.model, "engine": model.engine_name, "rows": rows}
        summary.update(forward_images_per_s=fwd_ips, grad_images_per_s=grad_ips)
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
