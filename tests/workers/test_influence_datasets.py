"""Registered training sets (``workers.datasets``) and influence on a user model with an
ImageFolder training set, loaded through the model registry like any job."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from schemas.errors import BadParams, JobFailure
from schemas.influence import InfluenceParams
from schemas.models import ModelManifest, Preprocessing, TrainingSet
from workers.datasets import TrainingSetData, load_training_set


def test_builtin_digits():
    from workers.models.digits import load_split

    manifest = ModelManifest(
        id="d", architecture="digits_cnn", weights="w.safetensors",
        preprocessing=Preprocessing(size=(8, 8), mode="L"), labels=[str(k) for k in range(10)],
        training_set=TrainingSet(kind="builtin", name="sklearn-digits"),
    )
    data = load_training_set(manifest, None)
    x, y, _, _ = load_split()
    assert len(data) == 1437 and np.array_equal(data.labels, y)
    assert torch.equal(data.images(slice(0, 5)), torch.from_numpy(x[:5])[:, None])
    assert torch.equal(data.images(np.array([7, 3])), torch.from_numpy(x[[7, 3]])[:, None])
    assert data.display(0).shape == (8, 8, 3) and data.display(0).dtype == np.uint8
    assert len(data.fingerprint) == 64 and load_training_set(manifest, None).fingerprint == data.fingerprint
    starts = [s for s, _, _ in data.batches(500)]
    assert starts == [0, 500, 1000]


def _write_png(path: Path, rgb: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 6, 3), rgb, np.uint8)).save(path)


def _folder_manifest(labels: list[str]) -> ModelManifest:
    return ModelManifest(
        id="folder-model", architecture="torchvision", arch_name="resnet18", arch_kwargs={"num_classes": len(labels)},
        weights="weights.safetensors", preprocessing=Preprocessing(size=(4, 4)), labels=labels,
        training_set=TrainingSet(kind="imagefolder", path="train"),
    )


def test_image_folder_maps_folder_names_to_labels(tmp_path):
    _write_png(tmp_path / "train" / "cat" / "a.png", (255, 0, 0))
    _write_png(tmp_path / "train" / "cat" / "b.png", (0, 255, 0))
    _write_png(tmp_path / "train" / "dog" / "c.png", (0, 0, 255))
    manifest = _folder_manifest(["dog", "cat"])  # not sorted: names decide the index
    data = load_training_set(manifest, tmp_path)
    assert len(data) == 3 and data.labels.tolist() == [1, 1, 0]
    x = data.images(slice(0, 3))
    assert x.shape == (3, 3, 4, 4)
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert data.display(2)[0, 0].tolist() == [0, 0, 255]
    before = data.fingerprint
    assert load_training_set(manifest, tmp_path) is data  # cached while unchanged
    path = tmp_path / "train" / "dog" / "c.png"
    _write_png(path, (9, 9, 9))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    fresh = load_training_set(manifest, tmp_path)
    assert fresh.fingerprint != before and fresh.display(2)[0, 0].tolist() == [9, 9, 9]


def test_image_folder_by_count_and_errors(tmp_path):
    _write_png(tmp_path / "train" / "b" / "1.png", (1, 2, 3))
    _write_png(tmp_path / "train" / "a" / "2.png", (4, 5, 6))
    data = load_training_set(_folder_manifest(["x", "y"]), tmp_path)  # sorted folders -> label order
    assert data.labels.tolist() == [0, 1]  # a/2.png first
    with pytest.raises(JobFailure, match="neither by name nor by count"):
        load_training_set(_folder_manifest(["x", "y", "z"]), tmp_path)
    with pytest.raises(JobFailure, match="missing"):
        load_training_set(_folder_manifest(["x", "y"]), tmp_path / "nowhere")
    no_set = _folder_manifest(["x", "y"]).model_copy(update={"training_set": None})
    with pytest.raises(BadParams, match="no training set"):
        load_training_set(no_set, tmp_path)


def test_from_tensors():
    x = torch.rand(4, 1, 3, 3)
    data = TrainingSetData.from_tensors(x, torch.tensor([0, 1, 0, 1]))
    assert data.display(1).shape == (3, 3, 3) and data.labels.tolist() == [0, 1, 0, 1]
    assert TrainingSetData.from_tensors(x, torch.tensor([0, 1, 0, 1])).fingerprint == data.fingerprint
    assert TrainingSetData.from_tensors(x + 1, torch.tensor([0, 1, 0, 1])).fingerprint != data.fingerprint


def test_influence_on_a_user_model_with_an_image_folder(tmp_path):
    """A torchvision resnet18 user model (BatchNorm layers) with an ImageFolder training set,
    through ModelCache and the kind's context: the folder image that duplicates the test image
    is its most helpful training image."""
    from safetensors.torch import save_file

    from workers.explain import influence as inf
    from workers.explain.base import Inputs, no_progress
    from workers.pipeline import JobContext, load_inputs
    from workers.registry import ModelCache

    torch.manual_seed(0)
    import torchvision

    module = torchvision.models.resnet18(num_classes=2)
    d = tmp_path / "models" / "folder-model"
    d.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(d / "weights.safetensors"))
    manifest = _folder_manifest(["cat", "dog"]).model_copy(update={"preprocessing": Preprocessing(size=(32, 32))})
    (d / "manifest.json").write_text(manifest.model_dump_json())
    rng = np.random.default_rng(0)
    pictures = []
    for i in range(8):
        rgb = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        pictures.append(rgb)
        folder = d / "train" / ("cat" if i % 2 == 0 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(folder / f"{i}.png")
    cache = ModelCache(tmp_path / "models", tmp_path / "cache", device="cpu", onnx=False)
    model = cache.get("folder-model")
    import io

    buf = io.BytesIO()
    Image.fromarray(pictures[3]).save(buf, format="PNG")
    params = InfluenceParams(layers=["fc", "bn1"], solver="exact", target=1, top_k=2)
    inputs: Inputs = load_inputs(model, [buf.getvalue()], params)
    result = inf.run(model, inputs, params, no_progress, context=JobContext(tmp_path / "cache", tmp_path / "models"))
    s = result.summary
    assert s["training_set"]["size"] == 8 and s["training_set"]["source"].startswith("imagefolder:")
    assert [la["type"] for la in s["layers"]] == ["Linear", "BatchNorm2d"]
    assert [la["params"] for la in s["layers"]] == [1026, 128]
    data = load_training_set(model.manifest, d)
    dup = [i for i in range(8) if np.array_equal(data.display(i), pictures[3])]
    assert s["images"][0]["top_helpful"]["total"][0]["index"] == dup[0]
    assert json.dumps(s)  # the summary is JSON
