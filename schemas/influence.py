"""Params of the influence-function kinds ``influence`` and ``influence_groups``.

Influence of a training point ``z`` on a test point ``z_t`` (Koh and Liang, 2017), computed
per layer as in Aamir, Tamosiunaite and Wörgötter (2023, Eq. 6):

    score_l(z, z_t) = grad_l L(z_t)^T (C_l + damping * I)^-1 grad_l L(z)

``C_l`` is the curvature of the mean training loss with respect to the parameters of layer
``l`` only (its diagonal block); the total score is the sum over layers (the paper's Eq. 7).
Positive = helpful: up-weighting ``z`` lowers the test loss, and removing ``z`` from the
training set raises it by about ``score / n`` (n training points). This is ``-I_up,loss`` in
Koh and Liang's notation, and Captum's sign convention.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from schemas.datasets import DATASET_REF_PATTERN
from schemas.params import JobParams

Solver = Literal["exact", "cg", "lissa", "arnoldi"]
Curvature = Literal["ggn", "hessian"]
Disturbance = Literal["white_background", "texture", "style"]
TextureName = Literal["brick", "grass", "gravel"]
StyleSource = Literal["hubble_deep_field", "coffee", "immunohistochemistry", "rocket", "astronaut"]


class InfluenceParams(JobParams):
    """Layer-wise influence of every training point on each test image.

    ``target`` (inherited) is the class whose cross-entropy is the test loss (default: the
    predicted class); ``batch_size`` the number of training points per per-example gradient
    chunk.
    """

    training_set: str | None = Field(
        None,
        pattern=DATASET_REF_PATTERN,
        description="the training set scored: an uploaded data set's id (ds_..., POST /v1/datasets; ImageFolder "
        "or labels.csv, classes matching the model's labels) or model:train; null = the model's registered one "
        "(or the request's training_set zip)",
    )
    layers: list[str] | None = Field(
        None,
        min_length=1,
        description="module names; each is one block of parameters (weight and bias together; a "
        "container module = all parameters under it; '' = the whole model as one block, Koh and Liang's "
        "non-layer-wise influence). null = every module that owns parameters "
        "(BatchNorm's affine weight and bias are a layer of their own; its running statistics are "
        "fixed buffers)",
    )
    solver: Solver = Field(
        "cg",
        description="inverse curvature-vector products: 'exact' (explicit matrix and eigendecomposition, "
        "small layers), 'cg' (conjugate gradient), 'lissa' (Koh and Liang's stochastic recursion), "
        "'arnoldi' (low-rank, Schioppa et al. 2022 via captum.influence's Arnoldi iteration)",
    )
    curvature: Curvature = Field(
        "ggn",
        description="'ggn' = generalised Gauss-Newton (the Fisher for cross-entropy): positive "
        "semi-definite, so every solver is sound with damping > 0; 'hessian' = the exact Hessian, "
        "which can be indefinite (flagged)",
    )
    damping: float = Field(
        0.01, ge=0.0, le=1e6, description="added to the curvature's diagonal (Koh and Liang's lambda)"
    )
    hessian_samples: int | None = Field(
        None, ge=1, description="training points the curvature is averaged over (seeded subset); null = all"
    )
    top_k: int = Field(8, ge=1, le=32, description="most helpful / harmful training images per layer")
    exact_max_params: int = Field(
        6000, ge=1, le=20000, description="largest layer (parameters) the 'exact' solver accepts"
    )
    cg_max_iter: int = Field(300, ge=1, le=10000, description="conjugate-gradient iterations at most")
    cg_tol: float = Field(1e-4, gt=0.0, lt=1.0, description="CG stops at this relative residual")
    lissa_depth: int = Field(1000, ge=1, le=100000, description="LiSSA recursion depth")
    lissa_repeats: int = Field(1, ge=1, le=64, description="independent LiSSA recursions averaged")
    lissa_batch: int = Field(256, ge=1, le=4096, description="training points per LiSSA step")
    lissa_tail: float = Field(
        0.5, ge=0.0, lt=1.0,
        description="fraction of final LiSSA iterates averaged (variance reduction; 0 = last iterate, as "
        "Koh and Liang)",
    )
    lissa_scale: float | None = Field(
        None, gt=0.0, description="LiSSA scale (must exceed the curvature's largest eigenvalue / 2); "
        "null = 2x the largest eigenvalue found by power iteration",
    )
    arnoldi_dim: int = Field(200, ge=2, le=2000, description="Krylov subspace dimension (Arnoldi iterations)")
    arnoldi_rank: int = Field(100, ge=1, le=1000, description="top eigenpairs kept (projection dimension)")
    tolerance: float = Field(
        0.05, gt=0.0, lt=1.0,
        description="a solve whose final relative residual |(C + damping I) x - g| / |g| exceeds this "
        "is flagged as not converged",
    )
    on_unsound: Literal["flag", "fail"] = Field(
        "flag", description="an indefinite or non-converged solve: flag it in the result, or fail the job"
    )
    seed: int = Field(0, ge=0, description="seed of the curvature subset, LiSSA sampling and Arnoldi start")


class InfluenceGroupsParams(InfluenceParams):
    """The paper's experiment: test images and their disturbed versions, layer-wise average
    influence per group, clustering of the groups (Aamir et al. 2023, Sec. 3.2, Fig. 8-9)."""

    groups: list[str] | None = Field(
        None,
        description="group name of each uploaded image (e.g. 'original', 'styled', or your own); "
        "null = every uploaded image is an 'original'. Disturbed versions are generated from the "
        "'original' images",
    )
    disturbances: list[Disturbance] | None = Field(
        None,
        description="disturbed versions generated from each original: white background, texture, "
        "style; null = all three when `groups` is null, none when you upload your own groups",
    )
    texture: TextureName = Field("brick", description="scikit-image texture blended into the image")
    texture_strength: float = Field(0.5, ge=0.0, le=1.0, description="weight of the texture in the blend")
    style_source: StyleSource = Field(
        "hubble_deep_field", description="scikit-image picture whose colours and texture are the style"
    )
    style_strength: float = Field(0.6, ge=0.0, le=1.0, description="weight of the style in the blend")
    average_over: Literal["intra_class", "inter_class", "all"] = Field(
        "intra_class",
        description="training points a test image's layer-wise score is averaged over: those of its "
        "target class (the paper's I_avg), of the other classes, or all",
    )
    cluster_distance: Literal["euclidean", "correlation"] = Field(
        "euclidean",
        description="distance between groups' layer-wise vectors for average-linkage clustering "
        "(the paper: Euclidean; 'correlation' = 1 - Pearson)",
    )
