"""U Analysis sweeps on digits-cnn: counts against the plain reference loop, chunked results
equal to one pass, the paper's grid, and the errors a client can fix."""

from __future__ import annotations

import csv
import io
import random

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from schemas.errors import BadParams
from schemas.u_analysis import PAPER_METHODS, USweepParams
from tests.workers.test_u_analysis import linear, loaded, reference_u_analysis
from workers import render
from workers.explain import u_sweep
from workers.explain.base import Inputs, no_progress
from workers.explain.u_analysis import compute_attribution


@pytest.fixture(scope="module")
def digits_model(model_cache):
    return model_cache.get("digits-cnn")


def test_the_default_grid_is_the_papers() -> None:
    p = USweepParams()
    assert p.n_configs == 900  # 10 methods x 3 orders x 6 noises x 5 windows (section 5.1)
    assert p.method_keys == PAPER_METHODS
    cfgs = u_sweep.configs(p)
    assert len({c.key for c in cfgs}) == 900
    assert u_sweep.window_sizes(p, (8, 8)) == [1, 1, 2, 2, 3]
    assert u_sweep.window_sizes(p, (32, 32)) == [3, 5, 6, 8, 11]
    with pytest.raises(ValidationError, match="duplicates"):
        USweepParams(noises=["zeros", "zeros"])
    with pytest.raises(ValidationError):
        USweepParams(methods=[{"method": "saliency", "batch_size": 4}])


def test_plan_covers_every_image_once() -> None:
    chunks = u_sweep.plan_sweep(USweepParams(images_per_chunk=40), 360)
    assert len(chunks) == 9
    covered = [i for c in chunks for i in range(c["first_index"], c["first_index"] + c["n_images"])]
    assert covered == list(range(360))
    assert u_sweep.plan_sweep(USweepParams(images_per_chunk=7), 10)[-1] == {"chunk": 1, "first_index": 7, "n_images": 3}


def test_chunk_counts_match_the_reference_loop(digits_model) -> None:
    model = digits_model
    params = USweepParams(
        limit=4,
        methods=[{"method": "saliency"}, {"method": "deeplift"}],
        noises=["zeros", "gaussian", "region_mean", "dataset_mean"],
        window_fractions=None,
        window_px=[2, 3],
        seed=5,
        batch_size=256,
    )
    images, labels = u_sweep.dataset(model, params, None)
    assert images.shape == (4, 1, 8, 8)
    partial = u_sweep.run_sweep_chunk(model, images, labels, params, no_progress, first_index=0)

    maps = {
        key: np.stack([render.to_2d(a, m.aggregation) for a in compute_attribution(model, images, labels, m)])
        for key, m in zip(params.method_keys, params.methods, strict=True)
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for k, cfg in enumerate(u_sweep.configs(params)):
            with_u = triples = 0
            for j in range(len(images)):
                _, _, t = reference_u_analysis(
                    model.module,
                    images[j].numpy(),
                    int(labels[j]),
                    maps[cfg.method][j],
                    int(cfg.window),
                    cfg.order,
                    cfg.noise,
                    params,
                    j,
                )
                with_u += bool(t)
                triples += len(t)
            assert (partial["with_u"][k], partial["triples"][k]) == (with_u, triples), cfg.key
    finally:
        torch.set_num_threads(threads)
    assert sum(partial["with_u"]) > 0
    assert partial["rows"] < partial["naive_rows"]  # shared rows evaluated once
    with torch.no_grad():
        assert partial["n_correct"] == int((model.module(images).argmax(1) == labels).sum())


def test_chunks_aggregate_to_the_single_pass(digits_model) -> None:
    grid = dict(
        limit=10,
        batch_size=256,
        methods=[{"method": "saliency"}, {"method": "gradcam"}],
        orders=["decreasing", "random"],
        noises=["zeros", "gaussian", "dataset_mean"],
        window_fractions=[0.1, 0.33],
    )
    whole = u_sweep.run(digits_model, None, USweepParams(images_per_chunk=10, **grid), no_progress)
    params = USweepParams(images_per_chunk=4, **grid)
    plan = u_sweep.plan(digits_model, None, params)
    assert [c["n_images"] for c in plan] == [4, 4, 2]
    partials = [u_sweep.run_chunk(digits_model, None, params, c, no_progress) for c in plan]
    random.Random(0).shuffle(partials)  # chunks finish in any order
    chunked = u_sweep.aggregate(digits_model, None, params, partials)

    s = chunked.summary
    assert s["by_hyperparameter"] == whole.summary["by_hyperparameter"]
    assert s["images"] == 10 and s["configurations"] == 24 and s["chunks"] == 3
    arts = {a.name: a for a in chunked.artifacts}
    assert arts["configs.csv"].data == {a.name: a for a in whole.artifacts}["configs.csv"].data
    rows = list(csv.DictReader(io.StringIO(arts["configs.csv"].data.decode())))
    assert len(rows) == 24
    # the per-hyperparameter figure is the mean of its configurations (equal image counts)
    for hp in u_sweep.HYPERPARAMETERS:
        for value, pct in s["by_hyperparameter"][hp].items():
            mine = [float(r["u_occurrence_pct"]) for r in rows if r[hp] == value]
            assert pct == pytest.approx(sum(mine) / len(mine), abs=1e-3)
        assert Image.open(io.BytesIO(arts[f"u_occurrence_{hp}.png"].data)).size[0] > 100
    # with mean 0, dataset_mean noise is the zeros noise: identical counts, evaluated once
    by_key = {(r["method"], r["order"], r["noise"], r["window"]): r["images_with_u"] for r in rows}
    assert all(by_key[(m, o, "zeros", w)] == by_key[(m, o, "dataset_mean", w)] for m, o, _, w in by_key)
    # random order ignores the method
    assert all(by_key[("saliency", "random", nz, w)] == by_key[("gradcam", "random", nz, w)] for _, _, nz, w in by_key)
    from workers.models.digits import load_split

    _, _, x, y = load_split()
    with torch.no_grad():
        acc = (digits_model.module(torch.from_numpy(x[:10])[:, None]).argmax(1).numpy() == y[:10]).mean()
    assert s["accuracy"] == pytest.approx(acc)


def test_aggregate_refuses_foreign_or_overlapping_chunks(digits_model) -> None:
    params = USweepParams(limit=2, methods=[{"method": "saliency"}], orders=["decreasing"], noises=["zeros"],
                          window_fractions=[0.25], images_per_chunk=1)  # fmt: skip
    plan = u_sweep.plan(digits_model, None, params)
    partials = [u_sweep.run_chunk(digits_model, None, params, c, no_progress) for c in plan]
    with pytest.raises(BadParams, match="overlap"):
        u_sweep.aggregate_sweep([partials[0], partials[0]], params)
    other = params.model_copy(update={"seed": 1})
    with pytest.raises(BadParams, match="another sweep"):
        u_sweep.aggregate_sweep(partials, other)
    assert u_sweep.aggregate_sweep(partials, params).summary["images"] == 2


def test_uploaded_images_and_models_without_a_data_set() -> None:
    model = loaded(linear({0: torch.full((4, 4), 1 / 16)}, [0.0, 0.5], 4), 4, ["y", "other"])
    params = USweepParams(methods=[{"method": "saliency"}], noises=["zeros", "ones"], window_fractions=[0.5])
    with pytest.raises(BadParams, match="no built-in data set"):
        u_sweep.run(model, None, params, no_progress)
    x = 0.6 + 0.4 * torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    inputs = Inputs(x, [], torch.zeros(3, dtype=torch.long), model.forward(x).softmax(1))
    up = params.model_copy(update={"dataset": "uploaded", "target": 0})
    result = u_sweep.run(model, inputs, up, no_progress)
    assert result.summary["labels"] == "given (target)" and result.summary["images"] == 3
    # a monotone model never shows a U, whatever the configuration
    assert result.summary["u_occurrence_pct"] == 0
    with pytest.raises(BadParams, match="needs images"):
        u_sweep.run(model, None, up, no_progress)
