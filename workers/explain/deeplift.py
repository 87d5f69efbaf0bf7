"""DeepLift's Rescale rule in two passes: the reference alone without gradients, then the input.

Captum's ``DeepLift`` runs inputs and baselines as one batch of ``2n`` through the model
with hooks on every nonlinearity: a forward pass that clones each activation's input and
output, and a backward pass over all ``2n`` rows that replaces each activation's gradient
by ``grad_out · Δy / Δx`` (its plain gradient where ``|Δx| < eps``). For elementwise
activations the multiplier of row ``i`` depends only on row ``i`` and its reference, so
the reference rows' backward is never used (they go back to the baselines, which need no
gradient). This module computes the same multipliers with

1. the reference pass: the baselines through the model under ``no_grad`` (one row for a
   baseline every image shares, such as ``black`` or ``zero``), keeping each activation's
   input and output; the activations of shared baselines are kept for later jobs;
2. the input pass: the inputs through the model with each activation a
   :class:`RescaleFunction` that computes its multiplier in the forward pass and applies it in
   the backward pass; attributions are ``(x - baseline) · ∂ target / ∂ x``.

That is ``1`` forward without gradients + ``1`` forward+backward per image instead of Captum's
``2`` forward+backward: Shrikumar et al. (2017, §3.5.1, §3.6) define the Rescale rule for any
elementwise nonlinearity and the multipliers of linear layers by the chain rule, which is
what both computations are. It applies to models whose only nonlinearities are ``ReLU`` and
``ReLU6`` modules (after :func:`workers.explain.rules.prepare`: one module per call site).
Max pooling's DeepLift rule mixes the gradients of input and reference rows (Captum's
``maxpool``), and other activations need their own derivative, so models with those run
on Captum's class (``rules.deeplift``): :func:`fast_path` says which.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from workers.explain import rules
from workers.explain.base import LoadedModel


class RescaleFunction(torch.autograd.Function):
    """``y = clamp(x, 0, hi)`` (``hi`` = ``inf`` for ReLU) whose backward multiplies the incoming
    gradient by the Rescale multiplier ``(y - y_ref) / (x - x_ref)``, or by the derivative
    ``1[0 < x < hi]`` where ``x = x_ref``.
    Captum's ``deep_lift.nonlinear`` takes the derivative wherever ``|x - x_ref| < 1e-10``;
    for a clamp the ratio is exact down to any nonzero difference (``|Δy| <= |Δx|``), so here
    only exact ties, where the ratio is 0/0, take it. The two differ only where both values
    lie within 1e-10 of a kink on either side."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, x_ref: torch.Tensor, y_ref: torch.Tensor, hi: float) -> torch.Tensor:
        y = x.clamp(0.0, hi)
        xv, xr = _cyclic(x, x_ref)
        yv, yr = _cyclic(y, y_ref)
        multiplier = (yv - yr).div_(xv - xr).reshape(x.shape).contiguous()
        _fill_ties(multiplier, x_ref, hi)
        ctx.save_for_backward(multiplier)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (multiplier,) = ctx.saved_tensors
        return grad * multiplier, None, None, None


def _cyclic(a: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of ``a`` ``(N, C, ...)`` and ``ref`` ``(R, C, ...)`` that broadcast row ``i`` of
    ``a`` against row ``i % R`` of ``ref`` (``R`` = 1, ``N``, or a divisor of ``N``: the same
    ``R`` baselines for each of ``N / R`` images)."""
    n, r = a.shape[0], ref.shape[0]
    if r in (1, n):
        return a, ref
    if n % r:
        raise ValueError(f"{n} rows cannot cycle through {r} reference rows")
    return a.reshape(n // r, *ref.shape), ref.unsqueeze(0)


def _fill_ties(multiplier: torch.Tensor, x_ref: torch.Tensor, hi: float) -> None:
    """Replace the 0/0 of ties (``x = x_ref``) in ``multiplier`` ``(N, C, ...)`` (contiguous)
    by the derivative there, ``1[0 < x_ref < hi]`` (``x_ref`` ``(R, C, ...)``, row ``i`` of the
    multiplier against row ``i % R``; at a tie the two are the same point). Ties are few
    (efficientnet-lite0: 0.01-0.1% of the values at most layers) but spread (20-24% of the
    (row, channel) planes hold one: a depthwise convolution over a region clamped in both
    input and reference gives its bias in both), so a read-only sum per plane finds the
    planes that have any and only those are rewritten."""
    n, c = multiplier.shape[:2]
    planes = multiplier.view(n * c, -1)
    bad = planes.sum(1).isnan().nonzero().flatten()
    if len(bad) == 0:
        return
    ref = x_ref.reshape(x_ref.shape[0] * c, -1)[(bad // c) % x_ref.shape[0] * c + bad % c]
    slope = ((ref > 0) & (ref < hi)).to(planes.dtype)
    part = planes[bad]
    planes[bad] = torch.where(part.isnan(), slope, part)


class RescaleActivation(nn.Module):
    """A ReLU or ReLU6 call site in the two-pass DeepLift: records its input and output in the
    reference pass, applies :class:`RescaleFunction` against them in the input pass."""

    def __init__(self, hi: float) -> None:
        super().__init__()
        self.hi = hi
        self.recording = False
        self.copy_refs = False
        self.ref: tuple[torch.Tensor, torch.Tensor] | None = None  # the reference's x, y
        self._versions = (0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recording:
            y = x.clamp(0.0, self.hi)
            self.ref = (x.clone(), y.clone()) if self.copy_refs else (x, y)
            self._versions = (x._version, y._version)
            return y
        if self.ref is None:
            raise RuntimeError("RescaleActivation: the reference pass did not reach this layer")
        return RescaleFunction.apply(x, *self.ref, self.hi)

    def ref_intact(self) -> bool:
        """False when a later layer wrote into the recorded tensors in place (their version
        counters moved): the reference pass then runs again, keeping copies."""
        return self.ref is not None and (self.ref[0]._version, self.ref[1]._version) == self._versions

    def extra_repr(self) -> str:
        return f"DeepLift Rescale, clamp(0, {self.hi})"


def _activation_hi(module: nn.Module) -> float | None:
    """``inf`` for ReLU, 6 for ReLU6, ``None`` for anything else."""
    if type(module) is nn.ReLU:
        return float("inf")
    if type(module) is nn.ReLU6:
        return 6.0
    return None


class TwoPassDeepLift:
    """DeepLift (Rescale) on a copy of a model prepared for the ``deeplift`` family whose
    ReLU/ReLU6 call sites are :class:`RescaleActivation` modules. The activations of
    baselines that recur (``key`` in :meth:`reference`) are kept, least recently used first
    out, up to ``cache_bytes``: a worker then computes the reference of a ``zero`` or
    ``black`` baseline once per model and input size, not once per job (efficientnet-lite0
    at 224x224: 50 MB per baseline row)."""

    def __init__(self, prepared: nn.Module, cache_bytes: int = 0) -> None:
        self.module = copy.deepcopy(prepared)
        self.sites: list[RescaleActivation] = []
        self.cache_bytes = cache_bytes
        self.reference_passes = 0  # reference forwards run (the kept ones save them)
        self._kept: OrderedDict[Hashable, tuple[list[tuple[torch.Tensor, torch.Tensor]], int]] = OrderedDict()
        self._baselines: torch.Tensor | None = None
        for name, m in list(self.module.named_modules()):
            hi = _activation_hi(m)
            if name and hi is not None:
                site = RescaleActivation(hi)
                parent, _, leaf = name.rpartition(".")
                setattr(self.module.get_submodule(parent) if parent else self.module, leaf, site)
                self.sites.append(site)
        self._lock = threading.Lock()  # the sites hold one reference at a time

    @contextmanager
    def reference(self, baselines: torch.Tensor, key: Hashable | None = None) -> Iterator[None]:
        """Hold the activations of ``baselines`` ``(R, C, H, W)`` for :meth:`against_reference`
        calls in the block: input row ``i`` is taken against baseline row ``i % R`` (``R`` = 1:
        one baseline shared by every input). ``key`` names these baselines (the same key, the
        same tensor) so that their activations can be kept for the next block."""
        with self._lock:
            try:
                kept = self._kept.get(key) if key is not None else None
                if kept is not None:
                    self._kept.move_to_end(key)
                    for site, ref in zip(self.sites, kept[0], strict=True):
                        site.ref = ref
                else:
                    self._record(baselines, copy_refs=False)
                    if not all(s.ref_intact() for s in self.sites):
                        self._record(baselines, copy_refs=True)
                    if key is not None:
                        self._keep(key)
                self._baselines = baselines
                yield
            finally:
                for s in self.sites:
                    s.recording, s.ref = False, None
                self._baselines = None

    def _record(self, baselines: torch.Tensor, copy_refs: bool) -> None:
        self.reference_passes += 1
        for s in self.sites:
            s.recording, s.copy_refs, s.ref = True, copy_refs, None
        try:
            with torch.no_grad():
                self.module(baselines)
        finally:
            for s in self.sites:
                s.recording = False

    def forget(self) -> None:
        """Drop the kept reference activations (the next job computes them again)."""
        with self._lock:
            self._kept.clear()

    def _keep(self, key: Hashable) -> None:
        refs = [s.ref for s in self.sites if s.ref is not None]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for ref in refs for t in ref}
        size = sum(storages.values())
        if len(refs) < len(self.sites) or size > self.cache_bytes:
            return
        self._kept[key] = (refs, size)
        while sum(n for _, n in self._kept.values()) > self.cache_bytes:
            self._kept.popitem(last=False)

    def against_reference(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Attributions ``(N, C, H, W)`` of ``target`` ``(N,)`` for inputs ``x`` ``(N, C, H, W)``
        against the baselines of the enclosing :meth:`reference` (``R`` rows, ``R`` dividing ``N``)."""
        baselines = self._baselines
        if baselines is None:
            raise RuntimeError("against_reference runs inside reference()")
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            out = self.module(leaf)
            picked = out.gather(1, target.view(-1, 1).to(out.device)).sum()
            (grad,) = torch.autograd.grad(picked, leaf)
        xv, bv = _cyclic(x.detach(), baselines)
        gv, _ = _cyclic(grad, baselines)
        return ((xv - bv) * gv).reshape(x.shape)

    def attribute(self, x: torch.Tensor, baselines: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """:meth:`against_reference` for ``baselines`` ``(R, C, H, W)``, ``R`` dividing ``N``."""
        with self.reference(baselines):
            return self.against_reference(x, target)


def fast_path(prepared: nn.Module) -> bool:
    """Whether :class:`TwoPassDeepLift` computes Captum's DeepLift on this prepared module:
    every nonlinearity is a ReLU or ReLU6 module (no max pooling, no other activation)."""
    leaves = [m for _, m in rules.leaf_modules(prepared)]
    nonlinear = [m for m in leaves if rules.is_activation(m) or rules.is_max_pool(m)]
    return bool(nonlinear) and all(_activation_hi(m) is not None for m in nonlinear)


_built: dict[tuple[str, str], TwoPassDeepLift | None] = {}
_built_lock = threading.Lock()


def two_pass(model: LoadedModel) -> TwoPassDeepLift | None:
    """The two-pass DeepLift of ``model`` (built once per model version), or ``None`` when the
    model needs Captum's (see :func:`fast_path`). Raises ``UnsupportedMethod`` like
    ``rules.prepare``."""
    prepared = rules.prepare(model, "deeplift")
    key = (model.id, model.version)
    with _built_lock:
        if key not in _built:
            for k in [k for k in _built if k[0] == model.id]:
                del _built[k]
            cache_bytes = model.deeplift_cache_mb * 2**20
            _built[key] = TwoPassDeepLift(prepared, cache_bytes) if fast_path(prepared) else None
        return _built[key]
