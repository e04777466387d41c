"""The run folder: where each file of a run lives (the one place their names are written), and
what the files hold, read as plain JSON and arrays.

    <run>/config.json        {"config": resolved Config, "environment": versions, device, threads}
    <run>/model.safetensors  Classifier weights (network + normalisation buffers), never a pickle
    <run>/model.json         architecture, classes, input shape, normalisation: how to rebuild it
    <run>/history.json/.csv  per-epoch lists: loss, accuracy, val_loss, val_accuracy, lr, seconds
    <run>/metrics.json       final figures: validation and test sizes, the test set's identity
                             and scores, per-class accuracy (no test figures: "tested": false)
    <run>/run.lock           held (flock) by the one process training or resuming the run; its pid
    <run>/splits.json        an image folder's train/val/test file lists (a flat folder's, seeded)
    <run>/evaluation.npz     test logits and labels, sample images, mistakes and their Grad-CAM
    <run>/plots/*.png, <run>/report.html, <run>/tensorboard/, <run>/checkpoints/
    <run>/model.onnx, <run>/explain/  what ``cnnlab export`` and ``cnnlab explain`` write by default

Reading is lenient: a report must be rebuildable anywhere the folder is copied, from a run
written by an older or newer cnnlab, so nothing here re-validates the config. What needs the
config as a typed ``Config`` or the model itself is ``cnnlab.engine.runs.Run``, built on this.
"""
from __future__ import annotations

import json
import math
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from cnnlab.core.errors import CnnlabError

REQUIRED = ("model.json", "history.json")


class RunFolder:
    """One run folder; its files are read when first asked for."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # -- layout --------------------------------------------------------------------------
    config_file = property(lambda self: self.path / "config.json")
    weights_file = property(lambda self: self.path / "model.safetensors")
    card_file = property(lambda self: self.path / "model.json")
    history_file = property(lambda self: self.path / "history.json")
    history_csv_file = property(lambda self: self.path / "history.csv")
    metrics_file = property(lambda self: self.path / "metrics.json")
    splits_file = property(lambda self: self.path / "splits.json")      # an image folder's split
    evaluation_file = property(lambda self: self.path / "evaluation.npz")
    report_file = property(lambda self: self.path / "report.html")
    plots_dir = property(lambda self: self.path / "plots")
    tensorboard_dir = property(lambda self: self.path / "tensorboard")
    explain_dir = property(lambda self: self.path / "explain")          # cnnlab explain's default
    onnx_file = property(lambda self: self.path / "model.onnx")         # cnnlab export's default
    checkpoints_dir = property(lambda self: self.path / "checkpoints")
    last_checkpoint = property(lambda self: self.checkpoints_dir / "last.safetensors")
    lock_file = property(lambda self: self.path / "run.lock")           # engine.runs.writing_run

    # -- contents ------------------------------------------------------------------------
    @cached_property
    def card(self) -> dict[str, Any]:
        return _read_json(self.card_file)

    @cached_property
    def history(self) -> dict[str, list]:
        return _read_json(self.history_file) if self.history_file.is_file() else {}

    @cached_property
    def _config_doc(self) -> dict[str, Any]:
        doc = _read_json(self.config_file) if self.config_file.is_file() else {}
        return doc if isinstance(doc, dict) else {}

    @property
    def saved_config(self) -> dict[str, Any]:
        """config.json's config, as written (``Run.config`` is the validated ``Config``)."""
        return self._config_doc.get("config") or {}

    @property
    def environment(self) -> dict[str, Any]:
        return self._config_doc.get("environment") or {}

    @cached_property
    def metrics(self) -> dict[str, Any]:
        metrics = _read_json(self.metrics_file) if self.metrics_file.is_file() else {}
        return metrics if isinstance(metrics, dict) else {}

    @cached_property
    def evaluation(self) -> dict[str, np.ndarray] | None:
        """``evaluation.npz`` (test logits, labels, mistakes, samples), or None if absent."""
        path = self.evaluation_file
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as e:
            raise CnnlabError(f"cannot read {path}: {e}; rebuild it with `cnnlab evaluate {self.path}`") from None

    # -- what reports ask of the contents --------------------------------------------------
    @property
    def name(self) -> str:
        return self.path.resolve().name

    @property
    def class_names(self) -> list[str]:
        names = self.card.get("class_names")
        if names:
            return [str(n) for n in names]
        return [str(i) for i in range(int(self.card.get("num_classes", 0)))]

    @property
    def epochs(self) -> int:
        return len(self.history.get("loss", []))

    def series(self, key: str) -> np.ndarray:
        """A history column as float64, with None (no validation) as NaN."""
        values = self.history.get(key) or []
        return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)

    @property
    def train_seconds(self) -> float | None:
        seconds = self.metrics.get("train_seconds")
        if seconds is None and self.history.get("seconds"):
            seconds = float(np.nansum(self.series("seconds")))
        return seconds

    @property
    def best_val(self) -> tuple[float, int] | None:
        """(best validation accuracy, its 1-based epoch), or None without validation."""
        va = self.series("val_accuracy")
        if not np.isfinite(va).any():
            return None
        i = int(np.nanargmax(va))
        return float(va[i]), i + 1


def read_run(path: str | Path) -> RunFolder:
    """A finished run folder, for plots and reports; a one-line error if it is not one."""
    run = RunFolder(path)
    if not run.path.is_dir():
        raise CnnlabError(f"{run.path} is not a cnnlab run folder: no such folder")
    missing = [n for n in REQUIRED if not (run.path / n).is_file()]
    if missing:
        raise CnnlabError(f"{run.path} is not a finished cnnlab run folder: {', '.join(missing)} missing "
                          f"(written by `cnnlab train` when a run ends)")
    if not isinstance(run.card, dict) or not isinstance(run.history, dict) \
            or not isinstance(run.history.get("loss"), list):
        raise CnnlabError(f"{run.path}: model.json or history.json does not hold what cnnlab writes "
                          f"(expected objects, history with a 'loss' list)")
    run._config_doc  # noqa: B018  (a damaged config.json fails here, not halfway through a report)
    return run


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise CnnlabError(f"cannot read {path}: {e}") from None
    except ValueError as e:
        raise CnnlabError(f"{path} is not valid JSON ({e}): the run folder is damaged") from None


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
