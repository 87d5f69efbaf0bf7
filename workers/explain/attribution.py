"""Kind ``attribution``: one Captum attribution method on a batch of images, batched so that it
costs about what its model evaluations cost.

``attribute(model, images (N, C, H, W), targets (N,), params) -> (N, C, H, W)`` runs the
method named by ``params.method`` with Captum's own classes (Kokhlikyan et al. 2020, the
library the Captum comparison paper uses) and returns the raw attributions, on the input's
shape. What this module adds is how the work is cut:

- gradient methods evaluate ``model.module`` in chunks of ``model.grad_batch_size`` (or the
  job's ``batch_size``) inputs: Captum's ``internal_batch_size`` for Integrated Gradients
  and the noise tunnel, image chunks for single-pass methods, sample chunks for
  GradientSHAP (whose Captum class has no batching of its own);
- forward-only methods (occlusion, feature ablation, Shapley value sampling, KernelSHAP,
  LIME) evaluate through ``model.forward`` (the fast engine) with ``perturbations_per_eval``
  set to ``model.batch_size``; occlusion, feature ablation and Shapley value sampling are
  Captum's algorithms (same windows, draws and sums, the same maps) written here without
  Captum's per-perturbation full-image work and per-permutation loop over the mask's pixels;
  KernelSHAP and LIME keep Captum's sampling and fit, with the samples' images built per
  batch and LIME's similarity from per-superpixel sums;
- rule-based methods (DeepLift, DeepLiftShap, guided backprop, deconvolution, guided
  Grad-CAM, LRP) run on the copy prepared by :mod:`workers.explain.rules`, so their rules
  apply to every nonlinearity, and never leave hooks on the cached model; DeepLift and
  DeepLiftShap on ReLU/ReLU6 models run in two passes (:mod:`workers.explain.deeplift`: the
  reference without gradients, kept across jobs for baselines every image shares, then
  the inputs), the same maps for half the evaluations;
- every random draw (noise, baselines, samples, metric perturbations) happens under
  ``params.seed`` without touching the process's global RNG state.

``run`` adds, per image, the 2-D map, heatmap and overlay PNGs, statistics, the top
regions and the optional quality scores (Captum's ``sensitivity_max`` and ``infidelity``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
from captum import attr as ca
from captum import metrics as cm

from schemas.attribution import (
    FORWARD_METHODS,
    AttributionParams,
    Baseline,
    DeconvolutionMethod,
    DeepLiftMethod,
    DeepLiftShapMethod,
    FeatureAblationMethod,
    GradCamMethod,
    GradientShapMethod,
    GuidedBackpropMethod,
    GuidedGradCamMethod,
    InputXGradientMethod,
    IntegratedGradientsMethod,
    KernelShapMethod,
    LRPMethod,
    NoiseTunnelMethod,
    OcclusionMethod,
    SaliencyMethod,
    ShapleyValueSamplingMethod,
    check_supported,
    gradcam_layer,
)
from schemas.attribution import _Method as MethodParams
from schemas.attribution import _WithSuperpixels as SuperpixelParams
from schemas.errors import BadParams
from schemas.models import ModelManifest
from workers import render
from workers.explain import deeplift, rules
from workers.explain.base import Artifact, Inputs, KindResult, LoadedModel, ProgressFn, no_progress

__all__ = ["attribute", "run", "quality_scores", "image_summary", "image_artifacts", "seeded"]


# --- helpers shared by the methods ---------------------------------------------------------


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's and numpy's global generators (Captum draws from both) for the block,
    and restore their previous state afterwards."""
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            np.random.set_state(np_state)


def input_bounds(manifest: ModelManifest, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(lo, hi)`` ``(C, 1, 1)`` of the normalised input: pixel values 0 and 255."""
    pre = manifest.preprocessing
    c = 1 if pre.mode == "L" else 3
    mean = torch.tensor(pre.mean[:c], dtype=torch.float32)[:, None, None]
    std = torch.tensor(pre.std[:c], dtype=torch.float32)[:, None, None]
    lo, hi = (0.0 - mean) / std, (255.0 * pre.scale - mean) / std
    return torch.minimum(lo, hi).to(device), torch.maximum(lo, hi).to(device)


def input_range(manifest: ModelManifest) -> float:
    """The widest per-channel range of the normalised input (SmoothGrad's noise unit)."""
    lo, hi = input_bounds(manifest, torch.device("cpu"))
    return float((hi - lo).max())


SHARED_BASELINES: tuple[Baseline, ...] = ("zero", "black", "uniform_noise")
"""Baselines that are the same for every image of a model (``uniform_noise``: for a given seed
and draw); ``mean`` and ``blur`` depend on the image."""


def make_baseline(
    kind: Baseline, x: torch.Tensor, manifest: ModelManifest, blur_sigma: float, seed: int, draw: int = 0
) -> torch.Tensor:
    """A baseline of shape ``x`` ``(N, C, H, W)``; ``draw`` numbers independent noise draws
    (one noise image per ``seed`` and ``draw``, the same for every image: whatever the chunk
    sizes, an image gets the same baseline)."""
    if kind == "zero":
        return torch.zeros_like(x)
    if kind == "black":
        lo, hi = input_bounds(manifest, x.device)
        pre = manifest.preprocessing
        black = lo if pre.std[0] > 0 else hi  # pixel 0 maps to lo unless std is negative
        return black.expand_as(x).clone()
    if kind == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x).clone()
    if kind == "blur":
        from scipy.ndimage import gaussian_filter

        s = blur_sigma * max(x.shape[2:])
        a = gaussian_filter(x.detach().cpu().numpy(), sigma=(0, 0, s, s), mode="reflect")
        return torch.from_numpy(a).to(x.device, x.dtype)
    lo, hi = input_bounds(manifest, torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed * 7919 + draw)
    u = torch.rand((1, *x.shape[1:]), generator=gen)
    return (lo + u * (hi - lo)).to(x.device, x.dtype).expand_as(x).clone()


class CountedForward:
    """A forward function for Captum that reports progress (model evaluations done of
    ``total``) after every call, so long Captum loops can be canceled between chunks."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], progress: ProgressFn, total: int, stage: str):
        self.fn, self.progress, self.total, self.stage = fn, progress, max(1, total), stage
        self.done = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fn(x)
        self.done += int(x.shape[0])
        self.progress(min(self.done, self.total), self.total, self.stage)
        return out


def engine_forward(model: LoadedModel) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model.forward`` (the fast engine) as an ordinary tensor function for Captum: the
    engine may return inference-mode tensors, which Captum cannot update in place."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        return model.forward(x.detach()).clone()

    return forward


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, max(1, size)):
        yield slice(start, min(n, start + max(1, size)))


def superpixel_mask(x: torch.Tensor, params: SuperpixelParams) -> torch.Tensor:
    """Feature ids ``(1, 1, H, W)`` (long, 0..F-1) for one image ``x`` ``(1, C, H, W)``: a
    regular grid, or SLIC superpixels (Achanta et al. 2012, scikit-image) of the image
    rescaled to [0, 1]."""
    h, w = x.shape[2:]
    if params.superpixels == "grid":
        k = max(1, round(math.sqrt(params.n_segments)))
        rows = torch.arange(h, device=x.device) * k // h
        cols = torch.arange(w, device=x.device) * k // w
        return (rows[:, None] * k + cols[None, :])[None, None].long()
    from skimage.segmentation import slic

    a = x[0].detach().float().cpu().numpy().transpose(1, 2, 0)
    a = (a - a.min()) / max(float(a.max() - a.min()), 1e-12)
    if a.shape[2] == 1:
        # grey values span [0, 1] where SLIC's Lab colours span ~100: scale the compactness alike
        compactness = params.slic_compactness / 100
        labels = slic(
            a[:, :, 0], n_segments=params.n_segments, compactness=compactness, start_label=0, channel_axis=None
        )
    else:
        labels = slic(a, n_segments=params.n_segments, compactness=params.slic_compactness, start_label=0)
    uniq, ids = np.unique(labels, return_inverse=True)
    if len(uniq) < 2:
        raise BadParams(
            f"SLIC found a single superpixel in this image; use superpixels='grid' or change n_segments "
            f"(now {params.n_segments}) or slic_compactness"
        )
    return torch.from_numpy(ids.reshape(h, w)).to(x.device).long()[None, None]


def _window(params: OcclusionMethod, h: int, w: int) -> tuple[int, int]:
    """Occlusion window and stride in pixels (default 1/7 of the side, stride half of it:
    32/16 at 224, the setting the issue measures)."""
    window = params.window or max(1, round(min(h, w) / 7))
    if window > min(h, w):
        raise BadParams(f"occlusion window {window} px is larger than the {h}x{w} input")
    stride = params.stride or max(1, window // 2)
    return window, stride


# --- the methods -----------------------------------------------------------------------------


class _Run:
    """One call of :func:`attribute`: the model, chunk sizes and progress of a method."""

    def __init__(self, model: LoadedModel, params: MethodParams, progress: ProgressFn, n: int) -> None:
        self.model, self.params, self.progress, self.n = model, params, progress, n
        self.grad_bs = params.batch_size or model.grad_batch_size
        self.fwd_bs = params.batch_size or model.batch_size

    def leaf(self, x: torch.Tensor) -> torch.Tensor:
        """A chunk of inputs as a leaf tensor, requiring grad for gradient methods (as Captum
        expects; it warns otherwise)."""
        return x.detach().clone().requires_grad_(self.params.method not in FORWARD_METHODS)

    def grad_forward(self, total: int) -> CountedForward:
        return CountedForward(self.model.module, self.progress, total, "attribution")

    def fwd_forward(self, total: int) -> CountedForward:
        return CountedForward(engine_forward(self.model), self.progress, total, "attribution")

    def baseline(self, kind: Baseline, x: torch.Tensor, blur_sigma: float, draw: int = 0) -> torch.Tensor:
        return make_baseline(kind, x, self.model.manifest, blur_sigma, self.params.seed, draw)

    def baselines(self, kinds: list[Baseline], x: torch.Tensor, blur_sigma: float) -> torch.Tensor:
        """The baseline distribution for one image ``x`` ``(1, C, H, W)`` -> ``(B, C, H, W)``."""
        return torch.cat([self.baseline(k, x, blur_sigma, draw=i) for i, k in enumerate(kinds)])

    def per_chunk(
        self, x: torch.Tensor, t: torch.Tensor, size: int, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        out = []
        for s in _chunks(len(x), size):
            out.append(fn(self.leaf(x[s]), t[s]).detach())
            self.progress(s.stop, len(x), "attribution")
        return torch.cat(out)


def _saliency(r: _Run, x: torch.Tensor, t: torch.Tensor, p: SaliencyMethod) -> torch.Tensor:
    method = ca.Saliency(r.grad_forward(len(x)))
    return r.per_chunk(x, t, r.grad_bs, lambda xc, tc: method.attribute(xc, target=tc, abs=p.abs))


def _input_x_gradient(r: _Run, x: torch.Tensor, t: torch.Tensor, p: InputXGradientMethod) -> torch.Tensor:
    method = ca.InputXGradient(r.grad_forward(len(x)))
    return r.per_chunk(x, t, r.grad_bs, lambda xc, tc: method.attribute(xc, target=tc))


def _integrated_gradients(r: _Run, x: torch.Tensor, t: torch.Tensor, p: IntegratedGradientsMethod) -> torch.Tensor:
    method = ca.IntegratedGradients(r.grad_forward(len(x) * p.n_steps))
    # Captum's internal batch holds internal_batch_size // n_images steps: keep <= grad_bs images
    return r.per_chunk(
        x,
        t,
        r.grad_bs,
        lambda xc, tc: method.attribute(
            xc,
            baselines=r.baseline(p.baseline, xc, p.blur_sigma),
            target=tc,
            n_steps=p.n_steps,
            method=p.integration,
            internal_batch_size=r.grad_bs,
        ),
    )


def _noise_tunnel(r: _Run, x: torch.Tensor, t: torch.Tensor, p: NoiseTunnelMethod) -> torch.Tensor:
    method = ca.NoiseTunnel(ca.IntegratedGradients(r.grad_forward(len(x) * p.nt_samples * p.n_steps)))
    stdev = p.noise_level * input_range(r.model.manifest)

    def one(xc: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
        # noisy copies per partition so that IG's chunks hold about grad_bs inputs
        per_partition = max(1, r.grad_bs // (len(xc) * p.n_steps))
        return method.attribute(
            xc,
            nt_type=p.nt_type,
            nt_samples=p.nt_samples,
            nt_samples_batch_size=per_partition,
            stdevs=stdev,
            baselines=r.baseline(p.baseline, xc, p.blur_sigma),
            target=tc,
            n_steps=p.n_steps,
            method=p.integration,
            internal_batch_size=r.grad_bs,
        )

    return r.per_chunk(x, t, r.grad_bs, one)


def _gradient_shap(r: _Run, x: torch.Tensor, t: torch.Tensor, p: GradientShapMethod) -> torch.Tensor:
    """Per image; Captum's GradientShap evaluates all ``n_samples`` at once, so the samples are
    drawn in calls of ``grad_bs`` and averaged (the estimator is a plain mean over samples)."""
    method = ca.GradientShap(r.grad_forward(len(x) * p.n_samples))
    out = []
    for i in range(len(x)):
        xi, ti = r.leaf(x[i : i + 1]), t[i : i + 1]
        dist = r.baselines(p.baselines, xi, p.blur_sigma)
        total = torch.zeros_like(xi, requires_grad=False)
        for s in _chunks(p.n_samples, r.grad_bs):
            k = s.stop - s.start
            total += k * method.attribute(xi, baselines=dist, n_samples=k, stdevs=p.stdevs, target=ti).detach()
        out.append(total / p.n_samples)
    return torch.cat(out)


def _shared_key(kind: Baseline, row: torch.Tensor, seed: int, draw: int) -> Hashable:
    """What determines a shared baseline's row ``(1, C, H, W)`` for a model (its kind, the
    noise draw, the input's size, dtype and device): the key of its reference activations."""
    noise = (seed, draw) if kind == "uniform_noise" else ()
    return (kind, *noise, tuple(row.shape), row.dtype, str(row.device))


def _deeplift(r: _Run, x: torch.Tensor, t: torch.Tensor, p: DeepLiftMethod) -> torch.Tensor:
    """Two passes (:mod:`workers.explain.deeplift`) where the model's nonlinearities allow it,
    else Captum's class, which evaluates inputs and baselines in one batch of ``2n``."""
    fast = deeplift.two_pass(r.model)
    if fast is not None:
        if p.baseline in SHARED_BASELINES:  # one reference row for all the chunks, kept for later jobs
            row = r.baseline(p.baseline, x[:1], p.blur_sigma)
            with fast.reference(row, key=_shared_key(p.baseline, row, p.seed, 0)):
                return r.per_chunk(x, t, r.grad_bs, fast.against_reference)
        return r.per_chunk(
            x, t, r.grad_bs, lambda xc, tc: fast.attribute(xc, r.baseline(p.baseline, xc, p.blur_sigma), tc)
        )
    method = rules.deeplift(rules.prepare(r.model, "deeplift"))
    return r.per_chunk(
        x,
        t,
        max(1, r.grad_bs // 2),
        lambda xc, tc: method.attribute(xc, baselines=r.baseline(p.baseline, xc, p.blur_sigma), target=tc),
    )


def _deeplift_shap(r: _Run, x: torch.Tensor, t: torch.Tensor, p: DeepLiftShapMethod) -> torch.Tensor:
    """DeepLift against each baseline of the distribution, averaged per image (Captum's
    ``DeepLiftShap``). In two passes where the model allows it: the shared baselines
    (``zero``, ``black``, ``uniform_noise``) as one reference for chunks of images, each image
    once per shared baseline (their activations kept for later jobs), then the per-image
    baselines (``mean``, ``blur``) with their own reference per chunk."""
    if len(p.baselines) < 2:
        raise BadParams("deeplift_shap needs at least two baselines (Captum averages over the distribution)")
    fast = deeplift.two_pass(r.model)
    if fast is None:
        method = rules.deeplift_shap(rules.prepare(r.model, "deeplift"))
        return r.per_chunk(
            x,
            t,
            1,
            lambda xc, tc: method.attribute(xc, baselines=r.baselines(p.baselines, xc, p.blur_sigma), target=tc),
        )
    shared = [(i, k) for i, k in enumerate(p.baselines) if k in SHARED_BASELINES]
    own = [(i, k) for i, k in enumerate(p.baselines) if k not in SHARED_BASELINES]
    n, total = len(x), torch.zeros_like(x)

    def against(xc: torch.Tensor, tc: torch.Tensor, k: int) -> torch.Tensor:
        """The summed attributions ``(m, C, H, W)`` of a chunk of ``m`` images, each taken once
        per baseline (rows image-major: row ``a·k + b`` is image ``a`` against baseline ``b``)."""
        rows = xc[:, None].expand(len(xc), k, *xc.shape[1:]).reshape(-1, *xc.shape[1:])
        attr = fast.against_reference(rows, tc.repeat_interleave(k))
        return attr.view(len(xc), k, *xc.shape[1:]).sum(1)

    done, steps = 0, len(p.baselines) * n

    def chunks(k: int) -> Iterator[slice]:
        """Chunks of images whose ``k`` rows each make about one gradient batch."""
        nonlocal done
        for s in _chunks(n, max(1, r.grad_bs // k)):
            yield s
            done += k * (s.stop - s.start)
            r.progress(done, steps, "attribution")

    if shared:
        dist = torch.cat([r.baseline(k, x[:1], p.blur_sigma, draw=i) for i, k in shared])
        with fast.reference(dist, key=tuple(_shared_key(k, x[:1], p.seed, i) for i, k in shared)):
            for s in chunks(len(shared)):
                total[s] += against(x[s], t[s], len(shared))
    for s in chunks(len(own)) if own else ():
        xc = x[s]
        # rows image-major, as in against(): image a's baselines, then image a+1's
        dist = torch.cat([r.baseline(k, xc[a : a + 1], p.blur_sigma) for a in range(len(xc)) for _, k in own])
        with fast.reference(dist):
            total[s] += against(xc, t[s], len(own))
    return total / len(p.baselines)


def _guided_module(r: _Run, layer: str | None = None) -> torch.nn.Module:
    keep = layer or r.model.manifest.gradcam_layer
    return rules.prepare(r.model, "guided", keep=keep)


def _guided_backprop(r: _Run, x: torch.Tensor, t: torch.Tensor, p: GuidedBackpropMethod) -> torch.Tensor:
    method = ca.GuidedBackprop(_guided_module(r))
    return r.per_chunk(x, t, r.grad_bs, lambda xc, tc: method.attribute(xc, target=tc))


def _deconvolution(r: _Run, x: torch.Tensor, t: torch.Tensor, p: DeconvolutionMethod) -> torch.Tensor:
    method = ca.Deconvolution(_guided_module(r))
    return r.per_chunk(x, t, r.grad_bs, lambda xc, tc: method.attribute(xc, target=tc))


def _gradcam(r: _Run, x: torch.Tensor, t: torch.Tensor, p: GradCamMethod) -> torch.Tensor:
    layer = r.model.submodule(gradcam_layer(p, r.model.manifest))
    method = ca.LayerGradCam(r.grad_forward(len(x)), layer)

    def one(xc: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
        cam = method.attribute(xc, target=tc, relu_attributions=p.relu_attributions)
        if not isinstance(cam, torch.Tensor) or cam.dim() != 4:
            raise BadParams(f"gradcam: layer {p.layer!r} does not output a (N, C, H, W) feature map")
        up = ca.LayerAttribution.interpolate(cam, tuple(xc.shape[2:]), interpolate_mode=p.interpolate_mode)
        return up.expand(-1, xc.shape[1], -1, -1)

    return r.per_chunk(x, t, r.grad_bs, one)


def _guided_gradcam(r: _Run, x: torch.Tensor, t: torch.Tensor, p: GuidedGradCamMethod) -> torch.Tensor:
    name = gradcam_layer(p, r.model.manifest)
    r.model.submodule(name)  # BadParams when the layer does not exist
    prepared = _guided_module(r, name)
    method = ca.GuidedGradCam(prepared, prepared.get_submodule(name))
    return r.per_chunk(
        x, t, r.grad_bs, lambda xc, tc: method.attribute(xc, target=tc, interpolate_mode=p.interpolate_mode)
    )


def _lrp(r: _Run, x: torch.Tensor, t: torch.Tensor, p: LRPMethod) -> torch.Tensor:
    prepared = rules.prepare(r.model, "lrp")

    def one(xc: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
        rules.lrp_layer_rules(prepared)
        try:
            return ca.LRP(prepared).attribute(xc, target=tc)
        finally:
            rules.lrp_cleanup(prepared)

    return r.per_chunk(x, t, r.grad_bs, one)


def _occlusion(r: _Run, x: torch.Tensor, t: torch.Tensor, p: OcclusionMethod) -> torch.Tensor:
    """Captum's Occlusion with a ``(C, window, window)`` window and ``(C, stride, stride)``
    strides, without its per-perturbation full-image work.

    The same windows, order and sums as ``ca.Occlusion(...).attribute(x,
    sliding_window_shapes, strides, baselines, target, perturbations_per_eval)``: window
    origins every ``stride`` pixels, ``ceil((side - window) / stride) + 1`` per side (the last
    one clipped at the border), rows varying fastest; the input is evaluated once, each window
    replaced by the baseline, and every pixel gets the mean output drop over the windows
    covering it. Captum builds each window's mask by padding, blends full images with it and
    accumulates ``drop * mask`` over the whole input for every perturbation: 30% on top of
    the model evaluations here (efficientnet-lite0, 170 of them). Here a window is a slice
    copy and a slice add."""
    c, h, w = x.shape[1:]
    window, stride = _window(p, h, w)
    rows = math.ceil((h - window) / stride) + 1
    cols = math.ceil((w - window) / stride) + 1
    origins = [(i * stride, j * stride) for j in range(cols) for i in range(rows)]
    fwd = r.fwd_forward(len(x) * (len(origins) + 1))
    out = []
    for n in range(len(x)):
        xi, ti = x[n : n + 1], int(t[n])
        base = r.baseline(p.baseline, xi, p.blur_sigma)
        initial = fwd(xi)[:, ti]
        total = torch.zeros((h, w), dtype=torch.float32, device=x.device)
        count = torch.zeros((h, w), dtype=torch.float32, device=x.device)
        for s in _chunks(len(origins), r.fwd_bs):
            chunk = origins[s]
            batch = xi.repeat(len(chunk), 1, 1, 1)
            for k, (y0, x0) in enumerate(chunk):
                batch[k, :, y0 : y0 + window, x0 : x0 + window] = base[0, :, y0 : y0 + window, x0 : x0 + window]
            drops = (initial - fwd(batch)[:, ti]).float()
            for k, (y0, x0) in enumerate(chunk):
                total[y0 : y0 + window, x0 : x0 + window] += drops[k]
                count[y0 : y0 + window, x0 : x0 + window] += 1
        out.append((total / count).expand(1, c, h, w))
    return torch.cat(out)


def _shapley_value_sampling(r: _Run, x: torch.Tensor, t: torch.Tensor, p: ShapleyValueSamplingMethod) -> torch.Tensor:
    """Captum's ShapleyValueSampling, computed without its per-permutation Python work.

    The same algorithm and random draws as ``ca.ShapleyValueSampling(...).attribute(x,
    baselines, target, feature_mask, n_samples, perturbations_per_eval)`` for one image: the
    baseline is evaluated once; for each of ``n_samples`` permutations from ``torch.randperm``
    (drawn in Captum's order) the features are added to the baseline one by one in that order,
    evaluated in chunks of ``fwd_bs`` consecutive steps, and each feature's attribution is the
    mean of its output differences. The k-th input of a permutation is ``where(rank[mask] <= k,
    x, baseline)``, bit for bit Captum's ``current * (mask != f) + x * (mask == f)``, and the
    differences are summed per feature in Captum's order, so the map equals Captum's. Captum
    builds a Python dict of every mask element (``.item()`` on each of the H x W pixels) for
    each permutation: 0.2-0.4 s per permutation at 224 x 224, about a third of the job at the
    defaults; here a permutation costs its model evaluations and a few tensor ops."""
    out = []
    masks = [superpixel_mask(x[i : i + 1], p) for i in range(len(x))]
    total_evals = sum(p.n_samples * (int(m.max()) + 1) + 1 for m in masks)
    fwd = r.fwd_forward(total_evals)
    for i in range(len(x)):
        xi, ti, mask = x[i : i + 1], int(t[i]), masks[i]
        base = r.baseline(p.baseline, xi, p.blur_sigma)
        n_features = int(mask.max()) + 1
        flat = mask.reshape(-1)
        if int(torch.bincount(flat, minlength=n_features).min()) == 0:
            raise BadParams(f"superpixel mask of image {i} has empty features (ids must be 0..{n_features - 1})")
        initial = fwd(base)[:, ti]
        phi = torch.zeros(n_features, dtype=torch.float32, device=x.device)
        steps = torch.arange(n_features, device=x.device)
        for _ in range(p.n_samples):
            perm = torch.randperm(n_features)
            rank = torch.empty(n_features, dtype=torch.long)
            rank[perm] = torch.arange(n_features)
            pixel_rank = rank.to(x.device)[mask]  # (1, 1, H, W): when each pixel joins the coalition
            prev = initial
            for s in _chunks(n_features, r.fwd_bs):
                batch = torch.where(pixel_rank <= steps[s].view(-1, 1, 1, 1), xi, base)
                evals = fwd(batch)[:, ti]
                diffs = torch.cat((prev, evals))
                diffs = diffs[1:] - diffs[:-1]
                prev = evals[-1:]
                phi[perm[s].to(x.device)] += diffs.float()
        out.append((phi / p.n_samples)[mask].expand_as(xi))
    return torch.cat(out)


def _feature_ablation(r: _Run, x: torch.Tensor, t: torch.Tensor, p: FeatureAblationMethod) -> torch.Tensor:
    """Captum's FeatureAblation on superpixels, without its per-perturbation full-image work:
    the input is evaluated once, then each superpixel (ids 0..F-1 in order, chunks of
    ``fwd_bs``) replaced by the baseline, ``where(mask == f, baseline, x)`` (bit for bit
    Captum's ``x * (1 - m) + baseline * m``); the attribution of every pixel of superpixel f
    is the output drop ``f(x) - f(x without f)``, Captum's value exactly."""
    masks = [superpixel_mask(x[i : i + 1], p) for i in range(len(x))]
    fwd = r.fwd_forward(sum(int(m.max()) + 2 for m in masks))
    out = []
    for i, mask in enumerate(masks):
        xi, ti = x[i : i + 1], int(t[i])
        base = r.baseline(p.baseline, xi, p.blur_sigma)
        n_features = int(mask.max()) + 1
        initial = fwd(xi)[:, ti]
        features = torch.arange(n_features, device=x.device)
        drops = []
        for s in _chunks(n_features, r.fwd_bs):
            batch = torch.where(mask == features[s].view(-1, 1, 1, 1), base, xi)
            drops.append((initial - fwd(batch)[:, ti]).float())
        out.append(torch.cat(drops)[mask].expand_as(xi))
    return torch.cat(out)


class _SampleImages:
    """The forward function Captum's ``Lime`` and ``KernelShap`` evaluate, fed the
    interpretable samples themselves (``from_interp_rep_transform`` is the identity): a batch
    of samples ``(B, F)`` (1 keeps a superpixel, 0 replaces it by the baseline) becomes its
    images in one ``where`` and goes to the engine. Captum would build each sample's image
    alone, ``m · x + (1 − m) · baseline`` over the whole input, between its per-sample Python;
    the images are the same values."""

    def __init__(
        self, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, base: torch.Tensor, mask: torch.Tensor
    ) -> None:
        self.forward, self.x, self.base = forward, x, base  # (1, C, H, W) each
        self.pixels = mask.flatten()  # (H*W,) feature ids, mask (1, 1, H, W)

    def __call__(self, samples: torch.Tensor) -> torch.Tensor:
        keep = samples.bool()[:, self.pixels].view(len(samples), 1, *self.x.shape[2:])
        return self.forward(torch.where(keep, self.x, self.base))


def _sample_itself(curr_sample: torch.Tensor, original_inputs: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    return curr_sample


class _CosineKernel:
    """LIME's similarity, Captum's ``get_exp_kernel_similarity_function("cosine", width)``:
    ``exp(-d² / (2 width²))`` with ``d = 1 - cos(x, sample's image)`` over the flattened input,
    computed from per-superpixel sums (``x·x``, ``x·b``, ``b·b`` in float64, once per image),
    so ``O(F)`` per sample instead of two passes over the input; equal to Captum's value to
    float32 rounding."""

    def __init__(self, x: torch.Tensor, base: torch.Tensor, mask: torch.Tensor, width: float) -> None:
        ids = mask.flatten()
        n = int(ids.max()) + 1

        def per_feature(v: torch.Tensor) -> torch.Tensor:
            return torch.zeros(n, dtype=torch.float64, device=v.device).index_add_(0, ids, v.sum(1).flatten())

        xd, bd = x.double(), base.double()
        self.xx, self.xb, self.bb = per_feature(xd * xd), per_feature(xd * bd), per_feature(bd * bd)
        self.norm_x = float(self.xx.sum().sqrt())
        self.width = width

    def __call__(self, original: torch.Tensor, perturbed: torch.Tensor, sample: torch.Tensor, **kwargs: Any) -> float:
        keep = sample[0].to(torch.float64)
        kept = float(keep @ self.xx)  # the kept superpixels' x·x: in both the dot product and |image|²
        dot = kept + float((1 - keep) @ self.xb)
        norm_p = math.sqrt(max(0.0, kept + float((1 - keep) @ self.bb)))
        distance = 1 - dot / max(self.norm_x * norm_p, 1e-8)
        return math.exp(-(distance**2) / (2 * self.width**2))


def _superpixel_method(r: _Run, x: torch.Tensor, t: torch.Tensor, p: Any) -> torch.Tensor:
    """KernelSHAP and LIME on superpixels with Captum's classes (its sampling, similarity
    weights and linear fit), one image per call (each image has its own segmentation); the
    samples' images are built in batches (:class:`_SampleImages`), LIME's similarity from
    per-superpixel sums (:class:`_CosineKernel`)."""
    fwd = r.fwd_forward(len(x) * p.n_samples)
    kwargs: dict[str, Any] = {"perturbations_per_eval": r.fwd_bs, "n_samples": p.n_samples}

    def one(xc: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
        mask = superpixel_mask(xc, p)
        base = r.baseline(p.baseline, xc, p.blur_sigma)
        images = _SampleImages(fwd, xc, base, mask)
        method: Any
        if isinstance(p, KernelShapMethod):
            method = ca.KernelShap(images)
        else:
            from captum._utils.models.linear_model import SkLearnLasso

            method = ca.Lime(
                images,
                interpretable_model=SkLearnLasso(alpha=p.alpha),
                similarity_func=_CosineKernel(xc, base, mask, p.kernel_width),
            )
        method.from_interp_rep_transform = _sample_itself
        return method.attribute(xc, baselines=base, target=tc, feature_mask=mask, **kwargs)

    return r.per_chunk(x, t, 1, one)


_METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "saliency": _saliency,
    "integrated_gradients": _integrated_gradients,
    "noise_tunnel": _noise_tunnel,
    "gradient_shap": _gradient_shap,
    "deeplift": _deeplift,
    "deeplift_shap": _deeplift_shap,
    "input_x_gradient": _input_x_gradient,
    "guided_backprop": _guided_backprop,
    "deconvolution": _deconvolution,
    "gradcam": _gradcam,
    "guided_gradcam": _guided_gradcam,
    "lrp": _lrp,
    "occlusion": _occlusion,
    "feature_ablation": _feature_ablation,
    "shapley_value_sampling": _shapley_value_sampling,
    "kernel_shap": _superpixel_method,
    "lime": _superpixel_method,
}


def attribute(
    model: LoadedModel,
    images: torch.Tensor,
    targets: torch.Tensor,
    params: MethodParams,
    progress: ProgressFn = no_progress,
) -> torch.Tensor:
    """Raw attributions ``(N, C, H, W)`` (float32, on ``images``' device) of ``images``
    ``(N, C, H, W)`` for ``targets`` ``(N,)`` with the method and params in ``params``.

    Raises BadParams / UnsupportedMethod (422) when the method cannot run on the model.
    """
    if isinstance(params, dict):
        params = AttributionParams.model_validate(params)
    check_supported(params, model.manifest)
    x = images.detach().to(model.device, torch.float32)
    t = targets.detach().to(model.device, torch.long).reshape(-1)
    if len(t) != len(x):
        raise BadParams(f"{len(t)} targets for {len(x)} images")
    run_method = _METHODS[params.method]
    r = _Run(model, params, progress, len(x))
    forward_only = params.method in FORWARD_METHODS
    with seeded(params.seed, model.device), torch.no_grad() if forward_only else torch.enable_grad():
        with model.forward_only() if forward_only else nullcontext():
            out = run_method(r, x, t, params)
    return out.detach().float()


# --- quality scores ------------------------------------------------------------------------


def quality_scores(
    model: LoadedModel,
    images: torch.Tensor,
    targets: torch.Tensor,
    attributions: torch.Tensor,
    params: MethodParams,
    progress: ProgressFn = no_progress,
) -> dict[str, list[float]]:
    """The quality scores ``params`` asks for, one value per image: ``sensitivity_max`` (each
    explanation recomputed on ``n_perturb_samples`` perturbed copies) and ``infidelity``
    (through the fast forward engine), with Captum's metrics, seeded by ``params.seed``."""
    scores: dict[str, list[float]] = {}
    x = images.detach().to(model.device, torch.float32)
    t = targets.detach().to(model.device, torch.long)
    inner = params.model_copy(update={"sensitivity_max": None, "infidelity": None})
    if params.sensitivity_max is not None:
        sm = params.sensitivity_max
        calls = [0]

        def explain(inputs: Any, target: torch.Tensor) -> Any:
            xi = inputs[0] if isinstance(inputs, tuple) else inputs
            # Captum leaves a one-element target unexpanded ("the same for every row").
            target = target.reshape(-1).expand(len(xi)) if target.numel() == 1 else target
            calls[0] += 1
            progress(min(calls[0], 1 + len(x) * sm.n_perturb_samples), 1 + len(x) * sm.n_perturb_samples,
                     "sensitivity_max")  # fmt: skip
            out = attribute(model, xi, target, inner)
            return (out,) if isinstance(inputs, tuple) else out  # Captum expects the inputs' format

        with seeded(params.seed, model.device):
            values = cm.sensitivity_max(
                explain,
                x,
                perturb_radius=sm.perturb_radius,
                n_perturb_samples=sm.n_perturb_samples,
                max_examples_per_batch=len(x) * sm.n_perturb_samples,
                target=t,
            )
        scores["sensitivity_max"] = [float(v) for v in values]
    if params.infidelity is not None:
        inf = params.infidelity

        def perturb(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            noise = torch.randn_like(inputs) * inf.noise_scale
            return noise, inputs - noise

        forward = CountedForward(engine_forward(model), progress, len(x) * inf.n_perturb_samples, "infidelity")
        with seeded(params.seed + 1, model.device), torch.no_grad():
            values = cm.infidelity(
                forward,
                perturb,
                x,
                attributions.to(model.device),
                target=t,
                n_perturb_samples=inf.n_perturb_samples,
                max_examples_per_batch=params.batch_size or model.batch_size,
                normalize=inf.normalize,
            )
        scores["infidelity"] = [float(v) for v in values]
    return scores


# --- summaries and artifacts ---------------------------------------------------------------


def top_regions(map2d: np.ndarray, grid: int, k: int) -> list[dict[str, Any]]:
    """The ``k`` cells of a ``grid`` x ``grid`` partition of ``map2d`` ``(H, W)`` holding the
    largest share of its positive mass: row, column, box ``[y0, x0, y1, x1)`` in pixels of the
    model input, and share (fraction of the map's positive mass)."""
    h, w = map2d.shape
    pos = np.clip(map2d, 0, None).astype(np.float64)
    total = float(pos.sum())
    if total <= 0 or k == 0:
        return []
    ys = np.linspace(0, h, min(grid, h) + 1).round().astype(int)
    xs = np.linspace(0, w, min(grid, w) + 1).round().astype(int)
    cells = [
        (float(pos[ys[i] : ys[i + 1], xs[j] : xs[j + 1]].sum()) / total, i, j)
        for i in range(len(ys) - 1)
        for j in range(len(xs) - 1)
    ]
    cells.sort(key=lambda c: -c[0])
    return [
        {"row": i, "col": j, "box": [int(ys[i]), int(xs[j]), int(ys[i + 1]), int(xs[j + 1])], "share": share}
        for share, i, j in cells[:k]
    ]


def image_summary(
    model: LoadedModel,
    inputs: Inputs,
    i: int,
    attr: torch.Tensor,
    map2d: np.ndarray,
    params: MethodParams,
) -> dict[str, Any]:
    """JSON summary of image ``i``: target, label, its probability, min/max/mean of the 2-D map,
    statistics of the raw attribution (its sum: the completeness check of IG and DeepLift),
    and the top regions."""
    target = int(inputs.targets[i])
    a = attr.detach().double()
    return {
        "index": i,
        "target": target,
        "label": model.manifest.labels[target],
        "probability": float(inputs.probs[i, target]),
        "predicted": int(inputs.probs[i].argmax()),
        "min": float(map2d.min()),
        "max": float(map2d.max()),
        "mean": float(map2d.mean()),
        "attribution": {"min": float(a.min()), "max": float(a.max()), "mean": float(a.mean()), "sum": float(a.sum())},
        "shape": list(attr.shape),
        "top_regions": top_regions(map2d, params.region_grid, params.top_regions),
    }


def image_artifacts(prefix: str, attr: torch.Tensor, map2d: np.ndarray, display: np.ndarray) -> list[Artifact]:
    """``{prefix}attribution.npy`` (raw, ``(C, H, W)``), ``{prefix}map.npy`` (``(H, W)``),
    ``{prefix}heatmap.png``, ``{prefix}overlay.png`` and ``{prefix}input.png`` (the input at
    model size, as large as the overlay: what a viewer lays the heatmap over)."""
    return [
        Artifact(f"{prefix}input.png", render.image_png(display), "image/png"),
        Artifact(f"{prefix}attribution.npy", render.npy_bytes(attr.detach().cpu().float()), "application/x-npy"),
        Artifact(f"{prefix}map.npy", render.npy_bytes(map2d), "application/x-npy"),
        Artifact(f"{prefix}heatmap.png", render.heatmap_png(map2d), "image/png"),
        Artifact(f"{prefix}overlay.png", render.overlay_png(map2d, display), "image/png"),
    ]


def run(model: LoadedModel, inputs: Inputs, params: MethodParams, progress: ProgressFn) -> KindResult:
    """The ``attribution`` kind: per image ``{i}-attribution.npy``, ``{i}-map.npy``,
    ``{i}-heatmap.png``, ``{i}-overlay.png``, ``{i}-input.png``, and a JSON summary."""
    t0 = time.perf_counter()
    attr = attribute(model, inputs.images, inputs.targets, params, progress)
    runtime = time.perf_counter() - t0
    t1 = time.perf_counter()
    scores = quality_scores(model, inputs.images, inputs.targets, attr, params, progress)
    scores_runtime = time.perf_counter() - t1
    artifacts: list[Artifact] = []
    images = []
    for i in range(len(inputs)):
        map2d = render.to_2d(attr[i], params.aggregation)
        summary = image_summary(model, inputs, i, attr[i], map2d, params)
        summary["runtime_s"] = runtime / len(inputs)
        for name, values in scores.items():
            summary[name] = values[i]
        images.append(summary)
        artifacts += image_artifacts(f"{i}-", attr[i], map2d, inputs.display[i])
    summary_all: dict[str, Any] = {
        "method": params.method,
        "params": params.model_dump(mode="json"),
        "runtime_s": runtime,
        "images": images,
    }
    if scores:
        summary_all["quality_runtime_s"] = scores_runtime
    return KindResult(summary_all, artifacts)
