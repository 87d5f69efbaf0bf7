"""Forward-only attribution methods under the two thread-pool settings, as an alternating A/B.

A forward-only method alternates torch ops (building perturbed batches) with ONNX Runtime
runs; both libraries keep their own threads. This times, in one process and alternating
rounds (so drifting load from other processes hits every variant alike):

- ``spin``: the engine's ONNX Runtime threads spin between runs (``True``) or not (``False``,
  ``INSPECTOR_JOB_SPIN_WAIT``'s default);
- ``torch``: torch's threads inside the method: ``1`` (``LoadedModel.forward_only``, what
  ``attribute`` does on the ONNX engine) or the process's setting (the variant runs with
  ``forward_only`` turned off).

Prints each variant's fastest and median wall seconds, and the ratios to the first variant
(the service's settings). Runs with ``workers.allocator.ALLOCATOR_ENV``, as workers do.

    flock /tmp/bench.lock .venv/bin/python benchmarks/thread_pools.py --threads 2 --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import time
from typing import Any

from workers.allocator import ALLOCATOR_ENV


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet-lite0")
    ap.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4, help="the engine's chunk")
    ap.add_argument("--methods", nargs="+", default=["occlusion", "kernel_shap", "lime", "shapley_value_sampling"])
    ap.add_argument("--shapley-permutations", type=int, default=5, help="n_samples of Shapley sampling (25: paper)")
    args = ap.parse_args()

    import torch
    from PIL import Image
    from skimage import data

    from schemas.attribution import AttributionParams
    from schemas.settings import get_settings
    from workers.explain.attribution import attribute
    from workers.registry import ModelCache, preprocess

    torch.set_num_threads(args.threads)
    settings = get_settings().model_copy(update={"intra_op_threads": args.threads})
    models = {spin: ModelCache.from_settings(settings, spin_wait=spin).get(args.model) for spin in (False, True)}
    base = models[False]
    x, _ = preprocess([Image.fromarray(data.chelsea())], base.manifest.preprocessing)
    t = base.forward(x).argmax(1)

    variants: list[tuple[str, Any]] = []
    for spin in (False, True):
        for one_thread in (True, False):
            m = dataclasses.replace(models[spin], batch_size=args.batch_size)
            if not one_thread:
                m = _without_forward_only(m)
            variants.append((f"spin={spin!s:5s} torch={'1' if one_thread else args.threads}", m))
    print(f"# {args.model} on the cat, engine {base.engine_name}, chunk {args.batch_size}, {args.threads} threads, "
          f"{args.rounds} rounds; load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")  # fmt: skip
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for name, m in variants:
            for method in args.methods:
                extra = {"n_samples": args.shapley_permutations} if method == "shapley_value_sampling" else {}
                p = AttributionParams.model_validate({"method": method, **extra})
                t0 = time.perf_counter()
                attribute(m, x, t, p)
                times.setdefault((method, name), []).append(time.perf_counter() - t0)
    print(f"{'method':24s} {'variant':22s} {'best s':>7s} {'median s':>9s} {'best / first':>12s}")
    for method in args.methods:
        first = min(times[(method, variants[0][0])])
        for name, _ in variants:
            runs = times[(method, name)]
            print(f"{method:24s} {name:22s} {min(runs):7.2f} {statistics.median(runs):9.2f} {min(runs) / first:12.2f}")
    print(f"# load average at the end {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


def _without_forward_only(model: Any) -> Any:
    """``model`` whose ``forward_only`` leaves torch's threads alone (the variant before the fix)."""

    class Unchanged(type(model)):  # type: ignore[misc]
        def forward_only(self) -> Any:
            return contextlib.nullcontext()

    return Unchanged(**{f.name: getattr(model, f.name) for f in dataclasses.fields(model)})


if __name__ == "__main__":
    missing = {k: v for k, v in ALLOCATOR_ENV.items() if k not in os.environ}
    if missing:  # glibc reads these at process start only, as the worker does
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **missing})
    main()
