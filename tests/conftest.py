"""Shared fixtures: prepared built-in models, a random-weight resnet18 user model, a model cache.

Models are prepared once into ``var/test-models`` (override with INSPECTOR_TEST_MODELS_DIR)
and reused across runs; preparing from scratch takes about 30 s on 2 cores.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = Path(os.environ.get("INSPECTOR_TEST_MODELS_DIR", ROOT / "var" / "test-models"))


def write_resnet18_random(models_dir: Path) -> None:
    """A torchvision resnet18 with fixed random weights (seed 0), as a user model directory."""
    if (models_dir / "resnet18-random" / "manifest.json").exists():
        return
    import torch
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    module = torchvision.models.resnet18(num_classes=10)
    d = models_dir / "resnet18-random"
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(d / "weights.safetensors"))
    manifest = {
        "id": "resnet18-random",
        "description": "torchvision resnet18, random weights (seed 0), 10 classes: a user model",
        "architecture": "torchvision",
        "arch_name": "resnet18",
        "arch_kwargs": {"num_classes": 10},
        "weights": "weights.safetensors",
        "preprocessing": {"size": [64, 64], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "labels": [f"class-{i}" for i in range(10)],
        "gradcam_layer": "layer4",
        "layers": ["layer1", "layer2", "layer3", "layer4", "fc"],
    }
    (d / "manifest.json").write_text(json.dumps(manifest, indent=2))


@pytest.fixture(scope="session")
def models_dir() -> Path:
    from workers.registry import prepare_builtin_models

    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    prepare_builtin_models(MODELS_DIR)
    write_resnet18_random(MODELS_DIR)
    return MODELS_DIR


@pytest.fixture(scope="session")
def model_cache(models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from workers.registry import ModelCache

    return ModelCache(models_dir, tmp_path_factory.mktemp("cache"), device="cpu")


@pytest.fixture(scope="session")
def chelsea():
    """``skimage.data.chelsea()``: a photo of a cat, ``(300, 451, 3)`` uint8."""
    from skimage import data

    return data.chelsea()
