"""Agreement and localisation metrics of 2-D maps, shared by the Model Inspector kinds
(``robustness``: a map against the original's; ``signal``: a map against a region;
``reference_map``: a map against a reference such as human clicks, the occlusion paper's
Exp. 1; the adversarial kinds: Grad-CAM before against after).

Maps are ``(H, W)`` arrays (any real dtype); masks ``(H, W)`` bool. Every function is plain
numpy/SciPy, deterministic, and returns ``None`` where a score is undefined (a constant map
has no correlation), never NaN (the results are JSON).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import rankdata


def _flat(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float64).ravel()


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation of two maps of the same shape; None when one is constant."""
    x, y = _flat(a), _flat(b)
    x, y = x - x.mean(), y - y.mean()
    den = float(np.sqrt((x * x).sum() * (y * y).sum()))
    if den <= 0:
        return None
    return float(np.clip((x * y).sum() / den, -1.0, 1.0))


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman rank correlation (Pearson of the average ranks, so ties count as SciPy's)."""
    return pearson(rankdata(_flat(a)), rankdata(_flat(b)))


def top_mask(a: np.ndarray, fraction: float) -> np.ndarray:
    """``(H, W)`` bool: the ``ceil(fraction * H * W)`` largest values of ``a`` (ties broken in
    raster order, first pixel first)."""
    flat = _flat(a)
    k = max(1, min(flat.size, int(np.ceil(fraction * flat.size - 1e-9))))
    order = np.argsort(-flat, kind="stable")
    out = np.zeros(flat.size, bool)
    out[order[:k]] = True
    return out.reshape(np.shape(a))


def iou(m1: np.ndarray, m2: np.ndarray) -> float:
    union = int((m1 | m2).sum())
    return float((m1 & m2).sum()) / union if union else 0.0


def top_iou(a: np.ndarray, b: np.ndarray, fraction: float) -> float:
    """Intersection over union of the top ``fraction`` of the pixels of ``a`` and of ``b``."""
    return iou(top_mask(a, fraction), top_mask(b, fraction))


def auc(scores: np.ndarray, positives: np.ndarray) -> float | None:
    """ROC AUC of ``scores`` ranking the pixels of ``positives`` (bool) above the others (the
    Mann-Whitney U statistic over average ranks); None when either class is empty."""
    s, p = _flat(scores), np.asarray(positives, bool).ravel()
    n_pos, n_neg = int(p.sum()), int((~p).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(s)
    return float((ranks[p].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def argmax_point(a: np.ndarray) -> tuple[int, int]:
    """``(row, col)`` of the map's maximum (first in raster order)."""
    r, c = np.unravel_index(int(np.argmax(np.asarray(a))), np.shape(a))
    return int(r), int(c)


def pointing_game(a: np.ndarray, mask: np.ndarray) -> bool:
    """The pointing game (Zhang et al. 2016): does the map's maximum fall inside ``mask``?"""
    r, c = argmax_point(a)
    return bool(np.asarray(mask)[r, c])


def mass_inside(a: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
    """How a map's mass splits between a region (``mask``) and the rest.

    ``mass_inside`` / ``mass_outside``: sums of the map's positive part; ``density_ratio``: the
    area-normalised ratio ``(mass_inside / area_inside) / (mass_outside / area_outside)`` (> 1:
    more mass per pixel inside; None when there is no mass outside); ``positive_share_inside``:
    the fraction of the positive mass inside; ``area_fraction``: the region's share of the
    pixels (what that share would be for a uniform map); ``pointing_game``."""
    pos = np.clip(np.asarray(a, np.float64), 0, None)
    m = np.asarray(mask, bool)
    inside, outside = float(pos[m].sum()), float(pos[~m].sum())
    area_in, area_out = int(m.sum()), int((~m).sum())
    total = inside + outside
    dens_in = inside / area_in if area_in else 0.0
    dens_out = outside / area_out if area_out else 0.0
    return {
        "mass_inside": inside,
        "mass_outside": outside,
        "density_inside": dens_in,
        "density_outside": dens_out,
        "density_ratio": dens_in / dens_out if dens_out > 0 else None,
        "positive_share_inside": inside / total if total > 0 else None,
        "area_fraction": area_in / m.size,
        "pointing_game": pointing_game(a, m),
    }


def agreement(a: np.ndarray, b: np.ndarray, fractions: tuple[float, ...] | list[float] = (0.1,)) -> dict[str, Any]:
    """``pearson``, ``spearman`` and ``iou_top{k}`` (k in percent) of map ``a`` against ``b``."""
    out: dict[str, Any] = {"pearson": pearson(a, b), "spearman": spearman(a, b)}
    for f in fractions:
        out[f"iou_top{round(100 * f):d}"] = top_iou(a, b, f)
    return out


def centroid(a: np.ndarray) -> tuple[float, float] | None:
    """``(row, col)`` in pixels of the centre of mass of the map's positive part (None if it
    has none)."""
    pos = np.clip(np.asarray(a, np.float64), 0, None)
    total = float(pos.sum())
    if total <= 0:
        return None
    rows, cols = np.indices(pos.shape)
    return float((rows * pos).sum() / total), float((cols * pos).sum() / total)


def shift(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """How map ``b`` moved from map ``a`` (the paper's attention shift, Figs 3-5): ``pearson``,
    both ``centroid``s and the Euclidean ``centroid_shift_px`` between them (None where a map
    has no positive mass)."""
    c0, c1 = centroid(a), centroid(b)
    return {
        "pearson": pearson(a, b),
        "centroid_before": None if c0 is None else [round(v, 3) for v in c0],
        "centroid_after": None if c1 is None else [round(v, 3) for v in c1],
        "centroid_shift_px": None if c0 is None or c1 is None else float(np.hypot(c1[0] - c0[0], c1[1] - c0[1])),
    }
