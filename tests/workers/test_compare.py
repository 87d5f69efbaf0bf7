"""The ``compare`` kind: table (JSON + CSV), grid PNG, error rows for unsupported methods, and
scores equal to those of single ``attribution`` runs with the same seed."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from PIL import Image
from torch import nn

from schemas.attribution import CompareParams
from tests.workers.test_attribution import digits_batch, inputs_for, params, tiny_model
from workers.explain.attribution import attribute, quality_scores
from workers.explain.compare import method_labels, run


def quiet(done: int, total: int, stage: str) -> None:
    pass


def test_compare_on_digits_matches_single_runs(model_cache):
    model = model_cache.get("digits-cnn")
    digits = (digits_batch(2)[:, 0].numpy() * 255).astype(np.uint8)
    inputs = inputs_for(model, [np.stack([d] * 3, -1) for d in digits])
    methods = [
        params("integrated_gradients", n_steps=4),
        params("noise_tunnel", nt_type="vargrad", nt_samples=2, n_steps=2),
        params("noise_tunnel", nt_type="smoothgrad_sq", nt_samples=2, n_steps=2),
        params("occlusion", window=2, stride=2),
    ]
    p = CompareParams(methods=methods, sensitivity_max={"n_perturb_samples": 2}, infidelity={"n_perturb_samples": 4})
    result = run(model, inputs, p, quiet)
    rows = result.summary["methods"]
    assert [r["method"] for r in rows] == [
        "integrated_gradients", "noise_tunnel-vargrad", "noise_tunnel-smoothgrad_sq", "occlusion"
    ]  # fmt: skip
    for r in rows:
        assert r["runtime_s"] > 0 and r["sensitivity_max"] >= 0 and r["infidelity"] >= 0
    # the same method as a single attribution job, same seed: the same scores
    single = methods[0].model_copy(update=dict(sensitivity_max=p.sensitivity_max, infidelity=p.infidelity))
    attr = attribute(model, inputs.images, inputs.targets, single)
    scores = quality_scores(model, inputs.images, inputs.targets, attr, single)
    assert rows[0]["per_image"]["sensitivity_max"] == pytest.approx(scores["sensitivity_max"], rel=1e-5)
    assert rows[0]["per_image"]["infidelity"] == pytest.approx(scores["infidelity"], rel=1e-5)
    names = {a.name: a for a in result.artifacts}
    table = list(csv.DictReader(io.StringIO(names["compare.csv"].data.decode())))
    assert [t["method"] for t in table] == [r["method"] for r in rows]
    assert float(table[3]["sensitivity_max"]) == pytest.approx(rows[3]["sensitivity_max"], rel=1e-4)
    grid = Image.open(io.BytesIO(names["compare-grid.png"].data))
    assert grid.size[0] > grid.size[1] > 0
    map_ = np.load(io.BytesIO(names["1-occlusion-map.npy"].data))
    assert map_.shape == (8, 8)


def test_unsupported_method_becomes_an_error_row():
    model = tiny_model(nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.SiLU(), nn.Linear(3, 2)), (2, 2), 2)
    inputs = inputs_for(model, [np.full((2, 2, 3), 200, np.uint8)])
    p = CompareParams(
        methods=[params("saliency"), params("lrp"), params("saliency")], sensitivity_max=None, infidelity=None
    )
    result = run(model, inputs, p, quiet)
    rows = result.summary["methods"]
    assert [r["method"] for r in rows] == ["saliency", "lrp", "saliency#2"]
    assert rows[1]["error"]["type"] == "unsupported_method" and "SiLU" in rows[1]["error"]["message"]
    assert "sensitivity_max" not in rows[0]
    table = names = {a.name: a for a in result.artifacts}
    assert "SiLU" in names["compare.csv"].data.decode() and "compare-grid.png" in table


def test_labels():
    assert method_labels([params("gradcam"), params("gradcam"), params("noise_tunnel")]) == [
        "gradcam", "gradcam#2", "noise_tunnel-smoothgrad_sq"
    ]  # fmt: skip
