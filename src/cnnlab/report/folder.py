"""Read a run folder for reporting: plain JSON and arrays, no model, no dataset.

Reports must be rebuildable anywhere the folder is copied, and must not fail on a run
written by an older or newer cnnlab, so this reads the files as they are instead of
re-validating the config (``cnnlab.engine.runs.load_run`` does that for commands that train or
predict).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from cnnlab.core.errors import CnnlabError

REQUIRED = ("model.json", "history.json")


@dataclass
class RunRecord:
    path: Path
    card: dict[str, Any]
    history: dict[str, list]
    config: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

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

    @cached_property
    def evaluation(self) -> dict[str, np.ndarray] | None:
        """``evaluation.npz`` (test logits, labels, mistakes, samples), or None if absent."""
        path = self.path / "evaluation.npz"
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as e:
            raise CnnlabError(f"cannot read {path}: {e}; rebuild it with `cnnlab evaluate {self.path}`") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise CnnlabError(f"cannot read {path}: {e}") from None
    except ValueError as e:
        raise CnnlabError(f"{path} is not valid JSON ({e}): the run folder is damaged") from None


def read_run(path: str | Path) -> RunRecord:
    """The parts of a run folder that plots and reports use; a one-line error if it is not one."""
    path = Path(path)
    if not path.is_dir():
        raise CnnlabError(f"{path} is not a cnnlab run folder: no such folder")
    missing = [n for n in REQUIRED if not (path / n).is_file()]
    if missing:
        raise CnnlabError(f"{path} is not a finished cnnlab run folder: {', '.join(missing)} missing "
                          f"(written by `cnnlab train` when a run ends)")
    card = _read_json(path / "model.json")
    history = _read_json(path / "history.json")
    if not isinstance(card, dict) or not isinstance(history, dict) or not isinstance(history.get("loss"), list):
        raise CnnlabError(f"{path}: model.json or history.json does not hold what cnnlab writes "
                          f"(expected objects, history with a 'loss' list)")
    doc = _read_json(path / "config.json") if (path / "config.json").is_file() else {}
    metrics = _read_json(path / "metrics.json") if (path / "metrics.json").is_file() else {}
    return RunRecord(path, card, history, doc.get("config", {}) or {}, doc.get("environment", {}) or {},
                     metrics if isinstance(metrics, dict) else {})


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
