"""Parity: for every method, :func:`attribute` returns what Captum's own class returns for the
same model, inputs, targets, baselines and seed, on models whose layers Captum's rules cover
(``digits-cnn`` and a torchvision ``resnet18`` with fixed random weights).

The service batches differently (chunks of ``batch_size``, ``perturbations_per_eval``); the
references call Captum as a user would, one batch, ``perturbations_per_eval=1``. Tolerance:
``|ours - captum| <= 1e-4 |captum|max + 1e-4 |captum|`` elementwise (summation order differs
across chunks; forward-only methods may run on an engine equal to eager within 1e-5).

References for the rule-based methods: guided backprop, deconvolution and guided Grad-CAM
use Captum on the original module (reused ReLUs do not change their rule); DeepLift on
``resnet18`` fails in Captum itself (``self.relu`` is called twice per block) and LRP on it
would copy relevance through additions, so those two are compared with Captum on the copy
:mod:`workers.explain.rules` prepares (its DeepLift completeness is tested separately).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from captum import attr as ca
from captum.attr._utils.lrp_rules import EpsilonRule
from PIL import Image

from schemas.attribution import METHODS
from tests.workers.test_attribution import digits_batch, params
from workers.engine import eager_forward
from workers.explain import rules
from workers.explain.attribution import attribute, input_range, make_baseline, superpixel_mask
from workers.explain.base import LoadedModel
from workers.registry import build_module, preprocess

SMALL = {
    "n_steps": 5,
    "nt_samples": 3,
    "n_samples": 6,
    "superpixels": "grid",
    "n_segments": 9,
    "baselines": ["zero", "black", "uniform_noise"],
}


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def captum_reference(model, x: torch.Tensor, t: torch.Tensor, p) -> torch.Tensor:
    """Captum called directly, one image at a time where the method has per-image inputs."""
    module = copy.deepcopy(model.module)
    layer_name = getattr(p, "layer", None) or model.manifest.gradcam_layer
    m = p.method
    xs = x.clone().requires_grad_(
        m not in ("occlusion", "feature_ablation", "shapley_value_sampling", "kernel_shap", "lime")
    )
    seed_all(p.seed)
    zeros = torch.zeros_like(x)
    if m == "saliency":
        return ca.Saliency(module).attribute(xs, target=t, abs=p.abs)
    if m == "input_x_gradient":
        return ca.InputXGradient(module).attribute(xs, target=t)
    if m == "integrated_gradients":
        return ca.IntegratedGradients(module).attribute(xs, baselines=zeros, target=t, n_steps=p.n_steps)
    if m == "noise_tunnel":
        return ca.NoiseTunnel(ca.IntegratedGradients(module)).attribute(
            xs, nt_type=p.nt_type, nt_samples=p.nt_samples, nt_samples_batch_size=1,
            stdevs=p.noise_level * input_range(model.manifest), baselines=zeros, target=t,
            n_steps=p.n_steps, internal_batch_size=p.batch_size,
        )  # fmt: skip
    if m == "guided_backprop":
        return ca.GuidedBackprop(module).attribute(xs, target=t)
    if m == "deconvolution":
        return ca.Deconvolution(module).attribute(xs, target=t)
    if m == "guided_gradcam":
        return ca.GuidedGradCam(module, module.get_submodule(layer_name)).attribute(xs, target=t)
    if m == "gradcam":
        cam = ca.LayerGradCam(module, module.get_submodule(layer_name)).attribute(xs, target=t, relu_attributions=True)
        return ca.LayerAttribution.interpolate(cam, tuple(x.shape[2:]), "bilinear").expand_as(x)
    if m == "deeplift":
        net = module if model.id == "digits-cnn" else rules.prepare(model, "deeplift")
        return ca.DeepLift(net).attribute(xs, baselines=zeros, target=t)
    if m == "lrp":
        if model.id == "digits-cnn":
            module.flatten.rule = EpsilonRule()  # Captum's documented way to give Flatten a rule
            return ca.LRP(module).attribute(xs, target=t)
        net = rules.prepare(model, "lrp")
        rules.lrp_layer_rules(net)
        try:
            return ca.LRP(net).attribute(xs, target=t)
        finally:
            rules.lrp_cleanup(net)
    out = []
    for i in range(len(x)):
        xi, ti = xs[i : i + 1], t[i : i + 1]
        if m in ("gradient_shap", "deeplift_shap"):
            dist = torch.cat([make_baseline(k, x[i : i + 1], model.manifest, p.blur_sigma, p.seed, d)
                              for d, k in enumerate(p.baselines)])  # fmt: skip
            if m == "gradient_shap":
                out.append(ca.GradientShap(module).attribute(xi, baselines=dist, n_samples=p.n_samples,
                                                             stdevs=p.stdevs, target=ti))  # fmt: skip
            else:
                net = module if model.id == "digits-cnn" else rules.prepare(model, "deeplift")
                out.append(ca.DeepLiftShap(net).attribute(xi, baselines=dist, target=ti))
        elif m == "occlusion":
            c = x.shape[1]
            window, stride = (c, p.window, p.window), (c, p.stride, p.stride)
            out.append(ca.Occlusion(module).attribute(xi, window, strides=stride, baselines=0, target=ti))
        else:
            mask = superpixel_mask(xi, p)
            kw = {"feature_mask": mask, "target": ti, "baselines": 0}
            if m == "feature_ablation":
                out.append(ca.FeatureAblation(module).attribute(xi, **kw))
            elif m == "shapley_value_sampling":
                out.append(ca.ShapleyValueSampling(module).attribute(xi, n_samples=p.n_samples, **kw))
            elif m == "kernel_shap":
                out.append(ca.KernelShap(module).attribute(xi, n_samples=p.n_samples, **kw))
            else:
                from captum._utils.models.linear_model import SkLearnLasso
                from captum.attr._core.lime import get_exp_kernel_similarity_function

                lime = ca.Lime(
                    module, SkLearnLasso(alpha=p.alpha), get_exp_kernel_similarity_function("cosine", p.kernel_width)
                )
                out.append(lime.attribute(xi, n_samples=p.n_samples, **kw))
    return torch.cat(out)


def assert_parity(ours: torch.Tensor, ref: torch.Tensor) -> None:
    ref = ref.detach()
    scale = float(ref.abs().max())
    assert scale > 0, "a reference map that is all zero proves nothing"
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * scale)


def method_params(method: str, **extra):
    fields = METHODS[method].model_fields
    return params(method, **{**{k: v for k, v in SMALL.items() if k in fields}, **extra})


def batch_size(method: str) -> int:
    """3 (several chunks) where chunking cannot change the result; where it changes the order
    of random draws, one chunk, as in the reference call (chunked sampling is checked exactly
    on a linear model in test_attribution.py)."""
    return 8 if method in ("noise_tunnel", "gradient_shap") else 3


@pytest.fixture(scope="module")
def digits(model_cache):
    model = model_cache.get("digits-cnn")
    x = digits_batch(2)
    return model, x, model.forward(x).argmax(1)


@pytest.fixture(scope="module")
def resnet(models_dir, chelsea):
    """resnet18-random, built eagerly (no forward-engine export: the exported engine is fixed
    to 64x64, and these inputs are 32x32, a quarter of the work; resnet18 is fully
    convolutional up to its global pool). Engine parity is the engine's own test; digits-cnn
    above runs through whatever engine the worker gives it."""
    from schemas.manifests import read_entry

    entry = read_entry(models_dir / "resnet18-random")
    module = build_module(entry)
    model = LoadedModel(entry.manifest, entry.version, module, torch.device("cpu"), eager_forward(module), 16, 8)
    images = [Image.fromarray(chelsea), Image.fromarray(np.ascontiguousarray(chelsea[:, ::-1]))]
    x, _ = preprocess(images, model.manifest.preprocessing)
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", antialias=True)
    return model, x, model.forward(x).argmax(1)


FORWARD_ONLY = ("occlusion", "feature_ablation", "shapley_value_sampling", "kernel_shap", "lime")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_parity_with_captum_on_digits(digits, method):
    model, x, t = digits
    extra = {"window": 2, "stride": 2} if method == "occlusion" else {}
    p = method_params(method, batch_size=batch_size(method), **extra)
    assert_parity(attribute(model, x, t, p), captum_reference(model, x, t, p))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_parity_with_captum_on_resnet18(resnet, method):
    model, x, t = resnet
    if method in FORWARD_ONLY:
        x, t = x[:1], t[:1]  # the references evaluate one perturbation per forward pass
    extra: dict = {"window": 8, "stride": 8, "nt_samples": 2, "n_steps": 3, "n_segments": 4}
    extra = {k: v for k, v in extra.items() if k in METHODS[method].model_fields}
    if method in ("shapley_value_sampling", "kernel_shap", "lime"):
        extra["n_samples"] = 2 if method == "shapley_value_sampling" else 8
    if method == "lime":
        extra.update(superpixels="slic", n_segments=9)  # a real photo: SLIC gives proper superpixels
    p = method_params(method, batch_size=batch_size(method), **extra)
    assert_parity(attribute(model, x, t, p), captum_reference(model, x, t, p))
