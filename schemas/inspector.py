"""Params of the Model Inspector kinds (papers/u-analysis-and-model-inspector §4 and
papers/occlusion-gradcam-adversarial-noise): ``robustness``, ``signal``, ``reference_map``
(and the adversarial / noise-image kinds, added beside them).

Units, as in :mod:`schemas.u_analysis`: *pixel space* is ``[0, 1]`` per channel before the
model's normalisation; regions and uploaded masks/maps are in pixels of the uploaded image and
mapped through the model's preprocessing (:mod:`schemas.regions`); epsilons are in 1/255.

Each params class may define ``check_uploads(manifest, files, sizes)``: checks that need the
uploads and the images' sizes but no torch; the API calls it before queueing
(``service.jobs.check_uploads``) and the worker again.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.attribution import AttributionMethod, AttributionParams
from schemas.errors import BadParams
from schemas.models import ModelManifest
from schemas.params import JobParams
from schemas.regions import Region, check_region_mask, decode_map, decode_mask, region_mask

SIGNAL_MASK = "signal_mask"
"""Upload name of a mask PNG of the uploaded image's size (white = signal)."""
REFERENCE = "reference"
"""Upload name of a reference map (``.npy`` or grey PNG, any size, e.g. 20x20 click counts)."""
ATTRIBUTION = "attribution"
"""Upload name of an attribution map at the model's input size (as ``u_analysis`` takes it)."""


def _gradcam() -> AttributionMethod:
    return AttributionParams.model_validate({"method": "gradcam"})  # type: ignore[return-value]


def _no_method_job_fields(method: AttributionMethod | None) -> None:
    if method is not None and (method.target is not None or method.batch_size is not None):
        raise ValueError(f"{method.method}: set target and batch_size on the job, not on the method")


# --- regions shared by the kinds ----------------------------------------------------------------


class _WithRegion(JobParams):
    region: Region | None = Field(
        None,
        description="the signal in pixels of the uploaded image: {'rect': [x0,y0,x1,y1]}, {'circle': [cx,cy,r]} or "
        "{'polygon': [[x,y],...]}; or upload a 'signal_mask' PNG instead",
    )

    def needs_region(self) -> bool:
        return True

    def check_uploads(self, manifest: ModelManifest, files: dict[str, bytes], sizes: list[tuple[int, int]]) -> None:
        """``sizes``: ``(H0, W0)`` of each uploaded image."""
        if not self.needs_region():
            return
        if self.region is not None and SIGNAL_MASK in files:
            raise BadParams("give region or a signal_mask upload, not both", details={"field": "region"})
        if self.region is None and SIGNAL_MASK not in files:
            raise BadParams("a region (or a signal_mask upload) is required", details={"field": "region"})
        for size0 in sizes:
            signal_mask(self.region, files, size0, manifest)


def signal_mask(
    region: Region | None, files: dict[str, bytes], size0: tuple[int, int], manifest: ModelManifest
) -> np.ndarray:
    """``(H, W)`` bool on the model input: the region, or the ``signal_mask`` upload, mapped
    through the preprocessing; BadParams/BadImage/UnsupportedMedia as the API reports them."""
    if region is not None:
        mask, field = region_mask(region, size0, manifest.preprocessing), "region"
    else:
        from schemas.regions import upload_mask

        mask, field = upload_mask(decode_mask(files[SIGNAL_MASK], size0), manifest.preprocessing), SIGNAL_MASK
    check_region_mask(mask, field)
    return mask


# --- robustness ---------------------------------------------------------------------------------

TransformName = Literal[
    "gaussian_noise", "shot_noise", "impulse_noise", "patch_shuffle", "horizontal_shuffle", "vertical_shuffle"
]
NOISES: tuple[TransformName, ...] = ("gaussian_noise", "shot_noise", "impulse_noise")
SHUFFLES: tuple[TransformName, ...] = ("patch_shuffle", "horizontal_shuffle", "vertical_shuffle")

GAUSSIAN_STD = (0.08, 0.12, 0.18, 0.26, 0.38)
"""ImageNet-C ``gaussian_noise``: std in pixel space per severity 1-5 (Hendrycks & Dietterich 2019)."""
SHOT_RATE = (60.0, 25.0, 12.0, 5.0, 3.0)
"""ImageNet-C ``shot_noise``: ``Poisson(u * c) / c`` per severity 1-5."""
IMPULSE_AMOUNT = (0.03, 0.06, 0.09, 0.17, 0.27)
"""ImageNet-C ``impulse_noise``: fraction of values (per pixel and channel) set to 0 or 1
(salt and pepper, half each: skimage's ``random_noise(mode='s&p')``) per severity 1-5."""


def shuffle_tiles(severity: int) -> int:
    """Tiles (patch_shuffle) or stripes per side of a shuffle of this severity: ``2**severity``
    (1: 2, 2: 4, 3: 8, 4: 16, 5: 32)."""
    return 2**severity


class Transform(BaseModel):
    """One Model Inspector transform (§4.1, Fig. 2): a texture noise (ImageNet-C constants) or a
    structure shuffle with ``2**severity`` tiles/stripes per side."""

    model_config = ConfigDict(extra="forbid")

    name: TransformName
    severity: int = Field(ge=1, le=5, description="1-5; shuffles: 2**severity tiles or stripes per side")

    @property
    def key(self) -> str:
        return f"{self.name}-{self.severity}"


def default_transforms(size: tuple[int, int]) -> list[Transform]:
    """All noises at severities 1-5 and the shuffles with 2, 4, 8, 16 tiles per side (those
    whose tiles are at least one pixel on a ``size`` input)."""
    out = [Transform(name=n, severity=s) for n in NOISES for s in range(1, 6)]
    out += [Transform(name=n, severity=s) for n in SHUFFLES for s in range(1, 5) if shuffle_tiles(s) <= min(size)]
    return out


class RobustnessParams(_WithRegion):
    """The Image processing module (§4.1, Fig. 5) and, with ``apply_to`` background / signal,
    §4.3's background texture analysis: each transform applied to the image (or only to its
    background / signal), top-5 before and after, target probability and its change."""

    transforms: list[Transform] | None = Field(
        None,
        description="transforms to apply; null = every noise at severity 1-5 and every shuffle with 2, 4, 8, 16 "
        "tiles per side (those that fit the input)",
    )
    apply_to: Literal["image", "background", "signal"] = Field(
        "image", description="transform the whole image, only the background, or only the signal (needs a region)"
    )
    attribution: AttributionMethod | None = Field(
        None,
        description="also compute this attribution on each transformed image and compare it with the original's "
        "(Pearson, Spearman, top-10% IoU; shuffled maps un-shuffled first)",
    )
    top_k: int = Field(5, ge=1, le=20, description="classes listed per image")
    seed: int = Field(0, ge=0, description="seed of the noises and the shuffles")

    def needs_region(self) -> bool:
        return self.apply_to != "image"

    @model_validator(mode="after")
    def _check(self) -> RobustnessParams:
        _no_method_job_fields(self.attribution)
        if self.transforms is not None:
            if not self.transforms:
                raise ValueError("transforms is empty (null = the defaults)")
            keys = [t.key for t in self.transforms]
            if len(set(keys)) != len(keys):
                raise ValueError("transforms has duplicates")
        if self.apply_to == "image" and self.region is not None:
            raise ValueError("region is used only with apply_to 'background' or 'signal'")
        return self

    @staticmethod
    def check_model(params: BaseModel, manifest: ModelManifest) -> None:
        assert isinstance(params, RobustnessParams)
        side = min(manifest.preprocessing.size)
        for i, t in enumerate(params.transforms or []):
            if t.name in SHUFFLES and shuffle_tiles(t.severity) > side:
                raise BadParams(
                    f"{t.name} severity {t.severity} makes {shuffle_tiles(t.severity)} tiles per side of a "
                    f"{side} px input",
                    details={"field": f"transforms.{i}.severity"},
                )


# --- signal -------------------------------------------------------------------------------------

Fill = Literal["white", "black", "mean", "blur", "gaussian", "brick", "grass", "gravel"]
"""What replaces the removed part (pixel space): white, black, the image's mean colour, the
image blurred (``blur_sigma``), Gaussian noise ``N(0.5, gaussian_std)`` clipped to [0, 1], or a
greyscale texture of scikit-image's data (``brick``, ``grass``, ``gravel``) tiled over the input."""
FILLS: list[Fill] = ["white", "black", "mean", "blur", "gaussian", "brick", "grass", "gravel"]


class SignalParams(_WithRegion):
    """Signal vs context (§4.3, Fig. 3): attribution mass inside the signal region against the
    context, predictions on the signal alone and the context alone under several fills, the
    relative foreground sensitivity (RFS, Moayeri et al. 2022, the paper's ref. 13) and Top-K
    erasing."""

    attribution: AttributionMethod = Field(
        default_factory=_gradcam, description="the map whose mass is compared (default Grad-CAM)"
    )
    fills: list[Fill] = Field(default_factory=lambda: list(FILLS), min_length=1)
    blur_sigma: float = Field(0.05, gt=0, le=1, description="'blur' fill: sigma as a fraction of the input side")
    gaussian_std: float = Field(0.25, gt=0, le=2, description="'gaussian' fill: std in pixel space")
    rfs_sigma: float = Field(
        0.25, gt=0, le=2, description="RFS: std of the Gaussian noise on the foreground or background, pixel space"
    )
    rfs_samples: int = Field(8, ge=1, le=256, description="RFS: noise draws per side (foreground, background)")
    erase_percents: list[float] = Field(
        default_factory=lambda: [5.0, 10.0, 20.0, 50.0], min_length=1,
        description="Top-K erasing: percentages of the input's pixels erased (the map's top k%, and k% random)",
    )  # fmt: skip
    erase_fill: Fill = Field("mean", description="what erased pixels become")
    random_draws: int = Field(4, ge=1, le=64, description="Top-K erasing: random-pixel draws averaged per k")
    seed: int = Field(0, ge=0, description="seed of noises and random pixels")

    @model_validator(mode="after")
    def _check(self) -> SignalParams:
        _no_method_job_fields(self.attribution)
        if any(not 0 < k < 100 for k in self.erase_percents):
            raise ValueError("erase_percents must be in (0, 100)")
        if len(set(self.fills)) != len(self.fills):
            raise ValueError("fills has duplicates")
        return self


# --- reference_map ------------------------------------------------------------------------------


class ReferenceMapParams(JobParams):
    """Agreement of a model's map with a reference (e.g. human clicks, the occlusion paper's
    Exp. 1): Pearson, Spearman, top-k% IoU, AUC of the map against the reference's top
    ``auc_fraction``, and the pointing game."""

    source: Literal["attribution", "occlusion", "uploaded"] = Field(
        "attribution",
        description="the compared map: an attribution method, the occlusion drop map, or an uploaded "
        "'attribution' .npy at the model's input size",
    )
    attribution: AttributionMethod = Field(default_factory=_gradcam, description="method when source='attribution'")
    occluder: int | None = Field(None, ge=1, le=4096, description="source='occlusion': occluder side, px")
    stride: int | None = Field(None, ge=1, le=4096, description="source='occlusion': stride, px")
    occlusion_fill: Literal["grey", "black", "mean"] = "grey"
    reference_space: Literal["image", "model"] = Field(
        "image",
        description="'image': the reference covers the uploaded image (any size, resampled through the "
        "preprocessing); 'model': it is at the model's input size and used as is",
    )
    iou_fractions: list[float] = Field(default_factory=lambda: [0.1, 0.2], min_length=1)
    auc_fraction: float = Field(0.2, gt=0, lt=1, description="the reference's top fraction taken as positives")
    absolute: bool = Field(False, description="compare |map| (for signed methods)")
    seed: int = Field(0, ge=0, description="seed of the attribution's random draws")

    @model_validator(mode="after")
    def _check(self) -> ReferenceMapParams:
        _no_method_job_fields(self.attribution)
        if any(not 0 < f < 1 for f in self.iou_fractions):
            raise ValueError("iou_fractions must be in (0, 1)")
        return self

    @staticmethod
    def check_model(params: BaseModel, manifest: ModelManifest) -> None:
        assert isinstance(params, ReferenceMapParams)
        h, w = manifest.preprocessing.size
        if params.source == "occlusion" and params.occluder is not None and params.occluder > min(h, w):
            raise BadParams(f"occluder {params.occluder} px is larger than the {h}x{w} input",
                            details={"field": "occluder"})  # fmt: skip

    def check_uploads(self, manifest: ModelManifest, files: dict[str, bytes], sizes: list[tuple[int, int]]) -> None:
        if REFERENCE not in files:
            raise BadParams("upload the reference map as 'reference'", details={"field": REFERENCE})
        ref = decode_map(files[REFERENCE], REFERENCE)
        if self.reference_space == "model" and ref.shape != tuple(manifest.preprocessing.size):
            raise BadParams(
                f"reference is {list(ref.shape)}; with reference_space='model' it must be the input size "
                f"{list(manifest.preprocessing.size)}",
                details={"field": REFERENCE},
            )
        if self.source == "uploaded":
            if ATTRIBUTION not in files:
                raise BadParams("source='uploaded' needs an 'attribution' upload", details={"field": ATTRIBUTION})
            att = decode_map(files[ATTRIBUTION], ATTRIBUTION)
            if att.shape != tuple(manifest.preprocessing.size):
                raise BadParams(
                    f"attribution is {list(att.shape)}; it must be the model's input size "
                    f"{list(manifest.preprocessing.size)}",
                    details={"field": ATTRIBUTION},
                )
