"""Model manifests (what a model directory declares) and the model info the API returns.

A model directory under ``models_dir`` holds ``manifest.json`` plus its weights file. The
built-in models are written there by ``python -m workers prepare``; users drop their own.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Resize = Literal["stretch", "shorter_side_center_crop"]
"""How an upload becomes ``size``: ``stretch`` resizes the whole image to it (every pixel is in
the input, the shape is distorted when the aspect ratios differ); ``shorter_side_center_crop``
keeps the aspect ratio: it takes the centred region of the input's aspect ratio whose shorter
side is ``crop_fraction`` of the upload's shorter side, and resizes that region to ``size``
(maps then cover that region only; each result says which)."""


class Preprocessing(BaseModel):
    """How an RGB image becomes the model's input tensor ``(C, H, W)``.

    ``x = (pixel * scale - mean) / std`` per channel after resizing to ``size`` (H, W).
    """

    model_config = ConfigDict(extra="forbid")

    size: tuple[int, int] = Field(description="(height, width) in pixels")
    mode: Literal["RGB", "L"] = "RGB"
    resize: Resize = "stretch"
    crop_fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        description="shorter_side_center_crop: the crop's shorter side as a fraction of the upload's "
        "(ImageNet evaluation: 0.875 = 224/256)",
    )
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    scale: float = 1 / 255
    mean: list[float] = Field(default_factory=lambda: [0.0, 0.0, 0.0])
    std: list[float] = Field(default_factory=lambda: [1.0, 1.0, 1.0])


def crop_box(width: int, height: int, pre: Preprocessing) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)``: the region of a ``width`` x ``height`` upload that
    ``pre`` turns into the model's input (the whole image for ``stretch``).

    ``shorter_side_center_crop``: the centred region of the input's aspect ratio whose shorter
    side is ``crop_fraction`` of the upload's (the largest such region times the fraction),
    offsets rounded as TensorFlow's EfficientNet evaluation does them
    (``crop = int(f * min(H, W))``, ``offset = (H - crop + 1) // 2``, with ``f = S / (S + 32)``).
    """
    if pre.resize == "stretch":
        return 0, 0, width, height
    h, w = pre.size
    f = pre.crop_fraction
    if h == w:  # the exact integer arithmetic of the reference, no float ratio in between
        cw = ch = int(f * min(width, height))
    else:
        cw, ch = int(f * min(width, height * w / h)), int(f * min(height, width * h / w))
    cw, ch = max(1, cw), max(1, ch)
    left, top = (width - cw + 1) // 2, (height - ch + 1) // 2
    return left, top, left + cw, top + ch

class TrainingSet(BaseModel):
    """A training set registered with a model (for influence functions and sweeps)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["builtin", "imagefolder"]
    name: str | None = Field(None, description="built-in data set name, e.g. 'sklearn-digits'")
    path: str | None = Field(None, description="ImageFolder directory, relative to the model dir")


class ModelManifest(BaseModel):
    """``manifest.json`` of a model directory."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    description: str = ""
    architecture: Literal["torchvision", "torchscript", "efficientnet_lite", "digits_cnn"]
    arch_name: str | None = Field(None, description="e.g. 'resnet18' for torchvision")
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)
    weights: str = Field(description="weights file in the model dir (.safetensors or .pt state dict)")
    sha256: str | None = Field(None, description="expected sha256 of the weights file")
    preprocessing: Preprocessing
    labels: list[str]
    gradcam_layer: str | None = Field(None, description="module name for Grad-CAM-style methods")
    layers: list[str] = Field(default_factory=list, description="layers of interest (module names)")
    module_types: dict[str, str] = Field(
        default_factory=dict, description="module name -> class name, for checks made before queueing"
    )
    training_set: TrainingSet | None = None
    metrics: dict[str, float] = Field(default_factory=dict)


class ModelInfo(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    id: str
    description: str
    version: str = Field(description="sha256 of the weights file")
    architecture: str
    input_size: tuple[int, int]
    input_mode: str
    preprocessing: Preprocessing | None = Field(
        None, description="how an upload becomes the input (resize or centre crop, normalisation)"
    )
    num_classes: int
    labels: list[str]
    gradcam_layer: str | None
    layers: list[str]
    has_training_set: bool
    metrics: dict[str, float]
    warm: bool | None = Field(
        None, description="a live worker has this version loaded and warm (None: not asked, e.g. in the list)"
    )
    warm_workers: list[str] = Field(default_factory=list, description="names of the workers that have it warm")


class ModelList(BaseModel):
    models: list[ModelInfo]
