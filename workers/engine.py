"""Forward engine: the fastest way to evaluate a model forward-only, checked against eager.

(Minimal eager version; the ONNX Runtime engine and batch-size measurement replace it.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from schemas.manifests import ModelEntry
from workers.explain.base import ForwardFn


@dataclass
class Engine:
    name: str
    forward: ForwardFn
    batch_size: int
    grad_batch_size: int


def eager_forward(module: nn.Module) -> ForwardFn:
    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(x)

    return forward


def build_engine(
    module: nn.Module, entry: ModelEntry, cache_dir: Path, device: torch.device, use_onnx: bool = True
) -> Engine:
    return Engine("eager", eager_forward(module), 16, 8)
