"""Kind ``signal`` (Model Inspector §4.3): map mass, signal/context fills, RFS, Top-K erasing."""

import io

import numpy as np
import pytest
import torch
from captum.attr import LayerAttribution, LayerGradCam
from PIL import Image
from torch import nn

from schemas.inspector import SignalParams
from schemas.stored_images import encode_rgb
from tests.helpers import digit_png, png
from tests.workers.test_attribution import tiny_model
from tests.workers.test_robustness import tiny_inputs
from workers.explain import signal
from workers.explain.base import no_progress
from workers.explain.maps import gradcam_maps
from workers.pipeline import JobContext, load_inputs


class LeftHalf(nn.Module):
    """Logits ``[10 m, -10 m]`` of ``m``, the mean of the left half of the image minus 0.5:
    the right half (the context) cannot matter."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x[:, :, :, : x.shape[3] // 2].mean(dim=(1, 2, 3)) - 0.5
        return torch.stack([m, -m], 1) * 10


def test_a_model_that_reads_only_the_signal() -> None:
    """Known answer: the context never changes the prediction; every change of the signal does."""
    model = tiny_model(LeftHalf(), (8, 8), 2)
    x = (torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 255).round() / 255
    inputs = tiny_inputs(model, x)
    p0 = float(inputs.probs[0, int(inputs.targets[0])])
    params = SignalParams(region={"rect": [0, 0, 4, 8]}, attribution={"method": "saliency"}, rfs_samples=4)
    image = signal.run(model, inputs, params, no_progress).summary["images"][0]
    assert image["region"] == {"pixels": 32, "fraction": 0.5}
    for f in image["fills"]:
        assert f["signal_only"]["target_probability"] == pytest.approx(p0, abs=1e-6)
    assert any(abs(f["context_only"]["target_probability"] - p0) > 1e-3 for f in image["fills"])
    rfs = image["rfs"]
    assert rfs["p_background_noise"] == pytest.approx(p0, abs=1e-6)
    p_fg, p_bg = rfs["p_foreground_noise"], rfs["p_background_noise"]
    p = (p_fg + p_bg) / 2
    assert rfs["rfs"] == pytest.approx((p_bg - p_fg) / (2 * min(p, 1 - p)))
    # saliency of the model is |10/32| on the left half and 0 on the right: all mass inside
    assert image["map"]["positive_share_inside"] == pytest.approx(1.0) and image["map"]["pointing_game"]
    assert image["map"]["density_ratio"] is None  # no mass outside
    # erasing 50% of the pixels by the map (all on the left) moves p further than the right half's
    erase = {e["percent"]: e for e in image["top_k_erasing"]}
    assert [e["percent"] for e in image["top_k_erasing"]] == [5.0, 10.0, 20.0, 50.0]
    assert abs(erase[50.0]["top"] - p0) >= abs(erase[50.0]["random"] - p0) - 1e-6


def test_erase_masks_count_pixels_exactly() -> None:
    m = torch.arange(100.0).reshape(10, 10)
    masks = signal.erase_masks(m, [5.0, 20.0], draws=3, gen=np.random.default_rng(0))
    assert masks.shape == (8, 10, 10)
    assert masks.flatten(1).sum(1).tolist() == [5, 5, 5, 5, 20, 20, 20, 20]
    assert masks[0].flatten()[95:].all() and masks[4].flatten()[80:].all()


def test_gradcam_map_is_captums(model_cache) -> None:
    """The map the kinds use is Captum's LayerGradCam at the manifest's layer, upsampled."""
    model = model_cache.get("digits-cnn")
    data, label = digit_png(7)
    inputs = load_inputs(model, [encode_rgb(Image.open(io.BytesIO(data)).convert("RGB"))], SignalParams())
    ours = gradcam_maps(model, inputs.images, inputs.targets)
    layer = model.module.get_submodule(model.manifest.gradcam_layer)
    cam = LayerGradCam(model.module, layer).attribute(inputs.images, target=inputs.targets, relu_attributions=True)
    ref = LayerAttribution.interpolate(cam, (8, 8), interpolate_mode="bilinear")[:, 0]
    np.testing.assert_allclose(ours, ref.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_digits_signal_mask_upload_equals_the_rect(model_cache) -> None:
    model = model_cache.get("digits-cnn")
    data, _ = digit_png(2)
    inputs = load_inputs(model, [encode_rgb(Image.open(io.BytesIO(data)).convert("RGB"))], SignalParams())
    by_rect = signal.run(model, inputs, SignalParams(region={"rect": [2, 1, 6, 7]}), no_progress)
    mask = np.zeros((8, 8), np.uint8)
    mask[1:7, 2:6] = 255
    context = JobContext(None, None, {"signal_mask": png(mask)})  # type: ignore[arg-type]
    by_mask = signal.run(model, inputs, SignalParams(), no_progress, context=context)
    assert {a.name: a.data for a in by_rect.artifacts} == {a.name: a.data for a in by_mask.artifacts}
    names = {a.name for a in by_rect.artifacts}
    assert {"0-signal.png", "0-map.npy", "0-overlay.png", "0-fills.png", "0-erasing.png", "signal.csv"} <= names
    assert by_rect.summary["evaluations"] == {"forward": 2 * 8 + 2 * 8 + 4 * 5, "backward": 1}


def test_chelsea_box_holds_more_gradcam_per_pixel(model_cache, chelsea) -> None:
    """The cat's face (eyes, nose) in pixels of the photo: the Grad-CAM of efficientnet-lite0
    puts more mass per pixel inside it than outside (the whole photo: ``resize='stretch'``)."""
    model = model_cache.get("efficientnet-lite0")
    params = SignalParams(
        region={"rect": [110, 60, 350, 290]}, rfs_samples=2, random_draws=1, fills=["grass"], resize="stretch"
    )
    inputs = load_inputs(model, [encode_rgb(Image.fromarray(chelsea))], params)
    image = signal.run(model, inputs, params, no_progress).summary["images"][0]
    assert image["target"] == 285
    assert image["map"]["density_ratio"] > 1.2 and image["map"]["pointing_game"]
    assert image["fills"][0]["signal_only"]["predicted"] in range(281, 288)
