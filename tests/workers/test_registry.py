"""Model registry: built-in models, determinism of digits-cnn, user model directories."""

import json
import shutil

import pytest
import torch

from schemas.errors import BadParams, JobFailure, UnknownModel
from schemas.manifests import ModelRegistry, file_sha256
from workers.registry import ModelCache, build_module


def test_digits_cnn_accuracy_and_deterministic_training(models_dir, tmp_path):
    from safetensors.torch import save_file

    from workers.models import digits

    entry = ModelRegistry(models_dir).get("digits-cnn")
    assert entry.manifest.metrics["test_accuracy"] >= 0.95
    assert sum(p.numel() for p in build_module(entry).parameters()) == 5130
    model, metrics = digits.train()  # a second, independent training run
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    assert file_sha256(tmp_path / "w.safetensors") == entry.version, "training is not deterministic"
    assert metrics == entry.manifest.metrics


def test_digits_cnn_accuracy_recomputed_from_loaded_weights(model_cache):
    import numpy as np

    from workers.models.digits import load_split

    _, _, x_te, y_te = load_split()
    assert (len(x_te), len(load_split()[0])) == (360, 1437)
    model = model_cache.get("digits-cnn")
    logits = model.forward(torch.from_numpy(x_te)[:, None])
    assert float((logits.argmax(1).numpy() == y_te).mean()) >= 0.95
    assert np.isclose(float((logits.argmax(1).numpy() == y_te).mean()), model.manifest.metrics["test_accuracy"])


def test_user_models_torchvision_and_torchscript(models_dir, tmp_path):
    # a copy of the resnet18 user model, plus the same network as TorchScript
    shutil.copytree(models_dir / "resnet18-random", tmp_path / "resnet18-random")
    cache = ModelCache(tmp_path, tmp_path / "cache", device="cpu", onnx=False)
    eager = cache.get("resnet18-random")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    scripted_dir = tmp_path / "resnet18-ts"
    scripted_dir.mkdir()
    torch.jit.script(eager.module).save(str(scripted_dir / "model.pt"))
    manifest = json.loads((tmp_path / "resnet18-random" / "manifest.json").read_text())
    manifest.update(id="resnet18-ts", architecture="torchscript", arch_name=None, arch_kwargs={}, weights="model.pt")
    (scripted_dir / "manifest.json").write_text(json.dumps(manifest))
    cache.registry.max_age_s = 0  # see the new directory now (the registry re-scans every 3 s)
    scripted = cache.get("resnet18-ts")
    assert torch.allclose(scripted.forward(x), eager.forward(x), atol=1e-5)
    assert scripted.version == file_sha256(scripted_dir / "model.pt")


def test_sha256_mismatch_unknown_model_and_changed_version(models_dir, tmp_path):
    d = tmp_path / "digits-copy"
    shutil.copytree(models_dir / "digits-cnn", d)
    manifest = json.loads((d / "manifest.json").read_text())
    manifest.update(id="digits-copy", sha256="0" * 64)
    (d / "manifest.json").write_text(json.dumps(manifest))
    cache = ModelCache(tmp_path, tmp_path / "cache", device="cpu", onnx=False)
    with pytest.raises(JobFailure, match="sha256"):
        cache.get("digits-copy")
    with pytest.raises(UnknownModel):
        cache.get("nope")
    manifest["sha256"] = None
    (d / "manifest.json").write_text(json.dumps(manifest))
    cache.registry.max_age_s = 0
    with pytest.raises(BadParams, match="changed"):
        cache.get("digits-copy", version="f" * 64)
    assert cache.get("digits-copy").version == file_sha256(d / "weights.safetensors")


def test_broken_manifest_is_reported_not_fatal(models_dir, tmp_path):
    shutil.copytree(models_dir / "digits-cnn", tmp_path / "digits-cnn")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text('{"id": "broken"}')
    registry = ModelRegistry(tmp_path)
    assert list(registry.entries()) == ["digits-cnn"]
    assert "broken" in registry.problems
