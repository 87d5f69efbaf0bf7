"""2-D explanation maps for the Model Inspector kinds, through the ``attribution`` kind's own
code (:func:`workers.explain.attribution.attribute` through
:func:`workers.explain.u_analysis.compute_attribution`: Captum's methods, batched on
``model.module``): any method as ``(N, H, W)`` maps, and Grad-CAM (the default map of
``signal``, ``reference_map`` and the adversarial kinds) by name.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from schemas.attribution import AttributionParams
from workers import render
from workers.explain.base import LoadedModel, ProgressFn, no_progress
from workers.explain.u_analysis import compute_attribution


def attribution_maps(
    model: LoadedModel,
    images: torch.Tensor,
    targets: torch.Tensor,
    method: Any,
    progress: ProgressFn = no_progress,
    batch_size: int | None = None,
) -> np.ndarray:
    """``(N, H, W)`` float32: ``method``'s attribution (an ``AttributionMethod`` params model or
    its dict) of ``images`` ``(N, C, H, W)`` for ``targets`` ``(N,)``, aggregated over channels
    by the method's ``aggregation``. The job's ``batch_size``, when set, is the chunk size."""
    if isinstance(method, dict):
        method = AttributionParams.model_validate(method)
    attr = compute_attribution(model, images, targets, method, progress, batch_size)
    return np.stack([render.to_2d(a, method.aggregation) for a in attr]) if len(attr) else np.zeros((0,))


def gradcam_maps(
    model: LoadedModel,
    images: torch.Tensor,
    targets: torch.Tensor,
    layer: str | None = None,
    progress: ProgressFn = no_progress,
    batch_size: int | None = None,
) -> np.ndarray:
    """``(N, H, W)`` Grad-CAM (Selvaraju et al. 2017; ReLU'd, upsampled bilinearly to the input)
    at ``layer`` (default: the manifest's ``gradcam_layer``)."""
    return attribution_maps(model, images, targets, {"method": "gradcam", "layer": layer}, progress, batch_size)
