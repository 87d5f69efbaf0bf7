"""Table 1's scores (papers/fill-in-the-blanks §4.3): accuracy, macro- and weighted-average
F1 (scikit-learn's definitions, over the classes present in either labels or predictions),
in percent, and the confusion matrix."""

from __future__ import annotations

from typing import Any

import numpy as np


def scores(predicted: list[int], labels: list[int]) -> dict[str, Any]:
    """``{"n", "accuracy", "macro_f1", "weighted_f1"}`` (percent; None when ``n`` is 0)."""
    from sklearn.metrics import accuracy_score, f1_score

    if not labels:
        return {"n": 0, "accuracy": None, "macro_f1": None, "weighted_f1": None}
    return {
        "n": len(labels),
        "accuracy": round(100.0 * float(accuracy_score(labels, predicted)), 2),
        "macro_f1": round(100.0 * float(f1_score(labels, predicted, average="macro", zero_division=0)), 2),
        "weighted_f1": round(100.0 * float(f1_score(labels, predicted, average="weighted", zero_division=0)), 2),
    }


def confusion(predicted: list[int], labels: list[int], n_classes: int) -> np.ndarray:
    """``(K, K)`` int64 counts: row = label, column = prediction."""
    out = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(out, (np.asarray(labels, np.int64), np.asarray(predicted, np.int64)), 1)
    return out
