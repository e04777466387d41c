"""Scores from predictions and labels, in one place for training, `cnnlab evaluate`, the
tuner and the report (numpy only: the report imports no torch), and how far to trust them."""
from __future__ import annotations

import math
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


def accuracy_se(accuracy: float | None, n: int) -> float:
    """The binomial standard error of an accuracy measured on ``n`` images,
    sqrt(p (1 - p) / n): how far the same model's score moves between two draws of ``n``
    images. NaN without images or without an accuracy."""
    if not n or accuracy is None or not math.isfinite(accuracy):
        return float("nan")
    p = min(max(float(accuracy), 0.0), 1.0)
    return math.sqrt(p * (1.0 - p) / n)


def worst_case_se(n: int) -> float:
    """The standard error an accuracy near 50% has on ``n`` images (the largest any can have):
    what a split of that size can resolve, before anything is measured on it."""
    return accuracy_se(0.5, n)


def with_se(accuracy: float | None, n: int | None) -> str:
    """``61.20% ± 2.18`` (the standard error in percentage points), or the accuracy alone
    when the split size is unknown; a dash without an accuracy."""
    if accuracy is None or not math.isfinite(accuracy):
        return "–"
    se = accuracy_se(accuracy, n or 0)
    return f"{accuracy:.2%}" + (f" ± {100 * se:.2f}" if math.isfinite(se) else "")
