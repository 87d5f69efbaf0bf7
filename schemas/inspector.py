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
            if SIGNAL_MASK in files:
                raise BadParams("a signal_mask is used only with apply_to 'background' or 'signal'",
                                details={"field": SIGNAL_MASK})  # fmt: skip
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


# --- adversarial and noise_images (papers/occlusion-gradcam-adversarial-noise, Exp. 2) ----------

Attack = Literal["fgsm", "ifgsm", "mifgsm"]
"""``fgsm``: one signed-gradient step of size epsilon (Goodfellow et al. 2015, the paper's
attack); ``ifgsm``: ``steps`` steps of ``step_size``, each projected back into the epsilon ball
(Kurakin et al. 2017); ``mifgsm``: I-FGSM on a momentum of L1-normalised gradients with decay
``decay`` (Dong et al. 2018). The attacks of the paper's Appendix Table 1 (Xie et al. 2019)."""

Dataset = Literal["test", "train", "uploaded"]
"""The model's registered data set split (``test`` as ``u_sweep``: digits-cnn's 360 test
images), or the uploaded images (labels: ``target``, one per image, else the predictions)."""


def _check_dataset(dataset: Dataset | None, manifest: ModelManifest) -> None:
    """A registered split is asked of a model that has one (422 naming ``dataset`` otherwise)."""
    ts = manifest.training_set
    if dataset in ("test", "train") and (ts is None or ts.kind != "builtin" or ts.name != "sklearn-digits"):
        raise BadParams(
            f"dataset={dataset!r}: model {manifest.id!r} has no built-in data set; upload images "
            "(dataset='uploaded', target = one label per image)",
            details={"field": "dataset"},
        )


def _check_image_count(kind: str, dataset: Dataset | None, n_images: int, images_needed: bool = True) -> None:
    """Images are the job's inputs (no data set), its data set (``uploaded``), or absent (a
    registered split; or a kind that makes its own images)."""
    if (dataset in ("test", "train") or not images_needed) and n_images:
        raise BadParams(f"{kind} takes no image with these params; got {n_images}", details={"field": "dataset"})
    if images_needed and dataset in (None, "uploaded") and not n_images:
        what = "dataset='uploaded' needs images" if dataset else "needs an image, or a dataset"
        raise BadParams(f"{kind} {what}", details={"field": "dataset"})


class AdversarialParams(JobParams):
    """Adversarial images and what they do to each model (Exp. 2.1-2.2, Figs 3-5): the attack
    is computed on the job's model; that model and every ``transfer_models`` entry predict
    the original and the adversarial image, with Grad-CAM of both classes before and after.

    Untargeted, the attack increases the cross-entropy of the job's ``target`` (default: the
    predicted class, as the paper uses the classifier's own labels); with ``adv_target`` it
    decreases the cross-entropy of that class. Each step is clipped to the epsilon ball
    around the original and to ``[0, 1]``. The adversarial image is also written as an 8-bit
    PNG (rounded, kept in the ball): fooling is reported for the float image and the PNG.

    With ``dataset``: the success rate per model over the data set (``success.csv``) instead
    of per-image maps."""

    attack: Attack = Field("fgsm", description="fgsm (the paper's), ifgsm (iterative) or mifgsm (momentum)")
    epsilon: float = Field(4.0, ge=0, le=255, description="L-inf budget in 1/255 of the pixel range (paper: 4)")
    steps: int = Field(10, ge=1, le=1000, description="iterations of ifgsm and mifgsm (fgsm takes one)")
    step_size: float | None = Field(
        None, gt=0, le=255, description="per-iteration step in 1/255; null = epsilon / steps (Dong et al. 2018)"
    )
    decay: float = Field(1.0, ge=0, le=100, description="mifgsm's momentum decay mu (Dong et al. 2018: 1.0)")
    adv_target: int | None = Field(None, ge=0, description="class to push every image to; null = untargeted")
    random_start: bool = Field(
        False, description="start from a uniform draw in the epsilon ball (Madry et al. 2018), seeded by seed"
    )
    transfer_models: list[str] = Field(
        default_factory=list,
        max_length=4,
        description="models with the same labels that get the adversarial images too (transfer, Exp. 2.2); "
        "their versions are part of the job's identity",
    )
    dataset: Dataset | None = Field(None, description="success rates over a data set instead of per-image maps")
    limit: int | None = Field(None, ge=1, description="use only the first `limit` images of the data set")
    gradcam: bool = Field(True, description="per-image mode: Grad-CAM of both classes before and after")
    seed: int = Field(0, ge=0, description="seed of random_start")

    @model_validator(mode="after")
    def _distinct_models(self) -> AdversarialParams:
        if len(set(self.transfer_models)) != len(self.transfer_models):
            raise ValueError("transfer_models has duplicates")
        return self

    def other_models(self) -> list[str]:
        """Models the job uses besides its own (``service.jobs.other_models``)."""
        return list(self.transfer_models)

    @staticmethod
    def check_model(params: BaseModel, manifest: ModelManifest) -> None:
        assert isinstance(params, AdversarialParams)
        k = len(manifest.labels)
        if params.adv_target is not None and params.adv_target >= k:
            raise BadParams(f"adv_target {params.adv_target} is out of range: {manifest.id!r} has {k} classes",
                            details={"field": "adv_target"})  # fmt: skip
        if manifest.id in params.transfer_models:
            raise BadParams(f"transfer_models names the job's own model {manifest.id!r}",
                            details={"field": "transfer_models"})  # fmt: skip
        _check_dataset(params.dataset, manifest)

    @staticmethod
    def check_other_model(params: BaseModel, manifest: ModelManifest, other: ModelManifest) -> None:
        """A transfer model predicts the same classes (so "fooled" means the same thing)."""
        if other.labels != manifest.labels:
            raise BadParams(
                f"transfer model {other.id!r} has other labels than {manifest.id!r} "
                f"({len(other.labels)} vs {len(manifest.labels)} classes, or other names)",
                details={"field": "transfer_models", "model": other.id},
            )

    @staticmethod
    def check_inputs(params: BaseModel, n_images: int) -> None:
        assert isinstance(params, AdversarialParams)
        _check_image_count("adversarial", params.dataset, n_images)


class NoiseImagesParams(JobParams):
    """Noise images as inputs (Exp. 2.3, Fig. 6): the top-5 classes and the Grad-CAM of the
    top class of each.

    ``perlin``: ``count`` images of fractal Perlin noise (the procedural noise of Co et al.
    2019): ``octaves`` octaves, the first of period ``scale`` px, each next one of half the
    period and ``persistence`` times the amplitude; grey (the same on every channel) or per
    channel. Image ``k`` is the same for a given seed whatever ``count`` is.

    ``uap``: a universal adversarial perturbation (Moosavi-Dezfooli et al. 2017, Algorithm 1
    with DeepFool's L-inf step) of L-inf norm ``xi``, computed on one part of ``dataset``, and
    its fooling rate (the share of images whose prediction changes) on the held-out part. The
    noise image is the perturbation as the paper shows it (``uap_image``)."""

    noise: Literal["perlin", "uap"] = Field("perlin", description="perlin (procedural) or uap (universal perturbation)")
    count: int = Field(4, ge=1, le=64, description="perlin: number of images")
    scale: float | None = Field(
        None, gt=0, le=4096, description="perlin: period of the first octave in px; null = a quarter of the side"
    )
    octaves: int = Field(4, ge=1, le=12, description="perlin: octaves (each halves the period)")
    persistence: float = Field(0.5, gt=0, le=1, description="perlin: amplitude factor from one octave to the next")
    sine_frequency: float | None = Field(
        None, gt=0, le=256, description="perlin: colour map sin(2 pi f n) (Co et al.'s phi_sine); null = min-max"
    )
    color: bool = Field(False, description="perlin: independent noise per channel instead of grey")
    dataset: Dataset | None = Field(None, description="uap: the images it is computed and tested on")
    limit: int | None = Field(None, ge=1, description="uap: use only the first `limit` images of the data set")
    holdout: float = Field(0.5, gt=0, lt=1, description="uap: share of the data set held out for the fooling rate")
    xi: float = Field(10.0, gt=0, le=255, description="uap: L-inf norm in 1/255 (Moosavi-Dezfooli et al.: 10)")
    delta: float = Field(
        0.2, gt=0, lt=1, description="uap: stop once the fooling rate on the fitting part reaches 1 - delta (0.2)"
    )
    max_passes: int = Field(5, ge=1, le=100, description="uap: passes over the fitting part at most")
    overshoot: float = Field(0.02, ge=0, le=1, description="uap: DeepFool's overshoot (DeepFool: 0.02)")
    deepfool_steps: int = Field(50, ge=1, le=500, description="uap: DeepFool iterations per image (DeepFool: 50)")
    candidates: int = Field(10, ge=2, le=1000, description="uap: classes DeepFool considers (DeepFool: the top 10)")
    uap_image: Literal["scaled", "grey"] = Field(
        "scaled",
        description="uap: the noise image given to the model: 'scaled' (0.5 + v / (2 max|v|): the perturbation "
        "as the papers show it) or 'grey' (mid-grey + v)",
    )
    seed: int = Field(0, ge=0, description="seed of the noise, of the held-out split and of the uap's image order")

    @model_validator(mode="after")
    def _uap_needs_data(self) -> NoiseImagesParams:
        if self.noise == "uap" and self.dataset is None:
            raise ValueError("dataset is required for noise='uap' (test, train or uploaded)")
        return self

    @staticmethod
    def check_model(params: BaseModel, manifest: ModelManifest) -> None:
        assert isinstance(params, NoiseImagesParams)
        _check_dataset(params.dataset if params.noise == "uap" else None, manifest)

    @staticmethod
    def check_inputs(params: BaseModel, n_images: int) -> None:
        assert isinstance(params, NoiseImagesParams)
        _check_image_count("noise_images", params.dataset, n_images, images_needed=params.noise == "uap")
