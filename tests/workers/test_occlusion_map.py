"""The ``occlusion_map`` kind (Zeiler and Fergus 2014): a hand-built model where the answer is
known, the geometry, and a real run on ``digits-cnn`` checked against occluding by hand."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from schemas.attribution import OcclusionMapParams
from tests.workers.test_attribution import OnePixel, digits_batch, inputs_for, tiny_model
from workers.explain.occlusion_map import geometry, occlusion_grid, run


def test_one_pixel_model_changes_only_where_the_occluder_covers_the_pixel():
    """Class 0's logit is 5 x[5, 2]: with a 2x2 occluder at stride 2 exactly one of the 16
    positions, the one at (4, 2), changes the probability, to softmax(5 * fill)."""
    model = tiny_model(OnePixel(), (8, 8), 2)
    image = torch.full((1, 8, 8), 0.8)
    p = OcclusionMapParams(occluder=2, stride=2, fill="black")
    grid = occlusion_grid(model, image, 0, p)
    p0 = torch.tensor([4.0, 0.0]).softmax(0)[0].item()
    want = np.full((4, 4), p0, np.float32)
    want[2, 1] = 0.5  # black = 0: both logits 0
    np.testing.assert_allclose(grid.probability, want, rtol=1e-6)
    assert (grid.top_class == 0).all() and grid.top_probability[2, 1] == pytest.approx(0.5)  # a tie: class 0
    drop = grid.drop_map(p0, (8, 8))
    assert np.argwhere(drop > 0).tolist() == [[4, 2], [4, 3], [5, 2], [5, 3]]


def test_geometry_and_fill():
    assert geometry(OcclusionMapParams(), 224, 224) == (32, 16, 13, 13)  # 1/7 of the side, half stride
    assert geometry(OcclusionMapParams(occluder=3, stride=2), 8, 8) == (3, 2, 3, 3)
    model = tiny_model(OnePixel(), (8, 8), 2)
    image = torch.full((1, 8, 8), 0.8)
    for fill, value in (("grey", 0.5), ("mean", 0.8)):
        grid = occlusion_grid(model, image, 0, OcclusionMapParams(occluder=8, fill=fill))
        assert grid.probability[0, 0] == pytest.approx(torch.tensor([5 * value, 0.0]).softmax(0)[0].item(), rel=1e-6)


def test_run_on_digits_matches_occluding_by_hand(model_cache):
    model = model_cache.get("digits-cnn")
    digits = (digits_batch(2)[:, 0].numpy() * 255).astype(np.uint8)
    inputs = inputs_for(model, [np.stack([d] * 3, -1) for d in digits])
    p = OcclusionMapParams(occluder=3, stride=1, fill="grey", batch_size=5)
    result = run(model, inputs, p, lambda done, total, stage: None)
    names = {a.name: a for a in result.artifacts}
    prob = np.load(io.BytesIO(names["1-probability.npy"].data))
    assert prob.shape == (6, 6) and np.load(io.BytesIO(names["1-drop.npy"].data)).shape == (8, 8)
    # position (2, 4) by hand: a grey 3x3 square at rows 2..4, columns 4..6
    x = inputs.images[1].clone()
    x[:, 2:5, 4:7] = 0.5
    t = int(inputs.targets[1])
    assert prob[2, 4] == pytest.approx(float(model.module(x[None]).softmax(1)[0, t]), rel=1e-4)
    s = result.summary
    assert s["grid"] == [6, 6] and s["evaluations"] == 72 and s["occluder"] == 3
    img = s["images"][1]
    assert img["min_probability"] == pytest.approx(float(prob.min()), rel=1e-6)
    assert img["probability"] == pytest.approx(float(inputs.probs[1, t]))
    assert {"0-heatmap.png", "0-overlay.png", "0-input.png", "0-top_class.npy", "0-top_probability.npy"} <= set(names)
    shown = np.asarray(Image.open(io.BytesIO(names["1-input.png"].data)))
    assert shown.shape[:2] == Image.open(io.BytesIO(names["1-overlay.png"].data)).size[::-1]
    assert np.array_equal(shown[:: shown.shape[0] // 8, :: shown.shape[1] // 8], inputs.display[1])
