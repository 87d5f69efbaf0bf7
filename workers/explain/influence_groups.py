"""Kind ``influence_groups``: layer-wise influence of test images and their disturbed versions.

The experiment of Aamir, Tamosiunaite and Wörgötter (2023, Sec. 3.1-3.2 and 4.2.3): test
images ("original") and disturbed versions of them (white background, texture, style) are
scored against the training set layer by layer (``workers.explain.influence``); each image's
layer-wise score is averaged over the training images of its class (the paper's intra-class
I_avg; ``average_over`` also offers inter-class and all), then over the images of a group.
Groups are compared by the Pearson correlation of their layer-wise vectors and clustered by
average linkage on Euclidean distances (the paper's choice; 1 - Pearson on request), and the
layer-wise curves are drawn per group with one line per class (the paper's Fig. 9).

Disturbances, computed on the image at the model's input size (``Inputs.display``):

- ``white_background``: pixels close in colour to the image border (the background, by Otsu's
  threshold on the distance to the border's median colour) become white. A simple stand-in for
  the paper's manual background removal; upload your own for hard cases.
- ``texture``: a scikit-image texture (brick, grass, gravel) at its native scale, tiled and
  blended into the image with weight ``texture_strength``.
- ``style``: a colour/texture blend standing in for neural style transfer: the image's Lab
  colour statistics are matched to a scikit-image picture's (Reinhard et al. 2001), and that
  picture's fine detail (its grey level minus a Gaussian blur, sigma 2 px) is added, both with
  weight ``style_strength``.

The client may instead upload its own groups (``groups``: one name per image). Disturbed
versions keep the target of their original: the question is how the same class's training
images support the disturbed prediction.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from schemas.errors import BadParams
from schemas.influence import InfluenceGroupsParams
from workers.explain.base import Artifact, Inputs, KindResult, LoadedModel, ProgressFn
from workers.explain.influence import (
    average_linkage,
    clustering_png,
    compute_influence,
    enforce_soundness,
    figure_png,
    finite_or_none,
    gradient_store,
    layer_correlation,
    new_figure,
    resolve_training_set,
    rows_of,
)
from workers.pipeline import forward_in_chunks
from workers.render import npy_bytes

ORIGINAL = "original"


def _skimage_picture(name: str) -> np.ndarray:
    from skimage import data

    fn = {"immunohistochemistry": data.immunohistochemistry}.get(name) or getattr(data, name)
    return np.asarray(fn())


def white_background(rgb: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 with the background (close to the border's colour) set to white."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    a = rgb.astype(np.float32)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    dist = np.linalg.norm(a - np.median(border, axis=0), axis=-1)
    if float(dist.max() - dist.min()) <= 1e-6:
        return np.full_like(rgb, 255)  # a flat image is all background
    foreground = ndimage.binary_fill_holes(dist > threshold_otsu(dist))
    out = rgb.copy()
    out[~foreground] = 255
    return out


def textured(rgb: np.ndarray, texture: str, strength: float) -> np.ndarray:
    """``rgb`` blended with a scikit-image texture at its native scale (tiled to fit)."""
    tex = _skimage_picture(texture).astype(np.float32)
    if tex.ndim == 3:
        tex = tex[..., :3].mean(-1)
    h, w = rgb.shape[:2]
    reps = (-(-h // tex.shape[0]), -(-w // tex.shape[1]))
    tile = np.tile(tex, reps)[:h, :w, None]
    out = (1 - strength) * rgb.astype(np.float32) + strength * tile
    return out.clip(0, 255).astype(np.uint8)


def styled(rgb: np.ndarray, source: str, strength: float) -> np.ndarray:
    """Reinhard colour transfer to a scikit-image picture plus that picture's fine detail."""
    from skimage.color import lab2rgb, rgb2gray, rgb2lab
    from skimage.filters import gaussian

    h, w = rgb.shape[:2]
    pic = _skimage_picture(source)
    if pic.ndim == 2:
        pic = np.repeat(pic[..., None], 3, axis=-1)
    # PIL's Lanczos reduction: as good as a Gaussian anti-aliasing filter here, and far faster
    # on the large pictures (a 1000 px photo to a few pixels).
    pic = np.asarray(Image.fromarray(pic[..., :3].astype(np.uint8)).resize((w, h), Image.Resampling.LANCZOS)) / 255.0
    lab, plab = rgb2lab(rgb / 255.0), rgb2lab(pic)
    mu, sd = lab.reshape(-1, 3).mean(0), lab.reshape(-1, 3).std(0) + 1e-6
    pmu, psd = plab.reshape(-1, 3).mean(0), plab.reshape(-1, 3).std(0)
    transferred = lab2rgb((lab - mu) / sd * psd + pmu) * 255.0
    grey = rgb2gray(pic)
    detail = (grey - gaussian(grey, sigma=2)) * 255.0
    out = (1 - strength) * rgb.astype(np.float32) + strength * (transferred + detail[..., None])
    return out.clip(0, 255).astype(np.uint8)


def disturb(rgb: np.ndarray, kind: str, params: InfluenceGroupsParams) -> np.ndarray:
    if kind == "white_background":
        return white_background(rgb)
    if kind == "texture":
        return textured(rgb, params.texture, params.texture_strength)
    return styled(rgb, params.style_source, params.style_strength)


def build_groups(
    model: LoadedModel, inputs: Inputs, params: InfluenceGroupsParams
) -> tuple[torch.Tensor, list[np.ndarray], torch.Tensor, list[str]]:
    """All test images: the uploaded ones (grouped by ``params.groups``) and the generated
    disturbed versions of the originals. Returns images ``(M, C, H, W)``, display images,
    targets ``(M,)`` and group names ``(M,)``."""
    from workers.registry import preprocess

    n = len(inputs)
    names = list(params.groups) if params.groups is not None else [ORIGINAL] * n
    if len(names) != n:
        raise BadParams(f"groups has {len(names)} names for {n} images")
    kinds = params.disturbances
    if kinds is None:
        kinds = ["white_background", "texture", "style"] if params.groups is None else []
    originals = [i for i in range(n) if names[i] == ORIGINAL]
    if kinds and not originals:
        raise BadParams("disturbances are generated from images of group 'original'; none was uploaded")
    images, display, targets = [inputs.images], list(inputs.display), [inputs.targets]
    for kind in dict.fromkeys(kinds):
        made = [disturb(inputs.display[i], kind, params) for i in originals]
        # Made from the display images, already the input's size and region: no second crop.
        at_size = model.manifest.preprocessing.model_copy(update={"resize": "stretch"})
        x, disp = preprocess([Image.fromarray(m) for m in made], at_size)
        images.append(x.to(inputs.images.device, inputs.images.dtype))
        display.extend(disp)
        targets.append(inputs.targets[originals])
        names.extend([kind] * len(originals))
    if len(set(names)) < 1:
        raise BadParams("no test images")
    return torch.cat(images), display, torch.cat(targets), names


def image_vectors(
    rows_scores: np.ndarray, labels: np.ndarray, targets: np.ndarray, average_over: str
) -> np.ndarray:
    """Each image's layer-wise score ``(M, L + 1)``: the mean over the training points of its
    target class (intra), of the other classes (inter) or all, of ``rows_scores`` ``(M, L + 1, n)``."""
    out = np.full(rows_scores.shape[:2], np.nan)
    for i, t in enumerate(targets):
        mask = {"intra_class": labels == t, "inter_class": labels != t}.get(average_over, np.ones_like(labels, bool))
        if mask.any():
            out[i] = rows_scores[i][:, mask].mean(axis=1)
    return out


def curves_png(
    layer_names: list[str], groups: list[str], vectors: np.ndarray, names: list[str], classes: list[str],
    targets: np.ndarray,
) -> bytes:
    """The paper's Fig. 9: one panel per group, the layer-wise average influence of each class
    (thin lines) and of the whole group (thick black line)."""
    g = len(groups)
    fig = new_figure(3.2 * g + 0.8, 3.4)
    x = np.arange(len(layer_names))
    axes = [fig.add_subplot(1, g, k + 1) for k in range(g)]
    for ax, group in zip(axes, groups, strict=True):
        sel = np.array([nm == group for nm in names])
        for t in np.unique(targets[sel]):
            m = sel & (targets == t)
            ax.plot(x, np.nanmean(vectors[m, :-1], axis=0), marker="o", lw=1, ms=3, label=classes[int(t)])
        ax.plot(x, np.nanmean(vectors[sel, :-1], axis=0), color="black", lw=2.2, label="group mean")
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_title(f"{group} ({int(sel.sum())})", fontsize=9)
        ax.set_xticks(x, layer_names, rotation=60, fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
    axes[0].set_ylabel("mean influence", fontsize=8)
    axes[-1].legend(fontsize=6, loc="best")
    fig.suptitle("layer-wise influence per group", fontsize=9)
    fig.tight_layout()
    return figure_png(fig)


def images_png(display: list[np.ndarray], names: list[str], captions: list[str]) -> bytes:
    """The test images by group (one row per group) with their predicted labels."""
    groups = list(dict.fromkeys(names))
    cols = max(sum(nm == g for nm in names) for g in groups)
    fig = new_figure(1.2 * cols + 1.2, 1.4 * len(groups))
    grid = fig.add_gridspec(len(groups), cols, hspace=0.5)
    for r, group in enumerate(groups):
        members = [i for i, nm in enumerate(names) if nm == group]
        for c, i in enumerate(members):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(display[i], interpolation="nearest")
            ax.set_title(captions[i], fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(group, fontsize=8)
    return figure_png(fig)


def run(
    model: LoadedModel, inputs: Inputs, params: InfluenceGroupsParams, progress: ProgressFn, context: Any = None
) -> KindResult:
    """Kind ``influence_groups``. ``context`` as for ``influence`` (cache_dir, models_dir).

    Artifacts: ``scores.npy`` ``(M, L + 1, n)`` of all M test images (rows: layers, total),
    ``image_layer_scores.npy`` ``(M, L + 1)`` (each image's average), ``group_layer_means.npy``
    ``(G, L + 1)``, ``curves.png`` (Fig. 9), ``groups_clustering.png`` (dendrogram and Pearson
    matrix of the groups, 2+ groups) and ``images.png`` (the test images by group)."""
    train = resolve_training_set(model, context, params.training_set)
    images, display, targets, names = build_groups(model, inputs, params)
    result = compute_influence(
        model, train, images, targets, params, progress, gradient_store(getattr(context, "cache_dir", None))
    )
    warnings = enforce_soundness(result, params)
    rows, all_rows = rows_of(result)
    tgt = targets.cpu().numpy()
    vectors = image_vectors(all_rows, train.labels, tgt, params.average_over)
    groups = list(dict.fromkeys(names))
    member = {g: np.array([nm == g for nm in names]) for g in groups}
    means = np.stack([np.nanmean(vectors[member[g]], axis=0) for g in groups])  # (G, L + 1)
    pred = forward_in_chunks(model, images).argmax(1).cpu().numpy()
    labels = model.manifest.labels

    group_rows = []
    for gi, g in enumerate(groups):
        sel = member[g]
        per_class = {labels[int(t)]: {r: finite_or_none(float(v)) for r, v in
                                      zip(rows, np.nanmean(vectors[sel & (tgt == t)], axis=0), strict=True)}
                     for t in np.unique(tgt[sel])}
        group_rows.append({
            "name": g,
            "images": int(sel.sum()),
            "accuracy": float((pred[sel] == tgt[sel]).mean()),
            "layer_means": {r: finite_or_none(float(v)) for r, v in zip(rows, means[gi], strict=True)},
            "class_means": per_class,
        })
    layer_part = means[:, :-1]
    summary: dict[str, Any] = {
        "training_set": {"source": train.source, "size": len(train), "fingerprint": train.fingerprint[:16]},
        "solver": params.solver,
        "curvature": params.curvature,
        "damping": params.damping,
        "average_over": params.average_over,
        "rows": rows,
        "groups": group_rows,
        "images": [{"index": i, "group": names[i], "target": int(tgt[i]), "predicted": int(pred[i]),
                    "sound": result.sound(i),
                    "layer_scores": {r: finite_or_none(float(v)) for r, v in zip(rows, vectors[i], strict=True)}}
                   for i in range(len(names))],
        "layers": [{"name": layer.name, "type": layer.kind, "params": layer.numel, "solve": r.as_dict()}
                   for layer, r in zip(result.layers, result.reports, strict=True)],
        "sound": all(result.sound(i) for i in range(len(names))),
        "warnings": warnings,
        "timings": {k: round(v, 4) for k, v in result.timings.items()},
    }
    artifacts = [
        Artifact("scores.npy", npy_bytes(all_rows.astype(np.float32)), "application/x-npy"),
        Artifact("image_layer_scores.npy", npy_bytes(vectors.astype(np.float32)), "application/x-npy"),
        Artifact("group_layer_means.npy", npy_bytes(means.astype(np.float32)), "application/x-npy"),
        Artifact("curves.png", curves_png(rows[:-1], groups, vectors, names, labels, tgt), "image/png"),
        Artifact("images.png", images_png(display, names, [f"{labels[int(p)]}" for p in pred]), "image/png"),
    ]
    if len(groups) >= 2:
        finite = np.nan_to_num(layer_part)
        rho = layer_correlation(finite) if layer_part.shape[1] >= 2 else np.eye(len(groups))
        z = (average_linkage(rho=rho) if params.cluster_distance == "correlation"
             else average_linkage(vectors=finite))
        summary["pearson"] = np.round(rho, 6).tolist()
        summary["linkage"] = np.round(z, 6).tolist()
        summary["cluster_distance"] = params.cluster_distance
        artifacts.append(Artifact("groups_clustering.png", clustering_png(
            groups, rho, z, f"groups: average linkage ({params.cluster_distance})"), "image/png"))
    progress(1, 1, "done")
    return KindResult(summary, artifacts)
