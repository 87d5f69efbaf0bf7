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
  DeepLift: a reference forward per baseline, once for baselines every image shares, and a
  forward+backward per image and baseline; LRP: one forward plus one forward+backward...);
  forward counts are those Captum's own run evaluates (counted on its module). DeepLift
  rows come twice: a worker's first job, and ``(kept ref.)``, a later one, whose shared
  baselines' reference activations the worker kept (no reference forward for them);
- ``paired``: the same evaluations alone (the best batch sizes of this run, raw passes of the
  engine's forward or of eager forward+backward), timed right after our run and right after
  Captum's, the faster counting: on a machine shared with other jobs the load drifts
  between the throughput measurement at the start and a method minutes later, and the
  paired figure isolates what the method adds to its evaluations;
- wall-clock and CPU-time (``time.process_time``) ratios: with ``--intra-op 1`` the CPU time
  is what the work costs, whatever share of the cores the other processes leave;
- ``max|diff|``: max |ours - Captum| / max |Captum| (same seed; the gradient methods whose
  draws depend on the chunking, and the rule-based ones, which Captum on the unprepared model
  computes as plain gradients, differ by design).

The process re-executes itself with ``workers.allocator.ALLOCATOR_ENV`` (glibc reads the
malloc settings only at start) unless ``--default-allocator``.

    python benchmarks/attributions.py [--quick] [--model efficientnet-lite0] [--methods ig ...]
                                      [--images N] [--intra-op 1] [--batch-sizes measured-cpu]
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


def best_throughput(
    run: Any, shape: tuple[int, ...], sizes: list[int], min_time: float, rounds: int = 2
) -> tuple[float, int, float, int]:
    """(best images/s, its batch size, least CPU seconds per image, its batch size): the fastest
    of several passes per size after a warm-up, in ``rounds`` rounds over the sizes (so that a
    burst of load from other processes hits every size alike)."""
    import torch

    inputs = {bs: torch.randn((bs, *shape), generator=torch.Generator().manual_seed(bs)) for bs in sizes}
    wall = dict.fromkeys(sizes, float("inf"))
    cpu = dict.fromkeys(sizes, float("inf"))
    for bs in sizes:
        run(inputs[bs])
    for _ in range(rounds):
        for bs in sizes:
            n = 0
            t_start = time.perf_counter()
            while time.perf_counter() - t_start < min_time / rounds or n < 2:
                t0, c0 = time.perf_counter(), time.process_time()
                run(inputs[bs])
                wall[bs] = min(wall[bs], time.perf_counter() - t0)
                cpu[bs] = min(cpu[bs], time.process_time() - c0)
                n += 1
    ips, bs = max((b / wall[b], b) for b in sizes)
    least_cpu, _ = min((cpu[b] / b, b) for b in sizes)
    return ips, bs, least_cpu, min(sizes, key=lambda b: cpu[b] / b)


def raw_costs(forward: Any, grad: Any, xf: Any, xg: Any, kinds: tuple[bool, bool], cap_s: float) -> list[float]:
    """[wall, CPU s per forward image, wall, CPU s per forward+backward image] of the model
    evaluations alone, at this moment, in batches of ``len(xf)`` / ``len(xg)`` (about
    ``cap_s`` seconds of passes for each kind ``kinds`` asks for; 0 for the other)."""
    out = []
    for run, x, wanted in ((forward, xf, kinds[0]), (grad, xg, kinds[1])):
        done, w, c = 0, 0.0, 0.0
        while wanted and (w < cap_s or done < 2 * len(x)):
            t0, c0 = time.perf_counter(), time.process_time()
            run(x)
            w, c = w + time.perf_counter() - t0, c + time.process_time() - c0
            done += len(x)
        out += [w / done, c / done] if wanted else [0.0, 0.0]
    return out


def gradient_passes(p: Any, n: int, kept: bool = False) -> tuple[int, int]:
    """(forward, forward+backward) evaluations a gradient method needs for ``n`` images;
    ``kept``: DeepLift's reference activations of shared baselines are already kept (a
    worker's later jobs), so those reference forwards are not needed."""
    from workers.explain.attribution import SHARED_BASELINES

    m = p.method
    if m in ("deeplift", "deeplift_shap"):
        # two passes (workers.explain.deeplift): reference forwards (once for the shared
        # baselines, per image for the others), each image's forward+backward per baseline
        kinds = [p.baseline] if m == "deeplift" else list(p.baselines)
        shared = sum(k in SHARED_BASELINES for k in kinds)
        return (0 if kept else shared) + (len(kinds) - shared) * n, len(kinds) * n
    per = {
        "integrated_gradients": (0, p.n_steps if m == "integrated_gradients" else 0),
        "noise_tunnel": (0, getattr(p, "nt_samples", 0) * getattr(p, "n_steps", 0)),
        "gradient_shap": (0, getattr(p, "n_samples", 0)),
        "guided_gradcam": (0, 2),
        "lrp": (1, 1),
    }.get(m, (0, 0) if m in FORWARD else (0, 1))
    return per[0] * n, per[1] * n


PER_IMAGE = ("gradient_shap", "deeplift_shap", "occlusion_map", "feature_ablation", "shapley_value_sampling",
             "kernel_shap", "lime")  # fmt: skip
"""Captum gets these one image at a time (per-image baseline distributions or segmentations)."""


def captum_default(model: Any, module: Any, x: Any, t: Any, p: Any) -> Any:
    """Captum's class on the eager module with its default batching and ``p``'s method params."""
    import torch

    m = getattr(p, "method", "occlusion_map")
    if m in PER_IMAGE and len(x) > 1:
        return torch.cat([captum_default(model, module, x[i : i + 1], t[i : i + 1], p) for i in range(len(x))])
    from captum import attr as ca

    from workers.explain.attribution import input_range, make_baseline, superpixel_mask

    if m == "occlusion_map":
        from workers.explain.occlusion_map import fill_value, geometry

        occ, stride, _, _ = geometry(p, *x.shape[2:])
        fill = fill_value(p, x[0], model).expand_as(x[0])[None]
        c = x.shape[1]
        return ca.Occlusion(lambda b: module(b).softmax(1)).attribute(
            x, sliding_window_shapes=(c, occ, occ), strides=(c, stride, stride), baselines=fill, target=t
        )
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
        cam = ca.LayerGradCam(module, module.get_submodule(layer)).attribute(xs, target=t, relu_attributions=True)
        return ca.LayerAttribution.interpolate(cam, tuple(x.shape[2:]), interpolate_mode=p.interpolate_mode)
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


PHOTOS = ("chelsea", "astronaut", "coffee", "rocket", "cat", "immunohistochemistry", "retina", "hubble_deep_field")


def photos(n: int) -> list[Any]:
    """``n`` photos bundled with scikit-image (the cat first), as PIL images."""
    from PIL import Image
    from skimage import data

    out = []
    for i in range(n):
        a = getattr(data, PHOTOS[i % len(PHOTOS)])()
        if a.ndim == 2:
            a = a[:, :, None].repeat(3, 2)
        out.append(Image.fromarray(a[:, :, :3]))
    return out


def batch_desc(name: str, p: Any, model: Any, n: int) -> str:
    """The chunk the method evaluates per model call, as run (images per forward or
    forward+backward pass)."""
    grad_bs = p.batch_size or model.grad_batch_size
    fwd_bs = p.batch_size or model.batch_size
    if name in FORWARD or name == "occlusion_map":
        return f"f{fwd_bs}"
    if name in ("deeplift", "deeplift_shap"):  # reference rows + inputs per forward+backward pass
        kinds = [p.baseline] if name == "deeplift" else list(p.baselines)
        return f"{len(kinds)}+{min(n, max(1, grad_bs // len(kinds))) * len(kinds)}"
    if name in ("integrated_gradients", "noise_tunnel", "gradient_shap"):
        return str(grad_bs)
    return str(min(grad_bs, n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small steps/samples (minutes instead of tens of minutes)")
    ap.add_argument("--model", default="efficientnet-lite0")
    ap.add_argument("--methods", nargs="*", help="default: all, and occlusion_map")
    ap.add_argument("--images", type=int, default=1, help="photos per job (the cat first)")
    ap.add_argument("--models-dir", type=Path, default=ROOT / "var" / "models")
    ap.add_argument("--cache-dir", type=Path, default=None, help="engine cache (default: a temporary directory)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--intra-op", type=int, default=0, help="torch and ONNX Runtime threads (0 = cores)")
    ap.add_argument("--no-captum", action="store_true", help="skip the direct Captum runs")
    ap.add_argument("--min-time", type=float, default=2.0, help="seconds per throughput measurement and size")
    ap.add_argument(
        "--batch-sizes",
        choices=["engine", "measured", "measured-cpu"],
        default="engine",
        help="chunk sizes: the engine's (as a worker runs), or the best measured in this run (images/s, or "
        "least CPU time per image: the dependable figure on a shared machine with one thread)",
    )
    ap.add_argument("--repeat", type=int, default=1, help="runs per method and side; the fastest counts")
    ap.add_argument(
        "--paired-cap", type=float, default=4.0, help="seconds of raw passes per kind in each paired measurement"
    )
    ap.add_argument("--json", type=Path, help="write the table here too")
    ap.add_argument("--default-allocator", action="store_true", help="do not re-exec with ALLOCATOR_ENV")
    args = ap.parse_args()

    from workers.allocator import ALLOCATOR_ENV

    missing = {k: v for k, v in ALLOCATOR_ENV.items() if k not in os.environ}
    if missing and not args.default_allocator:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **missing})

    import numpy as np
    import torch

    from schemas.attribution import METHODS, AttributionParams, OcclusionMapParams
    from workers.engine import eager_grad_pass
    from workers.explain import deeplift, rules
    from workers.explain.attribution import attribute
    from workers.explain.occlusion_map import occlusion_grid
    from workers.registry import ModelCache, prepare_builtin_models, preprocess

    if args.intra_op:
        torch.set_num_threads(args.intra_op)
    prepare_builtin_models(args.models_dir, only=[args.model])
    cache_dir = args.cache_dir or Path(tempfile.mkdtemp(prefix="attr-bench-"))
    t0 = time.perf_counter()
    cache = ModelCache(args.models_dir, cache_dir, args.device, intra_op_threads=args.intra_op)
    model = cache.get(args.model)
    load_s = time.perf_counter() - t0
    x, _ = preprocess(photos(args.images), model.manifest.preprocessing)
    x = x.to(model.device)
    t = model.forward(x).argmax(1)
    shape = tuple(x.shape[1:])
    dev = model.device
    sizes = [1, 4, 8, 16, 32]
    fwd_ips, fwd_bs, fwd_cpu, fwd_cpu_bs = best_throughput(
        lambda b: model.forward(b.to(dev)), shape, sizes, args.min_time
    )
    grad = eager_grad_pass(model.module)
    grad_ips, grad_bs, grad_cpu, grad_cpu_bs = best_throughput(
        lambda b: grad(b.to(dev)), shape, sizes[:4], args.min_time
    )
    engine_sizes = (model.batch_size, model.grad_batch_size)
    if args.batch_sizes == "measured":
        model = dataclasses.replace(model, batch_size=fwd_bs, grad_batch_size=grad_bs)
    elif args.batch_sizes == "measured-cpu":
        model = dataclasses.replace(model, batch_size=fwd_cpu_bs, grad_batch_size=grad_cpu_bs)
    print(f"# {args.model} {shape} x {len(x)} on {dev} (torch threads {torch.get_num_threads()}), engine "
          f"{model.engine_name} (batch {model.batch_size}, grad batch {model.grad_batch_size}; the engine's "
          f"measurement at start: {engine_sizes[0]}, {engine_sizes[1]}), "
          f"loaded in {load_s:.1f} s; "
          f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")  # fmt: skip
    print(
        f"# best forward {fwd_ips:.1f} img/s (batch {fwd_bs}), {1000 * fwd_cpu:.1f} ms CPU/img (batch {fwd_cpu_bs}); "
        f"best forward+backward {grad_ips:.1f} img/s (batch {grad_bs}), {1000 * grad_cpu:.1f} ms CPU/img "
        f"(batch {grad_cpu_bs})"
    )
    print(f"# allocator env: {'set' if all(k in os.environ for k in ALLOCATOR_ENV) else 'glibc default'}; "
          f"{'quick' if args.quick else 'default'} params")  # fmt: skip

    prep: dict[str, float] = {}
    for family in ("guided", "deeplift"):
        t0 = time.perf_counter()
        rules.prepare(model, family, keep=model.manifest.gradcam_layer if family == "guided" else None)
        prep[family] = time.perf_counter() - t0
    t0 = time.perf_counter()
    deeplift.two_pass(model)
    prep["two_pass"] = time.perf_counter() - t0
    print(
        f"# rule-prepared copies, built once per model version: "
        f"guided {prep['guided']:.1f} s, deeplift {prep['deeplift']:.1f} s, two-pass deeplift {prep['two_pass']:.1f} s"
    )

    # what a worker has imported after its first jobs: scikit-learn (KernelSHAP's and LIME's
    # linear models) and SLIC, a one-off second or two that would fall on the first method timed
    import skimage.segmentation  # noqa: F401
    import sklearn.linear_model  # noqa: F401

    ref_fwd_bs, ref_grad_bs = (fwd_cpu_bs, grad_cpu_bs) if args.batch_sizes == "measured-cpu" else (fwd_bs, grad_bs)
    gen = torch.Generator().manual_seed(1)
    xf = torch.randn((ref_fwd_bs, *shape), generator=gen).to(dev)
    xg = torch.randn((ref_grad_bs, *shape), generator=gen).to(dev)

    def paired(kinds: tuple[bool, bool]) -> list[float]:
        return raw_costs(model.forward, grad, xf, xg, kinds, args.paired_cap / 2)

    for _ in range(2):  # warm-up: first backward passes allocate
        attribute(model, x, t, AttributionParams.model_validate({"method": "saliency"}))
    rows: list[dict[str, Any]] = []
    header = (
        f"{'method':24s} {'batch':>5s} {'evals f/fb':>11s} {'limit s':>8s} {'ours s':>8s} {'captum s':>9s} "
        f"{'ours/captum':>11s} {'ours/limit':>10s} {'cpu/limit':>9s} {'ours/paired':>11s} {'cpu/paired':>10s} "
        f"{'max|diff|':>9s}"
    )
    print(header)
    names = args.methods or [*METHODS, "occlusion_map"]
    # DeepLift's first job on a worker computes the shared baselines' reference; later ones reuse it
    entries = [(name, kept) for name in names for kept in ((False, True) if "deeplift" in name else (False,))]
    for name, kept in entries:
        p: Any
        if name == "occlusion_map":
            p = OcclusionMapParams()
        else:
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

        def ours_run(m: Any = counting_model, p: Any = p, name: str = name, kept: bool = kept) -> torch.Tensor:
            fast = deeplift.two_pass(m) if "deeplift" in name else None
            if fast is not None and not kept:
                fast.forget()  # a worker's first job
            if name == "occlusion_map":
                return torch.cat(
                    [torch.from_numpy(occlusion_grid(m, x[i], int(t[i]), p).probability) for i in range(len(x))]
                )
            return attribute(m, x, t, p)

        label = f"{name} (kept ref.)" if kept else name
        row: dict[str, Any] = {"method": label, "batch": batch_desc(name, p, model, len(x))}
        ours_out = captum_out = None
        n_fwd, n_grad = gradient_passes(p, len(x), kept) if name != "occlusion_map" else (0, 0)
        if kept:
            ours_run()  # the first job, which keeps the reference
        kinds = (n_fwd > 0 or name in FORWARD or name == "occlusion_map", n_grad > 0)
        raws = []
        try:
            best = (float("inf"), float("inf"))
            for _ in range(args.repeat):
                counted[0] = 0
                t0, c0 = time.perf_counter(), time.process_time()
                ours_out = ours_run()
                best = min(best[0], time.perf_counter() - t0), min(best[1], time.process_time() - c0)
                raws.append(paired(kinds))
            row["ours_s"], row["ours_cpu_s"] = best
            row["ours_forward_evals"] = counted[0]
        except Exception as e:  # noqa: BLE001 - the table reports it
            row["error"] = f"{type(e).__name__}: {e}"[:90]
        if not args.no_captum and "error" not in row:
            module = copy.deepcopy(model.module)
            calls = [0]
            handle = module.register_forward_pre_hook(lambda _m, a, n=calls: n.__setitem__(0, n[0] + len(a[0])))
            try:
                best = (float("inf"), float("inf"))
                for _ in range(args.repeat):
                    calls[0] = 0
                    with torch.random.fork_rng():
                        torch.manual_seed(0)
                        np.random.seed(0)
                        t0, c0 = time.perf_counter(), time.process_time()
                        captum_out = captum_default(model, module, x, t, p)
                        best = min(best[0], time.perf_counter() - t0), min(best[1], time.process_time() - c0)
                row["captum_s"], row["captum_cpu_s"] = best
                row["captum_forward_evals"] = calls[0]
            except Exception as e:  # noqa: BLE001
                row["captum_error"] = f"{type(e).__name__}"
            finally:
                handle.remove()
        if name in FORWARD or name == "occlusion_map":
            # the evaluations the algorithm needs: Captum's own count (ours when it did not run)
            n_fwd = row.get("captum_forward_evals", counted[0])
        row.update(forward_evals=n_fwd, grad_evals=n_grad, limit_s=n_fwd / fwd_ips + n_grad / grad_ips)
        row["limit_cpu_s"] = n_fwd * fwd_cpu + n_grad * grad_cpu
        if raws and "error" not in row:
            raws.append(paired(kinds))  # after Captum's run too: the fastest moment counts
            wf, cf, wg, cg = (min(r[i] for r in raws) for i in range(4))
            row["paired_s"], row["paired_cpu_s"] = n_fwd * wf + n_grad * wg, n_fwd * cf + n_grad * cg
        if ours_out is not None and captum_out is not None and name != "occlusion_map":
            ref = captum_out.detach().float().expand_as(ours_out)
            row["max_rel_diff"] = float((ours_out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        rows.append(row)
        if "error" in row:
            print(f"{label:24s} {row['error']}")
            continue
        ours, lim, cap = row["ours_s"], row["limit_s"], row.get("captum_s")
        cap_s = f"{cap:9.2f}" if cap else "        -"
        ratio = f"{ours / cap:11.2f}" if cap else "          -"
        diff = f"{row['max_rel_diff']:9.1e}" if "max_rel_diff" in row else "        -"
        print(
            f"{label:24s} {row['batch']:>5s} {n_fwd:>5d}/{n_grad:<5d} {lim:8.2f} {ours:8.2f} {cap_s} {ratio} "
            f"{ours / lim:10.2f} {row['ours_cpu_s'] / row['limit_cpu_s']:9.2f} {ours / row['paired_s']:11.2f} "
            f"{row['ours_cpu_s'] / row['paired_cpu_s']:10.2f} {diff}",
            flush=True,
        )
    print(f"# load average at the end {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    if args.json:
        summary = {"model": args.model, "engine": model.engine_name, "images": len(x), "rows": rows}
        summary.update(forward_images_per_s=fwd_ips, grad_images_per_s=grad_ips)
        summary.update(forward_cpu_s_per_image=fwd_cpu, grad_cpu_s_per_image=grad_cpu)
        summary.update(batch_size=model.batch_size, grad_batch_size=model.grad_batch_size)
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
