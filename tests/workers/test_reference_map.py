"""Kind ``reference_map`` (occlusion paper, Exp. 1): a map's agreement with a reference."""

import io

import numpy as np
import pytest
from PIL import Image

from schemas.errors import BadParams
from schemas.inspector import ReferenceMapParams
from schemas.stored_images import encode_rgb
from tests.helpers import digit_png, png
from workers.explain import reference_map
from workers.explain.base import no_progress
from workers.explain.maps import gradcam_maps
from workers.explain.occlusion_map import occlusion_grid
from workers.pipeline import JobContext, load_inputs


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def ctx(**files: bytes) -> JobContext:
    return JobContext(None, None, files)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def digit(model_cache):
    model = model_cache.get("digits-cnn")
    data, _ = digit_png(1)
    return model, load_inputs(model, [encode_rgb(Image.open(io.BytesIO(data)).convert("RGB"))], ReferenceMapParams())


def test_a_map_against_itself_and_its_negation(digit) -> None:
    model, inputs = digit
    m = np.random.default_rng(0).random((8, 8)).astype(np.float32)
    params = ReferenceMapParams(source="uploaded", reference_space="model")
    same = reference_map.run(model, inputs, params, no_progress, ctx(reference=npy(m), attribution=npy(m)))
    s = same.summary["scores"]
    assert s["pearson"] == pytest.approx(1.0) and s["spearman"] == pytest.approx(1.0)
    assert s["iou_top10"] == 1.0 and s["iou_top20"] == 1.0 and s["auc"] == 1.0 and s["pointing_game"]
    neg = reference_map.run(model, inputs, params, no_progress, ctx(reference=npy(m), attribution=npy(-m)))
    n = neg.summary["scores"]
    assert n["pearson"] == pytest.approx(-1.0) and n["spearman"] == pytest.approx(-1.0)
    assert n["iou_top10"] == 0.0 and n["auc"] == 0.0 and not n["pointing_game"]
    names = {a.name for a in same.artifacts}
    assert names == {"0-side_by_side.png", "0-reference.npy", "0-map.npy"}


def test_gradcam_against_its_own_map_as_a_grey_png_of_the_image(digit) -> None:
    """The Grad-CAM map saved as a grey PNG over the uploaded (8x8) image: rank agreement is
    exact up to the PNG's 8-bit rounding."""
    model, inputs = digit
    cam = gradcam_maps(model, inputs.images, inputs.targets)[0]
    grey = (cam / cam.max() * 255).round().astype(np.uint8)
    result = reference_map.run(model, inputs, ReferenceMapParams(), no_progress, ctx(reference=png(grey)))
    s = result.summary["scores"]
    assert s["pearson"] > 0.99 and s["spearman"] > 0.98 and s["pointing_game"]
    assert result.summary["method"] == "gradcam" and result.summary["reference_shape"] == [8, 8]


def test_occlusion_source_is_the_drop_map(digit) -> None:
    from schemas.attribution import OcclusionMapParams

    model, inputs = digit
    target = int(inputs.targets[0])
    grid = occlusion_grid(model, inputs.images[0], target, OcclusionMapParams(occluder=2, stride=1))
    drop = grid.drop_map(float(inputs.probs[0, target]), (8, 8))
    params = ReferenceMapParams(source="occlusion", occluder=2, stride=1, reference_space="model")
    result = reference_map.run(model, inputs, params, no_progress, ctx(reference=npy(drop)))
    assert result.summary["scores"]["pearson"] == pytest.approx(1.0, abs=1e-6)


def test_a_click_grid_of_another_size(digit) -> None:
    model, inputs = digit
    clicks = np.zeros((20, 20))
    clicks[5:15, 5:15] = np.arange(100).reshape(10, 10)
    params = ReferenceMapParams(absolute=True)
    result = reference_map.run(model, inputs, params, no_progress, ctx(reference=npy(clicks)))
    ref = np.load(io.BytesIO({a.name: a.data for a in result.artifacts}["0-reference.npy"]))
    assert ref.shape == (8, 8) and ref[0, 0] == 0 and ref[5, 5] > ref[3, 3]
    assert -1 <= result.summary["scores"]["pearson"] <= 1 and 0 <= result.summary["scores"]["auc"] <= 1


def test_bad_references(digit) -> None:
    model, inputs = digit
    with pytest.raises(BadParams) as e:
        reference_map.run(model, inputs, ReferenceMapParams(), no_progress, ctx(reference=npy(np.full((4, 4), np.inf))))
    assert e.value.details["field"] == "reference"
    with pytest.raises(BadParams):
        reference_map.run(model, inputs, ReferenceMapParams(reference_space="model"), no_progress,
                          ctx(reference=npy(np.ones((4, 4)))))  # fmt: skip
    with pytest.raises(BadParams):
        reference_map.run(model, inputs, ReferenceMapParams(), no_progress, ctx())
