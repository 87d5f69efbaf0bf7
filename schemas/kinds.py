"""The catalogue of job kinds: name -> params schema, queue, description.

``GET /v1/methods`` is generated from this table, the API validates submissions with it,
and the worker looks the kind's ``run`` function up by the same name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel

from schemas.attribution import AttributionParams, CompareParams, OcclusionMapParams
from schemas.attribution_batch import AttributionBatchParams
from schemas.fill_blanks import FillBlanksConsistencyParams, FillBlanksParams
from schemas.influence import InfluenceGroupsParams, InfluenceParams
from schemas.inspector import (
    AdversarialParams,
    NoiseImagesParams,
    ReferenceMapParams,
    RobustnessParams,
    SignalParams,
)
from schemas.params import SaliencyParams
from schemas.settings import Settings
from schemas.u_analysis import UAnalysisParams, USweepParams

Queue = Literal["high", "default", "low"]


@dataclass(frozen=True)
class KindSpec:
    name: str
    params: type[BaseModel]
    queue: Queue
    description: str
    min_images: int = 1
    max_images: int | None = None  # None = the server's per-request limit
    files: tuple[str, ...] = ()  # extra uploads the kind accepts (e.g. "attribution" .npy)
    timeout_s: int | None = None  # time budget of one job; None = settings.job_timeout_s
    memory_mb: int | None = None  # memory budget of one job; None = settings.job_memory_mb (0: none)


def budgets(spec: KindSpec, settings: Settings) -> tuple[int, int]:
    """``(seconds, MiB)`` one job of this kind may take. An operator's ``kind_timeout_s`` /
    ``kind_memory_mb`` entry for the kind wins, then the catalogue's, then ``job_timeout_s`` /
    ``job_memory_mb``. 0 MiB: no memory budget."""
    seconds = settings.kind_timeout_s.get(spec.name) or spec.timeout_s or settings.job_timeout_s
    memory = settings.kind_memory_mb.get(spec.name, spec.memory_mb)
    return seconds, settings.job_memory_mb if memory is None else memory


UPLOADS: dict[str, str] = {
    "attribution": "an attribution map as .npy at the model's input size: (N, C', H, W), (N, H, W), or for one image "
    "(C', H, W) or (H, W), C' 1 or the model's channels; used instead of computing one",
    "training_set": "a zip of training images in ImageFolder layout, <class>/<image> (class folders named like "
    "the model's labels, or as many folders as labels in sorted order), used instead of the model's "
    "registered training set",
    "signal_mask": "a mask PNG of the uploaded image's size, white (grey > 127) = signal; instead of 'region'",
    "reference": "a reference map over the uploaded image: .npy or grey PNG of any size (e.g. 20x20 click counts)",
}
"""What each extra upload (``KindSpec.files``) is, as ``GET /v1/methods`` describes it."""

KINDS: dict[str, KindSpec] = {
    spec.name: spec
    for spec in [
        KindSpec(
            "saliency",
            SaliencyParams,
            "high",
            "Input-gradient saliency map of the target class (Simonyan et al. 2014).",
        ),
        KindSpec("attribution", AttributionParams, "default", "Attribution map by any Captum method."),
        KindSpec("occlusion_map", OcclusionMapParams, "default", "Probability under a sliding occluder."),
        KindSpec("compare", CompareParams, "default", "Several attribution methods: table and grid.", min_images=0),
        KindSpec("u_analysis", UAnalysisParams, "default", "U Analysis: regions replaced in order, U-triples.", files=("attribution",)),  # noqa: E501
        KindSpec("u_sweep", USweepParams, "low", "U Analysis over a data set x a grid: U occurrence.", min_images=0),
        KindSpec("fill_blanks", FillBlanksParams, "default", "Fill in the blanks: how the model fills masked patches.", max_images=16),  # noqa: E501
        KindSpec("fill_blanks_consistency", FillBlanksConsistencyParams, "low", "Fill in the blanks over a data set: does the model recognise its own fills (Table 1).", min_images=0),  # noqa: E501
        KindSpec("influence", InfluenceParams, "low", "Layer-wise influence of training images (Koh & Liang 2017).", max_images=32, files=("training_set",)),  # noqa: E501
        KindSpec("attribution_batch", AttributionBatchParams, "low", "One attribution method over a whole data set: maps.npy, per-image CSV.", min_images=0, max_images=0),  # noqa: E501
        KindSpec("robustness", RobustnessParams, "default", "Model Inspector transforms: noises and shuffles, top-5 before/after.", files=("signal_mask",)),  # noqa: E501
        KindSpec("signal", SignalParams, "default", "Signal vs context: map mass, fills, RFS, Top-K erasing.", max_images=1, files=("signal_mask",)),  # noqa: E501
        KindSpec("reference_map", ReferenceMapParams, "default", "Agreement of a map with a reference map (e.g. human clicks).", max_images=1, files=("reference", "attribution")),  # noqa: E501
        KindSpec("adversarial", AdversarialParams, "default", "FGSM / I-FGSM / MI-FGSM images: predictions and Grad-CAM before and after, transfer, success rates.", min_images=0),  # noqa: E501
        KindSpec("noise_images", NoiseImagesParams, "default", "Perlin noise and universal perturbations as inputs: top-5 and Grad-CAM.", min_images=0),  # noqa: E501
        KindSpec("influence_groups", InfluenceGroupsParams, "low", "Influence of disturbed image groups per layer (Aamir et al. 2023).", max_images=16, files=("training_set",)),  # noqa: E501
    ]
}
