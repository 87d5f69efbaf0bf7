"""``attribution_batch`` in one process: maps known by hand on a linear model, maps equal to
the ``attribution`` kind's on resnet18-random, float16 maps, the per-image table, chunks
recomputed after a crash, and the data set reader (``workers.dataset_source``)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import torch

from schemas.attribution import AttributionParams
from schemas.attribution_batch import AttributionBatchParams
from schemas.datasets import check_dataset_zip
from service.images import decode_image
from tests.helpers import noise_images, png, zip_of
from tests.workers.test_u_analysis import linear, loaded
from workers import render
from workers.dataset_source import open_source
from workers.explain import attribution, attribution_batch
from workers.explain.base import no_progress
from workers.pipeline import JobContext, load_inputs

DS = "ds_" + "1" * 32


def context_for(tmp_path: Path, archive: bytes, job_id: str = "job-1") -> JobContext:
    path = tmp_path / "datasets" / "set.zip"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(archive)
    return JobContext(tmp_path / "cache", tmp_path / "models", job_id=job_id, data_dir=tmp_path, datasets={DS: path})


def table(result) -> list[dict[str, str]]:
    data = next(a.data for a in result.artifacts if a.name == "images.csv")
    return list(csv.DictReader(io.StringIO(data.decode())))


def maps_of(result) -> np.ndarray:
    return np.load(next(a.path for a in result.artifacts if a.name == "maps.npy"))


def test_input_x_gradient_of_a_linear_model_is_known_by_hand(tmp_path):
    """``f_k(x) = <w_k, x>`` on 4x4 grey images: input x gradient of class k is ``x * w_k``
    (pixels / 255); each image explained for its label from labels.csv, or class 1 for all."""
    w = {0: torch.linspace(-1, 1, 16).reshape(4, 4), 1: torch.full((4, 4), 0.5)}
    model = loaded(linear(w, [0.0, 0.0], 4), 4, ["a", "b"])
    rng = np.random.default_rng(3)
    pixels = [rng.integers(0, 256, (4, 4), dtype=np.uint8) for _ in range(5)]
    members = {f"img{i}.png": png(p) for i, p in enumerate(pixels)}
    members["labels.csv"] = b"file,label\n" + b"".join(f"img{i}.png,{'ab'[i % 2]}\n".encode() for i in range(4))
    context = context_for(tmp_path, zip_of(members))
    method = {"method": "input_x_gradient", "aggregation": "sum"}
    params = AttributionBatchParams(dataset=DS, attribution=method, target_from="label", images_per_chunk=2,
                                    dtype="float32")  # fmt: skip
    result = attribution_batch.run(model, None, params, no_progress, context)
    maps, rows = maps_of(result), table(result)
    assert maps.shape == (5, 4, 4) and maps.dtype == np.float32
    for i, p in enumerate(pixels):
        x = p.astype(np.float32) / 255
        label = i % 2 if i < 4 else -1  # img4 has no row in labels.csv: its predicted class
        predicted = int(np.argmax([(x * w[k].numpy()).sum() for k in (0, 1)]))
        target = label if label >= 0 else predicted
        np.testing.assert_allclose(maps[i], x * w[target].numpy(), rtol=1e-5, atol=1e-6)
        assert (int(rows[i]["label"]), int(rows[i]["target"]), rows[i]["file"]) == (label, target, f"img{i}.png")
    everyone = attribution_batch.run(
        model, None, params.model_copy(update={"target": 1}), no_progress, context_for(tmp_path, zip_of(members), "j2")
    )
    for i, p in enumerate(pixels):
        np.testing.assert_allclose(maps_of(everyone)[i], p / 255 * 0.5, rtol=1e-5, atol=1e-6)
    assert result.summary["images"] == 5 and result.summary["labelled"] == 4


@pytest.fixture(scope="module")
def resnet(model_cache):
    return model_cache.get("resnet18-random")


def test_maps_equal_the_attribution_kind_image_by_image(resnet, tmp_path):
    """Each map equals ``attribution``'s ``{i}-map.npy`` for that image uploaded alone (the
    API's decode, the same targets), with images of other sizes than the model's input."""
    images = noise_images(5, size=40, seed=1) + noise_images(3, size=80, seed=2)
    archive = zip_of({f"{'ab'[i % 2]}/{i:02d}.png": b for i, b in enumerate(images)})
    listing = check_dataset_zip(archive, 100, 1 << 30)
    context = context_for(tmp_path, archive)
    for method in ({"method": "saliency"}, {"method": "integrated_gradients", "n_steps": 2}):
        params = AttributionBatchParams(dataset=DS, attribution=method, images_per_chunk=3, dtype="float32")
        result = attribution_batch.run(resnet, None, params, no_progress, context)
        maps, rows = maps_of(result), table(result)
        assert maps.shape == (8, 64, 64)
        by_name = dict(zip(listing.members, range(8), strict=True))
        single = AttributionParams.model_validate(method)
        for name, i in by_name.items():
            stored = decode_image(images[int(name[2:4])], 1 << 24, 10**8).data
            inputs = load_inputs(resnet, [stored], single)
            expected = attribution.run(resnet, inputs, single, no_progress)
            reference = np.load(io.BytesIO(next(a.data for a in expected.artifacts if a.name == "0-map.npy")))
            np.testing.assert_allclose(maps[i], reference, rtol=0, atol=1e-5, err_msg=f"{method} {name}")
            assert int(rows[i]["target"]) == expected.summary["images"][0]["target"]
        if method["method"] == "saliency":  # float16 maps: the float32 maps rounded
            half = params.model_copy(update={"dtype": "float16"})
            again = attribution_batch.run(resnet, None, half, no_progress, context_for(tmp_path, archive, "h"))
            maps16 = maps_of(again)
            assert maps16.dtype == np.float16 and np.array_equal(maps16, maps.astype(np.float16))


def test_a_resumed_job_recomputes_only_missing_chunks(resnet, tmp_path):
    archive = zip_of({f"c/{i}.png": b for i, b in enumerate(noise_images(6, size=16, seed=4))})
    context = context_for(tmp_path, archive)
    params = AttributionBatchParams(dataset=DS, images_per_chunk=2, dtype="float32")
    chunks = attribution_batch.plan(resnet, None, params, context)
    assert [(c["start"], c["stop"]) for c in chunks] == [(0, 2), (2, 4), (4, 6)]
    first = attribution_batch.run_chunk(resnet, None, params, chunks[0], no_progress, context)
    # a second plan (the job resumed on another worker) keeps the rows already written
    attribution_batch.plan(resnet, None, params, context)
    rest = [attribution_batch.run_chunk(resnet, None, params, c, no_progress, context) for c in chunks[1:]]
    again = attribution_batch.run_chunk(resnet, None, params, chunks[1], no_progress, context)  # a chunk twice
    result = attribution_batch.aggregate(resnet, None, params, [rest[1], first, again], context)
    assert [int(r["index"]) for r in table(result)] == list(range(6))
    whole = attribution_batch.run(resnet, None, params, no_progress, context_for(tmp_path / "w", archive))
    assert np.array_equal(maps_of(result), maps_of(whole))
    assert np.abs(maps_of(whole)).min(axis=(1, 2)).shape == (6,) and (np.abs(maps_of(whole)).sum((1, 2)) > 0).all()


def test_registered_splits_and_unmapped_classes(model_cache, tmp_path):
    digits = model_cache.get("digits-cnn")
    test = open_source(digits, "model:test", {}, tmp_path)
    alias = open_source(digits, "test", {}, tmp_path)
    assert len(test) == 360 and np.array_equal(test.labels, alias.labels)
    x, display = test.load(0, 3)
    assert x.shape == (3, 1, 8, 8) and display[0].shape == (8, 8, 3)
    # cat/dog folders fit none of digits-cnn's labels: unlabelled, unless labels are needed
    archive = zip_of({f"{c}/{i}.png": png(np.full((8, 8), 40 * i, np.uint8)) for i, c in enumerate(["cat", "dog"])})
    context = context_for(tmp_path, archive)
    src = open_source(digits, DS, context.datasets, tmp_path)
    assert src.labels.tolist() == [-1, -1] and src.names == ["cat/0.png", "dog/1.png"]
    from schemas.errors import BadParams

    with pytest.raises(BadParams, match="neither"):
        open_source(digits, DS, context.datasets, tmp_path, need_labels=True)
    batches = list(src.batches(0, 2, 1))
    assert [s for s, _, _ in batches] == [0, 1] and float(batches[1][1].max()) == pytest.approx(40 / 255)


def test_maps_rows_are_written_in_place(tmp_path):
    path = tmp_path / "m.npy"
    attribution_batch._create_maps(path, (5, 2, 3), "float16")
    attribution_batch.write_rows(path, 3, np.ones((2, 2, 3)))
    attribution_batch.write_rows(path, 0, np.full((1, 2, 3), 2.0))
    got = np.load(path)
    assert got.dtype == np.float16 and got[:, 0, 0].tolist() == [2, 0, 0, 1, 1]
    with pytest.raises(ValueError):
        attribution_batch.write_rows(path, 4, np.ones((2, 2, 3)))
    assert render.to_2d(np.ones((1, 2, 2)), "sum").shape == (2, 2)
