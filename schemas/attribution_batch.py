"""Params of the ``attribution_batch`` kind: one attribution method over a whole data set
(``schemas.datasets``), in chunks that idle workers share (``workers.fanout``).

Results: ``maps.npy`` ``(N, H, W)`` (the 2-D maps at the model's input size, in the data
set's order; float16 by default, written chunk by chunk to the data volume, never held in
one process), ``images.csv`` (file, label, predicted, target, probability, runtime per
image), ``summary.json``; the whole result as one ``.zip`` (``GET /v1/jobs/{id}/download``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

from schemas.attribution import AttributionMethod, AttributionParams, check_supported
from schemas.datasets import DATASET_FIELD_DESCRIPTION, DATASET_REF_PATTERN, DatasetParams
from schemas.models import ModelManifest
from schemas.params import JobParams


class AttributionBatchParams(DatasetParams, JobParams):
    """One attribution method over every image of a data set (``target``: one class index for
    all images, or null for each image's predicted class; see ``target_from``)."""

    dataset: str = Field(pattern=DATASET_REF_PATTERN, description=DATASET_FIELD_DESCRIPTION)  # type: ignore[assignment]
    attribution: AttributionMethod = Field(
        default_factory=lambda: AttributionParams.model_validate({"method": "saliency"}),
        description="the attribution method and its params (default saliency); target and batch_size are the job's",
    )
    target: int | None = Field(  # type: ignore[assignment]
        None, ge=0, description="class index explained for every image; null = see target_from"
    )
    target_from: Literal["predicted", "label"] = Field(
        "predicted",
        description="with target null: explain each image's predicted class, or its label (images without a "
        "label fall back to the predicted class)",
    )
    dtype: Literal["float16", "float32"] = Field("float16", description="dtype of maps.npy")
    images_per_chunk: int = Field(
        64, ge=1, le=4096, description="images per chunk (the unit idle workers share and progress counts)"
    )

    @model_validator(mode="after")
    def _no_method_job_fields(self) -> AttributionBatchParams:
        m = self.attribution
        if m.target is not None or m.batch_size is not None:
            raise ValueError(f"{m.method}: set target and batch_size on the job, not on the method")
        return self

    @staticmethod
    def check_model(params: BaseModel, manifest: ModelManifest) -> None:
        assert isinstance(params, AttributionBatchParams)
        check_supported(params.attribution, manifest)
