"""``cnnlab data show``: a labelled grid of sample images, the lesson's first look at the data."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cnnlab.core.errors import CnnlabError
from cnnlab.data.sources import load_dataset


def write_sample_grid(spec: str, out: str | Path, *, data_dir: str | None = None, per_class: int = 8,
                      seed: int = 0) -> Path:
    from cnnlab.report.plots import samples_figure, save_figure
    if per_class < 1:
        raise CnnlabError(f"--per-class must be at least 1, got {per_class}")
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise CnnlabError(f"--out {out} must end in .png")
    ds = load_dataset(spec, data_dir=data_dir)
    rng = np.random.default_rng(seed)
    labels = ds.train.labels
    shown = min(ds.num_classes, 20)  # beyond 20 classes a grid stops being readable
    picks = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(shown)])
    save_figure(samples_figure(ds.train.take(picks), labels[picks], ds.class_names, per_class), out)
    return out
