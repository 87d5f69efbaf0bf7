"""Parameters of the ``fill_blanks`` and ``fill_blanks_consistency`` kinds ("Fill in the
blanks: rethinking interpretability in vision", papers/fill-in-the-blanks).

Terms used below:

- *patch*: a square of ``patch_size`` x ``patch_size`` pixels; the image is tiled by patches
  from the top-left corner in raster order (a narrower last row/column when the side is
  not a multiple). Masks are unions of patches.
- *pixel space*: intensities in ``[0, 1]`` before the model's normalisation (as
  ``u_analysis``); masked pixels get ``fill`` there, the update ``dx`` is the gradient with
  respect to the pixel-space image, and the prototype ``M(x) + T(dx)`` (Eq. 3) is formed there.
- *kept draw*: a random mask whose masked input the model classifies as ``y``
  (``keep_correct``; §4.1: "we select the masks which result in a correct prediction").

Every choice the paper leaves open is a field here; docs/fill_blanks.md lists them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from schemas.errors import BadParams
from schemas.models import ModelManifest
from schemas.params import JobParams

Masking = Literal["random", "progressive"]
"""``random``: masks drawn uniformly among masks of ``round(mask_ratio x patches)`` patches,
``E[dx]`` over the kept draws (§4.1). ``progressive``: ``k`` disjoint masks covering the
image, filled one after the other, each step conditioned on the previous fills (§4.2)."""

Fill = Literal["zeros", "dataset_mean", "image_mean"]
"""What a masked pixel holds, in pixel space: 0 (the paper's element-wise product with a
binary mask), the normalisation mean, or the image's mean colour."""

MASKINGS: tuple[Masking, ...] = ("random", "progressive")

PAPER_MIN_KEPT = 10_000
"""§4.1: "N is made sufficiently large, so that the number of correct predictions N* > 10,000"."""


class Ablation(BaseModel):
    """§4.4, Fig. 4: prototypes of one image for each masking ratio x patch size (random
    masking, the job's other knobs)."""

    model_config = ConfigDict(extra="forbid")

    mask_ratios: list[float] = Field([0.1, 0.25, 0.5], min_length=1, max_length=8)
    patch_sizes: list[int] = Field([1, 2, 4], min_length=1, max_length=8)
    image: int = Field(0, ge=0, description="index in the job's data set of the image shown")

    @field_validator("mask_ratios")
    @classmethod
    def _ratios(cls, v: list[float]) -> list[float]:
        if any(not 0 < r < 1 for r in v):
            raise ValueError("every mask ratio must be in (0, 1)")
        return v

    @field_validator("patch_sizes")
    @classmethod
    def _patches(cls, v: list[int]) -> list[int]:
        if any(p < 1 for p in v):
            raise ValueError("every patch size must be >= 1")
        return v


class FillKnobs(BaseModel):
    """Masks, update, label and threshold: the knobs both kinds share."""

    model_config = ConfigDict(extra="forbid")

    patch_size: int = Field(2, ge=1, description="patch side in pixels (§4.4: 2 x 2 in the paper's experiments)")
    mask_ratio: float = Field(
        0.25, gt=0, lt=1, description="random masking: fraction eta of the patches masked per draw (§4.4: 0.25)"
    )
    k: int = Field(4, ge=2, description="progressive masking: number of disjoint masks (§4.2, Fig. 3: 4)")
    partition: Literal["random", "raster"] = Field(
        "random",
        description="progressive masking: how the patches are split into the k masks: a seeded random "
        "partition, or consecutive runs of the raster order",
    )
    fill: Fill = Field("zeros", description="value of masked pixels, pixel space")
    gamma: float = Field(1.0, gt=0, description="step size of the update dx = -gamma grad (Eq. 2)")
    update: Literal["gradient", "bfgs"] = Field(
        "gradient",
        description="dx: the gradient step (Eq. 2) or the BFGS direction after bfgs_steps iterations in "
        "image space (§4.5)",
    )
    bfgs_steps: int = Field(
        3, ge=1, le=50, description="BFGS iterations (fixed step gamma) before its direction is taken; 1 = gradient"
    )
    bfgs_history: int | None = Field(
        None,
        ge=1,
        le=100,
        description="curvature pairs kept: null = all, exactly BFGS (§4.5) with H_0 scaled by the first pair; "
        "a number = L-BFGS with that memory, H_0 scaled by the latest pair",
    )
    keep_correct: bool = Field(True, description="random masking: average only draws with f(M(x)) = y (§4.1)")
    max_masks: int = Field(40_000, ge=1, le=10_000_000, description="random masking: at most this many draws")
    min_kept: int = Field(
        PAPER_MIN_KEPT,
        ge=1,
        description="random masking: draw until this many draws are kept (§4.1: N* = 10,000), or max_masks",
    )
    step_label: Literal["first", "each", "target"] = Field(
        "first",
        description="progressive masking: label of each step's update: the prediction on the first masked "
        "input, each step's own prediction, or y",
    )
    normalize: Literal["max_abs", "minmax"] = Field(
        "max_abs",
        description="T's normalisation over the masked pixels (Eq. 4): v / max|v| or (v - min) / (max - min)",
    )
    binarize: bool = Field(True, description="T's binary threshold (§4.6); false: T is the normalised map")
    threshold: float = Field(0.5, ge=0, le=1, description="T's binary threshold on the normalised map")
    sign: Literal["positive", "both"] = Field(
        "positive",
        description="T keeps the positive part of dx only (the pixels the model would brighten), or both signs "
        "(binarised to -1/0/+1 with max_abs)",
    )
    seed: int = Field(0, ge=0, description="seed of the masks and partitions")
    draws_per_pass: int | None = Field(
        None, ge=1, le=65536, description="masked inputs per forward+backward pass; null = sized for the model"
    )

    @field_validator("min_kept")
    @classmethod
    def _min_kept_fits(cls, v: int, info: ValidationInfo) -> int:
        cap = info.data.get("max_masks")
        if cap is not None and v > cap:
            raise ValueError(f"min_kept ({v}) is over max_masks ({cap})")
        return v

    def check_image(self, size: tuple[int, int], masking: str | None = None) -> None:
        """BadParams naming the field when the masks do not fit an image of ``size`` (H, W)."""
        check_masks(self.patch_size, self.mask_ratio, self.k, size, masking)


def n_patches(size: tuple[int, int], patch_size: int) -> int:
    h, w = size
    return -(-h // patch_size) * -(-w // patch_size)


def check_masks(patch_size: int, mask_ratio: float, k: int, size: tuple[int, int], masking: str | None) -> None:
    """Masks of ``patch_size`` patches on an ``size`` image: the patch fits the shorter side,
    ``round(mask_ratio x patches)`` is at least one patch (random), ``k`` at most the number
    of patches (progressive). ``masking`` None checks both."""
    h, w = size
    if patch_size > min(h, w):
        raise BadParams(
            f"patch_size {patch_size} is over the image side ({h}x{w})",
            details={"field": "patch_size", "patch_size": patch_size, "size": [h, w]},
        )
    patches = n_patches(size, patch_size)
    if masking in (None, "random") and round(mask_ratio * patches) < 1:
        raise BadParams(
            f"mask_ratio {mask_ratio} of {patches} patches masks no patch",
            details={"field": "mask_ratio", "patches": patches},
        )
    if masking in (None, "progressive") and k > patches:
        raise BadParams(
            f"k={k} is over the number of patches ({patches} patches of {patch_size} px on {h}x{w})",
            details={"field": "k", "patches": patches},
        )


class FillBlanksParams(FillKnobs, JobParams):
    """How the model fills masked patches of each image (§3.2 Eq. 1-5, §4.1, §4.2): update maps
    ``dx``, thresholded fills ``T(dx)`` and the prototype ``M(x) + T(dx)``. ``target`` is ``y``
    (default: the class predicted on the unmasked image)."""

    masking: Masking = "random"

    @staticmethod
    def check_model(params: BaseModel, manifest: ModelManifest) -> None:
        assert isinstance(params, FillBlanksParams)
        params.check_image(manifest.preprocessing.size, params.masking)


class FillBlanksConsistencyParams(FillKnobs, JobParams):
    """§4.3, Table 1: does the model classify its own prototypes as the class they were
    filled for? For every image of a data set and every masking: the prototype, and as
    controls ``M(x)`` alone and ``T`` alone; accuracy, macro-F1 and weighted-F1 against the
    paper's label (the prediction on the masked input) and against the true label."""

    dataset: Literal["test", "train", "uploaded"] = Field(
        "test", description="the model's registered data set split, or the uploaded images (labels = target)"
    )
    limit: int | None = Field(None, ge=1, description="use only the first `limit` images of the data set")
    maskings: list[Masking] = Field(default_factory=lambda: list(MASKINGS), min_length=1)
    update_label: Literal["true", "predicted"] = Field(
        "true",
        description="y of each image's update: its true label (the paper's 'correct prediction of the class'), "
        "or the class predicted on the unmasked image",
    )
    ablation: Ablation | None = Field(None, description="also draw Fig. 4 (ablation.png) for one image")
    images_per_chunk: int = Field(40, ge=1, le=10000, description="images per child job")

    @model_validator(mode="after")
    def _distinct(self) -> FillBlanksConsistencyParams:
        if len(set(self.maskings)) != len(self.maskings):
            raise ValueError("maskings has duplicates")
        return self

    @staticmethod
    def check_model(params: BaseModel, manifest: ModelManifest) -> None:
        assert isinstance(params, FillBlanksConsistencyParams)
        size = manifest.preprocessing.size
        for masking in params.maskings:
            params.check_image(size, masking)
        if params.ablation is not None:
            for p in params.ablation.patch_sizes:
                for r in params.ablation.mask_ratios:
                    check_masks(p, r, params.k, size, "random")
        if params.dataset != "uploaded" and not has_builtin_set(manifest):
            raise BadParams(
                f"model {manifest.id!r} has no built-in data set; upload images with their labels "
                "(dataset='uploaded', target = one label per image)",
                details={"field": "dataset", "use": "uploaded"},
            )

    @staticmethod
    def check_inputs(params: BaseModel, n_images: int) -> None:
        assert isinstance(params, FillBlanksConsistencyParams)
        if params.dataset == "uploaded" and n_images == 0:
            raise BadParams("dataset='uploaded' needs images", details={"field": "dataset"})


def has_builtin_set(manifest: ModelManifest) -> bool:
    """Whether the model registers the built-in data set whose splits ``dataset`` names."""
    ts = manifest.training_set
    return ts is not None and ts.kind == "builtin" and ts.name == "sklearn-digits"
