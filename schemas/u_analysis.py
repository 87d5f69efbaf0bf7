"""Parameters of the ``u_analysis`` and ``u_sweep`` kinds (U Analysis, Algorithm 1 of
papers/u-analysis-and-model-inspector).

Terms used below:

- *pixel space*: intensities in ``[0, 1]`` (0 = black, 1 = white) before the model's
  normalisation; noise is defined there and mapped through the manifest's preprocessing
  (``x = (255 * u * scale - mean) / std``) into the model's input space.
- *window*: the side ``W`` of the non-overlapping square regions ("patches"), in pixels or
  as a fraction of the image's shorter side (the paper's sizes are 10%...33%).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.attribution import AttributionMethod, AttributionParams
from schemas.datasets import DATASET_REF_PATTERN, DatasetParams
from schemas.params import Aggregation, JobParams

Order = Literal["decreasing", "increasing", "random"]
"""In which order regions are replaced: most important first, least important first, or a
seeded random permutation (the paper's three sorting types)."""

NoiseType = Literal[
    "zeros", "ones", "gaussian", "uniform", "image_mean", "region_mean", "dataset_mean", "blur", "constant"
]
"""What replaces a removed region, in pixel space:

- ``zeros`` / ``ones``: black / white (the authors' code: ``black`` / ``white``).
- ``gaussian``: i.i.d. ``N(gaussian_mean, gaussian_std)`` per pixel and channel (the authors'
  code draws ``N(0, 1)`` on ``[0, 1]`` pixels, unclipped: the defaults).
- ``uniform``: i.i.d. ``U(0, 1)`` per pixel and channel.
- ``image_mean``: the image's mean colour. ``region_mean``: the removed region's own mean
  colour (the paper's "image region mean").
- ``dataset_mean``: the normalisation mean of the model (its training set's mean colour;
  the authors' ``mean_norm``), i.e. 0 after normalisation.
- ``blur``: the same region of a Gaussian-blurred copy of the image (``blur_sigma``).
- ``constant``: ``constant`` everywhere.
"""

PAPER_METHODS: list[str] = [
    "saliency",
    "input_x_gradient",
    "integrated_gradients",
    "deeplift",
    "deeplift_shap",
    "gradient_shap",
    "guided_backprop",
    "deconvolution",
    "gradcam",
    "guided_gradcam",
]
"""The sweep's default methods. The paper uses "10 different interpretability methods" without
naming them in the text; these are the ten gradient-based Captum methods the authors' code
imports (Saliency, InputXGradient, IntegratedGradients, DeepLift, DeepLiftShap, GradientShap,
GuidedBackprop, Deconvolution, LayerGradCam, GuidedGradCam), leaving out its two
perturbation methods (Occlusion, ShapleyValueSampling)."""

PAPER_NOISES: list[NoiseType] = ["zeros", "ones", "gaussian", "image_mean", "region_mean", "dataset_mean"]
"""The paper's 6 noise types: those of the authors' code (black, white, gaussian, img_mean,
region_mean, mean_norm)."""

PAPER_ORDERS: list[Order] = ["decreasing", "increasing", "random"]

PAPER_WINDOWS: list[float] = [0.10, 0.15, 0.20, 0.25, 0.33]
"""Five window sizes from 10% to 33% of the image side (the paper names 10% and 33%; the three
between are evenly spaced)."""

MAX_REGIONS = 4096
"""Each region costs one model evaluation; beyond this a window is surely a mistake."""


def paper_methods() -> list[Any]:
    """``PAPER_METHODS`` with their default params."""
    return [AttributionParams.model_validate({"method": name}) for name in PAPER_METHODS]


def _check_method_fields(methods: list[Any]) -> None:
    for m in methods:
        if m.target is not None or m.batch_size is not None or m.resize is not None:
            raise ValueError(f"{m.method}: set target, batch_size and resize on the job, not on the method")


class NoiseParams(BaseModel):
    """Noise and region settings shared by ``u_analysis`` and ``u_sweep``."""

    model_config = ConfigDict(extra="forbid")

    aggregation: Aggregation | None = Field(
        None,
        description="channel aggregation of the attribution before the window sums; null = the method's own "
        "(for an uploaded map: 'sum', the paper's 'summing up all attribution weight' of each region)",
    )
    gaussian_mean: float = Field(0.0, description="mean of 'gaussian' noise, pixel space")
    gaussian_std: float = Field(1.0, gt=0, description="standard deviation of 'gaussian' noise, pixel space")
    constant: float = Field(0.5, description="value of 'constant' noise, pixel space (0 black, 1 white)")
    blur_sigma: float | None = Field(
        None, gt=0, description="sigma in pixels of 'blur' noise; null = half the window side"
    )
    clip: bool = Field(False, description="clip the noise to [0, 1] pixel space (the authors' code does not)")
    seed: int = Field(0, ge=0, description="seed of random order, random noise and the paper's random middle")


class UAnalysisParams(NoiseParams, JobParams):
    """U Analysis of each image (Algorithm 1): region importance from an attribution map,
    cumulative replacement of regions by noise in the chosen order, model predictions along
    the sequence x_0 (original) ... x_N (every region replaced), and every U-triple."""

    attribution: AttributionMethod = Field(
        default_factory=lambda: AttributionParams.model_validate({"method": "saliency"}),
        description="attribution method and its params computing the importance map (ignored when a map is "
        "uploaded); target and batch_size are the job's",
    )
    window_px: int | None = Field(None, ge=1, description="window side in pixels (overrides window_fraction)")
    window_fraction: float = Field(
        0.10, gt=0, le=1, description="window side as a fraction of the image's shorter side (paper: 10%...33%)"
    )
    order: Order = Field(
        "increasing",
        description="removal order; default: least important first, as the paper's Fig. 1 describes the "
        "pipeline ('from the less important to the most one') and the authors' tool runs it",
    )
    noise: NoiseType = "zeros"

    @model_validator(mode="after")
    def _no_method_job_fields(self) -> UAnalysisParams:
        _check_method_fields([self.attribution])
        return self


class USweepParams(DatasetParams, NoiseParams, JobParams):
    """A data set x a grid of methods, orders, noises and window sizes; the U occurrence (%
    of images with at least one U-triple) per configuration and per hyperparameter value
    (the paper's Fig. 4). Defaults: the paper's grid, 10 x 3 x 6 x 5 = 900 configurations."""

    dataset: str = Field(  # type: ignore[assignment]
        "test",
        pattern=rf"^(test|train|uploaded|{DATASET_REF_PATTERN.strip('^$')})$",
        description="an uploaded data set's id (ds_..., POST /v1/datasets; labels = its classes, else the "
        "predicted class), model:<split> (the model's registered data), 'uploaded' (the request's images, "
        "labels = target); 'test' and 'train' = model:test and model:train",
    )
    methods: list[AttributionMethod] = Field(
        default_factory=lambda: paper_methods(),
        min_length=1,
        description="attribution methods with their params (default: the paper's ten, Captum's defaults)",
    )
    orders: list[Order] = Field(default_factory=lambda: list(PAPER_ORDERS), min_length=1)
    noises: list[NoiseType] = Field(default_factory=lambda: list(PAPER_NOISES), min_length=1)
    window_fractions: list[float] | None = Field(
        default_factory=lambda: list(PAPER_WINDOWS),
        description="window sides as fractions of the image's shorter side",
    )
    window_px: list[int] | None = Field(None, description="window sides in pixels (replaces window_fractions)")
    images_per_chunk: int = Field(40, ge=1, le=10000, description="images per child job")

    @model_validator(mode="after")
    def _grid(self) -> USweepParams:
        _check_method_fields(self.methods)
        for name in ("orders", "noises", "window_fractions", "window_px"):
            values = getattr(self, name)
            if values is not None and len(set(values)) != len(values):
                raise ValueError(f"{name} has duplicates")
        if self.window_px is None and not self.window_fractions:
            raise ValueError("give window_fractions or window_px")
        if self.window_px is not None and any(w < 1 for w in self.window_px):
            raise ValueError("window_px must be >= 1")
        if self.window_px is None and any(not 0 < f <= 1 for f in self.window_fractions or []):
            raise ValueError("window_fractions must be in (0, 1]")
        return self

    @property
    def method_keys(self) -> list[str]:
        """One name per method: its ``method``, suffixed ``#2``, ``#3``... when it repeats."""
        keys, seen = [], {}  # type: ignore[var-annotated]
        for m in self.methods:
            seen[m.method] = seen.get(m.method, 0) + 1
            keys.append(m.method if seen[m.method] == 1 else f"{m.method}#{seen[m.method]}")
        return keys

    @property
    def windows(self) -> list[tuple[str, int | float]]:
        """``[(unit, value)]`` with unit ``"px"`` or ``"fraction"``, in grid order."""
        if self.window_px is not None:
            return [("px", w) for w in self.window_px]
        return [("fraction", f) for f in self.window_fractions or []]

    @property
    def n_configs(self) -> int:
        return len(self.methods) * len(self.orders) * len(self.noises) * len(self.windows)
