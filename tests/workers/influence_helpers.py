"""Hand-built models and closed-form influence for the influence-function tests."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from schemas.models import ModelManifest, Preprocessing
from workers.explain.base import LoadedModel


def hand_model(module: nn.Module, num_classes: int, version: str, size: tuple[int, int] = (8, 8)) -> LoadedModel:
    """A ``LoadedModel`` around a hand-built module (eval mode, frozen, eager forward)."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    manifest = ModelManifest(
        id="hand-built",
        architecture="torchvision",
        weights="none.safetensors",
        preprocessing=Preprocessing(size=size, mode="L", mean=[0.0], std=[1.0]),
        labels=[f"c{k}" for k in range(num_classes)],
    )

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(x)

    return LoadedModel(manifest, version, module, torch.device("cpu"), forward, batch_size=64, grad_batch_size=64)


def softmax_regression_influence(
    w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray, xt: np.ndarray, yt: np.ndarray, damping: float
) -> np.ndarray:
    """Closed-form influence for logits = W x + b (float64): per-example Jacobian
    ``J_i[k, k*D + j] = x_ij``, ``J_i[k, K*D + k] = 1`` for theta = (vec W, b); the Hessian of
    the mean cross-entropy is ``mean_i J_i^T (diag p_i - p_i p_i^T) J_i`` (logits are linear
    in theta); scores ``(T, n)`` = ``g_t^T (H + damping I)^-1 g_i``."""
    k, d = w.shape

    def jac(xi: np.ndarray) -> np.ndarray:
        j = np.zeros((k, k * d + k))
        for c in range(k):
            j[c, c * d : (c + 1) * d] = xi
            j[c, k * d + c] = 1.0
        return j

    def probs(xi: np.ndarray) -> np.ndarray:
        z = w @ xi + b
        e = np.exp(z - z.max())
        return e / e.sum()

    size = k * d + k
    h = np.zeros((size, size))
    g_train = []
    for xi, yi in zip(x, y, strict=True):
        j, p = jac(xi), probs(xi)
        h += j.T @ (np.diag(p) - np.outer(p, p)) @ j
        g_train.append(j.T @ (p - np.eye(k)[yi]))
    h = h / len(x) + damping * np.eye(size)
    g_test = np.stack([jac(xi).T @ (probs(xi) - np.eye(k)[yi]) for xi, yi in zip(xt, yt, strict=True)])
    return g_test @ np.linalg.solve(h, np.stack(g_train).T)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])
