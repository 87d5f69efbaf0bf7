"""The ``attribution`` kind: hand-computed cases on tiny models, the params schema, and one
cross-method table test (shape, finiteness, determinism, no hooks) on ``digits-cnn``."""

from __future__ import annotations

import io
import itertools
import json
from typing import Any, Literal

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from schemas.attribution import (
    METHODS,
    AttributionParams,
    CompareParams,
    OcclusionMapParams,
    SaliencyMethod,
    check_supported,
)
from schemas.errors import BadParams, UnsupportedMethod
from schemas.models import ModelManifest, Preprocessing
from schemas.params import SaliencyParams
from workers.explain.attribution import attribute, make_baseline, run, superpixel_mask, top_regions
from workers.explain.base import Inputs, LoadedModel
from workers.registry import preprocess

# --- helpers shared by the attribution tests ------------------------------------------------


_versions = itertools.count()


def tiny_model(module: nn.Module, size: tuple[int, int], classes: int, mode: Literal["L", "RGB"] = "L") -> LoadedModel:
    """A hand-built module as a LoadedModel: inputs are pixels / 255 (mean 0, std 1); each
    gets its own version (prepared copies are cached per model version)."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    channels = 1 if mode == "L" else 3
    manifest = ModelManifest(
        id="tiny",
        architecture="torchscript",
        weights="none",
        preprocessing=Preprocessing(size=size, mode=mode, mean=[0.0] * channels, std=[1.0] * channels),
        labels=[f"c{i}" for i in range(classes)],
    )

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(x)

    return LoadedModel(
        manifest, f"v{next(_versions)}", module, torch.device("cpu"), forward, batch_size=4, grad_batch_size=4
    )


def inputs_for(model: LoadedModel, images: list[np.ndarray]) -> Inputs:
    """``Inputs`` of uint8 ``(H, W, 3)`` images, targets = the predicted classes."""
    x, display = preprocess([Image.fromarray(a) for a in images], model.manifest.preprocessing)
    probs = model.forward(x).softmax(1)
    return Inputs(images=x, display=display, targets=probs.argmax(1), probs=probs)


def digits_batch(n: int = 3) -> torch.Tensor:
    from workers.models.digits import load_split

    _, _, x_te, _ = load_split()
    return torch.from_numpy(x_te[:n])[:, None]


def assert_no_hooks(module: nn.Module) -> None:
    for name, m in module.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, name
        assert not m._backward_hooks and not getattr(m, "_backward_pre_hooks", None), name
    assert not any(p.requires_grad for p in module.parameters())


def params(method: str, **kw: Any) -> Any:
    return AttributionParams.model_validate({"method": method, **kw})


# --- hand-computed cases ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def linear() -> tuple[LoadedModel, torch.Tensor]:
    """``f(x) = W flatten(x) + b`` on 1x4x4 inputs, 3 classes, fixed weights."""
    gen = torch.Generator().manual_seed(1)
    lin = nn.Linear(16, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(3, 16, generator=gen))
        lin.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    return tiny_model(nn.Sequential(nn.Flatten(), lin), (4, 4), 3), lin.weight.detach().clone()


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("baseline", ["zero", "uniform_noise", "blur"])
def test_integrated_gradients_of_a_linear_model_is_input_minus_baseline_times_weight(linear, baseline, batch_size):
    """Also: an image's baseline does not depend on the chunk it is evaluated in (one noise
    image per seed and draw)."""
    model, w = linear
    x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0, 2])
    p = params("integrated_gradients", baseline=baseline, n_steps=5, batch_size=batch_size)
    got = attribute(model, x, t, p)
    b = make_baseline(baseline, x, model.manifest, p.blur_sigma, p.seed)
    want = (x - b) * w[t].reshape(2, 1, 4, 4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # completeness: the attributions sum to f(x) - f(baseline)
    delta = model.module(x).gather(1, t[:, None]) - model.module(b).gather(1, t[:, None])
    torch.testing.assert_close(got.flatten(1).sum(1), delta.flatten(), rtol=1e-5, atol=1e-5)


def test_gradient_shap_in_sample_chunks_is_exact_on_a_linear_model(linear):
    """7 samples drawn in calls of 3, 3 and 1: still (x - baseline) * w for one baseline."""
    model, w = linear
    x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([1, 1])
    got = attribute(model, x, t, params("gradient_shap", baselines=["zero"], n_samples=7, stdevs=0.0, batch_size=3))
    torch.testing.assert_close(got, x * w[1].reshape(1, 1, 4, 4), rtol=1e-5, atol=1e-6)


def test_input_x_gradient_and_saliency_of_a_linear_model(linear):
    model, w = linear
    x = torch.rand(1, 1, 4, 4)
    t = torch.tensor([2])
    torch.testing.assert_close(attribute(model, x, t, params("input_x_gradient")), x * w[2].reshape(1, 1, 4, 4))
    torch.testing.assert_close(attribute(model, x, t, params("saliency")), w[2].abs().reshape(1, 1, 4, 4))


class OnePixel(nn.Module):
    """Class 0's logit is ``5 * x[0, 0, 5, 2]``; class 1's is 0: only one pixel matters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = 5 * x[:, 0, 5, 2]
        return torch.stack([v, torch.zeros_like(v)], 1)


def test_occlusion_of_a_one_pixel_model_lights_exactly_that_window():
    model = tiny_model(OnePixel(), (8, 8), 2)
    x = torch.full((1, 1, 8, 8), 0.8)
    got = attribute(model, x, torch.tensor([0]), params("occlusion", window=2, stride=2))
    want = torch.zeros(1, 1, 8, 8)
    want[0, 0, 4:6, 2:4] = 5 * 0.8  # the 2x2 window holding pixel (5, 2), replaced by 0
    torch.testing.assert_close(got, want)


def test_feature_ablation_on_a_grid_lights_the_cell_of_the_pixel():
    model = tiny_model(OnePixel(), (8, 8), 2)
    x = torch.full((1, 1, 8, 8), 0.8)
    got = attribute(model, x, torch.tensor([0]), params("feature_ablation", superpixels="grid", n_segments=16))
    want = torch.zeros(1, 1, 8, 8)
    want[0, 0, 4:6, 2:4] = 5 * 0.8  # the 2x2 cell of a 4x4 grid holding pixel (5, 2)
    torch.testing.assert_close(got, want)


class SharedReLU6(nn.Module):
    """``y = relu6(1.5 relu6(2x) - 1)`` per input, one ReLU6 module called twice; logits
    ``[sum(y), -sum(y)]``. For ``x = (1, 5)``: ``2x = (2, 10)``, ``relu6 = (2, 6)``, ``y = (2, 6)``."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU6()
        self.flat = nn.Flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(1.5 * self.act(2 * self.flat(x)) - 1).sum(1)
        return torch.stack([y, -y], 1)


def test_deeplift_applies_the_rescale_rule_to_a_reused_relu6():
    """With baseline 0 every input is its own path, so DeepLift's attribution is that input's
    change of output: (2, 6). The plain gradient x input (what Captum computes when it does
    not know ReLU6) is (3, 0): 1.5 * 2 for the first input, 0 for the saturated second."""
    model = tiny_model(SharedReLU6(), (1, 2), 2)
    x = torch.tensor([[[[1.0, 5.0]]]])
    got = attribute(model, x, torch.tensor([0]), params("deeplift"))
    torch.testing.assert_close(got.flatten(), torch.tensor([2.0, 6.0]))
    plain = attribute(model, x, torch.tensor([0]), params("input_x_gradient"))
    torch.testing.assert_close(plain.flatten(), torch.tensor([3.0, 0.0]))
    assert_no_hooks(model.module)


def test_guided_backprop_blocks_negative_gradients_through_relu6():
    """Class 1's logit is -sum(y): its gradient is negative everywhere, and guided backprop
    passes only positive gradients through (Springenberg et al.), so its map is 0; the plain
    gradient is -3 for the first input."""
    model = tiny_model(SharedReLU6(), (1, 2), 2)
    x = torch.tensor([[[[1.0, 5.0]]]])
    assert attribute(model, x, torch.tensor([1]), params("guided_backprop")).abs().max() == 0
    grad = attribute(model, x, torch.tensor([1]), params("saliency", abs=False))
    torch.testing.assert_close(grad.flatten(), torch.tensor([-3.0, 0.0]))


def test_lrp_names_the_layer_it_has_no_rule_for():
    model = tiny_model(nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.SiLU(), nn.Linear(3, 2)), (2, 2), 2)
    with pytest.raises(UnsupportedMethod, match=r"'2' \(SiLU\)"):
        attribute(model, torch.rand(1, 1, 2, 2), torch.tensor([0]), params("lrp"))
    with pytest.raises(UnsupportedMethod, match="SiLU"):
        attribute(model, torch.rand(1, 1, 2, 2), torch.tensor([0]), params("deeplift"))
    assert_no_hooks(model.module)


def test_top_regions_share_of_positive_mass():
    m = np.zeros((8, 8), np.float32)
    m[0:4, 4:8] = 3.0  # cell (0, 1) of a 2x2 grid
    m[4:8, 0:4] = 1.0
    m[4:8, 4:8] = -5.0  # negative mass is not counted
    regions = top_regions(m, grid=2, k=2)
    assert regions[0] == {"row": 0, "col": 1, "box": [0, 4, 4, 8], "share": pytest.approx(0.75)}
    assert regions[1]["share"] == pytest.approx(0.25) and top_regions(-m * 0, 2, 2) == []


def test_superpixel_masks_are_consecutive_feature_ids(chelsea):
    x = torch.from_numpy(chelsea[:64, :96].transpose(2, 0, 1) / 255.0).float()[None]
    for kind in ("grid", "slic"):
        mask = superpixel_mask(x, METHODS["lime"](method="lime", superpixels=kind, n_segments=16))
        ids = mask.unique()
        assert mask.shape == (1, 1, 64, 96) and ids.tolist() == list(range(len(ids)))
        assert 8 <= len(ids) <= 32
    with pytest.raises(BadParams, match="single superpixel"):
        superpixel_mask(torch.rand(1, 3, 32, 32), METHODS["lime"](method="lime"))  # noise: SLIC merges all


def test_lime_similarity_and_sample_images_equal_captums_per_sample_computation(chelsea):
    """LIME's kernel from per-superpixel sums equals Captum's cosine kernel over the whole
    input, and a batch of samples' images equals Captum's ``m · x + (1 − m) · baseline``."""
    from captum.attr._core.lime import default_from_interp_rep_transform, get_exp_kernel_similarity_function

    from workers.explain.attribution import _CosineKernel, _SampleImages

    x = torch.from_numpy(chelsea[:64, :96].transpose(2, 0, 1) / 255.0).float()[None] * 4 - 2
    base = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) - 0.5
    mask = superpixel_mask(x, METHODS["lime"](method="lime", superpixels="grid", n_segments=16))
    samples = torch.bernoulli(torch.full((6, 16), 0.5), generator=torch.Generator().manual_seed(1)).long()
    samples[0], samples[1] = 0, 1  # the baseline alone, and the image itself
    ours = _CosineKernel(x, base, mask, 0.75)
    want = get_exp_kernel_similarity_function("cosine", 0.75)
    images = _SampleImages(lambda b: b, x, base, mask)(samples)
    for i, sample in enumerate(samples):
        image = default_from_interp_rep_transform(sample[None], x, feature_mask=mask, baselines=base)
        torch.testing.assert_close(images[i : i + 1], image, rtol=0, atol=0)
        assert ours(x, sample[None], sample[None]) == pytest.approx(want(x, image, sample[None]), rel=1e-5, abs=1e-6)
    assert ours(x, samples[1:2], samples[1:2]) == pytest.approx(1.0)


# --- the params schema --------------------------------------------------------------------------


def test_params_validate_to_the_method_model_and_publish_a_clean_schema():
    p = AttributionParams.model_validate({"method": "noise_tunnel", "target": 3, "nt_type": "vargrad"})
    assert type(p).__name__ == "NoiseTunnelMethod" and p.target == 3 and p.nt_samples == 10
    for bad in ({"method": "nope"}, {"method": "occlusion", "windw": 3}, {"method": "lime", "n_samples": 1}):
        with pytest.raises(ValueError):
            AttributionParams.model_validate(bad)
    schema = AttributionParams.model_json_schema()
    assert set(schema["discriminator"]["mapping"]) == set(METHODS) and len(METHODS) == 17
    json.dumps(schema)  # plain JSON, defaults included
    ig = schema["$defs"]["IntegratedGradientsMethod"]["properties"]
    assert ig["n_steps"]["default"] == 50 and ig["baseline"]["default"] == "zero"
    compare = CompareParams.model_json_schema()
    assert len(compare["properties"]["methods"]["default"]) == 8
    assert OcclusionMapParams.model_json_schema()["properties"]["fill"]["default"] == "grey"
    with pytest.raises(ValueError, match="on the compare job"):
        CompareParams.model_validate({"methods": [{"method": "saliency", "target": 1}]})


def test_saliency_kind_and_method_share_fields_and_defaults():
    kind, method = SaliencyParams.model_fields, SaliencyMethod.model_fields
    for name, field in kind.items():
        assert method[name].default == field.default, name


def test_checks_before_queueing_use_the_manifest(models_dir):
    from schemas.manifests import read_entry

    eff = read_entry(models_dir / "efficientnet-lite0").manifest
    with pytest.raises(UnsupportedMethod, match="LRP has no rule for layer '_conv_stem.static_padding'"):
        check_supported(params("lrp"), eff)
    with pytest.raises(BadParams, match="no layer 'nope'"):
        check_supported(params("gradcam", layer="nope"), eff)
    for ok in ("deeplift", "guided_backprop", "gradcam", "occlusion"):
        check_supported(params(ok), eff)
    digits = read_entry(models_dir / "digits-cnn").manifest
    check_supported(params("lrp"), digits)
    silu = eff.model_copy(update={"module_types": {"act": "SiLU", "fc": "Linear"}})
    with pytest.raises(UnsupportedMethod, match="'act' \\(SiLU\\)"):
        check_supported(params("guided_backprop"), silu)
    with pytest.raises(UnsupportedMethod):
        CompareParams.check_model(CompareParams(methods=[params("lrp")]), eff)
    CompareParams.check_model(CompareParams(), eff)  # LRP becomes an error row, the rest run


# --- every method through the same checks on digits-cnn -------------------------------------------

FAST = {"n_steps": 4, "nt_samples": 2, "n_samples": 4, "n_segments": 4, "superpixels": "grid", "window": 4, "stride": 2}


def fast_params(method: str, **extra: Any) -> Any:
    fields = METHODS[method].model_fields
    return params(method, **{k: v for k, v in FAST.items() if k in fields}, **extra)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_on_digits(model_cache, method):
    """Shape, finiteness, not all zero, same output twice with a seed, no hooks left."""
    model = model_cache.get("digits-cnn")
    x = digits_batch(3)
    t = model.forward(x).argmax(1)
    p = fast_params(method, batch_size=2)
    first = attribute(model, x, t, p)
    assert first.shape == x.shape and first.dtype == torch.float32
    assert torch.isfinite(first).all() and first.abs().sum() > 0
    torch.testing.assert_close(attribute(model, x, t, p), first, rtol=0, atol=0)
    assert_no_hooks(model.module)


@pytest.mark.parametrize("method", ["occlusion", "kernel_shap", "integrated_gradients"])
def test_forward_only_methods_leave_the_cores_to_onnx_runtime(model_cache, method):
    """On the CPU ONNX Runtime engine, torch runs on one thread while a forward-only method
    builds its batches (``LoadedModel.forward_only``); gradient methods keep every thread,
    and the setting is restored afterwards."""
    import dataclasses

    model = model_cache.get("digits-cnn")
    assert model.engine_name == "onnxruntime"
    seen: list[int] = []

    def forward(b: torch.Tensor) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return model.forward(b)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = digits_batch(1)
        attribute(dataclasses.replace(model, forward=forward), x, model.forward(x).argmax(1), fast_params(method))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    if method == "integrated_gradients":
        assert not seen, "gradient methods evaluate the eager module"
    else:
        assert seen and set(seen) == {1}


def test_run_writes_the_artifacts_and_summary(model_cache):
    model = model_cache.get("digits-cnn")
    digits = (digits_batch(2)[:, 0].numpy() * 255).astype(np.uint8)
    inputs = inputs_for(model, [np.stack([d] * 3, -1) for d in digits])
    p = fast_params("integrated_gradients", sensitivity_max={"n_perturb_samples": 2}, infidelity={})
    result = run(model, inputs, p, lambda done, total, stage: None)
    names = {a.name: a for a in result.artifacts}
    assert set(names) == {
        f"{i}-{n}"
        for i in range(2)
        for n in ("attribution.npy", "map.npy", "heatmap.png", "overlay.png", "input.png")
    }
    raw = np.load(io.BytesIO(names["1-attribution.npy"].data))
    assert raw.shape == (1, 8, 8) and np.load(io.BytesIO(names["1-map.npy"].data)).shape == (8, 8)
    assert Image.open(io.BytesIO(names["0-overlay.png"].data)).size[0] >= 224
    # the input at model size, as large as the overlay: each of the 8x8 pixels a 28x28 block
    shown = np.asarray(Image.open(io.BytesIO(names["1-input.png"].data)))
    assert shown.shape[:2] == Image.open(io.BytesIO(names["1-overlay.png"].data)).size[::-1] == (224, 224)
    assert np.array_equal(shown[::28, ::28], inputs.display[1])
    assert np.array_equal(shown[27::28, 27::28], inputs.display[1])
    s = result.summary
    assert s["method"] == "integrated_gradients" and s["runtime_s"] > 0
    img = s["images"][1]
    assert img["target"] == int(inputs.targets[1]) and img["label"] == str(img["target"])
    assert img["probability"] == pytest.approx(float(inputs.probs[1].max()))
    assert img["min"] <= img["mean"] <= img["max"] and len(img["top_regions"]) == 5
    assert img["attribution"]["sum"] == pytest.approx(float(raw.sum()), rel=1e-4)
    assert img["sensitivity_max"] >= 0 and img["infidelity"] >= 0
    json.dumps(s)


@pytest.mark.parametrize("method", ["integrated_gradients", "gradcam", "occlusion", "deeplift"])
def test_cancel_propagates_and_leaves_no_hooks(model_cache, method):
    """A progress callback raising JobCanceled (a canceled job) stops the method at the next
    chunk; Captum's hooks come off on the way out."""
    from workers.explain.base import JobCanceled

    model = model_cache.get("digits-cnn")
    x = digits_batch(3)
    calls = []

    def cancel_second(done: int, total: int, stage: str) -> None:
        calls.append(done)
        if len(calls) == 2:
            raise JobCanceled("job")

    with pytest.raises(JobCanceled):
        attribute(model, x, model.forward(x).argmax(1), fast_params(method, batch_size=1), cancel_second)
    assert len(calls) == 2
    assert_no_hooks(model.module)
