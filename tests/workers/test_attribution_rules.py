"""Rule-based methods really apply their rules on ``efficientnet-lite0`` (ReLU6, one activation
module called several times per block), every method runs on it or answers its 422, no
hooks stay behind, and Grad-CAM points at the cat in ``skimage.data.chelsea()``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from captum import attr as ca
from PIL import Image

from schemas.attribution import METHODS
from schemas.errors import UnsupportedMethod
from tests.workers.test_attribution import assert_no_hooks, params, tiny_model
from workers import render
from workers.explain import deeplift, rules
from workers.explain.attribution import attribute, make_baseline
from workers.explain.base import LoadedModel
from workers.registry import preprocess

TINY = {
    "n_steps": 2,
    "nt_samples": 2,
    "n_samples": 2,
    "baselines": ["zero", "uniform_noise"],
    "window": 112,
    "stride": 112,
    "superpixels": "grid",
    "n_segments": 4,
}


@pytest.fixture(scope="module")
def cat(model_cache, chelsea):
    """efficientnet-lite0, chelsea as its ``(1, 3, 224, 224)`` input (the model's own centre
    crop), and the predicted class."""
    model = model_cache.get("efficientnet-lite0")
    x, _ = preprocess([Image.fromarray(chelsea)], model.manifest.preprocessing)
    t = model.forward(x).argmax(1)
    assert model.manifest.labels[int(t)].endswith("cat")
    return model, x, t


@pytest.fixture(scope="module")
def gradient(cat) -> torch.Tensor:
    model, x, t = cat
    return attribute(model, x, t, params("saliency", abs=False))


RULE_METHODS = ("guided_backprop", "deconvolution", "deeplift")


@pytest.mark.parametrize("method", sorted(set(METHODS) - set(RULE_METHODS)))
def test_every_method_runs_on_efficientnet_or_answers_422(cat, method):
    """Shape and finiteness, or LRP's 422 naming the first layer it has no rule for (the rule
    methods run in the next test)."""
    model, x, t = cat
    fields = METHODS[method].model_fields
    p = params(method, **{k: v for k, v in TINY.items() if k in fields})
    if method == "lrp":
        with pytest.raises(
            UnsupportedMethod, match=r"LRP has no rule for layer '_conv_stem\.static_padding' \(ZeroPad2d\)"
        ):
            attribute(model, x, t, p)
    else:
        a = attribute(model, x, t, p)
        assert a.shape == x.shape and torch.isfinite(a).all() and a.abs().sum() > 0
    assert_no_hooks(model.module)
    for key, prepared in rules._prepared.items():
        if key[0] == model.id and isinstance(prepared, torch.nn.Module):
            assert_no_hooks(prepared)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("method", RULE_METHODS)
def test_rules_apply_on_efficientnet(cat, gradient, method):
    """On the model as it is, Captum silently returns the plain gradient (times x - baseline
    for DeepLift): ReLU6 is no ReLU to it, and DeepLift would mix the reused activation's
    calls. On the prepared copy the rule applies: the map is another one (relative L2
    difference > 0.5), and DeepLift's summation-to-delta (Shrikumar et al. 2017, eq. 1), which
    holds only when every nonlinearity follows its rule, holds within 1e-4 relative."""
    model, x, t = cat
    black = make_baseline("black", x, model.manifest, 0.1, 0)
    plain = gradient * (x - black) if method == "deeplift" else gradient
    xs = x.clone().requires_grad_()
    if method == "deeplift":
        raw = ca.DeepLift(model.module).attribute(xs, baselines=black, target=t)
    else:
        raw = {"guided_backprop": ca.GuidedBackprop, "deconvolution": ca.Deconvolution}[method](model.module).attribute(
            xs, target=t
        )
    assert relative_difference(raw.detach(), plain) < 1e-4, "Captum on the raw model falls back to the gradient"
    ours = attribute(model, x, t, params(method, baseline="black") if method == "deeplift" else params(method))
    assert ours.shape == x.shape and torch.isfinite(ours).all()
    assert relative_difference(ours, plain) > 0.5
    if method == "deeplift":
        with torch.no_grad():
            delta = float(model.module(x)[0, t] - model.module(black)[0, t])
        assert float(ours.sum()) == pytest.approx(delta, rel=1e-4, abs=1e-4)
    assert_no_hooks(model.module)


def test_prepared_models_match_the_original_and_are_cached(cat):
    model, x, t = cat
    with torch.no_grad():
        want = model.module(x)
        for family in ("guided", "deeplift"):
            prepared = rules.prepare(model, family, keep=model.manifest.gradcam_layer if family == "guided" else None)
            assert prepared is rules.prepare(
                model, family, keep=model.manifest.gradcam_layer if family == "guided" else None
            )
            torch.testing.assert_close(prepared(x), want, rtol=1e-4, atol=1e-4)
            types = {type(m).__name__ for m in prepared.modules()}
            if family == "guided":
                assert "ReLU6" not in types and "GuidedReLU6" in types
            else:  # ReLU6 stays; rules.deeplift gives Captum's DeepLift the Rescale rule for it
                assert "ReLU6" in types
                method = rules.deeplift(prepared)
                assert all(method._is_non_linear(m) for m in prepared.modules() if type(m) is torch.nn.ReLU6)
                assert not ca.DeepLift(prepared)._is_non_linear(torch.nn.ReLU6())  # Captum's table untouched
            assert prepared is not model.module and not any(p.requires_grad for p in prepared.parameters())


CAT_COLUMNS = 0.8
"""The cat's part of chelsea: the left 80% of the columns; the right fifth of the photo is the
room behind the cat (the same fraction of the 224x224 model input when the photo is stretched)."""


def test_gradcam_points_at_the_cat(cat, chelsea):
    """Grad-CAM at ``_bn1`` (the last feature map; its activation module is shared with the
    stem, so the map is taken before it) puts at least 90% of its mass on the cat's part of
    the photo (measured: 0.99), which is 80% of the area. The manifest's ``_conv_head``
    precedes a BatchNorm whose per-channel offsets add a constant to the Grad-CAM sum, a
    flatter map (measured: 0.86).

    On the whole photo: the job's ``resize: stretch`` choice (a full-image map). The model's
    own centre crop (columns 95-357 of 451, ``workers.registry.crop_box``) lies inside the
    cat's columns (0-360) and holds almost no room to tell apart."""
    model, _, _ = cat
    whole = model.manifest.preprocessing.model_copy(update={"resize": "stretch"})
    x, _ = preprocess([Image.fromarray(chelsea)], whole)
    t = model.forward(x).argmax(1)
    assert model.manifest.labels[int(t)].endswith("cat")
    a = attribute(model, x, t, params("gradcam", layer="_bn1"))
    heat = render.to_2d(a[0], "max_abs")
    cut = int(CAT_COLUMNS * heat.shape[1])
    fraction = float(heat[:, :cut].sum() / heat.sum())
    assert fraction >= 0.9, fraction
    default = render.to_2d(attribute(model, x, t, params("gradcam"))[0], "max_abs")
    assert float(default[:, :cut].sum() / default.sum()) > CAT_COLUMNS  # still above chance
    assert np.isfinite(heat).all()


def _captum_deeplift(model, x, baselines, t, shap: bool) -> torch.Tensor:
    """Captum's own DeepLift / DeepLiftShap (Rescale rule extended to ReLU6, ``rules.deeplift``)
    on the prepared copy: the reference of the two-pass computation."""
    prepared = rules.prepare(model, "deeplift")
    method = (rules.deeplift_shap if shap else rules.deeplift)(prepared)
    return method.attribute(x.clone().requires_grad_(), baselines=baselines, target=t).detach()


def _torchvision_mobilenet_v2() -> LoadedModel:
    """torchvision's MobileNetV2 with fixed random weights at 64x64: in-place ReLU6 in every
    block, residual additions, no max pooling. Its batch norms are calibrated on noise (at
    their initial statistics the activations shrink to ~1e-10 through the blocks, where
    Captum's ``eps`` turns its DeepLift into a plain gradient)."""
    from torchvision.models import mobilenet_v2

    torch.manual_seed(0)
    module = mobilenet_v2(num_classes=10)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batches
    with torch.no_grad():
        for _ in range(4):
            module.train()(torch.rand(8, 3, 64, 64) * 4 - 2)
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return tiny_model(module, (64, 64), 10, mode="RGB")


@pytest.mark.parametrize("which", ["efficientnet-lite0", "mobilenet_v2"])
def test_two_pass_deeplift_equals_captums(cat, which):
    """DeepLift in two passes (:mod:`workers.explain.deeplift`: the reference alone without
    gradients, then the input) returns Captum's DeepLift and DeepLiftShap on models whose
    nonlinearities are ReLU/ReLU6: within 1e-4 of the map's maximum (the convolutions see
    batches of other sizes), for two images with their own targets and a shared baseline,
    and an image against three baselines."""
    if which == "efficientnet-lite0":
        model, x1, _ = cat
        x = torch.cat([x1, x1.flip(3)])
    else:
        model = _torchvision_mobilenet_v2()
        x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 4 - 2
    t = torch.tensor([281, 7]) if which == "efficientnet-lite0" else torch.tensor([3, 7])
    assert deeplift.two_pass(model) is not None, "ReLU/ReLU6 only: the two-pass path applies"
    black = make_baseline("black", x, model.manifest, 0.1, 0)
    ours = attribute(model, x, t, params("deeplift", baseline="black"))
    want = _captum_deeplift(model, x, black, t, shap=False)
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    with torch.no_grad():
        delta = (model.module(x) - model.module(black)).gather(1, t[:, None])[:, 0]
    torch.testing.assert_close(ours.sum((1, 2, 3)), delta, rtol=1e-4, atol=1e-4)  # summation-to-delta
    kinds = ["zero", "blur", "black", "uniform_noise"]  # shared baselines and a per-image one
    for batch_size in (2, 8):  # 4 baseline rows an image: images in chunks of 1, and of 2 cycling the reference
        shap = attribute(model, x, t, params("deeplift_shap", baselines=kinds, batch_size=batch_size))
        for i in range(len(x)):
            xi = x[i : i + 1]
            dist = torch.cat([make_baseline(k, xi, model.manifest, 0.1, 0, draw=d) for d, k in enumerate(kinds)])
            want = _captum_deeplift(model, xi, dist, t[i : i + 1], shap=True)
            torch.testing.assert_close(shap[i : i + 1], want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    fast = deeplift.two_pass(model)
    assert fast is not None and all(s.ref is None for s in fast.sites), "no references held after a call"
    assert_no_hooks(fast.module)


def test_deeplift_keeps_the_reference_of_shared_baselines(cat):
    """A second DeepLift job against a shared baseline runs no reference pass and returns the
    same map; a per-image baseline is never kept; a budget of 0 keeps nothing."""
    model, x, t = cat
    fast = deeplift.two_pass(model)
    assert fast is not None
    p = params("deeplift", baseline="zero", seed=11)
    first = attribute(model, x, t, p)
    passes = fast.reference_passes
    again = attribute(model, x, t, p)
    assert fast.reference_passes == passes, "the kept reference served the second job"
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    attribute(model, x, t, params("deeplift", baseline="blur"))
    attribute(model, x, t, params("deeplift", baseline="blur"))
    assert fast.reference_passes == passes + 2, "blur depends on the image: recomputed"
    budget = fast.cache_bytes
    try:
        fast.cache_bytes = 0
        fast.forget()
        attribute(model, x, t, params("deeplift", baseline="black"))
        attribute(model, x, t, params("deeplift", baseline="black"))
        assert fast.reference_passes == passes + 4 and not fast._kept
    finally:
        fast.cache_bytes = budget


def test_models_with_max_pooling_use_captums_deeplift(model_cache):
    """Max pooling's DeepLift rule mixes input and reference gradients: ``digits-cnn`` (one
    MaxPool2d) takes Captum's class (its parity with Captum is in the parity tests)."""
    assert deeplift.two_pass(model_cache.get("digits-cnn")) is None
