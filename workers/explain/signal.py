"""Kind ``signal``: the Model Inspector's signal module (papers/u-analysis-and-model-inspector
§4.3, Fig. 3): the user marks the signal (foreground) of an image; the rest is the context.

For each image ``(C, H, W)`` and its signal mask ``(H, W)`` (``params.region`` or the
``signal_mask`` upload, in pixels of the uploaded image, mapped through the preprocessing by
:mod:`schemas.regions`):

1. **Map mass**: the map of ``params.attribution`` (default Grad-CAM, through the
   ``attribution`` kind) split between signal and context (:func:`map_metrics.mass_inside`:
   positive mass inside/outside, the area-normalised ratio, the positive share inside, the
   pointing game).
2. **Signal only / context only** per fill: the image with the context (resp. the signal)
   replaced by ``fill`` (white, black, the image's mean colour, blur, Gaussian noise, or a
   brick/grass/gravel texture; :func:`perturb.fill_pixels`); top-k and target probability.
3. **RFS**, the relative foreground sensitivity of Moayeri et al. 2022 (the paper's ref. 13):
   ``RFS = (p_bg - p_fg) / (2 min(p, 1 - p))`` where ``p_fg`` (``p_bg``) is the mean target
   probability over ``rfs_samples`` draws of Gaussian noise ``N(0, rfs_sigma²)`` (pixel space,
   clipped) added to the foreground (background) only, the same draws on both sides, and
   ``p = (p_fg + p_bg) / 2``. Moayeri et al. average accuracies over a data set; on one image
   the target probability takes the accuracy's place (the issue's definition). Positive: the
   model relies on the foreground more than on the background. None when ``p`` is 0 or 1.
4. **Top-K erasing**: the target probability after erasing (``erase_fill``) the map's top k%
   pixels, beside the mean over ``random_draws`` erasures of k% random pixels.

Every changed image is built on the model's device and the whole set, ``2 * fills +
2 * rfs_samples + len(erase_percents) * (1 + random_draws)`` images per image (52 by
default), goes through ``model.forward`` in chunks; the map costs one attribution.

Artifacts per image ``i``: ``{i}-signal.png`` (the image, region outlined), ``{i}-map.npy``,
``{i}-overlay.png``, ``{i}-fills.png`` (signal only and context only per fill),
``{i}-erasing.png`` (Top-K erasing curves); ``signal.csv``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from schemas.inspector import SignalParams
from workers import render
from workers.explain import perturb
from workers.explain.base import Artifact, Inputs, KindResult, LoadedModel, ProgressFn
from workers.explain.map_metrics import mass_inside
from workers.explain.maps import attribution_maps
from workers.explain.robustness import evaluate, masks_for, top_classes
from workers.explain.u_analysis import PixelSpace

CSV_FIELDS = ["image", "analysis", "setting", "target", "target_probability", "predicted", "predicted_label"]


def outline(display: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] = (255, 220, 0)) -> np.ndarray:
    """``display`` ``(H, W, 3)`` uint8 with the border pixels of ``mask`` ``(H, W)`` coloured."""
    m = np.pad(mask, 1, mode="edge")
    edge = mask & ~(m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:])
    out = display.copy()
    out[edge] = colour
    return out


def erase_masks(map2d: torch.Tensor, percents: list[float], draws: int, gen: np.random.Generator) -> torch.Tensor:
    """``(len(percents) * (1 + draws), H, W)`` bool: per k, the map's top k% pixels (stable
    order: ties in raster order), then ``draws`` sets of k% random pixels."""
    h, w = map2d.shape
    n = h * w
    order = torch.from_numpy(np.argsort(-map2d.cpu().numpy().ravel(), kind="stable").copy())
    ranks = torch.empty(n, dtype=torch.long)
    ranks[order] = torch.arange(n)
    random_ranks = torch.from_numpy(np.argsort(np.argsort(gen.random((draws, n)), axis=1), axis=1))
    out = []
    for k in percents:
        count = max(1, int(round(k / 100 * n)))
        out.append((ranks < count).reshape(h, w))
        out += list((random_ranks < count).reshape(draws, h, w))
    return torch.stack(out).to(map2d.device)


def build(
    x: torch.Tensor, mask: torch.Tensor, map2d: torch.Tensor, params: SignalParams, space: PixelSpace, index: int
) -> torch.Tensor:
    """Every changed copy of ``x`` ``(C, H, W)`` for one image, ``(B, C, H, W)`` in the order
    fills (signal only, context only), RFS (foreground noised, background noised), erasing."""
    u = space.to_pixels(x)
    m = mask.to(x.device)
    out = []
    for f in params.fills:
        z = perturb.fill_pixels(f, u, params.blur_sigma, params.gaussian_std, perturb.generator(params.seed, index, f))
        out += [torch.where(m, u, z), torch.where(m, z, u)]
    gen = perturb.generator(params.seed, index, "rfs")
    noise = torch.from_numpy(gen.standard_normal((params.rfs_samples, *u.shape), np.float32)).to(x.device)
    noise = noise * params.rfs_sigma
    fg, bg = m.to(u.dtype), (~m).to(u.dtype)
    out += list(perturb.quantise(u + noise * fg))
    out += list(perturb.quantise(u + noise * bg))
    erased = erase_masks(
        map2d, params.erase_percents, params.random_draws, perturb.generator(params.seed, index, "erase")
    )
    z = perturb.fill_pixels(params.erase_fill, u, params.blur_sigma, params.gaussian_std,
                            perturb.generator(params.seed, index, "erase_fill"))  # fmt: skip
    out += list(torch.where(erased[:, None], z[None], u[None]))
    return space.to_model(torch.stack(out))


def rfs(p_fg: float, p_bg: float) -> float | None:
    """Relative foreground sensitivity (Moayeri et al. 2022): ``(p_bg - p_fg) / (2 min(p, 1-p))``."""
    p = (p_fg + p_bg) / 2
    den = 2 * min(p, 1 - p)
    return (p_bg - p_fg) / den if den > 0 else None


def _pred(probs: torch.Tensor, target: int, labels: list[str], k: int) -> dict[str, Any]:
    predicted = int(probs.argmax())
    return {"target_probability": float(probs[target]), "predicted": predicted, "predicted_label": labels[predicted],
            "top": top_classes(probs, labels, k)}  # fmt: skip


def analyse(
    i: int, target: int, probs: torch.Tensor, params: SignalParams, labels: list[str]
) -> tuple[dict[str, Any], list[list[Any]]]:
    """The summary parts 2-4 of image ``i`` from the probabilities ``(B, K)`` of :func:`build`'s batch."""
    nf, ns, d = len(params.fills), params.rfs_samples, params.random_draws
    fills, rows = [], []
    for j, f in enumerate(params.fills):
        sig, ctx = _pred(probs[2 * j], target, labels, 5), _pred(probs[2 * j + 1], target, labels, 5)
        fills.append({"fill": f, "signal_only": sig, "context_only": ctx})
        for part, pred in (("signal_only", sig), ("context_only", ctx)):
            rows.append([i, part, f, target, pred["target_probability"], pred["predicted"], pred["predicted_label"]])
    pr = probs[2 * nf : 2 * nf + 2 * ns]
    p_fg, p_bg = float(pr[:ns, target].mean()), float(pr[ns:, target].mean())
    rfs_out = {
        "sigma": params.rfs_sigma,
        "samples": ns,
        "p_foreground_noise": p_fg,
        "p_background_noise": p_bg,
        "p_mean": (p_fg + p_bg) / 2,
        "accuracy_foreground_noise": float((pr[:ns].argmax(1) == target).float().mean()),
        "accuracy_background_noise": float((pr[ns:].argmax(1) == target).float().mean()),
        "rfs": rfs(p_fg, p_bg),
    }
    rows += [[i, "rfs_foreground_noise", f"sigma={params.rfs_sigma}", target, p_fg, "", ""],
             [i, "rfs_background_noise", f"sigma={params.rfs_sigma}", target, p_bg, "", ""]]  # fmt: skip
    pe = probs[2 * nf + 2 * ns :, target].reshape(len(params.erase_percents), 1 + d)
    erasing = []
    for k, pct in enumerate(params.erase_percents):
        top, rnd = float(pe[k, 0]), pe[k, 1:].double()
        erasing.append({"percent": pct, "top": top, "random": float(rnd.mean()),
                        "random_std": float(rnd.std()) if d > 1 else 0.0})  # fmt: skip
        rows += [[i, "erase_top", f"{pct}%", target, top, "", ""],
                 [i, "erase_random", f"{pct}%", target, float(rnd.mean()), "", ""]]  # fmt: skip
    return {"fills": fills, "rfs": rfs_out, "top_k_erasing": erasing}, rows


def erasing_png(erasing: list[dict[str, Any]], p0: float, title: str) -> bytes:
    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        ks = [0.0] + [e["percent"] for e in erasing]
        ax.plot(ks, [p0] + [e["top"] for e in erasing], "o-", color="tab:red", label="map's top k%")
        ax.plot(ks, [p0] + [e["random"] for e in erasing], "s--", color="tab:blue", label="random k%")
        ax.set_xlabel("pixels erased (%)")
        ax.set_ylabel("target probability")
        ax.set_ylim(0, 1)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()

    return render.figure_png(draw, (4.5, 3.2))


def run(
    model: LoadedModel, inputs: Inputs, params: SignalParams, progress: ProgressFn, context: Any = None
) -> KindResult:
    t0 = time.perf_counter()
    n, c, h, w = inputs.images.shape
    masks = masks_for(model, inputs, params, getattr(context, "files", {}) or {})
    maps = attribution_maps(model, inputs.images, inputs.targets, params.attribution, progress, params.batch_size)
    t_map = time.perf_counter()
    space = PixelSpace.of(model.manifest.preprocessing, c)
    labels = model.manifest.labels
    chunk = params.batch_size or model.batch_size
    images, rows, batches = [], [], []
    per_image = 2 * len(params.fills) + 2 * params.rfs_samples + len(params.erase_percents) * (1 + params.random_draws)
    for i in range(n):
        target = int(inputs.targets[i])
        with torch.no_grad(), model.forward_only():
            batch = build(inputs.images[i], masks[i], torch.from_numpy(maps[i]), params, space, i)
        probs = evaluate(model, batch, chunk, progress, i * per_image, n * per_image, "signal")
        parts, r = analyse(i, target, probs, params, labels)
        rows += r
        mask = masks[i].numpy()
        images.append({
            "index": i, "target": target, "label": labels[target], "probability": float(inputs.probs[i, target]),
            "original": _pred(inputs.probs[i].float(), target, labels, 5),
            "region": {"pixels": int(mask.sum()), "fraction": float(mask.mean())},
            "map": {"method": params.attribution.method, **mass_inside(maps[i], mask)},
            **parts,
        })  # fmt: skip
        batches.append(batch)
    t1 = time.perf_counter()
    artifacts = []
    for i, batch in enumerate(batches):
        mask, info = masks[i].numpy(), images[i]
        artifacts += [
            Artifact(f"{i}-signal.png", render.png_bytes(outline(inputs.display[i], mask)), "image/png"),
            Artifact(f"{i}-map.npy", render.npy_bytes(maps[i]), "application/x-npy"),
            Artifact(f"{i}-overlay.png", render.overlay_png(maps[i], outline(inputs.display[i], mask)), "image/png"),
        ]
        shown = [space.to_uint8(b) for b in batch[: 2 * len(params.fills)]]
        titles = [f"{part} {f['fill']}: {f[part]['target_probability']:.2f}" for f in info["fills"]
                  for part in ("signal_only", "context_only")]  # fmt: skip
        artifacts.append(Artifact(f"{i}-fills.png", render.montage_png(shown, titles, cols=4), "image/png"))
        title = f"{info['label'][:24]}: Top-K erasing ({params.attribution.method})"
        artifacts.append(Artifact(f"{i}-erasing.png", erasing_png(info["top_k_erasing"], info["probability"], title),
                                  "image/png"))  # fmt: skip
    artifacts.append(Artifact("signal.csv", render.csv_bytes(CSV_FIELDS, rows), "text/csv"))
    summary = {
        "attribution": params.attribution.method,
        "fills": list(params.fills),
        "seed": params.seed,
        "evaluations": {"forward": n * per_image, "backward": n},
        "runtime_s": {
            "map": round(t_map - t0, 4),
            "compute": round(t1 - t0, 4),
            "render": round(time.perf_counter() - t1, 4),
        },
        "images": images,
    }
    return KindResult(summary, artifacts)
