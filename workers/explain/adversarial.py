"""Kind ``adversarial``: adversarial images and what they do to one or more models (Exp. 2.1
and 2.2 of papers/occlusion-gradcam-adversarial-noise, Figs 3-5, Appendix Table 1).

The attack works in pixel space ``u`` in ``[0, 1]`` (``schemas.u_analysis``), on the job's
model (``model.module``, gradients to the input only), image chunks of
``params.batch_size or model.grad_batch_size``:

- ``fgsm`` (Goodfellow et al. 2015, the paper's attack): ``u' = u + eps sign(grad_u L)``;
- ``ifgsm`` (Kurakin et al. 2017): ``steps`` such steps of ``step_size`` (default ``eps /
  steps``, as Dong et al. 2018), each clipped to the ball ``|u' - u| <= eps`` and to [0, 1];
- ``mifgsm`` (Dong et al. 2018): the same on ``g <- decay g + grad / ||grad||_1``.

``L`` is the cross-entropy of the class each image is pushed away from (untargeted: the job's
``target``, by default the predicted class; in a data set, its label), or minus the
cross-entropy of ``adv_target`` (targeted). Every step is clipped to the ball and to
``[0, 1]``, so the float result is an image in the ball (FGSM with epsilon 0 returns the
input). The 8-bit image (:func:`to_8bit`: rounded, then kept in the ball) is what the
``{i}-adversarial.png`` artifact holds; fooling is reported for both.

Each model (the job's, then each ``transfer_models`` entry) gets the original and the two
adversarial images at the job model's input size, mapped to its own input by its
preprocessing (:func:`to_input`: resize as its manifest says, in pixel space, bilinear with
antialiasing as Pillow's resize, then its normalisation). Per image and model: top-5 before
and after, the probability of the original class, whether the prediction changed (untargeted)
or became ``adv_target`` (targeted), and with ``gradcam`` the Grad-CAM
(:mod:`workers.explain.attribution`'s) of the original class and of the adversarial class
(the prediction on the 8-bit image) on the original and on the 8-bit image: their Pearson
correlation and the shift of the centroid of their positive mass (pixels of that model's
input). Artifacts: ``{i}-adversarial.png`` (8-bit), ``{i}-adversarial.npy`` (float, ``(C,
H, W)`` pixel space), ``{i}-perturbation.png`` (``u' - u`` scaled so +-eps spans black to
white), ``{i}-<model>-gradcam.npy`` (``(4, H, W)``: original class before, after,
adversarial class before, after) and ``{i}-<model>-gradcam.png`` (the four over the images).

With ``dataset`` (the model's registered split, as ``u_sweep``, or the uploads with their
targets as labels): the success rate per model, among the images it classifies correctly
(untargeted: classified otherwise afterwards) or among those not of class ``adv_target``
(targeted: classified ``adv_target``), float and 8-bit, in the result and ``success.csv``;
every image's predictions in ``images.csv``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from schemas.errors import BadParams
from schemas.inspector import AdversarialParams
from schemas.models import Preprocessing, crop_box
from workers import render
from workers.explain import map_metrics
from workers.explain.base import Artifact, Inputs, KindResult, LoadedModel, ProgressFn, no_progress
from workers.explain.maps import gradcam_maps
from workers.explain.u_analysis import PixelSpace
from workers.explain.u_sweep import dataset as load_dataset
from workers.pipeline import JobContext, forward_in_chunks

# --- the attack ------------------------------------------------------------------------------


def pixel_space(model: LoadedModel, channels: int) -> PixelSpace:
    return PixelSpace.of(model.manifest.preprocessing, channels)


def step_size(params: AdversarialParams) -> float:
    """The step in 1/255: epsilon for FGSM, else ``step_size`` or epsilon / steps."""
    if params.attack == "fgsm":
        return params.epsilon
    return params.step_size if params.step_size is not None else params.epsilon / params.steps


def n_steps(params: AdversarialParams) -> int:
    return 1 if params.attack == "fgsm" else params.steps


def attack(
    model: LoadedModel,
    images: torch.Tensor,
    labels: torch.Tensor,
    params: AdversarialParams,
    progress: ProgressFn = no_progress,
) -> torch.Tensor:
    """Adversarial images ``(N, C, H, W)`` in pixel space ``[0, 1]`` (on the model's device)
    of ``images`` ``(N, C, H, W)`` in the model's input space; ``labels`` ``(N,)``: the class
    each image is pushed away from (ignored with ``adv_target``)."""
    space = pixel_space(model, images.shape[1])
    u0 = space.to_pixels(images.detach().float()).clamp(0, 1)
    eps, alpha = params.epsilon / 255, step_size(params) / 255
    steps = n_steps(params)
    targeted = params.adv_target is not None
    cls = torch.full_like(labels, params.adv_target) if targeted else labels  # type: ignore[arg-type]
    cls = cls.to(u0.device, torch.long)
    start = u0
    if params.random_start and eps > 0:
        gen = torch.Generator().manual_seed(params.seed)
        noise = (torch.rand(u0.shape, generator=gen) * 2 - 1) * eps
        start = (u0 + noise.to(u0.device)).clamp(0, 1)
    chunk = params.batch_size or model.grad_batch_size
    n = len(u0)
    out = []
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        u, lo, hi = start[s:e], (u0[s:e] - eps).clamp(0, 1), (u0[s:e] + eps).clamp(0, 1)
        momentum = torch.zeros_like(u)
        for k in range(steps):
            grad = input_gradient(model, space, u, cls[s:e])
            if params.attack == "mifgsm":
                momentum = params.decay * momentum + grad / grad.abs().sum(dim=(1, 2, 3), keepdim=True).clamp_min(1e-30)
                grad = momentum
            direction = -1.0 if targeted else 1.0
            u = torch.minimum(torch.maximum(u + direction * alpha * grad.sign(), lo), hi)
            progress(s * steps + (e - s) * (k + 1), n * steps, "attack")
        out.append(u.detach())
    return torch.cat(out) if out else u0


def input_gradient(model: LoadedModel, space: PixelSpace, u: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """``d CE(f(x(u)), cls) / du`` ``(n, C, H, W)`` (sum over the chunk: each row's own gradient)."""
    leaf = u.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model.module(space.to_model(leaf))
        loss = F.cross_entropy(logits.float(), cls, reduction="sum")
        (grad,) = torch.autograd.grad(loss, leaf)
    return grad


def to_8bit(adv: torch.Tensor, original: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``adv`` ``(N, C, H, W)`` pixel space rounded to the 8-bit grid (values k / 255), each
    value kept in ``[original - epsilon, original + epsilon]`` (epsilon in 1/255) and
    ``[0, 1]``. Where the ball holds no 8-bit value (an original off the grid, epsilon < 0.5),
    the original rounded."""
    q = (adv * 255).round()
    lo = torch.ceil(original * 255 - epsilon - 1e-3).clamp(0, 255)
    hi = torch.floor(original * 255 + epsilon + 1e-3).clamp(0, 255)
    q = torch.minimum(torch.maximum(q, lo), hi)
    return torch.where(lo > hi, (original * 255).round(), q) / 255


# --- what each model makes of it --------------------------------------------------------------


def to_input(u: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """Pixel-space images ``(N, C, H, W)`` (any size) as the input of a model with
    preprocessing ``pre``: grey <-> RGB (ITU-R 601 luma, as Pillow's ``convert("L")``),
    cropped to :func:`schemas.models.crop_box` and resized with the manifest's interpolation (as
    :func:`workers.registry.preprocess`), normalised."""
    c = 1 if pre.mode == "L" else 3
    if u.shape[1] == 3 and c == 1:
        u = (u * torch.tensor([0.299, 0.587, 0.114], device=u.device)[:, None, None]).sum(1, keepdim=True)
    elif u.shape[1] == 1 and c == 3:
        u = u.expand(-1, 3, -1, -1)
    h, w = pre.size
    uh, uw = u.shape[2:]
    if (uh, uw) != (h, w):  # at the model's size already (the source model's own input): as is
        left, top, right, bottom = crop_box(uw, uh, pre)
        u = u[:, :, top:bottom, left:right]
        u = F.interpolate(u, size=(h, w), mode=pre.interpolation, align_corners=False, antialias=True).clamp(0, 1)
    return PixelSpace.of(pre, c).to_model(u.contiguous())


def probabilities(model: LoadedModel, x: torch.Tensor, batch_size: int | None) -> torch.Tensor:
    """Softmax ``(N, K)`` (CPU) through the fast forward engine."""
    if not len(x):
        return torch.zeros(0, model.num_classes)
    with torch.no_grad(), model.forward_only():
        return forward_in_chunks(model, x, batch_size).float().softmax(1).cpu()


def top_k(probs: torch.Tensor, labels: list[str], k: int = 5) -> list[dict[str, Any]]:
    """The ``k`` most probable classes of one row ``(K,)``."""
    values, indices = probs.topk(min(k, len(probs)))
    pairs = zip(values.tolist(), indices.tolist(), strict=True)
    return [{"index": i, "label": labels[i], "probability": v} for v, i in pairs]


@dataclass
class Views:
    """The three images in one model's input space, ``(N, C, H, W)`` each."""

    original: torch.Tensor
    adversarial: torch.Tensor  # float
    png: torch.Tensor  # 8-bit

    @classmethod
    def of(cls, model: LoadedModel, u0: torch.Tensor, adv: torch.Tensor, q: torch.Tensor) -> Views:
        pre = model.manifest.preprocessing
        return cls(*(to_input(u.to(model.device), pre) for u in (u0, adv, q)))


@dataclass
class Predictions:
    """Softmax ``(N, K)`` of one model on the three images."""

    original: torch.Tensor
    adversarial: torch.Tensor
    png: torch.Tensor

    @classmethod
    def of(cls, model: LoadedModel, views: Views, batch_size: int | None) -> Predictions:
        return cls(*(probabilities(model, x, batch_size) for x in (views.original, views.adversarial, views.png)))


def fooled(p_after: torch.Tensor, reference: torch.Tensor, adv_target: int | None) -> torch.Tensor:
    """``(N,)`` bool: classified ``adv_target`` (targeted), else not ``reference`` ``(N,)``."""
    pred = p_after.argmax(1)
    return pred == adv_target if adv_target is not None else pred != reference


# --- per-image mode ---------------------------------------------------------------------------


def model_report(
    model: LoadedModel,
    role: str,
    views: Views,
    params: AdversarialParams,
    progress: ProgressFn,
) -> tuple[list[dict[str, Any]], list[Artifact], int]:
    """Per image: the model's predictions before and after, fooling, and the Grad-CAM
    comparison; the Grad-CAM artifacts; the forward+backward evaluations Grad-CAM took."""
    labels = model.manifest.labels
    preds = Predictions.of(model, views, params.batch_size)
    c0, cq = preds.original.argmax(1), preds.png.argmax(1)
    fooled_f = fooled(preds.adversarial, c0, params.adv_target)
    fooled_q = fooled(preds.png, c0, params.adv_target)
    maps = None
    n = len(c0)
    if params.gradcam:
        if model.manifest.gradcam_layer is None:
            raise BadParams(f"model {model.id!r} has no Grad-CAM layer; set gradcam=false")
        # rows: original class before, after; adversarial class before, after (each once)
        x = torch.cat([views.original, views.png, views.original, views.png])
        cls = torch.cat([c0, c0, cq, cq]).to(model.device)
        differ = torch.cat([torch.ones(2 * n, dtype=torch.bool), (cq != c0).repeat(2)])
        keep = differ.nonzero().squeeze(1)
        progress(0, 1, f"gradcam {model.id}")
        cams = gradcam_maps(model, x[keep.to(x.device)], cls[keep.to(cls.device)], batch_size=params.batch_size)
        full = np.zeros((4 * n, *cams.shape[1:]), np.float32)
        full[keep.numpy()] = cams
        same = (cq == c0).numpy()
        full[2 * n : 3 * n][same] = full[:n][same]
        full[3 * n :][same] = full[n : 2 * n][same]
        maps = full.reshape(4, n, *cams.shape[1:]).transpose(1, 0, 2, 3)  # (n, 4, H, W)
    space = pixel_space(model, views.original.shape[1])
    rows, artifacts = [], []
    for i in range(n):
        o, a = int(c0[i]), int(cq[i])
        row: dict[str, Any] = {
            "model": model.id,
            "role": role,
            "original_class": o,
            "original_label": labels[o],
            "adversarial_class": a,
            "adversarial_label": labels[a],
            "top5_before": top_k(preds.original[i], labels),
            "top5_after": top_k(preds.png[i], labels),
            "top5_after_float": top_k(preds.adversarial[i], labels),
            "p_original_before": float(preds.original[i, o]),
            "p_original_after": float(preds.png[i, o]),
            "p_original_after_float": float(preds.adversarial[i, o]),
            "fooled": bool(fooled_q[i]),
            "fooled_float": bool(fooled_f[i]),
        }
        if params.adv_target is not None:
            t = params.adv_target
            row["p_adv_target_before"] = float(preds.original[i, t])
            row["p_adv_target_after"] = float(preds.png[i, t])
            row["p_adv_target_after_float"] = float(preds.adversarial[i, t])
        if maps is not None:
            m = maps[i]
            row["gradcam"] = {
                "original_class": map_metrics.shift(m[0], m[1]),
                "adversarial_class": map_metrics.shift(m[2], m[3]),
            }
            before, after = space.to_uint8(views.original[i]), space.to_uint8(views.png[i])
            tiles = [render.overlay_rgb(m[j], before if j % 2 == 0 else after) for j in range(4)]
            titles = [
                f"{side} {labels[c][:18]} {float(p[c]):.2f}"
                for c in (o, a)
                for side, p in (("orig.", preds.original[i]), ("adv.", preds.png[i]))
            ]
            artifacts += [
                Artifact(f"{i}-{model.id}-gradcam.npy", render.npy_bytes(m), "application/x-npy"),
                Artifact(f"{i}-{model.id}-gradcam.png", render.montage_png(tiles, titles, cols=2, side=224),
                         "image/png"),  # fmt: skip
            ]
        rows.append(row)
    evaluations = 0 if maps is None else int(len(keep))
    return rows, artifacts, evaluations


def image_artifacts(i: int, u0: torch.Tensor, adv: torch.Tensor, q: torch.Tensor, epsilon: float) -> list[Artifact]:
    """The adversarial image (8-bit PNG and float ``.npy``) and the perturbation for display."""

    def rgb(u: torch.Tensor) -> np.ndarray:
        a = (u.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy().transpose(1, 2, 0)
        return a[:, :, 0] if a.shape[2] == 1 else a

    delta = (q - u0) / (2 * max(epsilon, 1e-9) / 255) + 0.5
    return [
        Artifact(f"{i}-adversarial.png", render.png_bytes(rgb(q)), "image/png"),
        Artifact(f"{i}-adversarial.npy", render.npy_bytes(adv.float()), "application/x-npy"),
        Artifact(f"{i}-perturbation.png", render.png_bytes(rgb(delta)), "image/png"),
    ]


def linf(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Per image ``max |a - b|`` in 1/255."""
    return [round(float(v) * 255, 4) for v in (a - b).abs().flatten(1).amax(1)]


def other_models(params: AdversarialParams, context: JobContext | None) -> list[LoadedModel]:
    if params.transfer_models and context is None:
        raise BadParams("transfer_models need the worker's model cache (run through a job)")
    out = [context.other_model(m) for m in params.transfer_models] if context else []
    return out


def run_images(
    model: LoadedModel, inputs: Inputs, params: AdversarialParams, progress: ProgressFn, others: list[LoadedModel]
) -> KindResult:
    t0 = time.perf_counter()
    space = pixel_space(model, inputs.images.shape[1])
    u0 = space.to_pixels(inputs.images.float()).clamp(0, 1)
    adv = attack(model, inputs.images, inputs.targets, params, progress)
    q = to_8bit(adv, u0, params.epsilon)
    t_attack = time.perf_counter() - t0
    per_image: list[dict[str, Any]] = [
        {"index": i, "target": int(inputs.targets[i]), "linf": a, "linf_png": b}
        for i, (a, b) in enumerate(zip(linf(adv, u0), linf(q, u0), strict=True))
    ]
    artifacts: list[Artifact] = []
    for i in range(len(inputs)):
        per_image[i]["models"] = []
        artifacts += image_artifacts(i, u0[i], adv[i], q[i], params.epsilon)
    gradcam_evals = 0
    for m, role in [(model, "source"), *((o, "transfer") for o in others)]:
        rows, arts, evals = model_report(m, role, Views.of(m, u0, adv, q), params, progress)
        gradcam_evals += evals
        artifacts += arts
        for i, row in enumerate(rows):
            per_image[i]["models"].append(row)
    n = len(inputs)
    summary = {
        **_attack_summary(params),
        "models": [model.id, *params.transfer_models],
        "images": per_image,
        "fooling_rate": _fooling_rates(per_image),
        "evaluations": {
            "attack_forward_backward": n * n_steps(params),
            "gradcam_forward_backward": gradcam_evals,
            "forward": 2 * n + 3 * n * len(others),
        },
        "attack_runtime_s": round(t_attack, 4),
        "runtime_s": round(time.perf_counter() - t0, 4),
    }
    return KindResult(summary, artifacts)


def _attack_summary(params: AdversarialParams) -> dict[str, Any]:
    return {
        "attack": params.attack,
        "epsilon": params.epsilon,
        "steps": n_steps(params),
        "step_size": step_size(params),
        "decay": params.decay if params.attack == "mifgsm" else None,
        "targeted": params.adv_target is not None,
        "adv_target": params.adv_target,
    }


def _fooling_rates(per_image: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per model: share of the images fooled, 8-bit and float."""
    out: dict[str, dict[str, float]] = {}
    for img in per_image:
        for row in img["models"]:
            r = out.setdefault(row["model"], {"png": 0.0, "float": 0.0})
            r["png"] += row["fooled"] / len(per_image)
            r["float"] += row["fooled_float"] / len(per_image)
    return out


# --- data-set mode ----------------------------------------------------------------------------

SUCCESS_FIELDS = [
    "model", "role", "images", "considered", "fooled_float", "fooled_png", "success_rate_float", "success_rate_png",
    "accuracy_before", "accuracy_after_float", "accuracy_after_png",
]  # fmt: skip


IMAGE_FIELDS = ["index", "label", "model", "before", "after_float", "after_png"]


def success_row(
    model: LoadedModel, role: str, labels: torch.Tensor, preds: Predictions, adv_target: int | None
) -> dict[str, Any]:
    """One model's success rate over a data set: untargeted, among the images it classifies
    correctly, the share classified otherwise afterwards; targeted, among the images not of
    class ``adv_target``, the share classified ``adv_target`` (Kurakin et al. 2017; Xie et al.
    2019's Table 1)."""
    y = labels.cpu()
    before = preds.original.argmax(1)
    considered = before == y if adv_target is None else y != adv_target
    f_float = fooled(preds.adversarial, y, adv_target) & considered
    f_png = fooled(preds.png, y, adv_target) & considered
    k = int(considered.sum())
    return {
        "model": model.id,
        "role": role,
        "images": len(y),
        "considered": k,
        "fooled_float": int(f_float.sum()),
        "fooled_png": int(f_png.sum()),
        "success_rate_float": round(int(f_float.sum()) / k, 6) if k else None,
        "success_rate_png": round(int(f_png.sum()) / k, 6) if k else None,
        "accuracy_before": round(float((before == y).float().mean()), 6),
        "accuracy_after_float": round(float((preds.adversarial.argmax(1) == y).float().mean()), 6),
        "accuracy_after_png": round(float((preds.png.argmax(1) == y).float().mean()), 6),
    }


def run_dataset(
    model: LoadedModel,
    inputs: Inputs | None,
    params: AdversarialParams,
    progress: ProgressFn,
    others: list[LoadedModel],
) -> KindResult:
    t0 = time.perf_counter()
    images, labels = load_dataset(model, params, inputs)
    labels = labels.to(torch.long)
    space = pixel_space(model, images.shape[1])
    u0 = space.to_pixels(images.float()).clamp(0, 1)
    adv = attack(model, images, labels.to(images.device), params, progress)
    q = to_8bit(adv, u0, params.epsilon)
    t_attack = time.perf_counter() - t0
    rows, per_image = [], []
    for m, role in [(model, "source"), *((o, "transfer") for o in others)]:
        progress(0, 1, f"evaluating {m.id}")
        preds = Predictions.of(m, Views.of(m, u0, adv, q), params.batch_size)
        rows.append(success_row(m, role, labels, preds, params.adv_target))
        for i, (a, b, c) in enumerate(zip(*(p.argmax(1).tolist() for p in (preds.original, preds.adversarial,
                                                                              preds.png)), strict=True)):  # fmt: skip
            per_image.append({"index": i, "label": int(labels[i]), "model": m.id, "before": a, "after_float": b,
                              "after_png": c})  # fmt: skip
    d_float, d_png = linf(adv, u0), linf(q, u0)
    n = len(labels)
    summary = {
        **_attack_summary(params),
        "dataset": params.dataset,
        "images": n,
        "success": rows,
        "max_linf": max(d_float, default=0.0),
        "max_linf_png": max(d_png, default=0.0),
        "evaluations": {"attack_forward_backward": n * n_steps(params), "forward": 2 * n + 3 * n * len(others)},
        "attack_runtime_s": round(t_attack, 4),
        "runtime_s": round(time.perf_counter() - t0, 4),
    }
    artifacts = [
        Artifact("success.csv", render.csv_bytes(SUCCESS_FIELDS, [[r[k] for k in SUCCESS_FIELDS] for r in rows]),
                 "text/csv"),  # fmt: skip
        Artifact("images.csv", render.csv_bytes(IMAGE_FIELDS, [[r[k] for k in IMAGE_FIELDS] for r in per_image]),
                 "text/csv"),  # fmt: skip
    ]
    return KindResult(summary, artifacts)


def run(
    model: LoadedModel,
    inputs: Inputs,
    params: AdversarialParams,
    progress: ProgressFn,
    context: JobContext | None = None,
) -> KindResult:
    """The ``adversarial`` kind: per image (no ``dataset``) or over a data set."""
    others = other_models(params, context)
    for o in others:
        if o.manifest.labels != model.manifest.labels:
            raise BadParams(f"transfer model {o.id!r} has other labels than {model.id!r}",
                            details={"field": "transfer_models"})  # fmt: skip
    if params.dataset is not None:
        return run_dataset(model, inputs, params, progress, others)
    if not len(inputs):
        raise BadParams("adversarial needs an image, or a dataset", details={"field": "dataset"})
    return run_images(model, inputs, params, progress, others)
