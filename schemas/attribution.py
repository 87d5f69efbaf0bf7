"""Params of the attribution kinds: ``attribution`` (one Captum method), ``occlusion_map`` and
``compare`` (several methods on the same images).

``AttributionParams`` is a discriminated union on ``method``; each variant subclasses
``JobParams`` (``target``, ``batch_size``) and carries its own knobs with Captum's or the
papers' defaults. Validating ``AttributionParams`` returns the variant itself, so the job
pipeline reads ``params.target`` like for any other kind.

Units: baselines, noise and perturbation radii are in the model's *normalised* input space
(what the model sees), except ``noise_level`` which is a fraction of the model's valid input
range (as SmoothGrad states it). Windows and strides are pixels of the model input.

``check_supported(params, manifest)`` rejects, without torch, what the manifest already
shows cannot work (unknown layer, a layer type without a rule); the worker checks the rest
on the model itself.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, model_validator

from schemas.datasets import DatasetParams
from schemas.errors import BadParams, UnsupportedMethod
from schemas.models import ModelManifest
from schemas.params import Aggregation, JobParams

Baseline = Literal["zero", "black", "mean", "blur", "uniform_noise"]
"""Reference input: ``zero`` (0 after normalisation: the data set's mean colour for
ImageNet-style normalisation), ``black`` (pixel value 0), ``mean`` (the image's own
per-channel mean), ``blur`` (the image blurred with a Gaussian, Sturmfels et al. 2020),
``uniform_noise`` (uniform over the valid pixel range: one noise image per seed, and per
entry of a baseline distribution, the same for every image of the job)."""

Superpixels = Literal["grid", "slic"]


class SensitivityMax(BaseModel):
    """Max Sensitivity (Yeh et al. 2019; the metric of the Captum comparison paper): the
    largest relative change of the explanation, ``max ||Φ(x+δ) - Φ(x)|| / ||Φ(x)||``, over
    ``n_perturb_samples`` draws of ``δ`` uniform in the L∞ ball of ``perturb_radius``.
    Lower is better. Costs ``n_perturb_samples + 1`` attributions per image."""

    model_config = ConfigDict(extra="forbid")

    perturb_radius: float = Field(0.02, gt=0, le=10, description="L-inf radius (Captum's default 0.02)")
    n_perturb_samples: int = Field(10, ge=1, le=200, description="Monte-Carlo samples (Captum's default 10)")


class Infidelity(BaseModel):
    """Infidelity (Yeh et al. 2019): ``E[(Iᵀ Φ(x) - (f(x) - f(x - I)))²]`` with Gaussian
    perturbations ``I ~ N(0, noise_scale²)``. Lower is better. ``normalize`` rescales the
    attribution by its least-squares optimal factor first (Captum), so methods of different
    scale compare."""

    model_config = ConfigDict(extra="forbid")

    noise_scale: float = Field(0.003, gt=0, le=10, description="std of I (Captum's documented example: 0.003)")
    n_perturb_samples: int = Field(10, ge=1, le=1000, description="Monte-Carlo samples (Captum's default 10)")
    normalize: bool = True


class _Method(JobParams):
    """Fields shared by every attribution method."""

    method: str = Field(description="the attribution method (each variant fixes it)")
    aggregation: Aggregation = Field("sum", description="channel aggregation of the 2-D map")
    seed: int = Field(0, ge=0, description="seed of every random draw (noise, samples, baselines, metrics)")
    region_grid: int = Field(
        7, ge=1, le=64, description="top regions: the 2-D map is cut into a grid of this many cells per side"
    )
    top_regions: int = Field(5, ge=0, le=64, description="how many of the cells with most positive mass to report")
    sensitivity_max: SensitivityMax | None = Field(None, description="compute Max Sensitivity (costly)")
    infidelity: Infidelity | None = Field(None, description="compute infidelity")


class _WithBaseline(BaseModel):
    baseline: Baseline = "zero"
    blur_sigma: float = Field(
        0.1, gt=0, le=2, description="'blur' baseline: Gaussian sigma as a fraction of the image side"
    )


class _WithBaselines(BaseModel):
    baselines: list[Baseline] = Field(
        ["zero", "blur", "uniform_noise"],
        min_length=1,
        max_length=32,
        description="the baseline distribution (each uniform_noise entry is a different draw)",
    )
    blur_sigma: float = Field(
        0.1, gt=0, le=2, description="'blur' baseline: Gaussian sigma as a fraction of the image side"
    )


class _WithSuperpixels(BaseModel):
    superpixels: Superpixels = Field("slic", description="features: a regular grid or SLIC superpixels (scikit-image)")
    n_segments: int = Field(49, ge=2, le=1024, description="number of features (grid: rounded to a square)")
    slic_compactness: float = Field(10.0, gt=0, description="SLIC colour/space trade-off (scikit-image's default)")
    baseline: Baseline = Field("zero", description="what a removed feature is replaced with")
    blur_sigma: float = Field(
        0.1, gt=0, le=2, description="'blur' baseline: Gaussian sigma as a fraction of the image side"
    )


Integration = Literal["gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid"]


class SaliencyMethod(_Method):
    """Input-gradient saliency (Simonyan et al. 2014): ``|∂f_target/∂x|``; the same fields and
    defaults as the ``saliency`` kind."""

    method: Literal["saliency"]
    abs: bool = Field(True, description="take the absolute value of the gradient (Captum's default)")
    aggregation: Aggregation = Field("max_abs", description="channel aggregation (max |.|, as Simonyan et al.)")


class IntegratedGradientsMethod(_Method, _WithBaseline):
    """Integrated Gradients (Sundararajan et al. 2017): ``(x - x') ∫₀¹ ∂f(x' + α(x - x'))/∂x dα``."""

    method: Literal["integrated_gradients"]
    n_steps: int = Field(50, ge=1, le=2000, description="integration steps (Captum's default 50)")
    integration: Integration = Field("gausslegendre", description="quadrature (Captum's default)")


class NoiseTunnelMethod(_Method, _WithBaseline):
    """Integrated Gradients smoothed over noisy copies (Captum's NoiseTunnel): SmoothGrad
    (mean), SmoothGrad² (mean of squares, the Captum paper's IG-SG) or VarGrad (variance,
    IG-VG; Adebayo et al. 2018)."""

    method: Literal["noise_tunnel"]
    nt_type: Literal["smoothgrad", "smoothgrad_sq", "vargrad"] = "smoothgrad_sq"
    nt_samples: int = Field(10, ge=1, le=500, description="noisy copies (the Captum tutorial the paper follows: 10)")
    noise_level: float = Field(
        0.15, gt=0, le=2, description="noise std as a fraction of the input range (SmoothGrad: 10-20%)"
    )
    n_steps: int = Field(50, ge=1, le=2000, description="IG steps per noisy copy (Captum's default 50)")
    integration: Integration = "gausslegendre"


class GradientShapMethod(_Method, _WithBaselines):
    """GradientSHAP (Lundberg and Lee 2017; Captum): expected gradients ``(x - x') ∂f(x' + α(x -
    x'))/∂x`` over baselines ``x'`` drawn from the distribution and ``α ~ U(0, 1)``."""

    method: Literal["gradient_shap"]
    n_samples: int = Field(50, ge=1, le=2000, description="samples (the Captum tutorial: 50)")
    stdevs: float = Field(0.0001, ge=0, le=10, description="noise added to each sample (the Captum tutorial: 1e-4)")


class DeepLiftMethod(_Method, _WithBaseline):
    """DeepLIFT with the Rescale rule (Shrikumar et al. 2017)."""

    method: Literal["deeplift"]


class DeepLiftShapMethod(_Method, _WithBaselines):
    """DeepLIFT averaged over a baseline distribution (DeepSHAP, Lundberg and Lee 2017)."""

    method: Literal["deeplift_shap"]


class InputXGradientMethod(_Method):
    """Input × gradient (Shrikumar et al. 2016)."""

    method: Literal["input_x_gradient"]


class GuidedBackpropMethod(_Method):
    """Guided backpropagation (Springenberg et al. 2015): only positive gradients pass ReLUs."""

    method: Literal["guided_backprop"]


class DeconvolutionMethod(_Method):
    """Deconvolution (Zeiler and Fergus 2014): ReLUs pass the positive part of the gradient
    regardless of the forward activation."""

    method: Literal["deconvolution"]


class GradCamMethod(_Method):
    """Grad-CAM (Selvaraju et al. 2017) at ``layer``, upsampled to the input. The raw
    attribution repeats the map on every input channel (so ``max_abs`` gives the map)."""

    method: Literal["gradcam"]
    layer: str | None = Field(None, description="layer (module name); null = the model's gradcam_layer")
    relu_attributions: bool = Field(True, description="keep the positive part (Grad-CAM's ReLU)")
    interpolate_mode: Literal["bilinear", "nearest", "bicubic"] = "bilinear"
    aggregation: Aggregation = Field("max_abs", description="channel aggregation (channels are identical)")


class GuidedGradCamMethod(_Method):
    """Guided Grad-CAM (Selvaraju et al. 2017): guided backprop × upsampled Grad-CAM."""

    method: Literal["guided_gradcam"]
    layer: str | None = Field(None, description="layer (module name); null = the model's gradcam_layer")
    interpolate_mode: Literal["nearest", "bilinear", "bicubic"] = Field("nearest", description="Captum's default")


class LRPMethod(_Method):
    """Layer-wise Relevance Propagation (Bach et al. 2015) with Captum's epsilon rules."""

    method: Literal["lrp"]


class OcclusionMethod(_Method):
    """Occlusion (Zeiler and Fergus 2014): the drop of the target output when a window is
    replaced by the baseline, averaged over the windows covering each pixel."""

    method: Literal["occlusion"]
    window: int | None = Field(
        None, ge=1, le=4096, description="window side in pixels; null = 1/7 of the image side (32 at 224)"
    )
    stride: int | None = Field(None, ge=1, le=4096, description="stride in pixels; null = half the window")
    baseline: Baseline = "zero"
    blur_sigma: float = Field(
        0.1, gt=0, le=2, description="'blur' baseline: Gaussian sigma as a fraction of the image side"
    )


class FeatureAblationMethod(_Method, _WithSuperpixels):
    """Feature ablation: the drop of the target output when one superpixel is replaced."""

    method: Literal["feature_ablation"]


class ShapleyValueSamplingMethod(_Method, _WithSuperpixels):
    """Shapley values of superpixels by permutation sampling (Castro et al. 2009)."""

    method: Literal["shapley_value_sampling"]
    n_samples: int = Field(25, ge=1, le=1000, description="permutations (Captum's default 25)")


class KernelShapMethod(_Method, _WithSuperpixels):
    """KernelSHAP (Lundberg and Lee 2017) on superpixels."""

    method: Literal["kernel_shap"]
    n_samples: int = Field(200, ge=2, le=20000, description="coalitions (about 4x the default 49 features)")


class LimeMethod(_Method, _WithSuperpixels):
    """LIME (Ribeiro et al. 2016) on superpixels: a Lasso fit to the model's outputs on
    random subsets of superpixels, weighted by an exponential cosine kernel."""

    method: Literal["lime"]
    n_samples: int = Field(200, ge=2, le=20000, description="perturbed samples (about 4x the default 49 features)")
    alpha: float = Field(0.01, ge=0, description="Lasso regularisation (Captum's default 0.01)")
    kernel_width: float = Field(1.0, gt=0, description="similarity kernel width (Captum's default 1.0)")


AttributionMethod = Annotated[
    SaliencyMethod
    | IntegratedGradientsMethod
    | NoiseTunnelMethod
    | GradientShapMethod
    | DeepLiftMethod
    | DeepLiftShapMethod
    | InputXGradientMethod
    | GuidedBackpropMethod
    | DeconvolutionMethod
    | GradCamMethod
    | GuidedGradCamMethod
    | LRPMethod
    | OcclusionMethod
    | FeatureAblationMethod
    | ShapleyValueSamplingMethod
    | KernelShapMethod
    | LimeMethod,
    Field(discriminator="method"),
]
"""One attribution method with its params (a discriminated union on ``method``)."""

METHODS: dict[str, type[_Method]] = {
    cls.model_fields["method"].annotation.__args__[0]: cls  # type: ignore[union-attr]
    for cls in AttributionMethod.__origin__.__args__  # type: ignore[attr-defined]
}
"""Method name -> its params model."""

GRADIENT_METHODS = frozenset(
    {
        "saliency", "integrated_gradients", "noise_tunnel", "gradient_shap", "deeplift", "deeplift_shap",
        "input_x_gradient", "guided_backprop", "deconvolution", "gradcam", "guided_gradcam", "lrp",
    }
)  # fmt: skip
FORWARD_METHODS = frozenset({"occlusion", "feature_ablation", "shapley_value_sampling", "kernel_shap", "lime"})


class AttributionParams(RootModel[AttributionMethod]):
    """Params of the ``attribution`` kind: ``{"method": "<name>", ...that method's params}``.

    ``AttributionParams.model_validate(data)`` returns the method's own model (e.g. an
    ``IntegratedGradientsMethod``), not the wrapper.
    """

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return super().model_validate(obj, **kwargs).root

    @staticmethod
    def check_model(params: BaseModel, manifest: ModelManifest) -> None:
        check_supported(params, manifest)


class OcclusionMapParams(JobParams):
    """Occlusion sensitivity map (Zeiler and Fergus 2014, as in the occlusion paper): a
    square occluder slides over the image; at each position the model's probability of the
    target class (and its most probable class) is recorded."""

    occluder: int | None = Field(
        None, ge=1, le=4096, description="occluder side in pixels; null = 1/7 of the image side"
    )
    stride: int | None = Field(None, ge=1, le=4096, description="stride in pixels; null = half the occluder")
    fill: Literal["grey", "black", "mean"] = Field(
        "grey", description="occluder colour: grey square (Zeiler and Fergus), black, or the image's mean colour"
    )

    @staticmethod
    def check_model(params: BaseModel, manifest: ModelManifest) -> None:
        assert isinstance(params, OcclusionMapParams)
        h, w = manifest.preprocessing.size
        if params.occluder is not None and params.occluder > min(h, w):
            raise BadParams(f"occluder {params.occluder} px is larger than the {h}x{w} input")


def _paper_methods() -> list[Any]:
    """The eight methods of the Captum comparison paper's Table I."""
    return [
        IntegratedGradientsMethod(method="integrated_gradients"),
        NoiseTunnelMethod(method="noise_tunnel", nt_type="smoothgrad_sq"),
        NoiseTunnelMethod(method="noise_tunnel", nt_type="vargrad"),
        GradientShapMethod(method="gradient_shap"),
        OcclusionMethod(method="occlusion"),
        LRPMethod(method="lrp"),
        GuidedBackpropMethod(method="guided_backprop"),
        GuidedGradCamMethod(method="guided_gradcam"),
    ]


COMPARE_DATASET_IMAGES = 16
"""Images ``compare`` takes from a data set when its ``limit`` is null."""


class CompareParams(DatasetParams, JobParams):
    """Several attribution methods on the same images (the Captum comparison paper's Fig. 1
    and Table I): a table of runtime, Max Sensitivity and infidelity, and a grid image.
    The images are the request's, or the first ``limit`` (default 16, at most 64) of a
    ``dataset``.

    Targets, the batch size and the quality scores are set here for all methods; a method
    that cannot run on the model gets a table row with its error instead of a map."""

    methods: list[AttributionMethod] = Field(
        _paper_methods(), min_length=1, max_length=16, description="default: the paper's eight"
    )
    sensitivity_max: SensitivityMax | None = SensitivityMax()
    infidelity: Infidelity | None = Infidelity()
    seed: int = Field(0, ge=0)
    limit: int | None = Field(
        None, ge=1, le=64, description="images taken from the dataset (null = 16); compare holds them all at once"
    )

    @model_validator(mode="after")
    def _no_per_method_settings(self) -> CompareParams:
        for m in self.methods:
            if m.target is not None or m.batch_size is not None or m.resize is not None:
                raise ValueError(f"{m.method}: set target, batch_size and resize on the compare job, not per method")
            if m.sensitivity_max is not None or m.infidelity is not None:
                raise ValueError(f"{m.method}: set sensitivity_max and infidelity on the compare job")
        return self

    @staticmethod
    def check_model(params: BaseModel, manifest: ModelManifest) -> None:
        """Bad params (an unknown layer) are a 422; a method the model does not support
        only becomes an error row, unless no method is supported."""
        assert isinstance(params, CompareParams)
        unsupported = []
        for m in params.methods:
            try:
                check_supported(m, manifest)
            except UnsupportedMethod as e:
                unsupported.append(e)
        if len(unsupported) == len(params.methods):
            raise UnsupportedMethod(
                "none of the methods can run on this model: " + "; ".join(e.message for e in unsupported),
                details=[e.details for e in unsupported],
            )


# --- checks before queueing (manifest only, no torch) --------------------------------------

LRP_LAYER_TYPES = frozenset(
    {
        "Conv2d", "Linear", "BatchNorm2d", "MaxPool1d", "MaxPool2d", "MaxPool3d", "AvgPool2d",
        "AdaptiveAvgPool2d", "ReLU", "Dropout", "Tanh", "Flatten", "Identity", "Unflatten",
    }
)  # fmt: skip
"""Layer types with an LRP rule: Captum's defaults plus identity rules for shape-only layers."""

ACTIVATION_TYPES = frozenset(
    {
        "ReLU", "ReLU6", "Hardtanh", "SiLU", "GELU", "Sigmoid", "Tanh", "ELU", "SELU", "CELU",
        "LeakyReLU", "PReLU", "RReLU", "Softplus", "Softmax", "LogSoftmax", "Softmin", "Hardswish",
        "Hardsigmoid", "Mish", "Threshold", "Softsign", "Tanhshrink", "Softshrink", "Hardshrink",
        "GLU", "LogSigmoid", "Swish", "MemoryEfficientSwish",
    }
)  # fmt: skip
DEEPLIFT_ACTIVATIONS = frozenset({"ReLU", "ReLU6", "ELU", "LeakyReLU", "Sigmoid", "Tanh", "Softplus", "Softmax"})
GUIDED_ACTIVATIONS = frozenset({"ReLU", "ReLU6"})


def _leaf_types(manifest: ModelManifest) -> dict[str, str]:
    """Modules without children. Linear in the number of modules: the check runs before every
    attribution, and the quadratic scan it replaces cost 40-60 ms on efficientnet-lite0 (166
    modules), half of a one-image saliency map."""
    names = manifest.module_types
    parents = {n[:i] for n in names for i, c in enumerate(n) if c == "."}
    return {n: t for n, t in names.items() if n not in parents}


def gradcam_layer(params: BaseModel, manifest: ModelManifest) -> str:
    """The layer a Grad-CAM-style method uses: its ``layer`` or the manifest's."""
    layer = getattr(params, "layer", None) or manifest.gradcam_layer
    if not layer:
        raise BadParams(
            f"{getattr(params, 'method', '')}: model {manifest.id!r} declares no gradcam_layer; set 'layer'"
        )
    return layer


def check_supported(params: BaseModel, manifest: ModelManifest) -> None:
    """Raise BadParams / UnsupportedMethod (both 422) for what the manifest shows cannot run.

    Uses ``manifest.module_types`` (module name -> class name); when a manifest lists none
    the worker decides on the model itself.
    """
    method = getattr(params, "method", None)
    types = manifest.module_types
    h, w = manifest.preprocessing.size
    if method in ("gradcam", "guided_gradcam"):
        layer = gradcam_layer(params, manifest)
        if types and layer not in types:
            raise BadParams(f"model {manifest.id!r} has no layer {layer!r}", details={"layer": layer})
    if method == "occlusion":
        assert isinstance(params, OcclusionMethod)
        if params.window is not None and params.window > min(h, w):
            raise BadParams(f"occlusion window {params.window} px is larger than the {h}x{w} input")
    if not types:
        return
    leaves = _leaf_types(manifest)
    if method == "lrp":
        for name, t in leaves.items():
            if t not in LRP_LAYER_TYPES:
                raise UnsupportedMethod(f"LRP has no rule for layer {name!r} ({t})", details={"layer": name, "type": t})
    elif method in ("deeplift", "deeplift_shap"):
        for name, t in leaves.items():
            if t in ACTIVATION_TYPES and t not in DEEPLIFT_ACTIVATIONS:
                raise UnsupportedMethod(
                    f"DeepLift has no rule for layer {name!r} ({t})", details={"layer": name, "type": t}
                )
    elif method in ("guided_backprop", "deconvolution", "guided_gradcam"):
        acts = {n: t for n, t in leaves.items() if t in ACTIVATION_TYPES}
        for name, t in acts.items():
            if t not in GUIDED_ACTIVATIONS:
                raise UnsupportedMethod(
                    f"{method} defines its rule for ReLU-type activations only; layer {name!r} ({t}) has none",
                    details={"layer": name, "type": t},
                )
        if not acts:
            raise UnsupportedMethod(
                f"{method}: the model has no ReLU-type activation module, so the map would equal the gradient",
                details={"layer": None, "type": None},
            )
