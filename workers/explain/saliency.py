"""Input-gradient saliency (Simonyan, Vedaldi and Zisserman, 2014, arXiv:1312.6034).

``attribution = d f_target(x) / d x`` (absolute value by default, as Captum's ``Saliency``).
The ``saliency`` kind is the ``attribution`` kind's ``saliency`` method with the same fields
and defaults (``SaliencyParams`` = ``SaliencyMethod`` without ``method``), kept as its own
kind on the ``high`` queue because it is cheap: one forward and backward pass per image,
in chunks of ``model.grad_batch_size``. Outputs: see :mod:`workers.explain.attribution`.
"""

from __future__ import annotations

import torch

from schemas.attribution import SaliencyMethod
from schemas.params import SaliencyParams
from workers.explain import attribution
from workers.explain.base import Inputs, KindResult, LoadedModel, ProgressFn, no_progress


def as_method(params: SaliencyParams) -> SaliencyMethod:
    """The ``attribution`` kind's params for the same saliency job."""
    return SaliencyMethod(method="saliency", **params.model_dump())


def attribute(
    model: LoadedModel,
    images: torch.Tensor,
    targets: torch.Tensor,
    params: SaliencyParams,
    progress: ProgressFn = no_progress,
) -> torch.Tensor:
    """Saliency of ``images`` ``(N, C, H, W)`` for ``targets`` ``(N,)`` -> ``(N, C, H, W)``."""
    return attribution.attribute(model, images, targets, as_method(params), progress)


def run(model: LoadedModel, inputs: Inputs, params: SaliencyParams, progress: ProgressFn) -> KindResult:
    return attribution.run(model, inputs, as_method(params), progress)
