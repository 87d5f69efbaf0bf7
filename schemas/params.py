"""Parameters shared by job kinds, and the `saliency` kind's own.

Every params model forbids unknown fields, so a typo is a 422, not a silently ignored knob.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.models import Resize

Aggregation = Literal["sum", "abs_sum", "positive", "max_abs"]
"""How a ``(C, H, W)`` attribution becomes a 2-D map: sum over channels, sum of absolute
values, sum of the positive part, or max of absolute values (Simonyan et al.'s saliency)."""


class JobParams(BaseModel):
    """Fields every kind accepts."""

    model_config = ConfigDict(extra="forbid")

    target: int | list[int] | None = Field(
        None,
        description="class index to explain: one for all images, one per image, or null for "
        "each image's predicted class",
    )
    batch_size: int | None = Field(
        None, ge=1, le=4096, description="model evaluations per chunk; null = measured per device and model"
    )
    resize: Resize | None = Field(
        None,
        description="how the uploaded images become the model's input: null = the model's own preprocessing; "
        "'stretch' = the whole image, resized to the input size (a map of the full image, its shape distorted "
        "when the aspect ratios differ); 'shorter_side_center_crop' = the centred crop. The result's "
        "input_regions say which region of each upload the maps cover",
    )


class SaliencyParams(JobParams):
    """Input-gradient saliency (Simonyan et al., 2014): ``|d f_target / d x|``."""

    abs: bool = Field(True, description="take the absolute value of the gradient (Captum's default)")
    aggregation: Aggregation = Field("max_abs", description="channel aggregation of the 2-D map")
