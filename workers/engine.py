"""Forward engine: the fastest way to evaluate a model forward-only, checked against eager.

DESIGN.md rules 6 and 7. :func:`build_engine` runs once per model version and device:

1. **Export** the module to ONNX with a dynamic batch axis, once per model version and
   library versions (:func:`library_key`), to ``<cache_dir>/onnx/<model_id>-<version>-<libs>.onnx``.
   The TorchScript tracer (``torch.onnx.export(dynamo=False)``) goes first; the ``torch.export``-based exporter
   (``dynamo=True``) is the fallback. Written to a temporary file and renamed, under a file
   lock, so workers starting together export once and never see half a file.
2. **Load** it with ONNX Runtime: the CPU provider with ``intra_op_threads`` threads (0 = the
   number of cores), or the CUDA provider when the model is on a GPU and ONNX Runtime has it.
3. **Check** it against eager PyTorch on probe batches (seeded standard-normal inputs, sizes
   1, 3 and the chosen batch size): every logit within :data:`TOLERANCE` (CPU) or
   :data:`CUDA_TOLERANCE` times ``max(1, max |eager logit|)`` and the same argmax (rows whose
   top-2 eager margin is within the tolerance excepted: such a tie can flip either way).
4. **Measure** the batch sizes: images/s of the engine's forward and of eager
   forward+backward to the input (parameter gradients off) at a few candidate sizes
   (:data:`CPU_CANDIDATES`, :data:`GPU_CANDIDATES`), and pick the smallest within 5% of the
   best. The result is stored beside the ONNX file (``<model_id>-<version>-<libs>.json``, keyed by
   device and thread counts) so the next worker start only loads. The file's SHA-256 is
   stored with a device's entry once it has passed its check there: a start on that device
   that finds the same bytes does not check them again (the eager passes cost about half a
   second of every start on 2 cores); other bytes under that name are checked again first.

When export, load or check fails the engine is eager PyTorch (``Engine.name == "eager"``),
and why is logged and kept in ``Engine.reason`` and in the JSON file (so a failed export is
not retried at every start; delete the JSON file to retry, both files to re-export).

Measured on the 2-core CPU and the allocator settings of :data:`ALLOCATOR_ENV`: see
docs/performance.md (``benchmarks/engine.py``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from schemas.manifests import ModelEntry, file_sha256
from workers.allocator import ALLOCATOR_ENV  # noqa: F401  (re-exported for launchers)
from workers.budget import JOB_STOPS
from workers.explain.base import ForwardFn

log = logging.getLogger(__name__)


TOLERANCE = 1e-4
"""Largest |ONNX - eager| logit difference accepted on CPU, times ``max(1, max |logit|)``."""
CUDA_TOLERANCE = 5e-3
"""The same on a GPU, where cuDNN and ONNX Runtime may use TF32 (10-bit mantissa) convolutions."""

CPU_CANDIDATES = (1, 4, 8, 16, 32, 64)
GPU_CANDIDATES = (8, 16, 32, 64, 128, 256, 512, 1024)
CPU_GRAD_CANDIDATES = (1, 4, 8, 16, 32)  # forward+backward at 64 costs seconds per pass here
EXPORTERS = ("torchscript", "dynamo")
OPSET = 18
PROBE_SEED = 0
NEAR_BEST = 0.95  # the smallest batch within 5% of the best: less memory, finer progress

_INPUT, _OUTPUT = "input", "logits"


@dataclass
class Engine:
    """A model's forward-only engine and its measured chunk sizes.

    ``forward``: ``(N, C, H, W)`` tensor on the model's device -> ``(N, K)`` float32 logits on
    the same device, without autograd. ``batch_size``: chunk size for ``forward``;
    ``grad_batch_size``: chunk size for eager forward+backward to the input. ``reason``: why
    the engine is eager when ONNX was asked for. ``forward_images_per_s`` and
    ``grad_images_per_s``: the measurements behind the two sizes (batch size -> images/s).
    ``predict_forward``: the same model in a second ONNX Runtime session with the predict
    batcher's own threads and spin mode (None: predicts share ``forward``).
    """

    name: str
    forward: ForwardFn
    batch_size: int
    grad_batch_size: int
    reason: str = ""
    forward_images_per_s: dict[int, float] = field(default_factory=dict)
    grad_images_per_s: dict[int, float] = field(default_factory=dict)
    engine_s: float = 0.0  # seconds to export (or load) and check the engine
    measure_s: float = 0.0  # seconds to measure the batch sizes (0 when they came from the cache)
    predict_forward: ForwardFn | None = None


class EngineUnavailable(Exception):
    """The ONNX engine cannot serve this model (export, load or check failed)."""


def eager_forward(module: nn.Module) -> ForwardFn:
    """Eager PyTorch forward without autograd (``no_grad``, so callers may edit the result)."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(x)

    return forward


def eager_grad_pass(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Forward+backward to the input, as gradient methods run it: ``(N, C, H, W)`` -> its
    gradient of the summed class-0 logits (parameters stay without gradients)."""

    def run(x: torch.Tensor) -> torch.Tensor:
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(module(x)[:, 0].sum(), x)
        return grad

    return run


def input_shape(entry: ModelEntry) -> tuple[int, int, int]:
    """``(C, H, W)`` of the model's input, from its manifest's preprocessing."""
    pre = entry.manifest.preprocessing
    return (1 if pre.mode == "L" else 3, *pre.size)


def probe_batch(shape: tuple[int, int, int], n: int, device: torch.device) -> torch.Tensor:
    """``(n, C, H, W)`` standard-normal inputs from :data:`PROBE_SEED` (the same on every run)."""
    gen = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randn((n, *shape), generator=gen).to(device)


# --------------------------------------------------------------------------- check


def check_against_eager(
    reference: ForwardFn, candidate: ForwardFn, probe: torch.Tensor, sizes: Sequence[int], tol: float
) -> float:
    """Compare ``candidate`` with ``reference`` on ``probe[:n]`` for each ``n`` in ``sizes``.

    Returns the largest |logit difference|; raises :class:`EngineUnavailable` when a shape
    differs, a difference exceeds ``tol * max(1, max |reference logit|)``, or the argmax
    differs on a row whose reference top-2 margin exceeds that bound.
    """
    worst = 0.0
    for n in sizes:
        x = probe[:n]
        ref = reference(x).float()
        try:
            out = candidate(x).float()
        except JOB_STOPS:
            raise  # the job's time or memory budget, raised into it while the model loads
        except Exception as e:  # an ONNX Runtime shape error says the export baked in a batch size
            raise EngineUnavailable(f"batch of {n}: {type(e).__name__}: {e}") from e
        if out.shape != ref.shape:
            raise EngineUnavailable(f"batch of {n}: logits {tuple(out.shape)}, eager {tuple(ref.shape)}")
        bound = tol * max(1.0, float(ref.abs().max()))
        diff = float((out.to(ref.device) - ref).abs().max())
        worst = max(worst, diff)
        if not diff <= bound:  # also catches NaN
            raise EngineUnavailable(f"batch of {n}: max |logit diff| {diff:.3g} > {bound:.3g}")
        top2 = ref.topk(min(2, ref.shape[1]), dim=1).values
        decisive = (top2[:, 0] - top2[:, -1]) > bound
        flipped = (out.to(ref.device).argmax(1) != ref.argmax(1)) & decisive
        if bool(flipped.any()):
            raise EngineUnavailable(f"batch of {n}: argmax differs on {int(flipped.sum())} rows")
    return worst


# --------------------------------------------------------------------------- batch sizes


def pick_batch_size(images_per_s: dict[int, float]) -> int:
    """The smallest batch size whose throughput is within 5% of the best measured."""
    best = max(images_per_s.values())
    return min(bs for bs, ips in images_per_s.items() if ips >= NEAR_BEST * best)


def measure_throughput(
    run: Callable[[torch.Tensor], object],
    shape: tuple[int, int, int],
    candidates: Sequence[int],
    device: torch.device,
    budget_s: float,
    rounds: int = 3,
    min_pass_s: float = 0.002,
    always: int = 3,
) -> dict[int, float]:
    """Images/s of ``run`` on ``(bs, *shape)`` inputs, ``bs`` in ``candidates``.

    First round, in ascending order: a warm-up pass per size (a new shape allocates and
    builds kernels), then one timed pass. It stops past the peak (below 75% of the best so
    far), before a size whose predicted cost would overrun ``budget_s`` seconds (from the
    ``always + 1``-th size on: the smallest ``always`` sizes are measured whatever the load,
    so that a busy machine, on which one pass of 4 already overruns the budget, does not
    leave batch 1 as the only candidate), or when the GPU runs out of memory. Then up to
    ``rounds - 1`` more rounds over the sizes kept, while the budget lasts; each size's
    figure is its fastest pass. Rounds rather than one block per size, so that a burst of
    load from other processes slows every size alike. A pass repeats ``run`` until it lasts
    ``min_pass_s`` (cheap models), and counts per call.
    """
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(PROBE_SEED)
    inputs: dict[int, tuple[torch.Tensor, int]] = {}  # size -> (input, calls per pass)
    best: dict[int, float] = {}  # size -> fastest seconds per call

    def timed(bs: int) -> float:
        x, calls = inputs[bs]
        t0 = time.perf_counter()
        for _ in range(calls):
            run(x)
        sync()
        return (time.perf_counter() - t0) / calls

    start = time.perf_counter()
    for i, bs in enumerate(sorted(candidates)):
        if best and i >= always:
            per_call = bs * max(t / b for b, t in best.items())  # from the slowest per image so far
            if 2 * per_call > budget_s - (time.perf_counter() - start):
                break
        x = torch.randn((bs, *shape), generator=gen).to(device)
        try:
            t0 = time.perf_counter()
            run(x)
            sync()
            warm = time.perf_counter() - t0
            inputs[bs] = (x, max(1, min(1000, int(min_pass_s / max(warm, 1e-6)))))
            best[bs] = timed(bs)
        except torch.OutOfMemoryError:
            inputs.pop(bs, None)
            torch.cuda.empty_cache()
            break
        if bs / best[bs] < 0.75 * max(b / t for b, t in best.items()):
            break
    for _ in range(rounds - 1):
        cost = sum(t * inputs[bs][1] for bs, t in best.items())
        if cost > budget_s - (time.perf_counter() - start):
            break
        for bs in best:
            best[bs] = min(best[bs], timed(bs))
    return {bs: bs / t for bs, t in best.items()}


# --------------------------------------------------------------------------- ONNX


def export_onnx(module: nn.Module, example: torch.Tensor, path: Path, exporter: str) -> None:
    """Write ``module`` as ONNX (input ``input``, output ``logits``, dynamic batch axis)."""
    with warnings.catch_warnings():
        # The tracer warns about every python value it freezes; the probe check decides.
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(
                module,
                (example,),
                str(path),
                dynamo=False,
                input_names=[_INPUT],
                output_names=[_OUTPUT],
                dynamic_axes={_INPUT: {0: "batch"}, _OUTPUT: {0: "batch"}},
                opset_version=OPSET,
            )
        elif exporter == "dynamo":
            with contextlib.redirect_stdout(None):  # it prints its progress
                torch.onnx.export(
                    module,
                    (example,),
                    str(path),
                    dynamo=True,
                    input_names=[_INPUT],
                    output_names=[_OUTPUT],
                    dynamic_shapes=({0: torch.export.Dim("batch")},),
                    opset_version=OPSET,
                    external_data=False,
                    verbose=False,
                )
        else:
            raise ValueError(f"unknown exporter {exporter!r}")


def ort_forward(path: Path, device: torch.device, threads: int, spin_wait: bool = True) -> ForwardFn:
    """An ONNX Runtime session of ``path`` as a :data:`ForwardFn` on ``device``.

    ``spin_wait``: the intra-op threads spin between runs (ONNX Runtime's default: a few
    percent more throughput for back-to-back batches, at the price of busy cores between
    them); off, they sleep and leave the cores to other threads and processes."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_wait else "0")
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    # No CPU arena: ONNX Runtime's arena keeps the activations of the largest batch it ever
    # ran for the life of the session (efficientnet-lite0, batch 32: +340 MB that no trim
    # returns). Plain malloc gives them back to glibc, whose settings (workers.allocator)
    # keep them for the next batch within a job, and the worker trims after each job.
    so.enable_cpu_mem_arena = False
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise EngineUnavailable("this onnxruntime has no CUDA provider (install onnxruntime-gpu)")
        index = device.index if device.index is not None else torch.cuda.current_device()
        sess = ort.InferenceSession(
            str(path), so, providers=[("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        )
        if sess.get_providers()[0] != "CUDAExecutionProvider":
            raise EngineUnavailable("onnxruntime could not start its CUDA provider")
        return _cuda_forward(sess, device, index)
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def forward(x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().to(torch.float32).contiguous().numpy()
        return torch.from_numpy(sess.run([_OUTPUT], {_INPUT: arr})[0])

    return forward


def _cuda_forward(sess: Any, device: torch.device, index: int) -> ForwardFn:
    """Run on the GPU tensors in place (I/O binding): no copy through host memory."""
    k = sess.get_outputs()[0].shape[1]
    if not isinstance(k, int):
        raise EngineUnavailable(f"the ONNX output has no fixed number of classes ({k!r})")

    def forward(x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to(device=device, dtype=torch.float32).contiguous()
        out = torch.empty((x.shape[0], k), device=device, dtype=torch.float32)
        binding = sess.io_binding()
        binding.bind_input(_INPUT, "cuda", index, np.float32, tuple(x.shape), x.data_ptr())
        binding.bind_output(_OUTPUT, "cuda", index, np.float32, tuple(out.shape), out.data_ptr())
        torch.cuda.current_stream(device).synchronize()  # x is written before ORT's stream reads it
        sess.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return out

    return forward


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path``: one process (or thread) at a time exports and measures."""
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _read_meta(path: Path) -> dict[str, Any]:
    """The JSON record beside the ONNX file; empty when missing or unreadable."""
    if not path.exists():
        return {}
    try:
        meta = json.loads(path.read_text())
        return meta if isinstance(meta, dict) else {}
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable %s: %s", path, e)
        return {}


def library_key() -> str:
    """Short hash of the versions that make an export or a measurement stale: torch, the ONNX
    exporters and ONNX Runtime, and :data:`OPSET`. Part of every cache file name, so a library
    upgrade starts a new entry instead of reusing one it may not load or time alike."""
    import hashlib
    from importlib import metadata

    versions = []
    for dist in ("torch", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu"):
        try:
            versions.append(f"{dist}={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{dist}=-")
    return hashlib.sha256(f"{';'.join(versions)};opset={OPSET}".encode()).hexdigest()[:10]


def _device_key(device: torch.device, threads: int, use_onnx: bool) -> str:
    if device.type == "cuda":
        where = f"cuda:{torch.cuda.get_device_name(device)}"
    else:
        where = f"cpu:ort{threads}:torch{torch.get_num_threads()}"
    return f"{where}/{'onnx' if use_onnx else 'eager'}"


def _onnx_engine(
    module: nn.Module,
    eager: ForwardFn,
    path: Path,
    shape: tuple[int, int, int],
    device: torch.device,
    threads: int,
    exporters: Sequence[str],
    tol: float,
    spin_wait: bool = True,
    trusted: bool = False,
) -> tuple[ForwardFn, str]:
    """Load (exporting first when missing) and check the ONNX engine; returns (forward,
    exporter that made the file or "" if it existed). ``trusted``: the existing file passed
    its check before (same bytes) and is not checked again. Raises :class:`EngineUnavailable`."""
    if device.type == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise EngineUnavailable("this onnxruntime has no CUDA provider (install onnxruntime-gpu)")
    probe = probe_batch(shape, 3, device)
    if path.exists():
        try:
            fwd = ort_forward(path, device, threads, spin_wait)
        except JOB_STOPS:
            raise
        except Exception as e:  # a file ONNX Runtime cannot load: serve eager, say why
            raise EngineUnavailable(f"loading {path.name}: {type(e).__name__}: {e}") from e
        if not trusted:
            check_against_eager(eager, fwd, probe, (1, 3), tol)
        return fwd, ""
    errors = []
    for exporter in exporters:
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            t0 = time.perf_counter()
            export_onnx(module, probe[:2], tmp, exporter)
            fwd = ort_forward(tmp, device, threads, spin_wait)
            diff = check_against_eager(eager, fwd, probe, (1, 3), tol)
            tmp.replace(path)
            log.info(
                "exported %s with %s in %.1f s (max |diff| %.2g)", path.name, exporter, time.perf_counter() - t0, diff
            )
            return fwd, exporter
        except JOB_STOPS:
            raise  # a budget ends the job: no other exporter is tried in its time
        except Exception as e:  # exporters raise many types; each is reported, eager serves
            errors.append(f"{exporter}: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}")
        finally:
            tmp.unlink(missing_ok=True)
    raise EngineUnavailable("; ".join(errors) or "no exporter")


# --------------------------------------------------------------------------- engine


def _measure(
    module: nn.Module,
    eager: ForwardFn,
    onnx: tuple[str, ForwardFn, str],
    shape: tuple[int, int, int],
    device: torch.device,
    tol: float,
    budget_s: float,
) -> dict[str, Any]:
    """Measure and pick both batch sizes (checking the ONNX engine at its pick too); the
    record stored in the JSON file."""
    name, forward, reason = onnx
    gpu = device.type == "cuda"
    fwd_ips = measure_throughput(forward, shape, GPU_CANDIDATES if gpu else CPU_CANDIDATES, device, budget_s)
    batch_size = pick_batch_size(fwd_ips)
    if name != "eager" and batch_size > 3:
        try:
            check_against_eager(eager, forward, probe_batch(shape, batch_size, device), (batch_size,), tol)
        except EngineUnavailable as e:
            name, forward, reason = "eager", eager, str(e)
            fwd_ips = measure_throughput(forward, shape, GPU_CANDIDATES if gpu else CPU_CANDIDATES, device, budget_s)
            batch_size = pick_batch_size(fwd_ips)
    grad_candidates = GPU_CANDIDATES if gpu else CPU_GRAD_CANDIDATES
    grad_ips = measure_throughput(eager_grad_pass(module), shape, grad_candidates, device, budget_s)
    log.info(
        "batch sizes on %s: %s forward %s, eager forward+backward %s (images/s)",
        device,
        name,
        {k: round(v) for k, v in fwd_ips.items()},
        {k: round(v) for k, v in grad_ips.items()},
    )
    return {
        "engine": name,
        "reason": reason,
        "batch_size": batch_size,
        "grad_batch_size": pick_batch_size(grad_ips),
        "forward_images_per_s": {str(k): round(v, 1) for k, v in fwd_ips.items()},
        "grad_images_per_s": {str(k): round(v, 1) for k, v in grad_ips.items()},
    }


def build_engine(
    module: nn.Module,
    entry: ModelEntry,
    cache_dir: Path,
    device: torch.device,
    use_onnx: bool = True,
    intra_op_threads: int = 0,
    *,
    exporters: Sequence[str] = EXPORTERS,
    budget_s: float = 4.0,
    spin_wait: bool = True,
    predict_threads: int = 0,
    predict_spin_wait: bool | None = None,
) -> Engine:
    """The forward engine of ``module`` (eval mode, on ``device``) for ``entry``'s version.

    ``use_onnx`` and ``intra_op_threads`` (0 = number of cores) come from the settings
    ``onnx_engine`` and ``intra_op_threads``. ``exporters``: tried in order. ``budget_s``:
    seconds each of the two batch-size measurements may take (first start per device only).
    ``spin_wait``: see :func:`ort_forward`. ``predict_threads`` (0 = ``threads``) and
    ``predict_spin_wait`` (None = ``spin_wait``): the predict batcher's session on the CPU;
    when either differs, the engine holds a second session for predicts (``predict_forward``,
    docs/performance.md: several single-threaded runs side by side serve small batches with
    less CPU than one run on every core). Never raises for an unexportable model: see the
    module docstring.
    """
    device = torch.device(device)
    threads = intra_op_threads or os.cpu_count() or 1
    shape = input_shape(entry)
    tol = CUDA_TOLERANCE if device.type == "cuda" else TOLERANCE
    onnx_dir = cache_dir / "onnx"
    onnx_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{entry.manifest.id}-{entry.version}-{library_key()}"
    onnx_path, meta_path = onnx_dir / f"{stem}.onnx", onnx_dir / f"{stem}.json"
    key = _device_key(device, threads, use_onnx)
    eager = eager_forward(module)
    measure_s = 0.0

    t0 = time.perf_counter()
    with _file_lock(onnx_dir / f"{stem}.lock"):
        meta = _read_meta(meta_path)
        meta.update(model_id=entry.manifest.id, version=entry.version)
        cached: dict[str, Any] | None = meta.setdefault("devices", {}).get(key)
        name, forward, reason, dirty = "eager", eager, "", False
        if use_onnx and cached is not None and cached["engine"] == "eager":
            reason = cached["reason"]  # failed before on this device: do not pay for it again
        elif use_onnx:
            try:
                # The file this device checked, byte for byte: not checked again.
                checked = (cached or {}).get("onnx_sha256")
                trusted = bool(checked) and onnx_path.exists() and file_sha256(onnx_path) == checked
                forward, exporter = _onnx_engine(
                    module, eager, onnx_path, shape, device, threads, exporters, tol, spin_wait, trusted
                )
                name = "onnxruntime-cuda" if device.type == "cuda" else "onnxruntime"
                if exporter:
                    meta.update(exporter=exporter, torch=torch.__version__)
                    dirty = True
                if not trusted and cached is not None and cached["engine"] == name:
                    n = cached["batch_size"]
                    if n > 3:
                        check_against_eager(eager, forward, probe_batch(shape, n, device), (n,), tol)
                    cached["onnx_sha256"] = file_sha256(onnx_path)  # checked at 1, 3 and n now
                    dirty = True
            except EngineUnavailable as e:
                name, forward, reason = "eager", eager, str(e)
        if cached is None or cached["engine"] != name:
            t1 = time.perf_counter()
            cached = _measure(module, eager, (name, forward, reason), shape, device, tol, budget_s)
            measure_s = time.perf_counter() - t1
            name, reason = cached["engine"], cached["reason"]
            forward = eager if name == "eager" else forward
            if name != "eager":  # checked at 1, 3 and the chosen size on this device
                cached["onnx_sha256"] = file_sha256(onnx_path)
            meta["devices"][key] = cached
            dirty = True
        if dirty:
            try:
                _atomic_write_text(meta_path, json.dumps(meta, indent=2, sort_keys=True))
            except OSError as e:
                log.warning("cannot cache the engine measurements in %s: %s", meta_path, e)
    if reason:
        log.warning("%s: eager forward engine (ONNX unavailable: %s)", entry.manifest.id, reason)
    predict_forward = None
    p_threads, p_spin = predict_threads or threads, spin_wait if predict_spin_wait is None else predict_spin_wait
    if name == "onnxruntime" and (p_threads, p_spin) != (threads, spin_wait):
        predict_forward = ort_forward(onnx_path, device, p_threads, p_spin)
    return Engine(
        name,
        forward,
        int(cached["batch_size"]),
        int(cached["grad_batch_size"]),
        reason,
        {int(k): v for k, v in cached["forward_images_per_s"].items()},
        {int(k): v for k, v in cached["grad_images_per_s"].items()},
        engine_s=time.perf_counter() - t0 - measure_s,
        measure_s=measure_s,
        predict_forward=predict_forward,
    )
