"""``influence_groups``: disturbances by hand, group averages, clustering and the kind end to end."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from schemas.errors import BadParams
from schemas.influence import InfluenceGroupsParams
from workers.datasets import load_training_set
from workers.explain import influence_groups as ig
from workers.explain.base import Inputs, no_progress
from workers.pipeline import JobContext


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_white_background_by_hand():
    """A grey object with a hole on a dark background: the background turns white, the object
    (and its hole, filled as part of it) keeps its pixels."""
    img = np.full((12, 12, 3), 10, np.uint8)
    img[3:9, 3:9] = (200, 120, 40)
    img[5, 5] = 10  # a hole inside the object
    out = ig.white_background(img)
    assert (out[:3] == 255).all() and (out[:, 10:] == 255).all()
    inside = np.zeros((12, 12), bool)
    inside[3:9, 3:9] = True
    np.testing.assert_array_equal(out[inside], img[inside])
    assert (ig.white_background(np.full((5, 5, 3), 77, np.uint8)) == 255).all()


def test_texture_blend_by_hand():
    from skimage import data

    img = np.zeros((20, 30, 3), np.uint8)
    out = ig.textured(img, "brick", 0.5)
    brick = data.brick().astype(np.float32)[:20, :30]
    np.testing.assert_array_equal(out, np.repeat((0.5 * brick).astype(np.uint8)[..., None], 3, -1))
    big = ig.textured(np.zeros((600, 40, 3), np.uint8), "gravel", 1.0)  # taller than the texture: tiled
    np.testing.assert_array_equal(big[512:520, :, 0], data.gravel()[:8, :40])


def test_style_moves_colours_to_the_style_picture(chelsea):
    from skimage.color import rgb2lab
    from skimage.transform import resize

    small = np.asarray(Image.fromarray(chelsea).resize((64, 48)))
    assert np.array_equal(ig.styled(small, "coffee", 0.0), small)
    out = ig.styled(small, "coffee", 1.0)
    assert out.shape == small.shape and out.dtype == np.uint8
    from skimage import data

    target = rgb2lab(resize(data.coffee(), (48, 64), anti_aliasing=True)).reshape(-1, 3).mean(0)
    before = rgb2lab(small / 255.0).reshape(-1, 3).mean(0)
    after = rgb2lab(out / 255.0).reshape(-1, 3).mean(0)
    assert np.abs(after - target).sum() < 0.5 * np.abs(before - target).sum()


@pytest.fixture(scope="module")
def digits_inputs(model_cache):
    from workers.models.digits import load_split

    model = model_cache.get("digits-cnn")
    _, _, x, y = load_split()
    x, y = torch.from_numpy(x[[0, 1, 2]])[:, None], torch.from_numpy(y[[0, 1, 2]])
    display = [np.repeat((xi[0].numpy() * 255).astype(np.uint8)[..., None], 3, -1) for xi in x]
    return model, Inputs(images=x, display=display, targets=y, probs=model.forward(x).softmax(1))


def test_run_groups_on_digits(digits_inputs, tmp_path):
    model, inputs = digits_inputs
    params = InfluenceGroupsParams(layers=["conv1", "fc"], solver="exact")
    result = ig.run(model, inputs, params, no_progress, context=JobContext(tmp_path, tmp_path))
    s = result.summary
    assert [g["name"] for g in s["groups"]] == ["original", "white_background", "texture", "style"]
    assert all(g["images"] == 3 for g in s["groups"]) and s["groups"][0]["accuracy"] == 1.0
    assert s["sound"] and s["rows"] == ["conv1", "fc", "total"]
    art = {a.name: a for a in result.artifacts}
    scores = np.load(io.BytesIO(art["scores.npy"].data))
    vectors = np.load(io.BytesIO(art["image_layer_scores.npy"].data))
    means = np.load(io.BytesIO(art["group_layer_means.npy"].data))
    assert scores.shape == (12, 3, 1437) and vectors.shape == (12, 3) and means.shape == (4, 3)
    assert {a.media_type for a in result.artifacts if a.name.endswith(".npy")} == {"application/x-npy"}
    labels = load_training_set(model.manifest, None).labels
    targets = inputs.targets.numpy()
    for i, img in enumerate(s["images"]):
        assert img["target"] == targets[i % 3]  # a disturbed image keeps its original's target
        np.testing.assert_allclose(vectors[i], scores[i][:, labels == targets[i % 3]].mean(1), rtol=1e-5)
    np.testing.assert_allclose(means, vectors.reshape(4, 3, 3).mean(1), rtol=1e-5)
    assert s["groups"][2]["layer_means"]["fc"] == pytest.approx(float(means[2, 1]), rel=1e-5)
    assert np.array(s["pearson"]).shape == (4, 4) and np.array(s["linkage"]).shape == (3, 4)
    # Euclidean average linkage: the first merge joins the two closest groups' layer vectors
    d = np.linalg.norm(means[:, None, :2] - means[None, :, :2], axis=-1) + np.eye(4) * 1e9
    first = sorted(int(v) for v in s["linkage"][0][:2])
    assert first == sorted(np.unravel_index(np.argmin(d), d.shape))
    for name in ("curves.png", "images.png", "groups_clustering.png"):
        assert Image.open(io.BytesIO(art[name].data)).format == "PNG"


def test_uploaded_groups(digits_inputs, tmp_path):
    model, inputs = digits_inputs
    params = InfluenceGroupsParams(layers=["fc"], solver="exact", groups=["original", "mine", "mine"])
    s = ig.run(model, inputs, params, no_progress, context=JobContext(tmp_path, tmp_path)).summary
    assert [(g["name"], g["images"]) for g in s["groups"]] == [("original", 1), ("mine", 2)]
    with pytest.raises(BadParams, match="2 names for 3 images"):
        ig.build_groups(model, inputs, InfluenceGroupsParams(groups=["original", "mine"]))
    with pytest.raises(BadParams, match="'original'"):
        ig.build_groups(model, inputs, InfluenceGroupsParams(groups=["a", "b", "c"], disturbances=["texture"]))


def test_groups_on_an_uploaded_training_set(digits_inputs, tmp_path):
    """A ``training_set`` zip in the job's files replaces the registered set."""
    import zipfile

    from workers.models.digits import load_split

    model, inputs = digits_inputs
    x, y, _, _ = load_split()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for k in range(10):
            for j, i in enumerate(np.flatnonzero(y == k)[:2]):
                b = io.BytesIO()
                Image.fromarray((x[i] * 255).round().astype(np.uint8)).save(b, format="PNG")
                zf.writestr(f"{k}/{j}.png", b.getvalue())
    params = InfluenceGroupsParams(layers=["fc"], solver="exact", groups=["original", "mine", "mine"])
    context = JobContext(tmp_path, tmp_path, {"training_set": buf.getvalue()})
    result = ig.run(model, inputs, params, no_progress, context=context)
    s = result.summary
    assert s["training_set"]["size"] == 20 and s["training_set"]["source"].startswith("upload:training_set.zip")
    scores = np.load(io.BytesIO({a.name: a for a in result.artifacts}["scores.npy"].data))
    assert scores.shape == (3, 2, 20) and np.isfinite(scores).all()
