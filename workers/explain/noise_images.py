"""Kind ``noise_images``: computer-generated noise as the model's input, its top-5 classes and
the Grad-CAM of its top class (Exp. 2.3 of papers/occlusion-gradcam-adversarial-noise, Fig. 6:
"we will just use the raw noise images as inputs"). Two noises:

- ``perlin``: fractal Perlin noise, the procedural noise of Co et al. (2019): per octave
  ``o`` a lattice of period ``scale / 2^o`` px with a random unit gradient per lattice point,
  the dot products with the four corners blended by Perlin's (2002) quintic fade
  ``6t^5 - 15t^4 + 10t^3``, weighted by ``persistence^o`` and summed; then mapped to
  ``[0, 1]`` by min-max, or by Co et al.'s sine colour map ``(sin(2 pi f n) + 1) / 2``.
  Gradients come from a generator per (seed, image, channel, octave): image ``k`` is the same
  bytes for a seed whatever ``count``; built batched as tensors on the model's device.
- ``uap``: a universal adversarial perturbation (Moosavi-Dezfooli et al. 2017, Algorithm 1):
  ``v = 0``; pass over the fitting images (a seeded order); for each image whose prediction
  ``v`` does not change yet, DeepFool (Moosavi-Dezfooli et al. 2016, Algorithm 2 with the
  L-inf step ``r = (|f'_l| / ||w'_l||_1) sign(w'_l)`` of its section 3.2, over the top
  ``candidates`` classes, ``overshoot``) finds the least step across the nearest boundary from
  ``x + v``, and ``v`` becomes ``clip(v + step, -xi, xi)`` (the L-inf projection); stop when
  the fooling rate on the fitting images reaches ``1 - delta`` or after ``max_passes``. The
  perturbed images are clipped to ``[0, 1]`` (images, which the paper leaves implicit). The
  fooling rate (share of images whose prediction changes) is measured on the held-out part.
  The noise image is ``v`` shown as the papers show it (``uap_image``).

Artifacts: ``{k}-noise.png`` (the image at the model's input size), ``{k}-gradcam.npy``
``(H, W)``, ``{k}-overlay.png``, ``noise.png`` (every image with its Grad-CAM, the paper's
Fig. 6), ``noise.csv`` (top-5 of each); for ``uap`` also ``uap.npy`` (``v`` ``(C, H, W)`` in
pixel units).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from schemas.inspector import NoiseImagesParams
from workers import render
from workers.explain import map_metrics
from workers.explain.adversarial import pixel_space, probabilities, top_k
from workers.explain.base import Artifact, Inputs, KindResult, LoadedModel, ProgressFn, no_progress
from workers.explain.maps import gradcam_maps
from workers.explain.perturb import generator
from workers.explain.u_sweep import dataset as load_dataset

# --- Perlin noise -----------------------------------------------------------------------------


def _fade(t: torch.Tensor) -> torch.Tensor:
    return t * t * t * (t * (t * 6 - 15) + 10)


def gradient_noise(angles: torch.Tensor, period: float, h: int, w: int) -> torch.Tensor:
    """One octave of Perlin noise ``(B, h, w)`` from gradient angles ``(B, ny, nx)`` (radians)
    on a lattice of ``period`` px, sampled at the pixel centres (pixel ``(i, j)`` at lattice
    coordinates ``((i + 0.5) / period, (j + 0.5) / period)``); values in about
    ``[-0.71, 0.71]``, 0 on lattice points."""
    dev = angles.device
    y = (torch.arange(h, device=dev, dtype=torch.float32) + 0.5) / period
    x = (torch.arange(w, device=dev, dtype=torch.float32) + 0.5) / period
    y0, x0 = y.floor().long(), x.floor().long()
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]
    gy, gx = torch.sin(angles), torch.cos(angles)

    def corner(dy: int, dx: int) -> torch.Tensor:
        iy, ix = (y0 + dy)[:, None], (x0 + dx)[None, :]
        return gy[:, iy, ix] * (fy - dy) + gx[:, iy, ix] * (fx - dx)

    sy, sx = _fade(fy), _fade(fx)
    top = corner(0, 0) + sx * (corner(0, 1) - corner(0, 0))
    bottom = corner(1, 0) + sx * (corner(1, 1) - corner(1, 0))
    return top + sy * (bottom - top)


def perlin_images(
    params: NoiseImagesParams, channels: int, size: tuple[int, int], device: torch.device, first: int = 0
) -> torch.Tensor:
    """``(count, C, H, W)`` Perlin noise images in pixel space ``[0, 1]``; image ``k`` is
    number ``first + k`` of the seed's sequence."""
    h, w = size
    period0 = params.scale or min(h, w) / 4
    planes = 1 if not params.color else channels
    total = torch.zeros(params.count * planes, h, w, device=device)
    for o in range(params.octaves):
        period = period0 / 2**o
        ny, nx = math.floor((h - 0.5) / period) + 2, math.floor((w - 0.5) / period) + 2
        angles = np.stack([
            generator(params.seed, "perlin", first + k, c, o).random((ny, nx), np.float32) * np.float32(2 * math.pi)
            for k in range(params.count)
            for c in range(planes)
        ])  # fmt: skip
        total += params.persistence**o * gradient_noise(torch.from_numpy(angles).to(device), period, h, w)
    if params.sine_frequency is not None:
        u = (torch.sin(2 * math.pi * params.sine_frequency * total) + 1) / 2
    else:
        flat = total.flatten(1)
        lo, hi = flat.amin(1)[:, None, None], flat.amax(1)[:, None, None]
        u = (total - lo) / (hi - lo).clamp_min(1e-12)
    u = u.reshape(params.count, planes, h, w)
    return u.expand(-1, channels, -1, -1).contiguous() if planes == 1 else u


# --- universal adversarial perturbation ---------------------------------------------------------


def deepfool_linf(
    model: LoadedModel, u: torch.Tensor, candidates: int, overshoot: float, max_iter: int
) -> tuple[torch.Tensor, int]:
    """DeepFool's L-inf perturbation ``(C, H, W)`` (pixel units) of one image ``u`` ``(C, H,
    W)`` in pixel space, and the forward+backward evaluations it took. The classes considered
    are the top ``candidates`` of ``u``'s prediction; each iteration differentiates all of
    them in one batch."""
    space = pixel_space(model, u.shape[0])
    with torch.no_grad():
        logits = model.module(space.to_model(u[None]))[0]
    classes = logits.topk(min(candidates, len(logits))).indices
    k0 = int(classes[0])
    r_tot = torch.zeros_like(u)
    evals = 0
    for _ in range(max_iter):
        x = (u + (1 + overshoot) * r_tot)[None].expand(len(classes), -1, -1, -1).detach().requires_grad_(True)
        with torch.enable_grad():
            out = model.module(space.to_model(x))
            picked = out[torch.arange(len(classes), device=out.device), classes]
            (grads,) = torch.autograd.grad(picked.sum(), x)
        evals += len(classes)
        f = out[0].detach()
        if int(f.argmax()) != k0:
            break
        w = grads[1:] - grads[0]  # (m - 1, C, H, W)
        fd = (picked[1:] - picked[0]).detach()
        norms = w.abs().flatten(1).sum(1).clamp_min(1e-12)
        dist = fd.abs() / norms
        best = int(dist.argmin())
        r_tot = r_tot + (dist[best] + 1e-4 / norms[best]) * w[best].sign()
    return (1 + overshoot) * r_tot, evals


def predictions(model: LoadedModel, u: torch.Tensor, batch_size: int | None) -> torch.Tensor:
    """``(N,)`` top-1 classes of pixel-space images ``u`` (clipped to ``[0, 1]``)."""
    space = pixel_space(model, u.shape[1])
    return probabilities(model, space.to_model(u.clamp(0, 1)), batch_size).argmax(1)


def universal_perturbation(
    model: LoadedModel, u: torch.Tensor, params: NoiseImagesParams, progress: ProgressFn = no_progress
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``v`` ``(C, H, W)`` (pixel units, ``|v| <= xi / 255``) for the fitting images ``u``
    ``(n, C, H, W)`` in pixel space, and how it was found (passes, fooling rate per pass,
    DeepFool calls and evaluations)."""
    xi = params.xi / 255
    base = predictions(model, u, params.batch_size)
    v = torch.zeros_like(u[0])
    rates: list[float] = []
    calls = evals = 0
    rate = 0.0
    for p in range(params.max_passes):
        order = generator(params.seed, "uap-order", p).permutation(len(u))
        for j, i in enumerate(order.tolist()):
            x = (u[i] + v).clamp(0, 1)
            if int(predictions(model, x[None], 1)[0]) == int(base[i]):
                step, e = deepfool_linf(model, x, params.candidates, params.overshoot, params.deepfool_steps)
                v = (v + step).clamp(-xi, xi)
                calls, evals = calls + 1, evals + e
            progress(p * len(u) + j + 1, params.max_passes * len(u), "uap")
        rate = float((predictions(model, u + v, params.batch_size) != base).float().mean())
        rates.append(round(rate, 6))
        if rate >= 1 - params.delta:
            break
    return v, {"passes": len(rates), "fooling_rate_per_pass": rates, "fooling_rate_fit": rate,
               "deepfool_calls": calls, "deepfool_forward_backward": evals}  # fmt: skip


def uap_image(v: torch.Tensor, params: NoiseImagesParams) -> torch.Tensor:
    """The perturbation as an image ``(C, H, W)`` in ``[0, 1]``: ``0.5 + v / (2 max|v|)``
    (scaled) or ``0.5 + v`` (grey)."""
    if params.uap_image == "grey":
        return (0.5 + v).clamp(0, 1)
    m = float(v.abs().max())
    return 0.5 + v / (2 * m) if m > 0 else torch.full_like(v, 0.5)


def run_uap(
    model: LoadedModel, inputs: Inputs | None, params: NoiseImagesParams, progress: ProgressFn
) -> tuple[torch.Tensor, dict[str, Any], list[Artifact]]:
    images, _ = load_dataset(model, params, inputs)
    n = len(images)
    if n < 2:
        from schemas.errors import BadParams

        raise BadParams(f"uap needs at least 2 images (fitting and held out); the data set has {n}",
                        details={"field": "dataset"})  # fmt: skip
    u = pixel_space(model, images.shape[1]).to_pixels(images.float()).clamp(0, 1)
    perm = torch.from_numpy(generator(params.seed, "uap-holdout").permutation(n))
    n_hold = min(n - 1, max(1, round(params.holdout * n)))
    held, fit = perm[:n_hold].to(u.device), perm[n_hold:].to(u.device)
    v, info = universal_perturbation(model, u[fit], params, progress)
    base = predictions(model, u[held], params.batch_size)
    after = predictions(model, u[held] + v, params.batch_size)
    info = {
        "xi": params.xi,
        "linf": round(float(v.abs().max()) * 255, 4),
        "fit_images": len(fit),
        "heldout_images": n_hold,
        **info,
        "fooling_rate_heldout": round(float((after != base).float().mean()), 6),
    }
    return uap_image(v, params)[None], info, [Artifact("uap.npy", render.npy_bytes(v.float()), "application/x-npy")]


# --- the kind ------------------------------------------------------------------------------------


def describe(
    model: LoadedModel, u: torch.Tensor, params: NoiseImagesParams, progress: ProgressFn
) -> tuple[list[dict[str, Any]], list[Artifact]]:
    """Top-5 and Grad-CAM of the top class of each pixel-space image ``u`` ``(N, C, H, W)``."""
    space = pixel_space(model, u.shape[1])
    x = space.to_model(u)
    probs = probabilities(model, x, params.batch_size)
    top = probs.argmax(1)
    progress(0, 1, "gradcam")
    maps = gradcam_maps(model, x, top.to(model.device), batch_size=params.batch_size)
    labels = model.manifest.labels
    rows: list[dict[str, Any]] = []
    artifacts: list[Artifact] = []
    tiles: list[np.ndarray] = []
    titles: list[str] = []
    table: list[list[Any]] = []
    for k in range(len(u)):
        shown = space.to_uint8(u[k])
        m = maps[k]
        peak = float(m.max())
        c = map_metrics.centroid(m)
        top5 = top_k(probs[k], labels)
        table += [[k, rank, t["index"], t["label"], round(t["probability"], 6)] for rank, t in enumerate(top5, 1)]
        rows.append({
            "index": k,
            "top5": top5,
            "gradcam": {
                "class": int(top[k]),
                "centroid": None if c is None else [round(v, 3) for v in c],
                "area_above_half_peak": float((m >= peak / 2).mean()) if peak > 0 else None,
            },
        })  # fmt: skip
        artifacts += [
            Artifact(f"{k}-noise.png", render.png_bytes(shown[:, :, 0] if u.shape[1] == 1 else shown), "image/png"),
            Artifact(f"{k}-gradcam.npy", render.npy_bytes(m), "application/x-npy"),
            Artifact(f"{k}-overlay.png", render.overlay_png(m, shown), "image/png"),
        ]
        tiles += [shown, render.overlay_rgb(m, shown)]
        titles += [f"noise {k}", f"{labels[int(top[k])][:22]} {float(probs[k, top[k]]):.2f}"]
    artifacts.append(Artifact("noise.png", render.montage_png(tiles, titles, cols=4, side=224), "image/png"))
    artifacts.append(Artifact("noise.csv", render.csv_bytes(["image", "rank", "class", "label", "probability"], table),
                              "text/csv"))  # fmt: skip
    return rows, artifacts


def run(model: LoadedModel, inputs: Inputs | None, params: NoiseImagesParams, progress: ProgressFn) -> KindResult:
    """The ``noise_images`` kind (no image; ``uap`` with ``dataset='uploaded'`` takes its data
    set as images)."""
    t0 = time.perf_counter()
    c = 1 if model.manifest.preprocessing.mode == "L" else 3
    summary: dict[str, Any] = {"noise": params.noise}
    artifacts: list[Artifact] = []
    if params.noise == "perlin":
        u = perlin_images(params, c, model.manifest.preprocessing.size, model.device)
        h, w = model.manifest.preprocessing.size
        summary["perlin"] = {
            "count": params.count,
            "scale_px": params.scale or min(h, w) / 4,
            "octaves": params.octaves,
            "persistence": params.persistence,
            "sine_frequency": params.sine_frequency,
            "color": params.color,
        }
    else:
        u, summary["uap"], artifacts = run_uap(model, inputs, params, progress)
    rows, more = describe(model, u, params, progress)
    summary["images"] = rows
    summary["runtime_s"] = round(time.perf_counter() - t0, 4)
    return KindResult(summary, artifacts + more)
