"""Fill in the blanks (papers/fill-in-the-blanks): the update of a linear softmax model by
hand, the masks' counts and partitions, L-BFGS against a dense BFGS step, the threshold T,
seeds, a job without a kept draw, Table 1's scores and chunks, and the errors a client can fix."""

from __future__ import annotations

import csv
import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from schemas.errors import BadParams
from schemas.fill_blanks import FillBlanksConsistencyParams, FillBlanksParams
from tests.workers.test_u_analysis import inputs_of, linear, loaded
from workers.explain import fill_blanks, fill_blanks_consistency
from workers.explain.base import no_progress
from workers.explain.fill_blanks import masks as mk
from workers.explain.fill_blanks import statistics
from workers.explain.fill_blanks.updates import random_fill, threshold, update
from workers.explain.u_analysis import Grid, PixelSpace


def softmax_model(seed: int = 0, size: int = 4, classes: int = 3, bias: list[float] | None = None):
    g = torch.Generator().manual_seed(seed)
    weights = {k: torch.randn(size, size, generator=g) for k in range(classes)}
    module = linear(weights, bias or [0.0] * classes, size)
    return loaded(module, size, [f"c{k}" for k in range(classes)], batch_size=4)


def hand_update(model, xm: torch.Tensor, y: int, gamma: float) -> np.ndarray:
    """``-gamma W^T (softmax(W x + b) - e_y)`` per row of ``xm`` ``(B, 1, H, W)``, in float64."""
    lin = model.module[1]
    w, b = lin.weight.double().numpy(), lin.bias.double().numpy()
    flat = xm.reshape(len(xm), -1).double().numpy()
    logits = flat @ w.T + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[:, y] -= 1
    return (-gamma * p @ w).reshape(xm.shape)


# ---------------------------------------------------------------------------------------------
# the update (Eq. 2, Eq. 5)


def test_linear_softmax_update_is_minus_gamma_w_transpose_p_minus_e_y() -> None:
    model = softmax_model()
    space = PixelSpace.of(model.manifest.preprocessing, 1)
    x = torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(1))
    grid = Grid(4, 4, 2)
    pix = torch.from_numpy(mk.pixels(grid, mk.RandomMasks.of(grid, 0.5, 3, 0).next(6)))
    xm = mk.apply(x, torch.zeros_like(x), pix)
    params = FillBlanksParams(gamma=0.7)
    dx, pred, y = update(model, xm, torch.full((6,), 2), params, space)
    assert torch.equal(y, torch.full((6,), 2))
    np.testing.assert_allclose(dx.numpy(), hand_update(model, xm, 2, 0.7), atol=1e-6)
    assert torch.equal(pred, model.module(xm).argmax(1))
    # M~(dx): the masked pixels only
    t = threshold(dx, pix, params.model_copy(update={"binarize": False, "sign": "both"}))
    assert (t[~pix[:, None].expand_as(t)] == 0).all() and (t[pix[:, None].expand_as(t)] != 0).any()


@pytest.mark.parametrize("keep_correct", [True, False])
def test_expected_update_is_the_mean_of_the_kept_masked_updates(keep_correct: bool) -> None:
    model = softmax_model(seed=0)
    space = PixelSpace.of(model.manifest.preprocessing, 1)
    x = torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(3))
    y = int(model.module(x[None]).argmax())
    grid = Grid(4, 4, 1)
    params = FillBlanksParams(mask_ratio=0.5, min_kept=60, max_masks=200, keep_correct=keep_correct, seed=4)
    rf = random_fill(model, x, torch.zeros_like(x), y, params, grid, 7, space, per_pass=16)

    # by hand: the same masks, one at a time
    stream = mk.RandomMasks.of(grid, 0.5, 4, 7)
    total, kept, draws, correct, first = np.zeros((1, 4, 4)), 0, 0, 0, None
    while kept < 60 and draws < 200:
        m = torch.from_numpy(mk.pixels(grid, stream.next(1)))
        xm = mk.apply(x, torch.zeros_like(x), m)
        ok = int(model.module(xm).argmax()) == y
        draws, correct = draws + 1, correct + ok
        if ok or not keep_correct:
            kept += 1
            total += hand_update(model, xm, y, 1.0)[0] * m.numpy()
            first = m[0] if first is None else first
    assert (rf.draws, rf.kept, rf.correct) == (draws, kept, correct)
    assert kept == 60 and (draws > 60) == keep_correct  # some masked inputs are misclassified
    np.testing.assert_allclose(rf.update.numpy(), total / kept, atol=1e-6)
    assert torch.equal(rf.mask, first)
    # the pass size changes nothing but the summation order
    again = random_fill(model, x, torch.zeros_like(x), y, params, grid, 7, space, per_pass=5)
    assert (again.draws, again.kept) == (rf.draws, rf.kept)
    np.testing.assert_allclose(again.update.numpy(), rf.update.numpy(), atol=1e-6)


def dense_bfgs(model, u0: np.ndarray, y: int, gamma: float, steps: int) -> np.ndarray:
    """``gamma * p`` after ``steps`` BFGS iterations (step ``gamma``) with the dense inverse
    Hessian ``H_{k+1} = (I - rho s y^T) H_k (I - rho y s^T) + rho s s^T`` (Nocedal & Wright
    eq. 6.17), ``H_0 = (s.y / y.y) I`` of the first pair (eq. 6.20)."""

    def grad(u: np.ndarray) -> np.ndarray:
        return -hand_update(model, torch.from_numpy(u.reshape(u0.shape)), y, 1.0).ravel()

    u, g, h, eye = u0.ravel(), grad(u0), None, np.eye(u0.size)
    for t in range(steps):
        p = -(g if h is None else h @ g)
        if t == steps - 1:
            return gamma * p
        u1 = u + gamma * p
        g1 = grad(u1)
        s, yy = u1 - u, g1 - g
        rho = 1 / (s @ yy)
        h = (s @ yy) / (yy @ yy) * eye if h is None else h
        h = (eye - rho * np.outer(s, yy)) @ h @ (eye - rho * np.outer(yy, s)) + rho * np.outer(s, s)
        u, g = u1, g1
    raise AssertionError


def test_bfgs_one_step_is_the_gradient_and_more_steps_the_dense_bfgs_direction() -> None:
    model = softmax_model(seed=5)
    space = PixelSpace.of(model.manifest.preprocessing, 1)
    xm = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(6))
    y = model.module(xm).argmin(1)  # far from the minimum: curvature pairs well above float32 noise
    bfgs = FillBlanksParams(gamma=0.2, update="bfgs")
    grad, _, _ = update(model, xm, y, FillBlanksParams(gamma=0.2), space)
    assert torch.equal(update(model, xm, y, bfgs.model_copy(update={"bfgs_steps": 1}), space)[0], grad)
    directions = {}
    for steps in (2, 3, 4):
        directions[steps], _, _ = update(model, xm, y, bfgs.model_copy(update={"bfgs_steps": steps}), space)
        for r in range(3):
            ref = dense_bfgs(model, xm[r : r + 1].double().numpy(), int(y[r]), 0.2, steps)
            np.testing.assert_allclose(directions[steps][r].double().numpy().ravel(), ref, atol=1e-5)
        assert not torch.allclose(directions[steps], grad)
    # a memory of one pair (L-BFGS): the same second direction, another fourth
    limited = bfgs.model_copy(update={"bfgs_history": 1})
    assert torch.allclose(update(model, xm, y, limited.model_copy(update={"bfgs_steps": 2}), space)[0], directions[2])
    fourth = update(model, xm, y, limited.model_copy(update={"bfgs_steps": 4}), space)[0]
    assert not torch.allclose(fourth, directions[4], atol=1e-5)


def test_threshold_normalises_binarises_and_keeps_the_sign_asked() -> None:
    dx = torch.tensor([[[[-4.0, -1.0], [2.0, 8.0]]]])
    mask = torch.tensor([[[True, True], [True, False]]])
    p = FillBlanksParams()
    plain = threshold(dx, mask, p.model_copy(update={"binarize": False, "sign": "both"}))
    assert plain.tolist() == [[[[-1.0, -0.25], [0.5, 0.0]]]]  # v / max|v| over the masked pixels
    minmax = threshold(dx, mask, p.model_copy(update={"binarize": False, "sign": "both", "normalize": "minmax"}))
    np.testing.assert_allclose(minmax.numpy(), [[[[0.0, 0.5], [1.0, 0.0]]]])  # (v - min) / (max - min)
    assert threshold(dx, mask, p).tolist() == [[[[0.0, 0.0], [1.0, 0.0]]]]  # positive part, >= 0.5
    both = threshold(dx, mask, p.model_copy(update={"sign": "both", "threshold": 0.4}))
    assert both.tolist() == [[[[-1.0, 0.0], [1.0, 0.0]]]]
    assert threshold(torch.zeros_like(dx), mask, p).abs().sum() == 0  # no update, no fill


# ---------------------------------------------------------------------------------------------
# masks


@pytest.mark.parametrize(("size", "patch", "ratio"), [((8, 8), 2, 0.25), ((7, 9), 3, 0.4), ((224, 224), 2, 0.25)])
def test_every_random_mask_masks_round_eta_patches(size: tuple[int, int], patch: int, ratio: float) -> None:
    grid = mk.patch_grid(size, patch)
    m = mk.masked_count(grid.n, ratio)
    assert m == int(np.floor(ratio * grid.n + 0.5))
    draws = mk.RandomMasks.of(grid, ratio, 0, 0).next(400)
    assert (draws.sum(1) == m).all()
    pix = mk.pixels(grid, draws[:3])
    assert pix.shape == (3, *size)
    for d, p in zip(draws[:3], pix, strict=True):  # every pixel of a masked patch, nothing else
        assert np.array_equal(p, d[grid.labels()])
    if grid.n <= 100:  # uniform over the patches
        np.testing.assert_allclose(draws.mean(0), m / grid.n, atol=0.1)


def test_mask_streams_follow_the_seed_not_the_pass_size() -> None:
    grid = Grid(8, 8, 2)
    a = mk.RandomMasks.of(grid, 0.25, 1, 3)
    b = mk.RandomMasks.of(grid, 0.25, 1, 3)
    assert np.array_equal(np.concatenate([a.next(5), a.next(11)]), b.next(16))
    assert not np.array_equal(
        mk.RandomMasks.of(grid, 0.25, 2, 3).next(16), mk.RandomMasks.of(grid, 0.25, 1, 3).next(16)
    )


@pytest.mark.parametrize("how", ["random", "raster"])
def test_progressive_masks_are_disjoint_and_cover_the_image(how: str) -> None:
    grid = Grid(9, 9, 2)  # 25 patches, partial ones at the border
    step = mk.partition(grid, 4, how, 0, 0)
    assert sorted(np.bincount(step, minlength=4).tolist()) == [6, 6, 6, 7]
    masks = mk.pixels(grid, step[None] == np.arange(4)[:, None])
    assert (masks.sum(0) == 1).all()  # each pixel in exactly one mask
    if how == "raster":
        assert (np.diff(step) >= 0).all()
    else:
        assert not np.array_equal(step, mk.partition(grid, 4, how, 1, 0))


# ---------------------------------------------------------------------------------------------
# the kind


@pytest.fixture(scope="module")
def digits(model_cache):
    from workers.models.digits import load_split

    model = model_cache.get("digits-cnn")
    _, _, x, y = load_split()
    xs = torch.from_numpy(x[:2])[:, None]
    return model, inputs_of(model, xs, model.forward(xs).argmax(1).tolist())


def test_progressive_prototype_has_no_original_pixel(digits) -> None:
    model, inputs = digits
    params = FillBlanksParams(masking="progressive", fill="image_mean", binarize=False, step_label="each", k=3)
    from workers.explain.fill_blanks.prototypes import fill

    for f, x in zip(fill(model, inputs.images, inputs.targets, params, "progressive"), inputs.images, strict=True):
        assert f.steps is not None and f.prototype is not None and f.update is not None
        assert (f.steps.masks.sum(0) == 1).all()
        z = x.mean()  # image_mean fill, pixel space = model space for digits-cnn
        np.testing.assert_allclose(f.prototype.numpy(), (z + f.fill).numpy(), atol=1e-6)  # x nowhere
        assert torch.equal(f.prototype, f.steps.images[-1])
        assert f.steps.labels == f.steps.predictions  # step_label='each'
        for i in range(3):  # each step's update lives on its own mask
            assert (f.update[i][:, ~f.steps.masks[i]] == 0).all()


def test_fill_blanks_job_artifacts_and_seeds(digits) -> None:
    model, inputs = digits
    params = FillBlanksParams(min_kept=150, max_masks=600, seed=3)
    first = fill_blanks.run(model, inputs, params, no_progress)
    again = fill_blanks.run(model, inputs, params, no_progress)
    assert [(a.name, a.data) for a in first.artifacts] == [(a.name, a.data) for a in again.artifacts]
    names = {a.name for a in first.artifacts}
    assert {f"{i}-{n}" for i in range(2) for n in ("update.npy", "fill.npy", "overlay.png", "prototype.png")} == names
    for img in first.summary["images"]:
        assert img["kept"] == 150 and img["draws"] >= 150
        assert img["masked_accuracy"] == pytest.approx(150 / img["draws"]) or img["draws"] == 600
        assert len(img["prototype"]["top"]) == 5
    arts = {a.name: a.data for a in first.artifacts}
    e = np.load(io.BytesIO(arts["0-update.npy"]))
    t = np.load(io.BytesIO(arts["0-fill.npy"]))
    assert e.shape == t.shape == (1, 8, 8) and set(np.unique(t)) <= {0.0, 1.0}
    assert Image.open(io.BytesIO(arts["0-overlay.png"])).size == (224, 224)
    other = fill_blanks.run(model, inputs, params.model_copy(update={"seed": 4}), no_progress)
    assert {a.name: a.data for a in other.artifacts}["0-update.npy"] != arts["0-update.npy"]

    prog = fill_blanks.run(model, inputs, FillBlanksParams(masking="progressive"), no_progress)
    assert {f"{i}-steps.png" for i in range(2)} <= {a.name for a in prog.artifacts}
    steps = prog.summary["images"][0]["steps"]
    assert len(steps) == 4 and all(s["label"] == steps[0]["prediction"] for s in steps)  # step_label='first'


def test_no_kept_draw_gives_a_null_prototype_and_a_warning() -> None:
    model = loaded(linear({0: torch.full((4, 4), 0.1)}, [5.0, -5.0], 4), 4, ["always", "never"])
    x = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    result = fill_blanks.run(model, inputs_of(model, x, [1]), FillBlanksParams(min_kept=5, max_masks=40), no_progress)
    img = result.summary["images"][0]
    assert img["prototype"] is None and img["kept"] == 0 and img["draws"] == 40
    assert "no kept draw" in result.summary["warnings"][0] and result.artifacts == []
    json.dumps(result.summary)


# ---------------------------------------------------------------------------------------------
# Table 1


def test_scores_by_hand() -> None:
    s = statistics.scores([0, 1, 1, 1], [0, 0, 1, 1])
    # class 0: P 1, R 1/2, F1 2/3; class 1: P 2/3, R 1, F1 4/5; equal support
    assert s == {"n": 4, "accuracy": 75.0, "macro_f1": 73.33, "weighted_f1": 73.33}
    s = statistics.scores([0, 0, 0, 1], [0, 0, 0, 0])  # class 1 only predicted: F1 0, no support
    assert (s["accuracy"], s["macro_f1"], s["weighted_f1"]) == (75.0, 42.86, 85.71)
    assert statistics.confusion([0, 1, 1], [1, 1, 0], 2).tolist() == [[0, 1], [1, 1]]


def test_consistency_chunks_aggregate_to_the_single_pass_and_table_1_by_hand(digits) -> None:
    model, _ = digits
    grid = dict(limit=6, min_kept=30, max_masks=120, ablation={"mask_ratios": [0.25], "patch_sizes": [2, 4]})
    whole = fill_blanks_consistency.run(
        model, None, FillBlanksConsistencyParams(images_per_chunk=6, **grid), no_progress
    )
    params = FillBlanksConsistencyParams(images_per_chunk=4, **grid)
    plan = fill_blanks_consistency.plan(model, None, params)
    assert [c["n_images"] for c in plan] == [4, 2, 1] and plan[-1]["ablation"] == 1
    partials = [fill_blanks_consistency.run_chunk(model, None, params, c, no_progress) for c in plan]
    random.Random(0).shuffle(partials)
    chunked = fill_blanks_consistency.aggregate(model, None, params, partials)
    assert chunked.summary["table1"] == whole.summary["table1"]
    arts = {a.name: a.data for a in chunked.artifacts}
    rows = json.loads(arts["rows.json"])
    for masking in ("random", "progressive"):
        r = rows[masking]
        assert [x["index"] for x in r] == list(range(6))
        done = [x for x in r if x["prototype"] is not None]
        t = chunked.summary["table1"][masking]
        assert t["images"] == 6 and t["prototypes"] == len(done)
        for name in ("prototype", "masked_only", "fill_only"):
            for ref in ("paper", "true"):
                acc = 100 * np.mean([x[name] == x[ref] for x in done])
                assert t[name][ref]["accuracy"] == pytest.approx(acc, abs=0.01)
        # random masking keeps only masked inputs classified as y (the true label here)
        if masking == "random":
            assert all(x["paper"] == x["y"] == x["true"] for x in done)
            assert t["masked_only"]["paper"]["accuracy"] == 100.0
    table = list(csv.DictReader(io.StringIO(arts["table1.csv"].decode())))
    assert [row["masking"] for row in table] == ["random", "progressive"]
    assert {"fill_only_vs_true_accuracy", "masked_only_vs_paper_macro_f1", "prototype_vs_true_weighted_f1"} <= set(
        table[0]
    )
    confusion = list(csv.reader(io.StringIO(arts["confusion_random.csv"].decode())))
    assert sum(int(v) for row in confusion[1:] for v in row[1:]) == chunked.summary["table1"]["random"]["prototypes"]
    for name in ("prototypes.png", "ablation.png"):
        assert Image.open(io.BytesIO(arts[name])).size[0] > 100
    assert [(c["patch_size"], c["mask_ratio"]) for c in chunked.summary["ablation"]] == [(2, 0.25), (4, 0.25)]
    with pytest.raises(BadParams, match="overlap"):
        fill_blanks_consistency.aggregate(model, None, params, partials + [p for p in partials if "rows" in p][:1])


# ---------------------------------------------------------------------------------------------
# errors a client can fix


@pytest.mark.parametrize(
    ("field", "value"),
    [("mask_ratio", 0), ("mask_ratio", 1), ("k", 1), ("patch_size", 0), ("min_kept", 50_000)],
)
def test_params_out_of_range_name_the_field(field: str, value: float) -> None:
    with pytest.raises(ValidationError) as e:
        FillBlanksParams.model_validate({field: value})
    assert e.value.errors()[0]["loc"] == (field,)


def test_params_that_do_not_fit_the_model(digits) -> None:
    manifest = digits[0].manifest
    for params, field in [({"patch_size": 9}, "patch_size"), ({"masking": "progressive", "k": 17}, "k"),
                          ({"mask_ratio": 0.01}, "mask_ratio")]:  # fmt: skip
        with pytest.raises(BadParams) as e:
            FillBlanksParams.check_model(FillBlanksParams.model_validate(params), manifest)
        assert e.value.details["field"] == field
    FillBlanksParams.check_model(FillBlanksParams(masking="progressive", k=16), manifest)
    consistency = FillBlanksConsistencyParams(dataset="uploaded")
    with pytest.raises(BadParams, match="needs images"):
        FillBlanksConsistencyParams.check_inputs(consistency, 0)
    lite = manifest.model_copy(update={"training_set": None, "id": "no-set"})
    with pytest.raises(BadParams, match="uploaded") as e:
        FillBlanksConsistencyParams.check_model(FillBlanksConsistencyParams(), lite)
    assert e.value.details["field"] == "dataset"
    FillBlanksConsistencyParams.check_model(consistency, lite)
