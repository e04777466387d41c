"""Scores from predictions and labels, in one place for training, `cnnlab evaluate` and the
report (numpy only: the report imports no torch)."""
from __future__ import annotations

from typing import Any

import numpy as np

from cnnlab.core.errors import CnnlabError


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts (true, predicted) as int64 (num_classes, num_classes)."""
    labels, preds = np.asarray(labels).astype(np.int64), np.asarray(preds).astype(np.int64)
    return np.bincount(labels * num_classes + preds, minlength=num_classes * num_classes).reshape(num_classes,
                                                                                                num_classes)


def per_class_accuracy(labels: np.ndarray, preds: np.ndarray, class_names: list[str]) -> dict[str, float | None]:
    """Each class's share of its test images predicted right; None for a class with none."""
    counts = confusion_matrix(labels, preds, len(class_names))
    totals = counts.sum(1)
    return {n: (float(counts[i, i] / totals[i]) if totals[i] else None) for i, n in enumerate(class_names)}


def check_top_k(k: int) -> None:
    if k < 1:
        raise CnnlabError(f"--top-k must be at least 1, got {k}")


def most_probable(probs: np.ndarray, class_names: list[str], k: int) -> list[list[dict[str, Any]]]:
    """Per row of ``probs`` (N, classes), its ``k`` most probable classes, most probable first
    (equal probabilities by class order): ``[{"class": name, "probability": p}, ...]``."""
    check_top_k(k)
    probs = np.asarray(probs, dtype=np.float64)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[{"class": class_names[j], "probability": float(row[j])} for j in idx] for row, idx in zip(probs, order)]
