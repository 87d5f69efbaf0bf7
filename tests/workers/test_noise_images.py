"""The ``noise_images`` kind: Perlin noise by hand and per seed, DeepFool's L-inf step on a
linear model, and a small universal perturbation on digits-cnn."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from schemas.errors import BadParams
from schemas.inspector import NoiseImagesParams
from tests.workers.test_adversarial import linear_model
from workers.explain import noise_images as ni
from workers.explain.base import no_progress


def test_one_octave_of_gradient_noise_by_hand():
    """Every gradient pointing along +x: the noise is ``f - fade(f)`` of the position ``f`` in
    the cell along x (Perlin 2002's fade ``6f^5 - 15f^4 + 10f^3``), whatever y; at period 2
    the pixel centres sit at f = 0.25 and 0.75."""
    angles = torch.zeros(1, 4, 5)
    n = ni.gradient_noise(angles, 2.0, 5, 7)
    fade = lambda f: 6 * f**5 - 15 * f**4 + 10 * f**3  # noqa: E731
    row = [0.25 - fade(0.25), 0.75 - fade(0.75)] * 3 + [0.25 - fade(0.25)]
    torch.testing.assert_close(n[0], torch.tensor([row] * 5), rtol=0, atol=1e-6)
    # gradients along +y: the same along y
    n = ni.gradient_noise(torch.full((1, 4, 5), math.pi / 2), 2.0, 5, 7)
    torch.testing.assert_close(n[0, :, 0], torch.tensor(row[:5]), rtol=0, atol=1e-6)
    assert float(n[0].std(1).max()) < 1e-6


def test_perlin_images_are_reproducible_per_seed_and_independent_of_count():
    p = NoiseImagesParams(count=4, seed=7, scale=8, octaves=3)
    a = ni.perlin_images(p, 3, (32, 24), torch.device("cpu"))
    assert a.shape == (4, 3, 32, 24) and float(a.min()) == 0 and float(a.max()) == 1
    assert torch.equal(a[:, 0], a[:, 2])  # grey
    b = ni.perlin_images(p.model_copy(update={"count": 2}), 3, (32, 24), torch.device("cpu"))
    assert torch.equal(a[:2], b)
    c = ni.perlin_images(p.model_copy(update={"seed": 8}), 3, (32, 24), torch.device("cpu"))
    assert not torch.equal(a, c)
    colour = ni.perlin_images(p.model_copy(update={"color": True, "sine_frequency": 2.0}), 3, (32, 24),
                              torch.device("cpu"))  # fmt: skip
    assert not torch.equal(colour[:, 0], colour[:, 1])
    assert float(colour.min()) >= 0 and float(colour.max()) <= 1
    # neighbouring pixels of smooth noise are close: for white noise the mean neighbour
    # difference is about 1.4 times the mean absolute deviation (measured here: 0.5)
    assert float((a[:, :, 1:] - a[:, :, :-1]).abs().mean()) < 0.75 * float((a - a.mean()).abs().mean())


def test_deepfool_on_a_linear_model_steps_exactly_across_the_boundary():
    """Two classes, ``f = W u``: DeepFool's L-inf step is ``(|f_1 - f_0| / ||W_1 - W_0||_1)
    sign(W_1 - W_0)`` (its section 3.2, plus its 1e-4 margin), times ``1 + overshoot``; it
    crosses in one iteration (the second only sees the new class: 2 x 2 evaluations)."""
    model = linear_model()
    u = torch.tensor([[[0.6, 0.2], [0.5, 0.4]]])
    w = model.module[1].weight
    f = w @ u.flatten()
    k0 = int(f.argmax())
    wd, fd = w[1 - k0] - w[k0], f[1 - k0] - f[k0]
    r, evals = ni.deepfool_linf(model, u, candidates=2, overshoot=0.02, max_iter=50)
    want = 1.02 * (fd.abs() + 1e-4) / wd.abs().sum() * wd.sign()
    torch.testing.assert_close(r.flatten(), want, rtol=1e-5, atol=1e-7)
    assert int((w @ (u + r).flatten()).argmax()) != k0 and evals == 4


def test_universal_perturbation_on_digits(model_cache):
    model = model_cache.get("digits-cnn")
    p = NoiseImagesParams(noise="uap", dataset="test", limit=24, xi=64, max_passes=1, seed=1)
    result = ni.run(model, None, p, no_progress)
    s = result.summary["uap"]
    assert s["fit_images"] == 12 and s["heldout_images"] == 12 and s["passes"] == 1
    assert 0 < s["linf"] <= 64 + 1e-3 and s["deepfool_calls"] >= 1
    assert 0 <= s["fooling_rate_heldout"] <= 1 and 0 <= s["fooling_rate_fit"] <= 1
    names = {a.name: a.data for a in result.artifacts}
    v = np.load(io.BytesIO(names["uap.npy"]))
    assert v.shape == (1, 8, 8) and np.abs(v).max() <= 64 / 255 + 1e-6
    # the noise image is the perturbation scaled to [0, 1] around grey
    shown = np.asarray(Image.open(io.BytesIO(names["0-noise.png"])), np.float32) / 255
    np.testing.assert_allclose(shown, 0.5 + v[0] / (2 * np.abs(v).max()), atol=0.51 / 255)
    top = result.summary["images"][0]["top5"]
    assert len(top) == 5 and all(a["probability"] >= b["probability"] for a, b in zip(top, top[1:], strict=False))
    print("digits uap (xi 64, 12 fitting images, 1 pass): held-out fooling rate", s["fooling_rate_heldout"])


def test_perlin_kind_on_digits(model_cache):
    model = model_cache.get("digits-cnn")
    result = ni.run(model, None, NoiseImagesParams(count=2, seed=5), no_progress)
    images = result.summary["images"]
    assert [i["index"] for i in images] == [0, 1]
    for img in images:
        assert sum(t["probability"] for t in img["top5"]) <= 1 + 1e-6
        assert img["gradcam"]["class"] == img["top5"][0]["index"]
    names = {a.name: a.data for a in result.artifacts}
    assert {"0-noise.png", "1-gradcam.npy", "1-overlay.png", "noise.png", "noise.csv"} <= set(names)
    assert np.load(io.BytesIO(names["0-gradcam.npy"])).shape == (8, 8)
    assert len(names["noise.csv"].decode().splitlines()) == 1 + 2 * 5


def test_bad_params():
    with pytest.raises(ValidationError, match="dataset is required"):
        NoiseImagesParams(noise="uap")
    for bad in ({"xi": 0}, {"xi": 300}, {"count": 0}, {"holdout": 1}):
        with pytest.raises(ValidationError):
            NoiseImagesParams.model_validate({"noise": "uap", "dataset": "test", **bad})
    with pytest.raises(BadParams, match="takes no image"):
        NoiseImagesParams.check_inputs(NoiseImagesParams(), 1)
    with pytest.raises(BadParams, match="needs images"):
        NoiseImagesParams.check_inputs(NoiseImagesParams(noise="uap", dataset="uploaded"), 0)
