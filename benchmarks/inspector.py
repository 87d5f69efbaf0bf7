"""What the Model Inspector kinds cost against their model evaluations (issue 16).

Each *case* in ``CASES`` runs one job of a kind directly (its ``run``, on the model as a worker
loads it: ``ModelCache``, the forward engine, the measured chunk sizes) on prepared inputs and
returns a :class:`Timing`: its wall-clock seconds and the model evaluations it needed
(forward-only and forward+backward). The *limit* is those evaluations at the best throughput
measured in the same run (``benchmarks.attributions.best_throughput`` over batch sizes: the
engine's ``model.forward``, and eager forward+backward to the input), and the figure is
``seconds / limit`` (target: at most 1.2x). On a shared machine the load drifts between the
throughput measurement and a case minutes later, so each run is also *paired* with the same
evaluations alone, timed right after it at the best batch sizes (``benchmarks.attributions.
raw_costs``), the best of the repeats counting. Add a case by writing a function
``(bench: Bench) -> Timing`` and listing it in ``CASES``.

    flock /tmp/bench.lock python benchmarks/inspector.py [--model efficientnet-lite0]
        [--cases robustness signal] [--images 1] [--repeat 3] [--device cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")


@dataclass
class Timing:
    seconds: float
    forward: int  # forward-only model evaluations (through model.forward)
    backward: int = 0  # forward+backward evaluations (on model.module)


@dataclass
class Bench:
    """What a case gets: the loaded model (``LoadedModel``), the preprocessed inputs
    (``Inputs``, with the uploaded sizes), the cat's box in its pixels, and the arguments."""

    model: Any
    inputs: Any
    cat_box: tuple[float, float, float, float]
    args: argparse.Namespace


def _robustness(b: Bench, whole_job: bool) -> Timing:
    """Default ``robustness`` (every noise at 1-5, shuffles 2/4/8/16 per side), no attribution:
    one forward per transformed image (the original's probabilities come with the inputs).
    The computation (transforms built on the device and evaluated: the summary's
    ``runtime_s.compute``), or the whole job with its artifacts (27 PNGs, grid, bars, CSV)."""
    from schemas.inspector import RobustnessParams
    from workers.explain import robustness
    from workers.explain.base import no_progress

    t0 = time.perf_counter()
    result = robustness.run(b.model, b.inputs, RobustnessParams(), no_progress)
    seconds = time.perf_counter() - t0 if whole_job else result.summary["runtime_s"]["compute"]
    return Timing(seconds, result.summary["evaluations"]["forward"])


def _signal(b: Bench, whole_job: bool) -> Timing:
    """Default ``signal`` on the cat's face: one Grad-CAM (a forward+backward) and the forward
    evaluations of the fills, RFS and Top-K erasing; the computation or the whole job."""
    from schemas.inspector import SignalParams
    from workers.explain import signal
    from workers.explain.base import no_progress

    params = SignalParams(region={"rect": list(b.cat_box)})
    t0 = time.perf_counter()
    result = signal.run(b.model, b.inputs, params, no_progress)
    ev = result.summary["evaluations"]
    seconds = time.perf_counter() - t0 if whole_job else result.summary["runtime_s"]["compute"]
    return Timing(seconds, ev["forward"], ev["backward"])


_PHOTOS: dict[str, Any] = {}


def _photos8(b: Bench) -> Any:
    """Eight photos bundled with scikit-image (the cat first) as the model's ``Inputs``."""
    if b.model.id not in _PHOTOS:
        from benchmarks.attributions import photos
        from workers.explain.base import Inputs
        from workers.pipeline import forward_in_chunks
        from workers.registry import preprocess

        x, display = preprocess(photos(8), b.model.manifest.preprocessing)
        x = x.to(b.model.device)
        probs = forward_in_chunks(b.model, x).float().softmax(1)
        _PHOTOS[b.model.id] = Inputs(x, display, probs.argmax(1), probs)
    return _PHOTOS[b.model.id]


def _adversarial(b: Bench, attack: str, whole_job: bool) -> Timing:
    """``adversarial`` on 8 photos: the attack alone (forward+backward per image and step), or
    the whole job (the attack, the float and 8-bit images' forwards, and Grad-CAM of both
    classes before and after, counted as forward+backward evaluations each)."""
    from schemas.inspector import AdversarialParams
    from workers.explain import adversarial
    from workers.explain.base import no_progress

    inputs = _photos8(b)
    params = AdversarialParams(attack=attack, steps=10)
    t0 = time.perf_counter()
    if not whole_job:
        adversarial.attack(b.model, inputs.images, inputs.targets, params)
        seconds = time.perf_counter() - t0
        _paired(b, inputs.images, adversarial.n_steps(params), seconds)
        return Timing(seconds, 0, len(inputs) * adversarial.n_steps(params))
    result = adversarial.run(b.model, inputs, params, no_progress)
    ev = result.summary["evaluations"]
    backward = ev["attack_forward_backward"] + ev["gradcam_forward_backward"]
    return Timing(time.perf_counter() - t0, ev["forward"], backward)


def _paired(b: Bench, x: Any, steps: int, seconds: float) -> None:
    """The attack's forward+backward passes alone (same chunks), timed right after it: on a
    shared machine the load drifts between the throughput measurement and the case, and this
    isolates what the attack adds to its evaluations."""
    from workers.engine import eager_grad_pass

    grad, chunk = eager_grad_pass(b.model.module), b.model.grad_batch_size
    t0 = time.perf_counter()
    for _ in range(steps):
        for s in range(0, len(x), chunk):
            grad(x[s : s + chunk])
    raw = time.perf_counter() - t0
    print(f"  paired: {seconds:.3f} s vs {raw:.3f} s for its passes alone (chunks of {chunk}): "
          f"{seconds / raw:.2f}x", flush=True)  # fmt: skip


CASES: dict[str, Callable[[Bench], Timing]] = {
    "robustness": lambda b: _robustness(b, whole_job=False),
    "signal": lambda b: _signal(b, whole_job=False),
    "robustness-job": lambda b: _robustness(b, whole_job=True),
    "signal-job": lambda b: _signal(b, whole_job=True),
    "fgsm-8": lambda b: _adversarial(b, "fgsm", whole_job=False),
    "ifgsm10-8": lambda b: _adversarial(b, "ifgsm", whole_job=False),
    "fgsm-8-job": lambda b: _adversarial(b, "fgsm", whole_job=True),
    "ifgsm10-8-job": lambda b: _adversarial(b, "ifgsm", whole_job=True),
}
"""Named cases; each runs one job and returns its seconds and model evaluations."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet-lite0")
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--images", type=int, default=1, help="copies of the cat photo per job")
    ap.add_argument("--repeat", type=int, default=3, help="runs per case; the fastest counts")
    ap.add_argument("--models-dir", type=Path, default=ROOT / "var" / "models")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--intra-op", type=int, default=0, help="torch and ONNX Runtime threads (0 = cores)")
    ap.add_argument("--min-time", type=float, default=2.0, help="seconds per throughput measurement and size")
    ap.add_argument("--paired-cap", type=float, default=1.0, help="seconds of raw passes after each run (paired)")
    ap.add_argument("--json", type=Path, help="write the table here too")
    args = ap.parse_args()

    import numpy as np
    import torch
    from PIL import Image
    from skimage import data

    from benchmarks.attributions import best_throughput, raw_costs
    from workers.engine import eager_grad_pass
    from workers.explain.base import Inputs
    from workers.registry import ModelCache, prepare_builtin_models, preprocess

    if args.intra_op:
        torch.set_num_threads(args.intra_op)
    prepare_builtin_models(args.models_dir, only=[args.model])
    cache = ModelCache(args.models_dir, Path(tempfile.mkdtemp(prefix="inspector-bench-")), args.device,
                       intra_op_threads=args.intra_op)  # fmt: skip
    model = cache.get(args.model)
    cat = Image.fromarray(np.asarray(data.chelsea()))
    x, display = preprocess([cat] * args.images, model.manifest.preprocessing)
    x = x.to(model.device)
    probs = model.forward(x).float().softmax(1)
    inputs = Inputs(x, display, probs.argmax(1), probs, sizes=[(cat.height, cat.width)] * args.images)
    bench = Bench(model, inputs, (110.0, 60.0, 350.0, 290.0), args)

    shape, dev, sizes = tuple(x.shape[1:]), model.device, [1, 4, 8, 16, 32]
    fwd_ips, fwd_bs, _, _ = best_throughput(lambda b: model.forward(b.to(dev)), shape, sizes, args.min_time)
    grad = eager_grad_pass(model.module)
    grad_ips, grad_bs, _, _ = best_throughput(lambda b: grad(b.to(dev)), shape, sizes[:4], args.min_time)
    print(f"# {args.model} {shape} x {len(x)} on {dev}, engine {model.engine_name} (batch {model.batch_size}, "
          f"grad batch {model.grad_batch_size}); best forward {fwd_ips:.1f} img/s (batch {fwd_bs}), "
          f"forward+backward {grad_ips:.1f} img/s (batch {grad_bs}); "
          f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")  # fmt: skip
    xf = x[:1].expand(fwd_bs, -1, -1, -1).contiguous()
    xg = x[:1].expand(grad_bs, -1, -1, -1).contiguous()
    rows = []
    for name in args.cases:
        runs = []
        for _ in range(args.repeat):
            run = CASES[name](bench)
            # paired: the same evaluations alone, right after the run (the load drifts on a shared machine)
            wf, _, wg, _ = raw_costs(model.forward, grad, xf, xg, (run.forward > 0, run.backward > 0), args.paired_cap)
            runs.append((run, run.forward * wf + run.backward * wg))
        best = min(runs, key=lambda r: r[0].seconds)[0]
        limit = best.forward / fwd_ips + best.backward / grad_ips
        paired = min(r.seconds / p for r, p in runs)
        rows.append({"case": name, "seconds": best.seconds, "forward": best.forward, "backward": best.backward,
                     "limit_s": limit, "ratio": best.seconds / limit, "ratio_paired": paired})  # fmt: skip
        print(f"{name:24s} {best.seconds:7.3f} s  {best.forward:5d} fwd + {best.backward:3d} fwd+bwd  "
              f"limit {limit:7.3f} s  ratio {best.seconds / limit:5.2f}x  paired {paired:5.2f}x")  # fmt: skip
    print(f"# load average after: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
