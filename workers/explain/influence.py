"""Layer-wise influence functions: which training images a prediction depends on, per layer.

Koh and Liang (2017, "Understanding black-box predictions via influence functions") and its
layer-wise form in Aamir, Tamosiunaite and Wörgötter (2023, "Interpreting the decisions of
CNNs via influence functions", Eq. 6-7). For a test image ``z_t`` and each training image
``z_j`` (n of them), per layer ``l``:

    score_l(z_j, z_t) = g_l(z_t)^T (C_l + damping I)^-1 g_l(z_j),       total = sum_l score_l

``g_l`` is the gradient of the cross-entropy loss with respect to layer ``l``'s parameters
(the test loss uses the job's target class, the training loss each image's label); ``C_l``
is the curvature of the mean training loss restricted to layer ``l`` (a diagonal block).
Positive = helpful (removing ``z_j`` raises the test loss by about ``score / n``), negative
= harmful; ``schemas.influence`` states the convention.

What a "layer" is: a module that owns parameters directly, with all of them (weight and
bias) as one block; a requested container module (``layer4``) is one block of all the
parameters under it, and ``""`` (the root) is the whole model as one block: Koh and Liang's
influence with the full curvature, cross-layer terms included. BatchNorm's affine weight and
bias are a layer of their own; its running mean and variance are buffers, fixed at their
trained values (the model is in eval mode), so the gradients see BatchNorm as the
per-channel affine map it is at inference.

Curvature: ``ggn`` (default) is the generalised Gauss-Newton matrix ``J^T (diag p - p p^T) J``,
the Fisher information of the softmax output: positive semi-definite by construction, so
with ``damping > 0`` every solver solves a positive definite system. ``hessian`` is the exact
Hessian; for one layer of a ReLU network it equals the GGN (the logits are piecewise linear in
any single layer's weights), for smooth activations it can be indefinite, which is detected
and flagged, never silently used.

Solvers of ``(C_l + damping I) x = g_l(z_t)``, each reporting its final relative residual:

- ``exact``: the explicit matrix (per-example Jacobians for the GGN, Hessian-vector products
  with the identity for the Hessian) and a Cholesky factorisation (fails = indefinite),
  cached per (model version, training set, layer, curvature, damping).
- ``cg``: conjugate gradient with curvature-vector products over the training set; stops on
  the residual or on negative curvature (``p^T A p <= 0``, flagged).
- ``lissa``: the recursion of Agarwal et al. (2017) used by Koh and Liang (2017, Sec. 3):
  ``h_j = g + (I - (C_batch + damping I) / scale) h_{j-1}``, ``x = h_depth / scale``, averaged
  over ``repeats``, each step on a mini-batch (drawn without replacement, reshuffled on each
  pass over the subset). The iterates of the last ``lissa_tail`` fraction of the recursion
  are averaged (Polyak-Ruppert averaging: the same fixed point with far less mini-batch
  noise; ``lissa_tail=0`` is Koh and Liang's last iterate). ``scale`` defaults to twice the
  largest eigenvalue found by power iteration (the recursion needs ``eig(A) / scale`` in (0, 2)).
- ``arnoldi``: Schioppa et al. (2022, "Scaling up influence functions"): captum.influence's
  Arnoldi iteration (``_parameter_arnoldi``, the routine behind ``ArnoldiInfluenceFunction``)
  finds a Krylov subspace; its top ``arnoldi_rank`` Ritz pairs ``(lambda_i, v_i)`` give
  ``(C + d I)^-1 ~ sum_i v_i v_i^T / (lambda_i + d) + (I - V V^T) / d``, the exact inverse of
  the damped rank-k approximation (Captum drops the second term, i.e. treats the rest of the
  spectrum as infinitely curved). Cached like ``exact``.

Per-example training gradients are computed with ``torch.func`` (``vmap`` over ``grad`` of a
``functional_call``) in chunks and cached per (model version, training set, layer) in memory
and as ``.npy`` under ``<cache_dir>/influence/``: after the first test image, a second one
costs its own gradient, its solve and one matrix product.
"""

from __future__ import annotations

import io
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap

from schemas.errors import BadParams, UnsupportedMethod
from schemas.influence import InfluenceParams
from schemas.training_zip import UPLOAD_NAME
from workers.datasets import TrainingSetData, load_training_set, uploaded_training_set
from workers.explain.base import Artifact, Inputs, KindResult, LoadedModel, ProgressFn, no_progress
from workers.render import npy_bytes

GRAD_CHUNK_BYTES = 256 << 20
"""Per-example gradients of one chunk stay under this (sets the chunk size when not given)."""
MEMORY_CACHE_BYTES = 2 << 30
"""In-memory budget for cached training gradients and curvature factorisations."""
MAX_CACHED_LAYER_BYTES = 4 << 30
"""A layer whose gradient matrix ``(n, P)`` exceeds this is streamed (recomputed per job)."""
JACOBIAN_BYTES = 768 << 20
"""A layer's logit Jacobians over the curvature subset ``(m, K, P)`` are kept in memory when
they fit: GGN products then cost two matrix products instead of a pass through the model."""
ORTHOGONALITY_TOL = 1e-6
"""Arnoldi basis vectors are kept while ``|Q^T Q - I|`` stays below this."""
EIGVALSH_MAX_PARAMS = 512
"""Up to this size the exact solver computes the full spectrum; above, a Lanczos estimate."""
LANCZOS_STEPS = 60
"""Lanczos iterations for the extreme eigenvalues of a curvature (one product each)."""


# --------------------------------------------------------------------------------- layers


@dataclass(frozen=True)
class Layer:
    """A block of parameters: ``name`` (module name), ``kind`` (module class), the full
    parameter names in ``module.named_parameters()`` order and their shapes."""

    name: str
    kind: str
    param_names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def sizes(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]


def parametrised_layers(module: nn.Module) -> list[str]:
    """Names of the modules that own parameters directly, in ``named_modules`` order."""
    return [name for name, m in module.named_modules() if any(True for _ in m.parameters(recurse=False))]


def resolve_layers(module: nn.Module, requested: list[str] | None) -> list[Layer]:
    """The parameter blocks for ``requested`` module names (None = every parametrised module).

    Raises ``BadParams`` for unknown names, modules without parameters and overlapping
    requests (a parameter counted twice would double its share of the total)."""
    if isinstance(module, torch.jit.ScriptModule):
        raise UnsupportedMethod(
            "influence functions need an eager PyTorch model (torch.func differentiates per "
            "parameter); TorchScript models are not supported"
        )
    names = parametrised_layers(module) if requested is None else list(requested)
    if not names:
        raise BadParams("the model has no parameters to compute influence for")
    prefixes = {n: (n + "." if n else "") for n in names}
    layers: list[Layer] = []
    seen: dict[str, str] = {}
    for name in names:
        try:
            m = module.get_submodule(name)
        except AttributeError:
            raise BadParams(f"the model has no layer {name!r}", details={"layer": name}) from None
        # Default layers own their parameters directly; a requested module brings all of its own.
        params = list(m.named_parameters(recurse=requested is not None))
        if not params:
            raise BadParams(f"layer {name!r} has no parameters", details={"layer": name})
        full = tuple(prefixes[name] + p for p, _ in params)
        for p in full:
            if p in seen:
                raise BadParams(
                    f"layers {seen[p]!r} and {name!r} overlap (both contain {p!r})",
                    details={"layers": [seen[p], name]},
                )
            seen[p] = name
        layers.append(Layer(name, type(m).__name__, full, tuple(tuple(t.shape) for _, t in params)))
    return layers


class LayerFunction:
    """The model as a function of one layer's flattened parameters ``(P,)``."""

    def __init__(self, module: nn.Module, layer: Layer) -> None:
        self.module, self.layer = module, layer
        named = dict(module.named_parameters())
        self.flat0 = torch.cat([named[n].detach().reshape(-1) for n in layer.param_names])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = flat.split(self.layer.sizes)
        return {n: p.reshape(s) for n, p, s in zip(self.layer.param_names, parts, self.layer.shapes, strict=True)}

    def logits(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(b, K)`` of ``x`` ``(b, C, H, W)`` with this layer's parameters ``flat``."""
        return functional_call(self.module, self.unflatten(flat), (x,))


def per_example_grads(
    module: nn.Module, fns: list[LayerFunction], x: torch.Tensor, y: torch.Tensor
) -> list[torch.Tensor]:
    """Gradients of each example's cross-entropy: one ``(b, P_l)`` tensor per layer, all
    layers from one vectorised backward pass (``vmap`` over ``grad``)."""
    flats = tuple(f.flat0 for f in fns)

    def loss(flat_params: tuple[torch.Tensor, ...], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        replaced: dict[str, torch.Tensor] = {}
        for f, v in zip(fns, flat_params, strict=True):
            replaced.update(f.unflatten(v))
        out = functional_call(module, replaced, (xi[None],))
        return nn.functional.cross_entropy(out, yi[None])

    try:
        return list(vmap(grad(loss), in_dims=(None, 0, 0))(flats, x, y))
    except RuntimeError as e:  # an op torch.func cannot batch: name it rather than a 500
        raise UnsupportedMethod(f"per-example gradients failed on this model: {e}") from e


def logit_jacobians(
    module: nn.Module, fns: list[LayerFunction], x: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-example Jacobians of the logits: one ``(b, K, P_l)`` tensor per layer, and the
    logits ``(b, K)``, from ``vmap`` over ``jacrev`` (K backward passes, batched)."""
    flats = tuple(f.flat0 for f in fns)

    def logits(flat_params: tuple[torch.Tensor, ...], xi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        replaced: dict[str, torch.Tensor] = {}
        for f, v in zip(fns, flat_params, strict=True):
            replaced.update(f.unflatten(v))
        out = functional_call(module, replaced, (xi[None],))[0]
        return out, out

    try:
        jac, z = vmap(jacrev(logits, has_aux=True), in_dims=(None, 0))(flats, x)
    except RuntimeError as e:
        raise UnsupportedMethod(f"per-example Jacobians failed on this model: {e}") from e
    return list(jac), z.detach()


def grads_from_jacobian(jac: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy gradients ``(b, P)`` from logit Jacobians ``(b, K, P)``: the loss's
    gradient with respect to the logits is ``softmax - onehot(y)``."""
    r = logits.softmax(-1) - nn.functional.one_hot(y, logits.shape[-1]).to(logits.dtype)
    return torch.einsum("bkp,bk->bp", jac, r)


class LayerCurvature:
    """Products with ``C_l + damping I`` for one layer, ``C_l`` averaged over a fixed subset
    of the training set (``index``, sorted). Counts the training points it has processed.

    With ``jac`` ``(m, K, P)`` and ``probs`` ``(m, K)`` of the subset (GGN only), products
    are two matrix multiplications, ``J^T (diag p - p p^T) J v``; otherwise each product is
    a pass over the subset through the model (``jvp``/``vjp``, or forward-over-reverse for
    the Hessian)."""

    def __init__(
        self,
        fn: LayerFunction,
        train: TrainingSetData,
        index: np.ndarray,
        kind: str,
        damping: float,
        chunk: int,
        device: torch.device,
        jac: torch.Tensor | None = None,
        probs: torch.Tensor | None = None,
    ) -> None:
        self.fn, self.train, self.index, self.kind = fn, train, index, kind
        self.damping, self.chunk, self.device = damping, chunk, device
        self.jac, self.probs = jac, probs
        self.points_processed = 0
        self.dtype = fn.flat0.dtype
        # Set by ``permuted``: positions of the subset in the Jacobians' row order, and one
        # buffer the rows of a mini-batch are gathered into (reused: no page faults per step).
        self.order: torch.Tensor | None = None
        self._gather: dict[str, torch.Tensor] = {}

    @property
    def size(self) -> int:
        return int(self.fn.flat0.numel())

    def _batch_product(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Sum over the batch of ``C_i v`` for ``v`` ``(P, m)`` -> ``(P, m)``."""
        f, w0 = self.fn, self.fn.flat0
        if self.kind == "ggn":
            z, pull = vjp(lambda w: f.logits(w, x), w0)[:2]
            p = z.softmax(-1).detach()

            def column(u: torch.Tensor) -> torch.Tensor:
                ju = jvp(lambda w: f.logits(w, x), (w0,), (u,))[1]
                h = p * ju - p * (p * ju).sum(-1, keepdim=True)  # (diag p - p p^T) J u
                return pull(h)[0]

        else:

            def total_loss(w: torch.Tensor) -> torch.Tensor:
                return nn.functional.cross_entropy(f.logits(w, x), y, reduction="sum")

            def column(u: torch.Tensor) -> torch.Tensor:
                return jvp(grad(total_loss), (w0,), (u,))[1]

        return vmap(column, in_dims=1, out_dims=1)(v)

    def _jacobian_product(self, v: torch.Tensor, rows: slice | None) -> torch.Tensor:
        assert self.jac is not None and self.probs is not None
        if rows is None:
            j, p = self.jac, self.probs[:, :, None]
        elif self.order is None:
            j, p = self.jac[rows], self.probs[rows][:, :, None]  # a slice: a view, no copy
        else:
            idx = self.order[rows]
            b = int(idx.numel())
            buf = self._gather.get("jac")
            if buf is None or buf.shape[0] < b:
                buf = self._gather["jac"] = torch.empty((b, *self.jac.shape[1:]), dtype=self.jac.dtype,
                                                        device=self.jac.device)
            j = torch.index_select(self.jac, 0, idx, out=buf[:b])
            p = self.probs[idx][:, :, None]
        m, k, size = j.shape
        jm = j.reshape(m * k, size)
        ju = (jm @ v.to(j.dtype)).reshape(m, k, -1)
        h = p * ju - p * (p * ju).sum(1, keepdim=True)
        return (h.reshape(m * k, -1).T @ jm).T.to(v.dtype)  # (h^T J)^T: faster than J^T h on CPU BLAS

    def apply(self, v: torch.Tensor, rows: slice | None = None, damped: bool = True) -> torch.Tensor:
        """``(C + damping I) v`` for ``v`` ``(P, m)``, ``C`` averaged over the subset, or over
        its ``rows`` (a slice of positions in the subset, e.g. a LiSSA mini-batch);
        ``damped=False`` leaves the damping out."""
        count = len(self.index) if rows is None else len(range(len(self.index))[rows])
        if self.jac is not None:
            out = self._jacobian_product(v, rows)
        else:
            idx = self.index if rows is None else self.index[rows]
            out = torch.zeros_like(v)
            for _, x, y in self.train.batches(self.chunk, idx):
                out += self._batch_product(x.to(self.device, self.dtype), y.to(self.device), v)
        self.points_processed += count * v.shape[1]
        out = out / count
        return out + self.damping * v if damped else out

    def permuted(self, perm: np.ndarray) -> LayerCurvature:
        """The same curvature with the subset in the order ``perm``, so that mini-batches are
        contiguous slices of it. The Jacobians are not copied: a mini-batch's rows are
        gathered into one reused buffer (copying all of them per epoch, 267 MB for conv2 of
        digits-cnn, took 60% of a LiSSA solve)."""
        out = LayerCurvature(self.fn, self.train, self.index[perm], self.kind, self.damping, self.chunk,
                             self.device, self.jac, self.probs)
        if self.jac is not None:
            base = self.order.cpu().numpy() if self.order is not None else np.arange(len(self.index))
            out.order = torch.as_tensor(base[perm], device=self.jac.device)
        out._gather = self._gather
        return out

    def explicit(self, progress: Callable[[int, int], None]) -> torch.Tensor:
        """The undamped matrix ``C`` ``(P, P)``."""
        size = self.size
        c = torch.zeros(size, size, dtype=self.dtype, device=self.device)
        if self.jac is not None:
            m = len(self.index)
            step = max(1, int(GRAD_CHUNK_BYTES // (4 * self.jac.shape[1] * size)))
            for r0 in range(0, m, step):
                rows = np.arange(r0, min(m, r0 + step))
                j = self.jac[r0 : r0 + step]
                p = self.probs[r0 : r0 + step][:, :, None]  # type: ignore[index]
                hj = p * j - p * (p.transpose(1, 2) @ j)  # (diag p - p p^T) J per example
                c += j.reshape(-1, size).T @ hj.reshape(-1, size)
                progress(int(rows[-1]) + 1, m)
            self.points_processed += m * size
            c /= m
        else:
            eye = torch.eye(size, dtype=self.dtype, device=self.device)
            step = 32
            for j0 in range(0, size, step):
                c[:, j0 : j0 + step] = self.apply(eye[:, j0 : j0 + step], damped=False)
                progress(min(size, j0 + step), size)
        return (c + c.T) / 2


# -------------------------------------------------------------------------------- solvers


@dataclass
class SolveReport:
    """How one layer's systems were solved (lists: one entry per test image).

    ``residual`` is ``|(C + d I) x - g| / |g|``; ``converged`` = residual <= the job's
    ``tolerance`` (and, for CG, no negative curvature met). ``min_eigenvalue`` /
    ``max_eigenvalue`` are of the undamped curvature: exact for ``eigvalsh``, extreme Ritz
    values for ``lanczos`` and ``ritz (arnoldi)`` (an upper bound on the smallest, a lower
    bound on the largest eigenvalue). ``indefinite``: the damped curvature was shown not to be
    positive definite (Cholesky failed, CG met ``p^T A p <= 0``, or the smallest eigenvalue
    estimate plus the damping is not positive)."""

    solver: str
    iterations: list[int]
    residual: list[float]
    converged: list[bool]
    indefinite: bool = False
    min_eigenvalue: float | None = None
    max_eigenvalue: float | None = None
    eigenvalue_method: str | None = None
    seconds: float = 0.0
    reused: bool = False
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def sound(self, i: int) -> bool:
        return self.converged[i] and not self.indefinite

    def as_dict(self) -> dict[str, Any]:
        d = {
            "solver": self.solver,
            "iterations": self.iterations,
            "residual": [finite_or_none(r) for r in self.residual],
            "converged": self.converged,
            "indefinite": self.indefinite,
            "min_eigenvalue": finite_or_none(self.min_eigenvalue),
            "max_eigenvalue": finite_or_none(self.max_eigenvalue),
            "eigenvalue_method": self.eigenvalue_method,
            "seconds": round(self.seconds, 4),
            "reused": self.reused,
            "notes": self.notes,
        }
        d.update(self.extra)
        return d


def finite_or_none(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def relative_residual(curv: LayerCurvature, x: torch.Tensor, b: torch.Tensor) -> list[float]:
    """``|(C + d I) x - b| / |b|`` per column (0 for a zero right-hand side)."""
    r = (curv.apply(x) - b).norm(dim=0)
    bn = b.norm(dim=0)
    return [float(ri / bi) if bi > 0 else 0.0 for ri, bi in zip(r, bn, strict=True)]


def _lanczos_extremes(
    matvec: Callable[[np.ndarray], np.ndarray], size: int, seed: int, steps: int = LANCZOS_STEPS
) -> tuple[float, float]:
    """Smallest and largest eigenvalue estimates of a symmetric operator: the extreme Ritz
    values of ``steps`` Lanczos iterations with full reorthogonalisation (small operators are
    materialised and solved exactly). Ritz values lie inside the spectrum, so the smallest is
    an upper bound on the smallest eigenvalue (a negative one proves indefiniteness) and the
    largest a lower bound on the largest; the extreme ones converge first.

    (ARPACK's ``eigsh`` with a few restarts, used before, returns only the Ritz values that
    met its tolerance: on conv2 of digits-cnn that was one value, reported as both ends.)"""
    if size <= 64:
        dense = np.stack([matvec(e) for e in np.eye(size)], axis=1)
        w = np.linalg.eigvalsh((dense + dense.T) / 2)
        return float(w[0]), float(w[-1])
    steps = min(steps, size)
    q = np.zeros((steps + 1, size))
    v = np.random.default_rng(seed).standard_normal(size)
    q[0] = v / np.linalg.norm(v)
    alpha, beta = np.zeros(steps), np.zeros(steps)
    k = 0
    for k in range(steps):
        w = np.asarray(matvec(q[k]), dtype=np.float64)
        if not np.isfinite(w).all():
            return float("nan"), float("nan")
        alpha[k] = q[k] @ w
        for _ in range(2):  # full reorthogonalisation, twice is enough (Kahan)
            w -= q[: k + 1].T @ (q[: k + 1] @ w)
        beta[k] = np.linalg.norm(w)
        if beta[k] <= 1e-10 * max(abs(alpha[: k + 1]).max(), 1e-300):  # an invariant subspace
            break
        q[k + 1] = w / beta[k]
    from scipy.linalg import eigvalsh_tridiagonal

    theta = eigvalsh_tridiagonal(alpha[: k + 1], beta[:k])
    return float(theta[0]), float(theta[-1])


def _indefinite(min_eig: float | None, max_eig: float | None, damping: float) -> bool:
    if min_eig is None or not math.isfinite(min_eig):
        return False
    tol = 1e-5 * max(abs(max_eig or 0.0), 1e-12)  # rounding of a PSD matrix's zero eigenvalues
    return min_eig + damping <= tol


class _LRU:
    """A small byte-bounded LRU of tensors / arrays (per process; guarded by a lock)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key][0]

    def put(self, key: Any, value: Any, nbytes: int) -> None:
        if nbytes > self.max_bytes:
            return
        with self._lock:
            self._items[key] = (value, nbytes)
            self._items.move_to_end(key)
            while sum(b for _, b in self._items.values()) > self.max_bytes:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


_factors = _LRU(MEMORY_CACHE_BYTES // 2)
"""Curvature factorisations (exact: Cholesky factors; arnoldi: Ritz pairs) per layer key."""


def check_exact_size(layer: Layer, max_params: int) -> None:
    if layer.numel > max_params:
        raise BadParams(
            f"layer {layer.name!r} has {layer.numel} parameters; the 'exact' solver builds a "
            f"{layer.numel}x{layer.numel} matrix and accepts up to exact_max_params={max_params}: use "
            "'cg', 'lissa' or 'arnoldi' for it, or raise exact_max_params",
            details={"layer": layer.name, "params": layer.numel},
        )


def solve_exact(
    curv: LayerCurvature, b: torch.Tensor, key: tuple, max_params: int, progress: Callable[[int, int], None]
) -> tuple[torch.Tensor, SolveReport]:
    """Explicit ``C + d I`` and its Cholesky factor (float64); ``x`` ``(P, T)``."""
    check_exact_size(curv.fn.layer, max_params)
    t0 = time.perf_counter()
    cached = _factors.get(("exact", *key))
    reused = cached is not None
    if cached is None:
        c = curv.explicit(progress).double().cpu()
        a = c + curv.damping * torch.eye(curv.size, dtype=torch.float64)
        chol, info = torch.linalg.cholesky_ex(a)
        if curv.size <= EIGVALSH_MAX_PARAMS:
            ev = torch.linalg.eigvalsh(c)
            lo, hi, method = float(ev[0]), float(ev[-1]), "eigvalsh"
        else:
            cn = c.numpy()
            lo, hi = _lanczos_extremes(lambda v: cn @ v, curv.size, 0, steps=200)
            method = "lanczos"
        cached = (a, chol if int(info) == 0 else None, lo, hi, method)
        _factors.put(("exact", *key), cached, a.numel() * 8 * 2)
    a, chol, lo, hi, method = cached
    b64 = b.double().cpu()
    # Cholesky failed = the damped matrix is not positive definite: solve anyway (LU), flagged.
    x = torch.cholesky_solve(b64, chol) if chol is not None else torch.linalg.solve(a, b64)
    r = (a @ x - b64).norm(dim=0) / b64.norm(dim=0).clamp_min(1e-300)
    res = [float(v) if bn > 0 else 0.0 for v, bn in zip(r, b64.norm(dim=0), strict=True)]
    report = SolveReport(
        "exact",
        iterations=[0] * b.shape[1],
        residual=res,
        converged=[math.isfinite(v) for v in res],
        indefinite=chol is None or _indefinite(lo, hi, curv.damping),
        min_eigenvalue=lo,
        max_eigenvalue=hi,
        eigenvalue_method=method,
        seconds=time.perf_counter() - t0,
        reused=reused,
    )
    return x.to(b.device, b.dtype), report


def conjugate_gradient(
    op: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    tol: float,
    max_iter: int,
    tick: Callable[[int], None] = lambda it: None,
) -> tuple[torch.Tensor, list[int], list[bool]]:
    """Conjugate gradient for ``A x = b``, ``b`` ``(P, T)``: every column its own CG (Hestenes
    and Stiefel 1952), the operator applied to the active columns at once. Returns ``x``,
    iterations per column and whether negative curvature (``p^T A p <= 0``) stopped a column."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = (r * r).sum(0)
    bn = b.norm(dim=0)
    t = b.shape[1]
    iters = [0] * t
    negative = [False] * t
    active = [i for i in range(t) if bn[i] > 0]
    for it in range(1, max_iter + 1):
        if not active:
            break
        cols = torch.tensor(active, device=b.device)
        ap = op(p[:, cols])
        pap = (p[:, cols] * ap).sum(0)
        still = []
        for j, i in enumerate(active):
            iters[i] = it
            if not pap[j] > 0:
                negative[i] = True
                continue
            alpha = rs[i] / pap[j]
            x[:, i] += alpha * p[:, i]
            r[:, i] -= alpha * ap[:, j]
            rs_new = r[:, i] @ r[:, i]
            if rs_new.sqrt() <= tol * bn[i]:
                continue
            p[:, i] = r[:, i] + (rs_new / rs[i]) * p[:, i]
            rs[i] = rs_new
            still.append(i)
        active = still
        tick(it)
    return x, iters, negative


def solve_cg(
    curv: LayerCurvature, b: torch.Tensor, params: InfluenceParams, key: tuple, tick: Callable[[int], None]
) -> tuple[torch.Tensor, SolveReport]:
    t0 = time.perf_counter()
    x, iters, negative = conjugate_gradient(curv.apply, b, params.cg_tol, params.cg_max_iter, tick)
    res = relative_residual(curv, x, b)
    report = SolveReport(
        "cg",
        iterations=iters,
        residual=res,
        converged=[r <= params.tolerance and not n for r, n in zip(res, negative, strict=True)],
        indefinite=any(negative),
    )
    if any(negative):
        report.notes.append("negative curvature met (p^T A p <= 0): the damped curvature is indefinite")
    _check_curvature(curv, params, key, report)
    report.seconds = time.perf_counter() - t0
    return x, report


def _check_curvature(curv: LayerCurvature, params: InfluenceParams, key: tuple, report: SolveReport) -> None:
    """For the exact Hessian (which may be indefinite), estimate its extreme eigenvalues by
    Lanczos once per layer; the GGN is positive semi-definite by construction."""
    if params.curvature != "hessian":
        report.eigenvalue_method = "psd by construction (ggn)"
        return
    cached = _factors.get(("extremes", *key))
    if cached is None:

        def matvec(v: np.ndarray) -> np.ndarray:
            u = torch.from_numpy(np.asarray(v, dtype=np.float64).reshape(-1, 1)).to(curv.device, curv.dtype)
            return curv.apply(u, damped=False).double().cpu().numpy().ravel()

        cached = _lanczos_extremes(matvec, curv.size, params.seed)
        _factors.put(("extremes", *key), cached, 16)
    lo, hi = cached
    report.min_eigenvalue, report.max_eigenvalue, report.eigenvalue_method = lo, hi, "lanczos"
    if _indefinite(lo, hi, curv.damping):
        report.indefinite = True
        report.notes.append(f"the damped Hessian has a negative eigenvalue (about {lo + curv.damping:.3g})")


def power_iteration(
    op: Callable[[torch.Tensor], torch.Tensor], size: int, like: torch.Tensor, seed: int, steps: int = 20
) -> float:
    """Largest eigenvalue (Rayleigh quotient after ``steps`` power iterations) of a PSD ``op``."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(size, 1, generator=g, dtype=torch.float64).to(like.device, like.dtype)
    v /= v.norm()
    lam = 0.0
    for _ in range(steps):
        w = op(v)
        lam = float((v * w).sum())
        n = w.norm()
        if not n > 0:
            break
        v = w / n
    return lam


def solve_lissa(
    curv: LayerCurvature, b: torch.Tensor, params: InfluenceParams, key: tuple, tick: Callable[[int], None]
) -> tuple[torch.Tensor, SolveReport]:
    """Koh and Liang's LiSSA (their Sec. 3; Agarwal et al. 2017) on random mini-batches."""
    t0 = time.perf_counter()
    scale = params.lissa_scale
    top = None
    if scale is None:
        top = _factors.get(("top", *key))
        if top is None:
            top = power_iteration(curv.apply, curv.size, b, params.seed)
            _factors.put(("top", *key), top, 8)
        scale = 2.0 * top
    rng = np.random.default_rng(params.seed)
    batch = min(params.lissa_batch, len(curv.index))
    estimate = torch.zeros_like(b)
    diverged = False
    bound = 1e6 * float(b.norm()) * params.lissa_depth / scale + 1.0
    tail_start = params.lissa_depth - max(1, round(params.lissa_tail * params.lissa_depth))
    m = len(curv.index)
    work, pos = curv, m
    for rep in range(params.lissa_repeats):
        h = b.clone()
        tail = torch.zeros_like(b)
        for step in range(params.lissa_depth):
            if pos + batch > m:  # a new epoch: mini-batches without replacement within it
                curv.points_processed += work.points_processed if work is not curv else 0
                work, pos = curv.permuted(rng.permutation(m)), 0
            h = b + h - work.apply(h, slice(pos, pos + batch)) / scale
            pos += batch
            if step >= tail_start:
                tail += h
            if step % 50 == 0:
                if not torch.isfinite(h).all() or float(h.norm()) > bound:
                    diverged = True
                    break
                tick(rep * params.lissa_depth + step)
        if diverged:
            break
        estimate += tail / (params.lissa_depth - tail_start) / scale
    if work is not curv:
        curv.points_processed += work.points_processed
    x = estimate / params.lissa_repeats
    res = relative_residual(curv, x, b) if not diverged else [float("inf")] * b.shape[1]
    report = SolveReport(
        "lissa",
        iterations=[params.lissa_depth * params.lissa_repeats] * b.shape[1],
        residual=res,
        converged=[r <= params.tolerance for r in res],
        max_eigenvalue=top,
        extra={"scale": scale, "depth": params.lissa_depth, "repeats": params.lissa_repeats, "batch": batch,
               "tail": params.lissa_tail},
    )
    if diverged:
        report.notes.append("the recursion diverged: scale is below the curvature's largest eigenvalue / 2")
    _check_curvature(curv, params, key, report)
    report.seconds = time.perf_counter() - t0
    return x, report


def solve_arnoldi(
    curv: LayerCurvature, b: torch.Tensor, params: InfluenceParams, key: tuple, tick: Callable[[int], None]
) -> tuple[torch.Tensor, SolveReport]:
    """Low-rank inverse from captum's Arnoldi iteration (Schioppa et al. 2022)."""
    from captum.influence._core.arnoldi_influence_function import _parameter_arnoldi

    t0 = time.perf_counter()
    ckey = ("arnoldi", *key, params.arnoldi_dim, params.arnoldi_rank, params.seed)
    cached = _factors.get(ckey)
    reused = cached is not None
    if cached is None:
        g = torch.Generator().manual_seed(params.seed)
        start = torch.randn(curv.size, generator=g, dtype=torch.float64).to(curv.device)
        calls = [0]

        def hvp(v: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            calls[0] += 1
            tick(calls[0])
            out = curv.apply(v[0].to(curv.dtype)[:, None], damped=False)[:, 0]
            return (out.double(),)

        # Start in the curvature's range (C times a random vector): the Krylov space then holds
        # no null-space direction, which the damping term covers exactly. Arnoldi stops when a
        # new basis vector's norm falls below tol (captum: absolute), here relative to |C|.
        start = hvp((start / start.norm(),))[0]
        tol = 1e-7 * float(start.norm())
        n = min(params.arnoldi_dim, curv.size + 1)
        qs, hess = _parameter_arnoldi(hvp, (start,), n, tol, curv.device, False)
        basis = [t[0] for t in qs]
        m = len(basis)
        q = torch.stack(basis, dim=1)  # (P, m) Krylov basis
        # Captum returns the Hessenberg matrix without the last vector's column (and drops that
        # vector when the Krylov space closed early, losing one invariant direction): one more
        # product completes the projection Q^T C Q on every returned vector.
        h = torch.zeros(m, m, dtype=torch.float64, device=curv.device)
        h[:, : m - 1] = hess[:m, : m - 1].to(h)
        h[:, m - 1] = q.T @ hvp((basis[-1],))[0]
        # Captum's single Gram-Schmidt pass loses orthogonality once new vectors get tiny (a
        # Krylov space near the curvature's rank): keep the prefix of the basis that is still
        # orthonormal, a valid Arnoldi decomposition of its own.
        err = (q.T @ q - torch.eye(m, dtype=q.dtype, device=q.device)).abs()
        prefix = torch.cummax(torch.tril(err).max(dim=1).values, 0).values  # max |.| over [:k, :k]
        m = int((prefix <= ORTHOGONALITY_TOL).sum().clamp_min(1))
        q, h = q[:, :m], h[:m, :m]
        theta, s = torch.linalg.eigh((h + h.T) / 2)  # Rayleigh-Ritz pairs, ascending
        lo, hi = float(theta[0]), float(theta[-1])
        keep = min(params.arnoldi_rank, m)
        lam, v = theta[m - keep :], q @ s[:, m - keep :]
        cached = (lam, v, lo, hi, calls[0], m)
        _factors.put(ckey, cached, v.numel() * 8)
    lam, v, lo, hi, calls, dim = cached
    d = curv.damping
    b64 = b.double()
    coef = v.T @ b64  # (k, T)
    inv = 1.0 / (lam + d)
    bad = ~(lam + d > 0)
    inv[bad] = 0.0  # directions of non-positive damped curvature are dropped (and flagged)
    x = v @ (inv[:, None] * coef)
    if d > 0:
        x = x + (b64 - v @ coef) / d
    x = x.to(b.dtype)
    res = relative_residual(curv, x, b)
    report = SolveReport(
        "arnoldi",
        iterations=[calls] * b.shape[1],
        residual=res,
        converged=[r <= params.tolerance for r in res],
        indefinite=_indefinite(lo, hi, d),
        min_eigenvalue=lo,
        max_eigenvalue=hi,
        eigenvalue_method="ritz (arnoldi)",
        reused=reused,
        extra={"krylov_dim": dim, "rank": int(lam.numel())},
    )
    if d == 0:
        report.notes.append("damping 0: the inverse is restricted to the top-rank subspace (Captum's form)")
    report.seconds = time.perf_counter() - t0
    return x, report


# ------------------------------------------------------------------------ gradient cache


class GradientStore:
    """Per-example training gradients ``(n, P)`` float32 per (model version, training set,
    layer): in memory (byte-bounded LRU) and, with a ``cache_dir``, as ``.npy`` files under
    ``<cache_dir>/influence/<version>/<training set>/`` written atomically."""

    def __init__(self, cache_dir: Path | None, memory_bytes: int = MEMORY_CACHE_BYTES) -> None:
        self.cache_dir = cache_dir
        self._memory = _LRU(memory_bytes)

    def _path(self, key: tuple[str, str, str]) -> Path | None:
        if self.cache_dir is None:
            return None
        version, fingerprint, layer = key
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in layer) or "root"
        return self.cache_dir / "influence" / version[:24] / fingerprint[:24] / f"{safe}.npy"

    def load(self, key: tuple[str, str, str]) -> np.ndarray | None:
        arr = self._memory.get(key)
        if arr is not None:
            return arr
        path = self._path(key)
        if path is None or not path.is_file():
            return None
        try:
            arr = np.load(path, mmap_mode="r" if path.stat().st_size > self._memory.max_bytes // 4 else None)
        except (OSError, ValueError):
            return None  # a torn or foreign file: recompute
        self._memory.put(key, arr, 0 if isinstance(arr, np.memmap) else arr.nbytes)
        return arr

    def save(self, key: tuple[str, str, str], arr: np.ndarray) -> None:
        self._memory.put(key, arr, arr.nbytes)
        path = self._path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{threading.get_ident()}.tmp")
        with tmp.open("wb") as f:
            np.save(f, arr, allow_pickle=False)
        tmp.replace(path)  # atomic: another worker never reads half a file

    def clear_memory(self) -> None:
        self._memory.clear()


_stores: dict[Path | None, GradientStore] = {}


def gradient_store(cache_dir: Path | None) -> GradientStore:
    """The process-wide store for ``cache_dir`` (None = memory only)."""
    if cache_dir not in _stores:
        _stores[cache_dir] = GradientStore(cache_dir)
    return _stores[cache_dir]


# ---------------------------------------------------------------------------- computation


@dataclass
class InfluenceScores:
    """Scores ``(T, L, n)`` of T test images, L layers, n training points; ``total`` ``(T, n)``."""

    layers: list[Layer]
    scores: np.ndarray
    reports: list[SolveReport]
    test_loss: np.ndarray
    timings: dict[str, float]
    cached_layers: list[str]

    @property
    def total(self) -> np.ndarray:
        return self.scores.sum(axis=1)

    def sound(self, i: int) -> bool:
        return all(r.sound(i) for r in self.reports)


def _store_key(model: LoadedModel, train: TrainingSetData, layer: Layer) -> tuple[str, str, str]:
    return (model.version, train.fingerprint, f"{layer.name}#{layer.numel}")


def _chunk(params: InfluenceParams, model: LoadedModel, floats_per_example: int, input_numel: int) -> int:
    """Training points per chunk: the given ``batch_size``, else as many as keep the chunk's
    per-example tensors under ``GRAD_CHUNK_BYTES`` and its activations near 64 M floats (large
    chunks matter: torch.func's per-call overhead dominates small models), at least the
    model's measured gradient batch size."""
    if params.batch_size:
        return params.batch_size
    by_tensors = GRAD_CHUNK_BYTES // max(1, 4 * 3 * floats_per_example)
    by_activations = (64 << 20) // max(1, input_numel * 64)
    return int(max(model.grad_batch_size, min(4096, by_tensors, by_activations)))


def curvature_subset(n: int, samples: int | None, seed: int) -> np.ndarray:
    """Sorted indices of the training points the curvature is averaged over."""
    if samples is None or samples >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=samples, replace=False))


def _training_pass(
    model: LoadedModel,
    train: TrainingSetData,
    fns: list[LayerFunction],
    need_grads: list[int],
    need_jac: list[int],
    subset: np.ndarray,
    num_classes: int,
    params: InfluenceParams,
    progress: ProgressFn,
) -> tuple[dict[int, np.ndarray], dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """One pass over the training set (or only the curvature subset when no gradients are
    needed): per-example gradients ``(n, P)`` of the ``need_grads`` layers and logit
    Jacobians ``(m, K, P)`` with softmax ``(m, K)`` of the subset for the ``need_jac``
    layers (gradients of those come from the Jacobians: ``J^T (softmax - onehot)``)."""
    n, device, dtype = len(train), model.device, fns[0].flat0.dtype
    plain = [li for li in need_grads if li not in need_jac]
    floats = sum(fns[li].flat0.numel() for li in plain) + num_classes * sum(fns[li].flat0.numel() for li in need_jac)
    chunk = _chunk(params, model, floats, int(train.images(np.arange(1)).numel()))
    order = np.arange(n) if need_grads else subset
    sub_pos = np.full(n, -1)
    sub_pos[subset] = np.arange(len(subset))
    grads = {li: np.empty((n, fns[li].flat0.numel()), dtype=np.float32) for li in need_grads}
    jacs = {li: torch.empty(len(subset), num_classes, fns[li].flat0.numel(), dtype=dtype, device=device)
            for li in need_jac}
    probs = torch.empty(len(subset), num_classes, dtype=dtype, device=device)
    jac_fns = [fns[li] for li in need_jac]
    for start, x, y in train.batches(chunk, None if need_grads else subset):
        ids = order[start : start + len(x)]
        x, y = x.to(device, dtype), y.to(device)
        if need_jac:
            js, z = logit_jacobians(model.module, jac_fns, x)
            sel = sub_pos[ids] >= 0
            rows = torch.as_tensor(sub_pos[ids][sel], device=device)
            mask = torch.as_tensor(sel, device=device)
            probs[rows] = z[mask].softmax(-1)
            for li, j in zip(need_jac, js, strict=True):
                jacs[li][rows] = j[mask]
                if li in grads:
                    grads[li][ids] = grads_from_jacobian(j, z, y).float().cpu().numpy()
        if plain:
            for li, g in zip(plain, per_example_grads(model.module, [fns[li] for li in plain], x, y), strict=True):
                grads[li][ids] = g.float().cpu().numpy()
        progress(start + len(x), len(order), "training gradients")
    return grads, {li: (j, probs) for li, j in jacs.items()}


def compute_influence(
    model: LoadedModel,
    train: TrainingSetData,
    images: torch.Tensor,
    targets: torch.Tensor,
    params: InfluenceParams,
    progress: ProgressFn = no_progress,
    store: GradientStore | None = None,
) -> InfluenceScores:
    """Layer-wise influence scores of every training point on each test image.

    images ``(T, C, H, W)`` normalised on the model's device, targets ``(T,)`` class indices
    (the test loss is their cross-entropy). Returns scores ``(T, L, n)``."""
    store = store or gradient_store(None)
    module, device = model.module, model.device
    layers = resolve_layers(module, params.layers)
    if params.solver == "exact":
        for layer in layers:
            check_exact_size(layer, params.exact_max_params)
    fns = [LayerFunction(module, layer) for layer in layers]
    dtype = fns[0].flat0.dtype
    n, t = len(train), int(images.shape[0])
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    test_grads = per_example_grads(module, fns, images.to(device, dtype), targets.to(device))
    logits = model.forward(images.to(device, dtype))
    num_classes = int(logits.shape[1])
    test_loss = nn.functional.cross_entropy(logits.float(), targets.to(logits.device), reduction="none").cpu().numpy()
    timings["test_gradients_s"] = time.perf_counter() - t0

    # What the caches hold: training gradients (memory + disk) and, for the GGN, the logit
    # Jacobians of the curvature subset (memory).
    t0 = time.perf_counter()
    subset = curvature_subset(n, params.hessian_samples, params.seed)
    sub_key = None if len(subset) == n else (params.hessian_samples, params.seed)
    grads: dict[int, np.ndarray] = {}
    for li, layer in enumerate(layers):
        arr = store.load(_store_key(model, train, layer))
        if arr is not None and arr.shape == (n, layer.numel):
            grads[li] = arr
    cached_layers = [layers[li].name for li in grads]
    jac_keys = {li: ("jacobian", *_store_key(model, train, layer), sub_key) for li, layer in enumerate(layers)
                if params.curvature == "ggn" and len(subset) * num_classes * layer.numel * 4 <= JACOBIAN_BYTES}
    jacs = {li: _factors.get(k) for li, k in jac_keys.items()}
    jacs = {li: v for li, v in jacs.items() if v is not None}
    need_grads = [li for li, layer in enumerate(layers)
                  if li not in grads and n * layer.numel * 4 <= MAX_CACHED_LAYER_BYTES]
    streamed = [li for li in range(len(layers)) if li not in grads and li not in need_grads]
    need_jac = [li for li in jac_keys if li not in jacs]
    if need_grads or need_jac:
        fresh_grads, fresh_jacs = _training_pass(
            model, train, fns, need_grads, need_jac, subset, num_classes, params, progress
        )
        for li, arr in fresh_grads.items():
            store.save(_store_key(model, train, layers[li]), arr)
            grads[li] = arr
        for li, pair in fresh_jacs.items():
            _factors.put(jac_keys[li], pair, pair[0].numel() * pair[0].element_size())
            jacs[li] = pair
    timings["training_pass_s"] = time.perf_counter() - t0

    op_chunk = _chunk(params, model, 0, int(images[0].numel()))
    solutions: list[torch.Tensor] = []
    reports: list[SolveReport] = []
    t0 = time.perf_counter()
    for li, (layer, fn) in enumerate(zip(layers, fns, strict=True)):
        jac, probs = jacs.get(li, (None, None))
        curv = LayerCurvature(fn, train, subset, params.curvature, params.damping, op_chunk, device, jac, probs)
        key = (*_store_key(model, train, layer), params.curvature, params.damping, sub_key)
        stage = f"solve {layer.name} ({params.solver})"
        budget = {"cg": params.cg_max_iter, "lissa": params.lissa_depth * params.lissa_repeats,
                  "arnoldi": params.arnoldi_dim}.get(params.solver, 1)

        def tick(done: int, stage: str = stage, budget: int = budget) -> None:
            progress(min(done, budget), budget, stage)

        def explicit_progress(done: int, total: int, stage: str = stage) -> None:
            progress(done, total, stage)

        b = test_grads[li].T.contiguous()  # (P, T)
        if params.solver == "exact":
            x, report = solve_exact(curv, b, key, params.exact_max_params, explicit_progress)
        elif params.solver == "cg":
            x, report = solve_cg(curv, b, params, key, tick)
        elif params.solver == "lissa":
            x, report = solve_lissa(curv, b, params, key, tick)
        else:
            x, report = solve_arnoldi(curv, b, params, key, tick)
        report.extra["curvature_points"] = int(curv.points_processed)
        report.extra["curvature_products"] = "jacobian" if jac is not None else "functional"
        solutions.append(x)
        reports.append(report)
    timings["solve_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    scores = np.zeros((t, len(layers), n), dtype=np.float32)
    for li, arr in grads.items():
        v = solutions[li].float().cpu().numpy()
        for s0 in range(0, n, 1 << 14):
            scores[:, li, s0 : s0 + (1 << 14)] = (np.asarray(arr[s0 : s0 + (1 << 14)]) @ v).T
    if streamed:  # layers too large to keep: their gradients are recomputed and scored at once
        chunk = _chunk(params, model, sum(layers[li].numel for li in streamed), int(images[0].numel()))
        sub = [fns[li] for li in streamed]
        for start, x, y in train.batches(chunk):
            gs = per_example_grads(module, sub, x.to(device, dtype), y.to(device))
            for li, g in zip(streamed, gs, strict=True):
                scores[:, li, start : start + len(x)] = (g @ solutions[li].to(g.dtype)).T.float().cpu().numpy()
            progress(start + len(x), n, "training gradients (streamed)")
    timings["scores_s"] = time.perf_counter() - t0
    return InfluenceScores(layers, scores, reports, test_loss, timings, cached_layers)


# ------------------------------------------------------------------------------- summary


def rows_of(result: InfluenceScores) -> tuple[list[str], np.ndarray]:
    """Row names (layers, then 'total') and the scores ``(T, L + 1, n)`` in that order."""
    names = [layer.name for layer in result.layers] + ["total"]
    return names, np.concatenate([result.scores, result.total[:, None]], axis=1)


def class_means(scores: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Mean score over the training points of each class: ``(..., n)`` -> ``(..., K)``
    (NaN for a class without training points)."""
    out = np.full(scores.shape[:-1] + (num_classes,), np.nan, dtype=np.float64)
    for k in range(num_classes):
        mask = labels == k
        if mask.any():
            out[..., k] = scores[..., mask].mean(axis=-1)
    return out


def intra_inter(scores: np.ndarray, labels: np.ndarray, target: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean score ``(rows,)`` over training points of the target class (intra-class) and of
    the other classes (inter-class): the paper's I_avg (Aamir et al. 2023, Sec. 3.1)."""
    same = labels == target
    intra = scores[:, same].mean(axis=1) if same.any() else np.full(scores.shape[0], np.nan)
    inter = scores[:, ~same].mean(axis=1) if (~same).any() else np.full(scores.shape[0], np.nan)
    return intra, inter


def layer_correlation(scores: np.ndarray) -> np.ndarray:
    """Pearson correlation ``(L, L)`` of layer-wise score vectors ``(L, n)``; a constant
    layer correlates 0 with the others (1 with itself)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.corrcoef(scores.astype(np.float64))
    rho = np.atleast_2d(rho)
    rho = np.where(np.isfinite(rho), rho, 0.0)
    np.fill_diagonal(rho, 1.0)
    return rho


def average_linkage(vectors: np.ndarray | None = None, rho: np.ndarray | None = None) -> np.ndarray:
    """scipy average-linkage matrix ``(m - 1, 4)``: on Euclidean distances between the rows
    of ``vectors``, or on correlation distances ``1 - rho`` (Marti et al. 2017, as the paper)."""
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import pdist, squareform

    if rho is not None:
        d = squareform(np.clip(1.0 - rho, 0.0, 2.0), checks=False)
    else:
        assert vectors is not None
        d = pdist(vectors, metric="euclidean")
    return linkage(d, method="average")


def _top(row: np.ndarray, labels: np.ndarray, names: list[str], k: int, helpful: bool) -> list[dict[str, Any]]:
    order = np.argsort(-row if helpful else row, kind="stable")[:k]
    return [{"index": int(j), "label": names[int(labels[j])] if 0 <= labels[j] < len(names) else str(labels[j]),
             "score": float(row[j])} for j in order]


def image_summary(
    rows: list[str], scores: np.ndarray, labels: np.ndarray, label_names: list[str], target: int, top_k: int
) -> dict[str, Any]:
    """Top-k helpful / harmful training points, intra- and inter-class means per row of one
    image's scores ``(L + 1, n)``, and the layers' Pearson matrix and clustering."""
    intra, inter = intra_inter(scores, labels, target)
    out: dict[str, Any] = {
        "top_helpful": {r: _top(scores[i], labels, label_names, top_k, True) for i, r in enumerate(rows)},
        "top_harmful": {r: _top(scores[i], labels, label_names, top_k, False) for i, r in enumerate(rows)},
        "intra_class_mean": {r: finite_or_none(float(v)) for r, v in zip(rows, intra, strict=True)},
        "inter_class_mean": {r: finite_or_none(float(v)) for r, v in zip(rows, inter, strict=True)},
    }
    layer_rows = scores[:-1]
    rho = layer_correlation(layer_rows)
    out["pearson"] = np.round(rho, 6).tolist()
    if len(layer_rows) >= 2:
        z = average_linkage(rho=rho)
        out["linkage"] = np.round(z, 6).tolist()
    return out


# ----------------------------------------------------------------------------- rendering


def new_figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=90)


def figure_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def top_grid_png(
    test_image: np.ndarray,
    test_caption: str,
    rows: list[str],
    helpful: dict[str, list[dict[str, Any]]],
    harmful: dict[str, list[dict[str, Any]]],
    train: TrainingSetData,
) -> bytes:
    """Grid PNG: one row per layer (and total); the test image, then the most helpful and the
    most harmful training images, each captioned with its label and score."""
    k = max(len(v) for v in helpful.values())
    cols = 1 + 2 * k
    fig = new_figure(1.15 * cols, 1.35 * len(rows) + 0.4)
    grid = fig.add_gridspec(len(rows), cols, wspace=0.08, hspace=0.55)
    for r, name in enumerate(rows):
        ax = fig.add_subplot(grid[r, 0])
        ax.imshow(test_image, interpolation="nearest")
        ax.set_title(test_caption, fontsize=7)
        ax.set_ylabel(name, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        for c, (entries, colour) in enumerate(((helpful[name], "#1a7f37"), (harmful[name], "#cf222e"))):
            for j, e in enumerate(entries):
                ax = fig.add_subplot(grid[r, 1 + c * k + j])
                ax.imshow(train.display(e["index"]), interpolation="nearest")
                ax.set_title(f"{e['label']}  {e['score']:+.2g}", fontsize=7, color=colour)
                ax.axis("off")
    fig.suptitle("most helpful (green) | most harmful (red) training images", fontsize=9)
    return figure_png(fig)


def clustering_png(names: list[str], rho: np.ndarray, z: np.ndarray, title: str) -> bytes:
    """Dendrogram (average linkage) beside the Pearson correlation heatmap."""
    from scipy.cluster.hierarchy import dendrogram

    m = len(names)
    fig = new_figure(4 + 0.25 * m + 4, 3.5 + 0.12 * m)
    ax1 = fig.add_subplot(1, 2, 1)
    dendrogram(z, labels=names, ax=ax1, orientation="right", color_threshold=None)
    ax1.set_title("average linkage", fontsize=9)
    ax1.tick_params(labelsize=7)
    ax2 = fig.add_subplot(1, 2, 2)
    im = ax2.imshow(rho, cmap="RdBu_r", vmin=-1, vmax=1)
    ax2.set_xticks(range(m), names, rotation=90, fontsize=7)
    ax2.set_yticks(range(m), names, fontsize=7)
    ax2.set_title("Pearson correlation", fontsize=9)
    fig.colorbar(im, ax=ax2, fraction=0.046)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return figure_png(fig)


# ------------------------------------------------------------------------------------ run


def unsound_details(result: InfluenceScores) -> list[dict[str, Any]]:
    """One entry per layer whose solve is indefinite or did not converge for some image."""
    out = []
    for layer, r in zip(result.layers, result.reports, strict=True):
        bad = [i for i in range(len(r.converged)) if not r.sound(i)]
        if bad:
            out.append({"layer": layer.name, "images": bad, "indefinite": r.indefinite,
                        "residual": [finite_or_none(r.residual[i]) for i in bad], "notes": r.notes})
    return out


def enforce_soundness(result: InfluenceScores, params: InfluenceParams) -> list[str]:
    """Warnings for unsound solves; with ``on_unsound='fail'`` a ``BadParams`` instead."""
    bad = unsound_details(result)
    if not bad:
        return []
    hint = ("use curvature='ggn' (positive semi-definite), raise the damping, or give the solver "
            "more iterations (cg_max_iter, lissa_depth)")
    if params.on_unsound == "fail":
        raise BadParams(f"the influence solve is not sound for {len(bad)} layer(s): {hint}", details=bad)
    return [f"layer {b['layer']!r}: " + ("indefinite curvature" if b["indefinite"] else "not converged")
            + f" for image(s) {b['images']}; scores are unreliable ({hint})" for b in bad]


def resolve_training_set(model: LoadedModel, context: Any, ref: str | None = None) -> TrainingSetData:
    """The data set named by the ``training_set`` param (``ref``, ``ds_...``:
    ``workers.dataset_source.training_set_of``), else the training set uploaded with the job
    (``context.files["training_set"]``, a zip: ``workers.datasets.uploaded_training_set``)
    when there is one, else the model's registered training set (``model_dir`` found through
    ``context.models_dir``; also ``ref`` ``model:train``)."""
    if ref is not None and ref.startswith("ds_"):
        from workers.dataset_source import training_set_of

        return training_set_of(model, ref, context)
    uploaded = (getattr(context, "files", None) or {}).get(UPLOAD_NAME)
    if uploaded is not None:
        return uploaded_training_set(uploaded, model.manifest)
    model_dir = None
    models_dir = getattr(context, "models_dir", None)
    if model.manifest.training_set is not None and model.manifest.training_set.kind == "imagefolder" and models_dir:
        from schemas.manifests import scan

        entry = scan(Path(models_dir))[0].get(model.id)
        model_dir = entry.directory if entry is not None else None
    return load_training_set(model.manifest, model_dir)


def run(
    model: LoadedModel, inputs: Inputs, params: InfluenceParams, progress: ProgressFn, context: Any = None
) -> KindResult:
    """Kind ``influence``: per test image, layer-wise and total scores over the training set.

    ``context`` (``workers.pipeline.JobContext``) supplies ``cache_dir`` (gradient cache on
    disk; None = memory only) and ``models_dir`` (to find ImageFolder training sets).

    Artifacts: ``scores.npy`` ``(T, L + 1, n)`` float32 (rows: layers, then total),
    ``class_means.npy`` ``(T, L + 1, K)``, and per image ``top_<i>.png`` (helpful / harmful
    training images per row) and ``layers_<i>.png`` (dendrogram + Pearson matrix, 2+ layers).
    """
    train = resolve_training_set(model, context, params.training_set)
    cache_dir = getattr(context, "cache_dir", None)
    result = compute_influence(model, train, inputs.images, inputs.targets, params, progress, gradient_store(cache_dir))
    warnings = enforce_soundness(result, params)
    names, all_rows = rows_of(result)
    labels = model.manifest.labels
    images = []
    artifacts = [
        Artifact("scores.npy", npy_bytes(all_rows.astype(np.float32)), "application/x-npy"),
        Artifact("class_means.npy", npy_bytes(class_means(all_rows, train.labels, len(labels)).astype(np.float32)),
                 "application/x-npy"),
    ]
    for i in range(len(inputs)):
        target = int(inputs.targets[i])
        s = image_summary(names, all_rows[i], train.labels, labels, target, params.top_k)
        caption = f"test: {labels[target]}"
        artifacts.append(Artifact(f"top_{i}.png", top_grid_png(
            inputs.display[i], caption, names, s["top_helpful"], s["top_harmful"], train), "image/png"))
        if "linkage" in s:
            artifacts.append(Artifact(f"layers_{i}.png", clustering_png(
                names[:-1], np.array(s["pearson"]), np.array(s["linkage"]),
                f"image {i}: layer-wise influence scores"), "image/png"))
        images.append({
            "index": i, "target": target, "label": labels[target], "test_loss": float(result.test_loss[i]),
            "sound": result.sound(i), **s,
        })
        progress(i + 1, len(inputs), "rendering")
    summary = {
        "training_set": {"source": train.source, "size": len(train), "fingerprint": train.fingerprint[:16]},
        "solver": params.solver,
        "curvature": params.curvature,
        "damping": params.damping,
        "rows": names,
        "layers": [{"name": layer.name, "type": layer.kind, "params": layer.numel, "solve": r.as_dict()}
                   for layer, r in zip(result.layers, result.reports, strict=True)],
        "sound": all(result.sound(i) for i in range(len(inputs))),
        "warnings": warnings,
        "cached_layers": result.cached_layers,
        "timings": {k: round(v, 4) for k, v in result.timings.items()},
        "sign": "positive = helpful: removing the training image raises the test loss by about score / n",
        "images": images,
    }
    return KindResult(summary, artifacts)
