"""What every job kind receives and returns.

A kind module exposes ``run(model: LoadedModel, inputs: Inputs, params, progress) -> KindResult``.
The generic pipeline (``workers.pipeline``) loads the model, decodes and preprocesses the
images, picks targets, calls ``run`` and stores what it returns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from schemas.models import ModelManifest


class ProgressFn(Protocol):
    def __call__(self, done: int, total: int, stage: str) -> None:
        """Report ``done`` of ``total`` units of work in ``stage``; raises ``JobCanceled``
        when the client canceled the job, so long loops stop at the next chunk."""


def no_progress(done: int, total: int, stage: str) -> None:
    """A progress callback that reports nowhere (for direct calls and tests)."""


ForwardFn = Callable[[torch.Tensor], torch.Tensor]
"""Logits ``(N, K)`` of a batch ``(N, C, H, W)``; forward only, no gradients."""


@dataclass
class LoadedModel:
    """A model loaded once per worker and kept warm.

    ``module`` is in eval mode on ``device`` with ``requires_grad=False`` on its parameters
    (gradient methods differentiate with respect to the input only). ``forward`` is the
    fastest forward-only engine for it (ONNX Runtime when it matches eager, else eager);
    use it for every evaluation that needs no gradient. ``batch_size`` is the chunk size
    measured for forward passes on this device, ``grad_batch_size`` for forward+backward.
    ``deeplift_cache_mb`` bounds the reference activations DeepLift keeps for shared
    baselines (:mod:`workers.explain.deeplift`). ``predict_forward``: the predict batcher's
    own ONNX Runtime session of the same model (``workers.engine.Engine``), None when
    predicts share ``forward``.
    """

    manifest: ModelManifest
    version: str
    module: nn.Module
    device: torch.device
    forward: ForwardFn
    batch_size: int = 16
    grad_batch_size: int = 8
    engine_name: str = "eager"
    deeplift_cache_mb: int = 256
    predict_forward: ForwardFn | None = None

    @property
    def id(self) -> str:
        return self.manifest.id

    @property
    def num_classes(self) -> int:
        return len(self.manifest.labels)

    @contextmanager
    def forward_only(self) -> Iterator[None]:
        """For a block whose model evaluations all go through ``forward``: on the CPU ONNX
        Runtime engine, torch's own ops in it (building the perturbed batches) run on one
        thread, so that torch's OpenMP threads, spinning after each op, leave the cores to
        ONNX Runtime's threads (two threads, efficientnet-lite0: 1.1-1.7x faster;
        ``benchmarks/thread_pools.py``, docs/performance.md). Elsewhere (eager engine, GPU)
        it changes nothing."""
        if self.device.type != "cpu" or not self.engine_name.startswith("onnxruntime"):
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def submodule(self, name: str) -> nn.Module:
        """The module called ``name`` (as in ``named_modules``); BadParams if absent."""
        from schemas.errors import BadParams

        try:
            return self.module.get_submodule(name)
        except AttributeError:
            raise BadParams(f"model {self.id!r} has no layer {name!r}", details={"layer": name}) from None


@dataclass
class Inputs:
    """The job's images, preprocessed, with their targets.

    images:  ``(N, C, H, W)`` float tensor on the model's device, normalised for the model.
    display: N uint8 arrays ``(H, W, 3)``, the same images resized to the model's input
             size before normalisation (what overlays are drawn on).
    targets: ``(N,)`` long tensor, the class explained for each image.
    probs:   ``(N, K)`` softmax probabilities of the unperturbed images.
    regions: per image, the region of the upload the input (so every map) covers:
             ``{left, top, width, height}`` in upload pixels and the ``resize`` used
             (``workers.registry.input_region``).
    sizes:   N ``(H0, W0)``, the uploaded images' sizes in pixels (regions given in their
             pixels are mapped through the preprocessing: ``schemas.regions``).
    """

    images: torch.Tensor
    display: list[np.ndarray]
    targets: torch.Tensor
    probs: torch.Tensor
    regions: list[dict[str, Any]] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass
class Artifact:
    """A result file: ``data`` stored beside the job in Redis, or (``path``) a large file
    already written to the data volume (``settings.data_dir``), served from there."""

    name: str
    data: bytes
    media_type: str
    path: Path | None = None

    @property
    def size(self) -> int:
        return len(self.data) if self.path is None else self.path.stat().st_size


@dataclass
class KindResult:
    """``summary`` is the JSON result (small); ``artifacts`` the PNG/NPY/CSV files."""

    summary: dict[str, Any]
    artifacts: list[Artifact] = field(default_factory=list)


class JobCanceled(Exception):
    """Raised by a progress callback when the job was canceled."""
