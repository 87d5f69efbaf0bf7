"""Kind ``robustness``: the Model Inspector's image processing module
(papers/u-analysis-and-model-inspector §4.1, Figs 2 and 5) and, with ``apply_to``
``background`` / ``signal``, §4.3's background texture analysis.

Each image ``(C, H, W)`` goes through every transform of ``params.transforms``
(:mod:`workers.explain.perturb`: ImageNet-C noises in pixel space, shuffles as pixel
permutations), built as one ``(T, C, H, W)`` batch on the model's device and evaluated
through ``model.forward`` (the fast engine) in chunks, so the job costs about ``T``
forward evaluations per image. With ``apply_to`` ``background`` (``signal``) only the pixels
outside (inside) the region change (``schemas.regions``: the region is given in pixels of the
uploaded image and mapped through the preprocessing).

Per transform: the top-k classes, the target's probability and its change from the original,
the predicted class and whether it flipped (differs from the original's prediction); with
``params.attribution``, the map of each transformed image for the original target against the
original's (Pearson, Spearman, IoU of the top 10%), shuffled maps moved back onto the
original's pixels first.

Artifacts per image ``i``: ``{i}-grid.png`` (the original and every transformed image),
``{i}-bars.png`` (top-k of the original beside each transform's, Fig. 5),
``{i}-<transform>-<severity>.png`` (each transformed image); ``robustness.csv`` (one row per
image and transform).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from schemas.inspector import RobustnessParams, Transform, default_transforms, signal_mask
from workers import render
from workers.explain import perturb
from workers.explain.base import Artifact, Inputs, KindResult, LoadedModel, ProgressFn
from workers.explain.map_metrics import agreement
from workers.explain.maps import attribution_maps
from workers.explain.u_analysis import PixelSpace

CSV_FIELDS = [
    "image", "transform", "severity", "setting", "target", "target_probability", "change", "predicted",
    "predicted_label", "flipped", "top", "pearson", "spearman", "iou_top10",
]  # fmt: skip


def top_classes(probs: torch.Tensor, labels: list[str], k: int) -> list[dict[str, Any]]:
    """The ``k`` most probable classes of one probability row ``(K,)``."""
    values, idx = probs.float().topk(min(k, probs.numel()))
    return [
        {"index": int(i), "label": labels[int(i)], "probability": float(v)} for v, i in zip(values, idx, strict=True)
    ]


def masks_for(model: LoadedModel, inputs: Inputs, params: Any, files: dict[str, bytes]) -> list[torch.Tensor]:
    """One ``(H, W)`` bool mask per image: ``params.region`` or the ``signal_mask`` upload,
    mapped through the preprocessing (BadParams when outside the crop / the whole image)."""
    h, w = inputs.images.shape[2:]
    sizes = inputs.sizes or [(int(h), int(w))] * len(inputs)
    return [torch.from_numpy(signal_mask(params.region, files, s, model.manifest)) for s in sizes]


def evaluate(model: LoadedModel, batch: torch.Tensor, chunk: int, progress: ProgressFn, done: int, total: int,
             stage: str) -> torch.Tensor:  # fmt: skip
    """Softmax ``(B, K)`` of ``batch`` through ``model.forward`` in chunks, reporting progress."""
    out = []
    with torch.no_grad(), model.forward_only():
        for s in range(0, len(batch), chunk):
            out.append(model.forward(batch[s : s + chunk]).float().softmax(1))
            progress(done + min(s + chunk, len(batch)), total, stage)
    return torch.cat(out)


def run(
    model: LoadedModel, inputs: Inputs, params: RobustnessParams, progress: ProgressFn, context: Any = None
) -> KindResult:
    t0 = time.perf_counter()
    n, c, h, w = inputs.images.shape
    files = getattr(context, "files", {}) or {}
    transforms: list[Transform] = params.transforms or default_transforms((h, w))
    RobustnessParams.check_model(params, model.manifest)
    masks: list[torch.Tensor | None] = [None] * n
    if params.apply_to != "image":
        masks = list(masks_for(model, inputs, params, files))
    space = PixelSpace.of(model.manifest.preprocessing, c)
    labels = model.manifest.labels
    chunk = params.batch_size or model.batch_size
    total = n * len(transforms)
    rows: list[list[Any]] = []
    images: list[dict[str, Any]] = []
    batches: list[torch.Tensor] = []
    build_s = eval_s = attr_s = 0.0
    for i in range(n):
        tb = time.perf_counter()
        with torch.no_grad(), model.forward_only():  # torch ops on one thread beside ONNX Runtime's
            keep = params.apply_to == "background"
            batch, sources = perturb.transformed(inputs.images[i], transforms, space, params.seed, i, masks[i], keep)
        te = time.perf_counter()
        probs = evaluate(model, batch, chunk, progress, i * len(transforms), total, "transforms")
        ta = time.perf_counter()
        target = int(inputs.targets[i])
        p0 = inputs.probs[i].float()
        predicted0 = int(p0.argmax())
        agreements: list[dict[str, Any] | None] = [None] * len(transforms)
        if params.attribution is not None:
            stack = torch.cat([inputs.images[i : i + 1], batch])
            maps = attribution_maps(model, stack, torch.full((len(stack),), target, dtype=torch.long),
                                    params.attribution, progress, params.batch_size)  # fmt: skip
            for k, src in enumerate(sources):
                m = maps[k + 1] if src is None else perturb.unshuffle(maps[k + 1], src.numpy())
                agreements[k] = agreement(m, maps[0], (0.1,))
        build_s, eval_s, attr_s = build_s + te - tb, eval_s + ta - te, attr_s + time.perf_counter() - ta
        results = []
        for k, t in enumerate(transforms):
            predicted = int(probs[k].argmax())
            pt = float(probs[k, target])
            r: dict[str, Any] = {
                "transform": t.name,
                "severity": t.severity,
                "key": t.key,
                "setting": perturb.setting(t),
                "top": top_classes(probs[k], labels, params.top_k),
                "target_probability": pt,
                "change": pt - float(p0[target]),
                "predicted": predicted,
                "predicted_label": labels[predicted],
                "flipped": predicted != predicted0,
            }
            if agreements[k] is not None:
                r["attribution"] = agreements[k]
            results.append(r)
        images.append(
            {
                "index": i,
                "target": target,
                "label": labels[target],
                "original": {
                    "top": top_classes(p0, labels, params.top_k),
                    "target_probability": float(p0[target]),
                    "predicted": predicted0,
                    "predicted_label": labels[predicted0],
                },
                "region_fraction": None if (mask := masks[i]) is None else float(mask.float().mean()),
                "flipped": sum(r["flipped"] for r in results),
                "transforms": results,
            }
        )
        rows += [_csv_row(i, target, r) for r in results]
        batches.append(batch)
    t1 = time.perf_counter()
    artifacts = _artifacts(inputs, images, batches, space, transforms, rows)
    summary = {
        "apply_to": params.apply_to,
        "seed": params.seed,
        "transforms": [{"name": t.name, "severity": t.severity, **perturb.setting(t)} for t in transforms],
        "attribution": None if params.attribution is None else params.attribution.method,
        "evaluations": {"forward": total, "attributions": (n * (len(transforms) + 1)) if params.attribution else 0},
        "runtime_s": {
            "build": round(build_s, 4),
            "evaluate": round(eval_s, 4),
            "attribution": round(attr_s, 4),
            "compute": round(t1 - t0, 4),
            "render": round(time.perf_counter() - t1, 4),
        },
        "images": images,
    }
    return KindResult(summary, artifacts)


def _csv_row(i: int, target: int, r: dict[str, Any]) -> list[Any]:
    a = r.get("attribution") or {}
    return [
        i, r["transform"], r["severity"], ";".join(f"{k}={v}" for k, v in r["setting"].items()), target,
        f"{r['target_probability']:.6g}", f"{r['change']:.6g}", r["predicted"], r["predicted_label"],
        int(r["flipped"]), ";".join(f"{c['index']}:{c['probability']:.4g}" for c in r["top"]),
        a.get("pearson", ""), a.get("spearman", ""), a.get("iou_top10", ""),
    ]  # fmt: skip


def _artifacts(
    inputs: Inputs,
    images: list[dict[str, Any]],
    batches: list[torch.Tensor],
    space: PixelSpace,
    transforms: list[Transform],
    rows: list[list[Any]],
) -> list[Artifact]:
    artifacts = []
    for i, batch in enumerate(batches):
        shown = [space.to_uint8(b) for b in batch]
        for t, img in zip(transforms, shown, strict=True):
            artifacts.append(Artifact(f"{i}-{t.key}.png", render.png_bytes(img, compress_level=1), "image/png"))
        info = images[i]
        titles = [f"original: {info['original']['predicted_label'][:18]}"] + [
            f"{t.key}: {r['predicted_label'][:14]} {r['target_probability']:.2f}"
            for t, r in zip(transforms, info["transforms"], strict=True)
        ]
        artifacts.append(
            Artifact(f"{i}-grid.png", render.montage_png([inputs.display[i], *shown], titles), "image/png")
        )
        artifacts.append(Artifact(f"{i}-bars.png", render.top_bars_png(info["original"]["top"], [
            (f"{r['key']}", r["top"]) for r in info["transforms"]]), "image/png"))  # fmt: skip
    artifacts.append(Artifact("robustness.csv", render.csv_bytes(CSV_FIELDS, rows), "text/csv"))
    return artifacts

