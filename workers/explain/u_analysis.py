"""U Analysis: Algorithm 1 of papers/u-analysis-and-model-inspector ("U Analysis", section 3).

Given an image ``x`` ``(C, H, W)``, its target ``y`` and an attribution map ``I``:

1. Regions: the image is tiled by non-overlapping ``W x W`` windows from the top-left corner,
   in raster order. When ``W`` does not divide the side, the last row/column of windows is
   narrower (a partial window of ``H mod W`` pixels): every pixel belongs to exactly one
   region, so ``x_N`` holds no pixel of ``x`` (the paper: "the x_N image does not have any
   information"). A region's importance is the sum of the (channel-aggregated) attribution
   over its pixels (the paper's ``get_region_importance``), so a partial window sums over
   fewer pixels.
2. Order: decreasing or increasing importance (stable sort: ties keep raster order), or a
   seeded random permutation.
3. ``x_i`` = ``x`` with its first ``i`` regions (in that order) replaced by noise, ``i = 0..N``
   (``x_0`` the original). The noise is one image ``z`` drawn once in pixel space, so a region
   keeps the same noise in every later ``x_j`` (as the authors' cumulative code does).
4. The model's prediction along the sequence; every gap between consecutive correctly
   predicted indices ``left < right`` with ``right - left > 1`` is a U: ``f(x_left) = y``,
   ``f(x_middle) != y`` for every ``left < middle < right``, ``f(x_right) = y``.

The paper picks one random middle per gap; we report all middles (deterministic) and also the
paper's pick, drawn from a seeded generator. Per U we report the patches removed between
``left`` and ``right`` (``order[left:right]``) and the suppressor patches, the paper's
"patches in x_middle but not in x_right" (``order[middle:right]``) for the first middle
``left + 1``: their presence, with ``order[right:]`` present, turns the prediction away
from ``y``; the suffix ``order[m:right]`` is the set for a later middle ``m``.

Every sequence image goes through ``model.forward`` (the fast engine) in chunks of
``params.batch_size or model.batch_size`` that run across images, so the cost after the
attribution is that of ``sum(N_i + 1)`` forward evaluations.
"""

from __future__ import annotations

import functools
import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from schemas.errors import BadParams
from schemas.models import Preprocessing
from schemas.npy_upload import REAL_KINDS, attribution_map, attribution_shape
from schemas.params import Aggregation
from schemas.u_analysis import MAX_REGIONS, NoiseParams, NoiseType, Order, UAnalysisParams
from workers import render
from workers.explain.base import Artifact, Inputs, KindResult, LoadedModel, ProgressFn, no_progress

STREAM_ORDER, STREAM_NOISE, STREAM_MIDDLE = 1, 2, 3
"""Independent random streams per image: ``SeedSequence([seed, image_index, stream, ...])``."""

MAX_STRIP_ROWS = 8
GATHER_BYTES = 64 << 20
"""Rows built at once by ``evaluate_sequences`` (then evaluated in forward chunks)."""
PROGRESS_REPORTS = 200
"""At most about this many progress calls per evaluation (each may write to Redis)."""


def rng_for(seed: int, index: int, stream: int, *extra: int) -> np.random.Generator:
    """The generator of one random stream of one image: reproducible whatever the batching."""
    return np.random.default_rng(np.random.SeedSequence([seed, index, stream, *extra]))


# ---------------------------------------------------------------------------------------------
# regions


@dataclass(frozen=True)
class Grid:
    """Non-overlapping ``window x window`` regions of an ``height x width`` image, raster order;
    the last row/column is partial when the window does not divide the side."""

    height: int
    width: int
    window: int

    @property
    def rows(self) -> int:
        return -(-self.height // self.window)

    @property
    def cols(self) -> int:
        return -(-self.width // self.window)

    @property
    def n(self) -> int:
        return self.rows * self.cols

    def labels(self) -> np.ndarray:
        """``(H, W)`` int64: the region index of each pixel (cached: do not modify)."""
        return _labels(self.height, self.width, self.window)

    def box(self, region: int) -> tuple[int, int, int, int]:
        """``(top, left, bottom, right)`` of a region in pixels, bottom/right exclusive."""
        r, c = divmod(int(region), self.cols)
        top, left = r * self.window, c * self.window
        return top, left, min(top + self.window, self.height), min(left + self.window, self.width)


@functools.lru_cache(maxsize=64)
def _labels(height: int, width: int, window: int) -> np.ndarray:
    cols = -(-width // window)
    out = (np.arange(height) // window)[:, None] * cols + (np.arange(width) // window)[None, :]
    out.setflags(write=False)
    return out


def window_pixels(size: tuple[int, int], window_px: int | None, window_fraction: float | None) -> int:
    """The window side in pixels: ``window_px``, else ``round(fraction * shorter side)`` (at
    least 1). BadParams when it exceeds the image or makes more than ``MAX_REGIONS`` regions."""
    side = min(size)
    if window_px is not None:
        if window_px > side:
            raise BadParams(f"window_px={window_px} is larger than the image side ({side} px)")
        win = int(window_px)
    elif window_fraction is not None:
        win = max(1, min(side, round(window_fraction * side)))
    else:
        raise BadParams("give window_px or window_fraction")
    n = Grid(size[0], size[1], win).n
    if n > MAX_REGIONS:
        raise BadParams(
            f"a {win} px window makes {n} regions on a {size[0]}x{size[1]} image (at most {MAX_REGIONS}): "
            "each region costs one model evaluation; use a larger window",
            details={"window_px": win, "regions": n},
        )
    return win


def region_importance(attr2d: np.ndarray, grid: Grid) -> np.ndarray:
    """``(H, W)`` map -> ``(N,)`` float64: the sum of the map over each region."""
    return np.bincount(grid.labels().ravel(), weights=np.asarray(attr2d, np.float64).ravel(), minlength=grid.n)


def region_order(importance: np.ndarray, order: Order, rng: np.random.Generator) -> np.ndarray:
    """``(N,)`` int64 permutation of region indices, first removed first. Sorting is stable
    (ties keep raster order); ``rng`` is used only by ``random``."""
    if order == "decreasing":
        return np.argsort(-importance, kind="stable")
    if order == "increasing":
        return np.argsort(importance, kind="stable")
    return rng.permutation(len(importance))


# ---------------------------------------------------------------------------------------------
# pixel space and noise


@dataclass(frozen=True)
class PixelSpace:
    """The affine map between pixel space ``u`` in ``[0, 1]`` and the model's input:
    ``x = a * u + b`` per channel, from the manifest's ``x = (255 * u * scale - mean) / std``."""

    a: torch.Tensor  # (C, 1, 1)
    b: torch.Tensor  # (C, 1, 1)

    @classmethod
    def of(cls, pre: Preprocessing, channels: int) -> PixelSpace:
        def per_channel(values: list[float]) -> torch.Tensor:
            v = torch.tensor(values, dtype=torch.float32)
            v = v.expand(channels) if len(v) == 1 else v[:channels]
            return v[:, None, None]

        mean, std = per_channel(pre.mean), per_channel(pre.std)
        return cls(a=255.0 * pre.scale / std, b=-mean / std)

    def to_model(self, u: torch.Tensor) -> torch.Tensor:
        return u * self.a.to(u.device) + self.b.to(u.device)

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b.to(x.device)) / self.a.to(x.device)

    def pixels_np(self, x: torch.Tensor) -> np.ndarray:
        """``to_pixels`` in numpy (one thread: small element-wise ops stay cheap on a busy CPU)."""
        return (x.detach().float().cpu().numpy() - self.b.numpy()) / self.a.numpy()

    def to_uint8(self, x: torch.Tensor) -> np.ndarray:
        """``(C, H, W)`` model input -> ``(H, W, 3)`` uint8 for display (grey replicated)."""
        rgb = (np.clip(self.pixels_np(x), 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)
        return np.repeat(rgb, 3, axis=2) if rgb.shape[2] == 1 else rgb[:, :, :3]


def noise_pixels(
    u: np.ndarray, noise: NoiseType, params: NoiseParams, grid: Grid, space_mean: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """The replacement image in pixel space, ``(C, H, W)`` float32, for an image ``u`` in pixel
    space. ``space_mean`` ``(C,)``: the normalisation mean in pixel space (``dataset_mean``).
    ``rng`` draws ``gaussian`` (``rng.normal``) and ``uniform`` (``rng.random``) noise over
    the whole ``(C, H, W)`` image at once."""
    c = u.shape[0]
    if noise == "zeros":
        z = np.zeros_like(u)
    elif noise == "ones":
        z = np.ones_like(u)
    elif noise == "constant":
        z = np.full_like(u, params.constant)
    elif noise == "gaussian":
        z = rng.normal(params.gaussian_mean, params.gaussian_std, size=u.shape)
    elif noise == "uniform":
        z = rng.random(size=u.shape)
    elif noise == "image_mean":
        z = np.broadcast_to(u.mean(axis=(1, 2), keepdims=True), u.shape)
    elif noise == "dataset_mean":
        z = np.broadcast_to(space_mean.reshape(c, 1, 1), u.shape)
    elif noise == "region_mean":
        labels = grid.labels().ravel()
        counts = np.bincount(labels, minlength=grid.n)
        means = np.stack([np.bincount(labels, weights=u[k].ravel(), minlength=grid.n) / counts for k in range(c)])
        z = means[:, labels].reshape(u.shape)
    elif noise == "blur":
        from scipy.ndimage import gaussian_filter

        sigma = params.blur_sigma if params.blur_sigma is not None else grid.window / 2
        z = gaussian_filter(u.astype(np.float64), sigma=(0, sigma, sigma), mode="reflect")
    else:  # pragma: no cover - the schema's Literal rules it out
        raise BadParams(f"unknown noise {noise!r}")
    if params.clip:
        z = np.clip(z, 0.0, 1.0)
    return np.ascontiguousarray(z, dtype=np.float32)


def noise_image(
    x: torch.Tensor, noise: NoiseType, params: NoiseParams, grid: Grid, space: PixelSpace, index: int
) -> torch.Tensor:
    """The replacement image ``(C, H, W)`` in the model's input space for the model input ``x``
    ``(C, H, W)`` of image number ``index`` (random noise from ``rng_for(seed, index,
    STREAM_NOISE)``)."""
    u = space.pixels_np(x)
    space_mean = space.pixels_np(torch.zeros(x.shape[0], 1, 1)).ravel()
    z = noise_pixels(u, noise, params, grid, space_mean, rng_for(params.seed, index, STREAM_NOISE))
    z = z * space.a.numpy() + space.b.numpy()
    return torch.from_numpy(z.astype(np.float32)).to(device=x.device, dtype=x.dtype)


# ---------------------------------------------------------------------------------------------
# the sequence x_0 ... x_N and its evaluation


def region_ranks(order: np.ndarray) -> np.ndarray:
    """``(N,)`` int32: the position of each region in ``order``; region r is replaced in ``x_i``
    iff ``rank[r] < i``."""
    rank = np.empty(len(order), dtype=np.int32)
    rank[order] = np.arange(len(order), dtype=np.int32)
    return rank


def pixel_ranks(grid: Grid, order: np.ndarray) -> torch.Tensor:
    """``(H, W)`` int64: the rank (``region_ranks``) of each pixel's region."""
    return torch.from_numpy(region_ranks(order)[grid.labels()].astype(np.int64))


def sequence_images(x: torch.Tensor, z: torch.Tensor, ranks: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """``x_i`` for ``i`` in ``steps`` ``(S,)``: ``(S, C, H, W)``, pixels of the first ``i`` regions
    from ``z``, the others from ``x`` (both ``(C, H, W)``); ``ranks`` from ``pixel_ranks``."""
    mask = ranks.to(x.device)[None, None] < steps.to(x.device)[:, None, None, None]
    return torch.where(mask, z[None], x[None])


@dataclass
class SequenceSpec:
    """Rows to evaluate: ``x_i`` for ``i`` in ``steps`` of one sequence, and the class whose
    probability is read. Specs may share ``x``, ``z`` and ``rank`` objects (they are pooled by
    identity, so sharing saves memory)."""

    x: torch.Tensor  # (C, H, W)
    z: torch.Tensor  # (C, H, W)
    grid: Grid
    rank: np.ndarray  # (N,) from region_ranks
    steps: np.ndarray  # (S,) int
    target: int


class _Pool:
    """Distinct objects by identity, numbered in order of arrival."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._index: dict[int, int] = {}

    def add(self, obj: Any, key: Any = None) -> int:
        k = id(obj) if key is None else key
        if k not in self._index:
            self._index[k] = len(self.items)
            self.items.append(obj)
        return self._index[k]


def evaluate_sequences(
    model: LoadedModel,
    specs: Sequence[SequenceSpec],
    batch_size: int,
    progress: ProgressFn = no_progress,
    stage: str = "evaluating",
    need_probability: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Every row of ``specs`` through ``model.forward`` in chunks of ``batch_size`` (chunks run
    across sequences), progress reported every ``1 / PROGRESS_REPORTS`` of the rows. Returns
    ``(predicted (R,) int64, target probability (R,) float32)`` in row order,
    ``R = sum(len(s.steps))`` (probabilities are NaN when not needed).

    Each chunk is gathered in one go: a row is (image, noise image, region ranks, region
    labels, step) by index into pools of the distinct tensors, and its pixels come from the
    noise image where ``rank[label[p]] < step``."""
    if not specs:
        return np.empty(0, np.int64), np.empty(0, np.float32)
    device = specs[0].x.device
    xs, zs, ranks, grids = _Pool(), _Pool(), _Pool(), _Pool()
    ids = np.array(
        [
            (
                xs.add(s.x),
                zs.add(s.z),
                ranks.add(s.rank),
                grids.add(s.grid, (s.grid.height, s.grid.width, s.grid.window)),
            )
            for s in specs
        ],
        dtype=np.int64,
    )
    lengths = np.array([len(s.steps) for s in specs], dtype=np.int64)
    total = int(lengths.sum())
    row_ids = ids[np.repeat(np.arange(len(specs)), lengths)]  # (R, 4): image, noise, ranks, grid
    row_step = np.concatenate([np.asarray(s.steps, np.int32) for s in specs])
    targets = np.repeat([s.target for s in specs], lengths)
    rank_pool = np.zeros((len(ranks.items), max(len(r) for r in ranks.items)), dtype=np.int32)
    for i, r in enumerate(ranks.items):
        rank_pool[i, : len(r)] = r
    label_pool = np.stack([g.labels().ravel() for g in grids.items])
    x_pool, z_pool = torch.stack(xs.items), torch.stack(zs.items)
    shape = tuple(x_pool.shape[1:])
    on_cpu = device.type == "cpu"
    if on_cpu:  # numpy: one thread, no OpenMP barrier per small op on a busy CPU
        x_np, z_np = x_pool.detach().numpy(), z_pool.detach().numpy()
    else:
        rank_pool_t, label_pool_t = torch.from_numpy(rank_pool).to(device), torch.from_numpy(label_pool).to(device)

    def rows_of(sl: slice) -> torch.Tensor:
        ids, steps = row_ids[sl], row_step[sl]
        if not on_cpu:
            ix, iz, ir, ig = (torch.from_numpy(a).to(device) for a in ids.T)
            pixel_rank = torch.gather(rank_pool_t[ir], 1, label_pool_t[ig])
            mask = (pixel_rank < torch.from_numpy(steps).to(device)[:, None]).view(-1, 1, *shape[1:])
            return torch.where(mask, z_pool[iz], x_pool[ix])
        # runs of rows from the same sequence share x, z and the pixel ranks: broadcast them
        out = np.empty((len(ids), *shape), dtype=x_np.dtype)
        cuts = np.flatnonzero((ids[1:] != ids[:-1]).any(1)) + 1
        for a, b in zip([0, *cuts.tolist()], [*cuts.tolist(), len(ids)], strict=True):
            ix, iz, ir, ig = ids[a]
            pixel_rank = rank_pool[ir][label_pool[ig]].reshape(1, 1, *shape[1:])
            out[a:b] = x_np[ix]
            np.copyto(out[a:b], z_np[iz], where=pixel_rank < steps[a:b, None, None, None])
        return torch.from_numpy(out)

    predicted = np.empty(total, dtype=np.int64)
    prob = np.full(total, np.nan, dtype=np.float32)
    every, reported = max(1, total // PROGRESS_REPORTS), 0
    # rows are built many forward chunks at a time (up to GATHER_BYTES) to amortise the indexing
    gather = batch_size * max(1, min(64, GATHER_BYTES // (batch_size * int(np.prod(shape)) * 4)))
    for start in range(0, total, gather):
        sl = slice(start, min(start + gather, total))
        rows = rows_of(sl)
        logits = []
        for i in range(0, len(rows), batch_size):
            logits.append(model.forward(rows[i : i + batch_size]).float().cpu().numpy())
            done = start + min(i + batch_size, len(rows))
            if done - reported >= every or done == total:
                reported = done
                progress(done, total, stage)
        out = np.concatenate(logits)
        predicted[sl] = out.argmax(1)
        if need_probability:
            z = out - out.max(1, keepdims=True)
            p = np.exp(z[np.arange(len(out)), targets[sl]]) / np.exp(z).sum(1)
            prob[sl] = p.astype(np.float32)
    return predicted, prob


# ---------------------------------------------------------------------------------------------
# U-triples


def find_u_triples(
    predicted: Sequence[int] | np.ndarray, target: int, order: np.ndarray, rng: np.random.Generator | None = None
) -> list[dict[str, Any]]:
    """Every U of a sequence (Algorithm 1's loop over consecutive correct positions).

    ``predicted`` ``(N+1,)``: the class predicted for ``x_0 .. x_N``; ``order`` ``(N,)``: regions
    in removal order. Returns, per gap between consecutive correct indices, ``left``, ``right``,
    all ``middles``, the paper's random ``middle`` (from ``rng``; the first middle without
    one), ``removed`` = ``order[left:right]`` and ``suppressors`` = ``order[left+1:right]``.
    """
    correct = np.flatnonzero(np.asarray(predicted) == target)
    triples = []
    for left, right in zip(correct[:-1].tolist(), correct[1:].tolist(), strict=True):
        if right - left > 1:
            middles = list(range(left + 1, right))
            middle = int(rng.choice(middles)) if rng is not None else middles[0]
            triples.append(
                {
                    "left": left,
                    "middle": middle,
                    "right": right,
                    "middles": middles,
                    "removed": [int(r) for r in order[left:right]],
                    "suppressors": [int(r) for r in order[left + 1 : right]],
                }
            )
    return triples


# ---------------------------------------------------------------------------------------------
# attribution


def compute_attribution(
    model: LoadedModel,
    images: torch.Tensor,
    targets: torch.Tensor,
    method: Any,
    progress: ProgressFn = no_progress,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Attribution ``(N, C, H, W)`` of ``images`` ``(N, C, H, W)`` for ``targets`` ``(N,)`` by
    ``method`` (an ``AttributionMethod`` params model), through the ``attribution`` kind. The
    job's ``batch_size``, when set, is also the attribution's chunk size."""
    from workers.explain.attribution import attribute

    if batch_size is not None:
        method = method.model_copy(update={"batch_size": batch_size})
    return attribute(model, images, targets, method, progress)


def uploaded_attribution(array: np.ndarray, n: int, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """A client's map as ``(N, C', H, W)`` float32; the shapes ``schemas.npy_upload.attribution_shape``
    accepts, real numbers, finite."""
    a = np.asarray(array)
    if a.dtype.kind not in REAL_KINDS:
        raise BadParams(f"the attribution map must be real numbers, not {a.dtype}")
    a = a.reshape(attribution_shape(a.shape, n, channels, size)).astype(np.float32)
    if not np.isfinite(a).all():
        raise BadParams("the attribution map has NaN or infinite values")
    return torch.from_numpy(a)


# ---------------------------------------------------------------------------------------------
# one analysis per image


@dataclass
class UResult:
    """The U Analysis of one image. ``predicted`` and ``target_probability`` ``(N+1,)`` are
    indexed by the step ``i`` of ``x_i``; ``order`` ``(N,)`` is the removal order."""

    index: int
    target: int
    grid: Grid
    importance: np.ndarray
    order: np.ndarray
    predicted: np.ndarray
    target_probability: np.ndarray
    triples: list[dict[str, Any]] = field(default_factory=list)

    def summary(self, labels: list[str]) -> dict[str, Any]:
        return {
            "target": self.target,
            "label": labels[self.target] if self.target < len(labels) else str(self.target),
            "regions": self.grid.n,
            "evaluations": self.grid.n + 1,
            "region_importance": [float(v) for v in self.importance],
            "order": [int(r) for r in self.order],
            "predicted": [int(p) for p in self.predicted],
            "target_probability": [round(float(p), 6) for p in self.target_probability],
            "has_u": bool(self.triples),
            "triples": [
                {**t, "suppressor_boxes": [list(self.grid.box(r)) for r in t["suppressors"]]} for t in self.triples
            ],
        }


def analyse(
    model: LoadedModel,
    images: torch.Tensor,
    targets: torch.Tensor,
    attributions: torch.Tensor,
    params: UAnalysisParams,
    aggregation: Aggregation,
    progress: ProgressFn = no_progress,
    first_index: int = 0,
) -> list[UResult]:
    """U Analysis of ``images`` ``(N, C, H, W)`` (model input space) for ``targets`` ``(N,)``
    with ``attributions`` ``(N, C', H, W)`` (reduced to 2-D by ``aggregation``); image ``j`` is
    seeded as number ``first_index + j``. Every image's sequence is evaluated in shared chunks."""
    n, c, h, w = images.shape
    grid = Grid(h, w, window_pixels((h, w), params.window_px, params.window_fraction))
    space = PixelSpace.of(model.manifest.preprocessing, c)
    specs, orders, importances = [], [], []
    for j in range(n):
        index = first_index + j
        imp = region_importance(render.to_2d(attributions[j], aggregation), grid)
        order = region_order(imp, params.order, rng_for(params.seed, index, STREAM_ORDER, grid.window))
        z = noise_image(images[j], params.noise, params, grid, space, index)
        steps = np.arange(grid.n + 1)
        specs.append(SequenceSpec(images[j], z, grid, region_ranks(order), steps, int(targets[j])))
        orders.append(order)
        importances.append(imp)
    predicted, prob = evaluate_sequences(
        model, specs, params.batch_size or model.batch_size, progress, "evaluating sequence"
    )
    results = []
    for j in range(n):
        rows = slice(j * (grid.n + 1), (j + 1) * (grid.n + 1))
        target = int(targets[j])
        triples = find_u_triples(
            predicted[rows], target, orders[j], rng_for(params.seed, first_index + j, STREAM_MIDDLE)
        )
        results.append(
            UResult(first_index + j, target, grid, importances[j], orders[j], predicted[rows], prob[rows], triples)
        )
    return results


# ---------------------------------------------------------------------------------------------
# pictures


def _figure_png(draw: Callable[[Any], None], size: tuple[float, float]) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    draw(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def curve_png(result: UResult, title: str) -> bytes:
    """Target probability along ``x_0 .. x_N``, correct steps green, wrong red, each U shaded
    from left to right with its middles marked."""

    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        steps = np.arange(len(result.predicted))
        ok = result.predicted == result.target
        ax.plot(steps, result.target_probability, color="0.4", lw=1, zorder=1)
        ax.scatter(steps[ok], result.target_probability[ok], s=12, color="tab:green", label="f(x_i) = y", zorder=2)
        ax.scatter(steps[~ok], result.target_probability[~ok], s=12, color="tab:red", label="f(x_i) != y", zorder=2)
        for k, t in enumerate(result.triples):
            ax.axvspan(t["left"], t["right"], color="tab:orange", alpha=0.15, label="U" if k == 0 else None)
            m = t["middle"]
            ax.annotate(
                "U",
                (m, result.target_probability[m]),
                textcoords="offset points",
                xytext=(0, 8),
                ha="center",
                color="tab:orange",
                fontweight="bold",
            )
        ax.set_xlabel("regions replaced (i)")
        ax.set_ylabel("probability of the target")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(title, fontsize=9)
        ax.legend(loc="best", fontsize=7)
        fig.subplots_adjust(left=0.1, right=0.98, bottom=0.14, top=0.9)

    return _figure_png(draw, (6.4, 3.6))


def _upscale(rgb: np.ndarray, min_side: int = 128) -> tuple[np.ndarray, int]:
    k = max(1, -(-min_side // max(rgb.shape[:2])))
    return np.repeat(np.repeat(rgb, k, 0), k, 1), k


def strip_png(result: UResult, x: torch.Tensor, z: torch.Tensor, space: PixelSpace, labels: list[str]) -> bytes:
    """Rows of ``x_left | x_middle | x_right`` (the paper's pick of middle), one per U (at most
    ``MAX_STRIP_ROWS``), the patches present in ``x_middle`` but not in ``x_right`` outlined."""
    from PIL import Image, ImageDraw

    ranks = pixel_ranks(result.grid, result.order)
    rows = []
    for t in result.triples[:MAX_STRIP_ROWS]:
        steps = torch.tensor([t["left"], t["middle"], t["right"]])
        imgs = sequence_images(x, z, ranks, steps)
        tiles = []
        for col, (step, img) in enumerate(zip(steps.tolist(), imgs, strict=True)):
            rgb, k = _upscale(space.to_uint8(img))
            tile = Image.new("RGB", (rgb.shape[1] + 8, rgb.shape[0] + 22), "white")
            tile.paste(Image.fromarray(rgb), (4, 18))
            d = ImageDraw.Draw(tile)
            p = int(result.predicted[step])
            name = labels[p] if p < len(labels) else str(p)
            d.text(
                (4, 3),
                f"x_{step}: {name[:18]} ({result.target_probability[step]:.2f})",
                fill="green" if p == result.target else "red",
            )
            if col == 1:  # the paper's suppressors of this middle: in x_middle, not in x_right
                for r in result.order[t["middle"] : t["right"]]:
                    top, left, bottom, right = result.grid.box(r)
                    d.rectangle((4 + left * k, 18 + top * k, 4 + right * k - 1, 18 + bottom * k - 1), outline="orange")
            tiles.append(tile)
        row = Image.new("RGB", (sum(tl.width for tl in tiles), tiles[0].height), "white")
        for i, tl in enumerate(tiles):
            row.paste(tl, (i * tl.width, 0))
        rows.append(row)
    out = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)), "white")
    for i, r in enumerate(rows):
        out.paste(r, (0, i * r.height))
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()


def regions_png(result: UResult, display: np.ndarray) -> bytes:
    """Region importance over the image, region borders drawn, and each region's removal rank
    written in it when there are at most 100 regions."""
    from PIL import Image, ImageDraw

    grid = result.grid
    map2d = result.importance[grid.labels()].astype(np.float32)
    img = Image.open(io.BytesIO(render.overlay_png(map2d, display)))
    k = img.width / grid.width
    d = ImageDraw.Draw(img)
    for r in range(grid.n):
        top, left, bottom, right = grid.box(r)
        d.rectangle((left * k, top * k, right * k - 1, bottom * k - 1), outline=(255, 255, 255))
    if grid.n <= 100:
        rank = np.empty(grid.n, dtype=np.int64)
        rank[result.order] = np.arange(grid.n)
        for r in range(grid.n):
            top, left, _, _ = grid.box(r)
            d.text((left * k + 2, top * k + 1), str(rank[r] + 1), fill=(255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# the job kind


def run(
    model: LoadedModel,
    inputs: Inputs,
    params: UAnalysisParams,
    progress: ProgressFn,
    attribution: np.ndarray | None = None,
    context: Any = None,
) -> KindResult:
    """The ``u_analysis`` kind: U Analysis of each input image.

    ``attribution``: a map uploaded by the client (see ``uploaded_attribution`` for its shapes),
    else the ``.npy`` upload named ``attribution`` in ``context.files`` (``JobContext``); when
    there is none, ``params.attribution`` computes one for each image's target. Artifacts per image
    ``i``: ``{i}-curve.png``, ``{i}-regions.png``, ``{i}-regions.npy`` (``(rows, cols)``
    importance), and ``{i}-strip.png`` when a U was found. The summary holds the curve,
    the order and every U-triple.
    """
    n, c, h, w = inputs.images.shape
    win = window_pixels((h, w), params.window_px, params.window_fraction)  # fail before the attribution
    t0 = time.perf_counter()
    upload = getattr(context, "files", {}).get("attribution") if attribution is None else None
    if upload is not None:  # checked by the API before queueing; again here, with the same code
        attribution = attribution_map(upload, n, c, (h, w))
    if attribution is not None:
        attr = uploaded_attribution(attribution, n, c, (h, w)).to(inputs.images.device)
        source, aggregation = "uploaded", params.aggregation or "sum"
    else:
        attr = compute_attribution(
            model, inputs.images, inputs.targets, params.attribution, progress, params.batch_size
        )
        source, aggregation = params.attribution.method, params.aggregation or params.attribution.aggregation
    t1 = time.perf_counter()
    results = analyse(model, inputs.images, inputs.targets, attr, params, aggregation, progress)
    t2 = time.perf_counter()
    space = PixelSpace.of(model.manifest.preprocessing, c)
    labels = model.manifest.labels
    artifacts = []
    for j, res in enumerate(results):
        title = (
            f"{labels[res.target] if res.target < len(labels) else res.target}: {res.grid.n} regions of "
            f"{win} px, {params.order}, {params.noise} noise, {len(res.triples)} U"
        )
        artifacts.append(Artifact(f"{j}-curve.png", curve_png(res, title), "image/png"))
        artifacts.append(Artifact(f"{j}-regions.png", regions_png(res, inputs.display[j]), "image/png"))
        artifacts.append(
            Artifact(
                f"{j}-regions.npy",
                render.npy_bytes(res.importance.reshape(res.grid.rows, res.grid.cols).astype(np.float32)),
                "application/x-npy",
            )
        )
        if res.triples:
            z = noise_image(inputs.images[j], params.noise, params, res.grid, space, j)
            artifacts.append(
                Artifact(f"{j}-strip.png", strip_png(res, inputs.images[j], z, space, labels), "image/png")
            )
    t3 = time.perf_counter()
    summary = {
        "attribution": source,
        "aggregation": aggregation,
        "window_px": win,
        "grid": {"rows": results[0].grid.rows, "cols": results[0].grid.cols, "regions": results[0].grid.n},
        "order": params.order,
        "noise": params.noise,
        "seed": params.seed,
        "images_with_u": sum(bool(r.triples) for r in results),
        "runtime_s": {
            "attribution": round(t1 - t0, 4),
            "analysis": round(t2 - t1, 4),
            "render": round(t3 - t2, 4),
        },
        "images": [r.summary(labels) for r in results],
    }
    return KindResult(summary, artifacts)
