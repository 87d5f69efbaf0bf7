"""U Analysis (Algorithm 1 of papers/u-analysis-and-model-inspector): a model with a U by
construction, a monotone model without one, a plain one-image-at-a-time reference loop on
digits-cnn, seeds, border windows and the errors a client can fix."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from torch import nn

from schemas.errors import BadParams
from schemas.models import ModelManifest, Preprocessing
from schemas.u_analysis import NoiseParams, UAnalysisParams
from workers.explain import u_analysis as ua
from workers.explain.base import Inputs, LoadedModel, no_progress

# ---------------------------------------------------------------------------------------------
# helpers


def loaded(module: nn.Module, size: int, labels: list[str], batch_size: int = 3) -> LoadedModel:
    """A hand-built model as the worker would hold it (grey input, pixel values as is)."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(x)

    manifest = ModelManifest(
        id="hand-built",
        architecture="torchscript",
        weights="none",
        preprocessing=Preprocessing(size=(size, size), mode="L", mean=[0.0], std=[1.0]),
        labels=labels,
    )
    return LoadedModel(manifest, "v", module, torch.device("cpu"), forward, batch_size=batch_size)


def inputs_of(model: LoadedModel, x: torch.Tensor, targets: list[int]) -> Inputs:
    display = [np.repeat((xi[0].clamp(0, 1).numpy() * 255).astype(np.uint8)[:, :, None], 3, 2) for xi in x]
    return Inputs(x, display, torch.tensor(targets), model.forward(x).softmax(1))


def linear(weights: dict[int, torch.Tensor], bias: list[float], size: int) -> nn.Module:
    """``logits[k] = <weights[k], x> + bias[k]`` on a ``(1, size, size)`` input."""
    lin = nn.Linear(size * size, len(bias))
    with torch.no_grad():
        lin.weight.zero_()
        for k, w in weights.items():
            lin.weight[k] = w.flatten()
        lin.bias.copy_(torch.tensor(bias))
    return nn.Sequential(nn.Flatten(), lin)


def quadrant_masks() -> list[torch.Tensor]:
    """The four 2x2 regions of a 4x4 image in raster order: A (top left), B, C, D."""
    masks = []
    for top in (0, 2):
        for left in (0, 2):
            m = torch.zeros(4, 4)
            m[top : top + 2, left : left + 2] = 1
            masks.append(m)
    return masks


def u_model() -> LoadedModel:
    """Class 1 exactly when patch B is present without patch A (zeros = removed):
    ``logit_1 - logit_0 = 2 (mean B - mean A) - 1``; on an all-ones image the model says 0,
    without A it says 1, without A and B it says 0 again."""
    a, b, _, _ = quadrant_masks()
    return loaded(linear({1: 2 * (b - a) / 4}, [0.0, -1.0], 4), 4, ["y", "other"])


def png_size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


# ---------------------------------------------------------------------------------------------
# a U by construction, and none on a monotone model


def test_finds_exactly_the_u_built_into_the_model() -> None:
    model = u_model()
    x = torch.ones(1, 1, 4, 4)
    # importance A > B > C > D: decreasing order removes A, then B, then C, D
    attribution = torch.stack([v * m for v, m in zip([4.0, 3.0, 2.0, 1.0], quadrant_masks(), strict=True)]).sum(0)
    params = UAnalysisParams(window_px=2, order="decreasing", noise="zeros")
    result = ua.run(model, inputs_of(model, x, [0]), params, no_progress, attribution=attribution.numpy())

    img = result.summary["images"][0]
    assert img["order"] == [0, 1, 2, 3]
    assert img["predicted"] == [0, 1, 0, 0, 0]
    assert img["triples"] == [
        {
            "left": 0,
            "middle": 1,
            "right": 2,
            "middles": [1],
            "removed": [0, 1],
            "suppressors": [1],  # B: present in x_1, absent from x_2
            "suppressor_boxes": [[0, 2, 2, 4]],
        }
    ]
    # the curve is the model's own probability of class 0 on each x_i
    a, b, _, _ = quadrant_masks()
    seq = [x[0], x[0] * (1 - a), x[0] * (1 - a - b)]
    expected = [float(model.module(s[None]).softmax(1)[0, 0]) for s in seq]
    assert img["target_probability"][:3] == pytest.approx(expected, abs=1e-6)
    names = {a.name for a in result.artifacts}
    assert names == {"0-curve.png", "0-regions.png", "0-regions.npy", "0-strip.png"}
    for art in result.artifacts:
        if art.media_type == "image/png":
            assert min(png_size(art.data)) > 50
    regions = np.load(io.BytesIO(next(a.data for a in result.artifacts if a.name == "0-regions.npy")))
    assert regions.tolist() == [[16.0, 12.0], [8.0, 4.0]]  # window sums of the uploaded map


def test_the_u_depends_on_the_order() -> None:
    model = u_model()
    x = torch.ones(1, 1, 4, 4)
    attribution = torch.stack([v * m for v, m in zip([4.0, 3.0, 2.0, 1.0], quadrant_masks(), strict=True)]).sum(0)
    # increasing: D, C, B, A; B goes before A, so the model never sees B without A
    params = UAnalysisParams(window_px=2, order="increasing", noise="zeros")
    result = ua.run(model, inputs_of(model, x, [0]), params, no_progress, attribution=attribution.numpy())
    img = result.summary["images"][0]
    assert img["order"] == [3, 2, 1, 0]
    assert img["predicted"] == [0] * 5
    assert img["triples"] == [] and "0-strip.png" not in {a.name for a in result.artifacts}


@pytest.mark.parametrize("order", ["decreasing", "increasing", "random"])
@pytest.mark.parametrize("noise", ["zeros", "dataset_mean", "constant"])
def test_a_monotone_model_has_no_u(order: str, noise: str) -> None:
    # logit_0 = mean pixel, logit_1 = 0.5: replacing pixels by values below them only lowers
    # logit_0, so once the prediction leaves class 0 it never comes back
    model = loaded(linear({0: torch.full((4, 4), 1 / 16)}, [0.0, 0.5], 4), 4, ["y", "other"])
    x = 0.6 + 0.4 * torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    attribution = torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(1)) - 0.5
    for window in (1, 2, 3):
        params = UAnalysisParams(window_px=window, order=order, noise=noise, constant=0.1, seed=window)
        results = ua.analyse(model, x, torch.zeros(4, dtype=torch.long), attribution, params, "sum")
        for r in results:
            assert r.predicted[0] == 0 and r.predicted[-1] == 1  # the prediction does change
            assert r.triples == []
            flips = np.flatnonzero(np.diff(r.predicted) != 0)
            assert len(flips) == 1


# ---------------------------------------------------------------------------------------------
# against a plain reference loop (one image at a time, no batching)


def reference_u_analysis(
    module: nn.Module,
    x: np.ndarray,
    target: int,
    attr2d: np.ndarray,
    window: int,
    order: str,
    noise: str,
    params: NoiseParams,
    index: int,
) -> tuple[list[int], list[float], list[dict]]:
    """Algorithm 1 written out as the authors' code does it, on a digits image ``x`` ``(1, 8, 8)``
    whose pixel space is the model input: predictions, target probabilities and U-triples."""
    from skimage.filters import gaussian

    h, w = x.shape[1:]
    regions = [(t, left) for t in range(0, h, window) for left in range(0, w, window)]
    imp = [float(attr2d[t : t + window, left : left + window].astype(np.float64).sum()) for t, left in regions]
    if order == "decreasing":
        seq = sorted(range(len(regions)), key=lambda r: -imp[r])
    elif order == "increasing":
        seq = sorted(range(len(regions)), key=lambda r: imp[r])
    else:
        seq = list(
            np.random.default_rng(np.random.SeedSequence([params.seed, index, 1, window])).permutation(len(regions))
        )
    noise_rng = np.random.default_rng(np.random.SeedSequence([params.seed, index, 2]))
    if noise == "zeros" or noise == "dataset_mean":
        z = np.zeros_like(x)
    elif noise == "ones":
        z = np.ones_like(x)
    elif noise == "constant":
        z = np.full_like(x, params.constant)
    elif noise == "gaussian":
        z = noise_rng.normal(params.gaussian_mean, params.gaussian_std, size=x.shape)
    elif noise == "uniform":
        z = noise_rng.random(size=x.shape)
    elif noise == "image_mean":
        z = np.full_like(x, x.mean())
    elif noise == "region_mean":
        z = np.zeros_like(x)
        for t, left in regions:
            z[:, t : t + window, left : left + window] = x[:, t : t + window, left : left + window].mean()
    elif noise == "blur":
        z = gaussian(x[0].astype(np.float64), sigma=window / 2, mode="reflect", preserve_range=True)[None]
    images = [x.copy()]
    for r in seq:
        t, left = regions[r]
        cur = images[-1].copy()
        cur[:, t : t + window, left : left + window] = z[:, t : t + window, left : left + window]
        images.append(cur)
    preds, probs = [], []
    with torch.no_grad():
        for img in images:
            p = module(torch.tensor(img, dtype=torch.float32)[None]).softmax(1)[0]
            preds.append(int(p.argmax()))
            probs.append(float(p[target]))
    correct = [i for i, p in enumerate(preds) if p == target]
    triples = []
    for i in range(len(correct) - 1):
        left, right = correct[i], correct[i + 1]
        if right - left > 1:
            triples.append(
                {
                    "left": left,
                    "right": right,
                    "middles": list(range(left + 1, right)),
                    "removed": [int(r) for r in seq[left:right]],
                    "suppressors": [int(r) for r in seq[left + 1 : right]],
                }
            )
    return preds, probs, triples


@pytest.fixture(scope="module")
def digits(model_cache) -> tuple[LoadedModel, torch.Tensor, torch.Tensor]:
    from workers.models.digits import load_split

    model = model_cache.get("digits-cnn")
    _, _, x, y = load_split()
    idx = [0, 1, 2, 3, 4, 5]
    return model, torch.from_numpy(x[idx])[:, None], torch.from_numpy(y[idx])


@pytest.fixture
def one_thread():
    """The reference loop's thousands of one-image forward passes run far faster on one
    thread when the cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


NOISES = ["zeros", "ones", "gaussian", "uniform", "image_mean", "region_mean", "dataset_mean", "blur", "constant"]


@pytest.mark.parametrize("order", ["decreasing", "increasing", "random"])
def test_matches_a_plain_reference_loop(digits, one_thread, order: str) -> None:
    model, x, y = digits
    x, y = x[:3], y[:3]
    from schemas.attribution import METHODS

    attr = ua.compute_attribution(model, x, y, METHODS["integrated_gradients"](method="integrated_gradients"))
    maps = attr.sum(1).numpy()
    n_u = 0
    for window in (2, 3):  # 3 px on 8x8: partial windows at the right and bottom border
        for noise in NOISES:
            params = UAnalysisParams(window_px=window, order=order, noise=noise, seed=7)
            results = ua.analyse(model, x, y, attr, params, "sum", first_index=10)
            for j, res in enumerate(results):
                preds, probs, triples = reference_u_analysis(
                    model.module, x[j].numpy(), int(y[j]), maps[j], window, order, noise, params, 10 + j
                )
                assert res.predicted.tolist() == preds, (window, noise, j)
                np.testing.assert_allclose(res.target_probability, probs, atol=2e-5)
                got = [{k: t[k] for k in ("left", "right", "middles", "removed", "suppressors")} for t in res.triples]
                assert got == triples
                assert all(t["middle"] in t["middles"] for t in res.triples)
                n_u += len(triples)
    assert n_u > 0  # the comparison covered U-triples, not only empty lists


# ---------------------------------------------------------------------------------------------
# seeds, batching, regions


def test_random_order_and_noise_are_reproducible_with_a_seed(digits) -> None:
    model, x, y = digits
    attr = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))

    def analyse(seed: int, images: torch.Tensor, targets: torch.Tensor, first: int = 0) -> list[ua.UResult]:
        params = UAnalysisParams(window_px=2, order="random", noise="gaussian", seed=seed)
        return ua.analyse(model, images, targets, attr[first : first + len(images)], params, "sum", first_index=first)

    a, b, c = analyse(3, x, y), analyse(3, x, y), analyse(4, x, y)
    for ra, rb, rc in zip(a, b, c, strict=True):
        assert ra.order.tolist() == rb.order.tolist()
        assert ra.predicted.tolist() == rb.predicted.tolist()
        np.testing.assert_array_equal(ra.target_probability, rb.target_probability)
        assert ra.triples == rb.triples
        assert ra.order.tolist() != rc.order.tolist()
    # an image's result does not depend on the other images of the batch, only on its number
    alone = analyse(3, x[4:5], y[4:5], first=4)[0]
    assert alone.order.tolist() == a[4].order.tolist()
    assert alone.predicted.tolist() == a[4].predicted.tolist()
    np.testing.assert_allclose(alone.target_probability, a[4].target_probability, atol=1e-5)
    space = ua.PixelSpace.of(model.manifest.preprocessing, 1)
    grid = ua.Grid(8, 8, 2)
    p3, p4 = UAnalysisParams(seed=3, noise="uniform"), UAnalysisParams(seed=4, noise="uniform")
    z3 = ua.noise_image(x[0], "uniform", p3, grid, space, 0)
    assert torch.equal(z3, ua.noise_image(x[0], "uniform", p3, grid, space, 0))
    assert not torch.equal(z3, ua.noise_image(x[0], "uniform", p4, grid, space, 0))
    assert 0 <= float(z3.min()) and float(z3.max()) <= 1


def test_border_windows_are_partial_and_cover_every_pixel_once() -> None:
    grid = ua.Grid(8, 10, 3)
    assert (grid.rows, grid.cols, grid.n) == (3, 4, 12)
    labels = grid.labels()
    assert np.bincount(labels.ravel()).tolist() == [9, 9, 9, 3, 9, 9, 9, 3, 6, 6, 6, 2]
    assert grid.box(11) == (6, 9, 8, 10)
    imp = ua.region_importance(np.ones((8, 10)), grid)
    assert imp.tolist() == np.bincount(labels.ravel()).tolist()
    # x_N holds no pixel of x
    x, z = torch.zeros(1, 8, 10), torch.ones(1, 8, 10)
    order = ua.region_order(imp, "decreasing", np.random.default_rng(0))
    last = ua.sequence_images(x, z, ua.pixel_ranks(grid, order), torch.tensor([grid.n]))
    assert torch.equal(last[0], z)


def test_noise_is_defined_in_pixel_space() -> None:
    # ImageNet-style normalisation: ones = white, dataset_mean = 0 after normalisation
    pre = Preprocessing(size=(4, 4), mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    space = ua.PixelSpace.of(pre, 3)
    x = space.to_model(torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0)))
    grid = ua.Grid(4, 4, 2)
    p = UAnalysisParams()
    ones = ua.noise_image(x, "ones", p, grid, space, 0)
    torch.testing.assert_close(ones[:, 0, 0], (1 - torch.tensor(pre.mean)) / torch.tensor(pre.std))
    torch.testing.assert_close(ua.noise_image(x, "dataset_mean", p, grid, space, 0), torch.zeros(3, 4, 4))
    rm = ua.noise_image(x, "region_mean", p, grid, space, 0)
    torch.testing.assert_close(rm[:, :2, :2].mean((1, 2)), x[:, :2, :2].mean((1, 2)), atol=1e-6, rtol=0)
    # efficientnet-lite's (x - 127) / 128 on 0..255 pixels
    lite = ua.PixelSpace.of(Preprocessing(size=(4, 4), scale=1.0, mean=[127.0] * 3, std=[128.0] * 3), 3)
    torch.testing.assert_close(lite.to_model(torch.ones(3, 1, 1)), torch.full((3, 1, 1), 1.0))


def test_window_from_fraction_and_limits() -> None:
    assert ua.window_pixels((224, 224), None, 0.10) == 22
    assert ua.window_pixels((224, 224), None, 0.33) == 74
    assert ua.window_pixels((8, 8), None, 0.10) == 1
    assert ua.window_pixels((8, 8), 3, 0.10) == 3
    with pytest.raises(BadParams, match="larger than the image"):
        ua.window_pixels((8, 8), 9, None)
    with pytest.raises(BadParams, match="regions"):
        ua.window_pixels((224, 224), 2, None)


def test_errors_a_client_can_fix() -> None:
    model = u_model()
    inp = inputs_of(model, torch.ones(2, 1, 4, 4), [0, 0])
    with pytest.raises(BadParams, match="does not fit"):
        ua.run(model, inp, UAnalysisParams(window_px=2), no_progress, attribution=np.zeros((3, 4, 4)))
    with pytest.raises(BadParams, match="NaN"):
        ua.run(model, inp, UAnalysisParams(window_px=2), no_progress, attribution=np.full((2, 4, 4), np.nan))
    with pytest.raises(ValidationError):
        UAnalysisParams(noise="salt")
    with pytest.raises(ValidationError, match="on the job"):
        UAnalysisParams(attribution={"method": "saliency", "target": 3})
    # shapes accepted for an upload: (N, H, W) and (N, 1, H, W)
    ok = ua.run(model, inp, UAnalysisParams(window_px=2), no_progress, attribution=np.ones((2, 4, 4)))
    assert len(ok.summary["images"]) == 2


def test_computed_attribution_and_artifacts_on_digits(digits) -> None:
    model, x, y = digits
    inp = inputs_of(model, x[:2], y[:2].tolist())
    params = UAnalysisParams(attribution={"method": "gradcam"}, window_fraction=0.25, order="decreasing", noise="blur")
    calls: list[tuple[int, int, str]] = []
    result = ua.run(model, inp, params, lambda d, t, s: calls.append((d, t, s)))
    s = result.summary
    assert s["attribution"] == "gradcam" and s["window_px"] == 2 and s["grid"]["regions"] == 16
    assert len(s["images"]) == 2 and all(len(i["predicted"]) == 17 for i in s["images"])
    assert calls[-1][0] == calls[-1][1] == 34  # every row evaluated and reported
    for i, img in enumerate(s["images"]):
        assert img["predicted"][0] == int(inp.probs[i].argmax())
        assert img["target_probability"][0] == pytest.approx(float(inp.probs[i, int(y[i])]), abs=1e-5)
