"""`digits-cnn`: a small CNN trained deterministically on scikit-learn's digits.

The data set (1,797 8x8 images, values 0..16) ships with scikit-learn, so the model is
built on a fresh machine without any download. Fixed split (80/20, ``random_state=0``,
stratified: 1,437 train / 360 test), fixed seed, single thread, full determinism: the same
weights (and so the same sha256 version) on every run on the same platform.

Architecture (5,130 parameters): conv 1->16 3x3, ReLU, conv 16->32 3x3, ReLU, 2x2 max pool,
global average pool, linear 32->10. Input ``(N, 1, 8, 8)`` with pixel values in [0, 1].
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn

SEED = 0
TEST_FRACTION = 0.2
EPOCHS = 120
BATCH = 64
LR = 0.01


def build() -> nn.Module:
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(1, 16, 3, padding=1),
            relu1=nn.ReLU(),
            conv2=nn.Conv2d(16, 32, 3, padding=1),
            relu2=nn.ReLU(),
            pool=nn.MaxPool2d(2),
            gap=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            fc=nn.Linear(32, 10),
        )
    )


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fixed split: ``(x_train (1437, 8, 8) float32 in [0,1], y_train, x_test (360,8,8), y_test)``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=TEST_FRACTION, random_state=SEED, stratify=y
    )
    return x_tr, y_tr, x_te, y_te


def train() -> tuple[nn.Module, dict[str, float]]:
    """Train from scratch; returns the model (eval mode, CPU) and its metrics."""
    x_tr, y_tr, x_te, y_te = load_split()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reduction order fixed -> bit-identical weights run to run
    try:
        torch.manual_seed(SEED)
        model = build()
        opt = torch.optim.Adam(model.parameters(), lr=LR)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, EPOCHS)
        xt, yt = torch.from_numpy(x_tr)[:, None], torch.from_numpy(y_tr)
        gen = torch.Generator().manual_seed(SEED)
        model.train()
        for _ in range(EPOCHS):
            order = torch.randperm(len(xt), generator=gen)
            for i in range(0, len(xt), BATCH):
                idx = order[i : i + BATCH]
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
                loss.backward()
                opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            acc_te = (model(torch.from_numpy(x_te)[:, None]).argmax(1).numpy() == y_te).mean()
            acc_tr = (model(xt).argmax(1).numpy() == y_tr).mean()
    finally:
        torch.set_num_threads(threads)
    return model, {"test_accuracy": float(acc_te), "train_accuracy": float(acc_tr)}
