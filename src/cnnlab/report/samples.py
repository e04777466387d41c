"""``cnnlab data show``: a labelled grid of sample images, the lesson's first look at the data."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cnnlab.core.errors import CnnlabError
from cnnlab.data.sources import load_dataset


def write_sample_grid(spec: str, out: str | Path, *, data_dir: str | None = None, per_class: int = 8,
                      seed: int = 0, augment: str | None = None) -> Path:
    """``augment``: a preset's name (``cnnlab.data.augment.PRESETS``): the samples as a training
    batch of that preset sees them, mixed ones labelled by their larger share."""
    from cnnlab.data.augment import PRESETS
    from cnnlab.report.plots import samples_figure, save_figure
    if per_class < 1:
        raise CnnlabError(f"--per-class must be at least 1, got {per_class}")
    if augment is not None and augment not in PRESETS:
        raise CnnlabError(f"--augment {augment!r} is not a preset: choose one of {', '.join(PRESETS)}")
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise CnnlabError(f"--out {out} must end in .png")
    ds = load_dataset(spec, data_dir=data_dir)
    rng = np.random.default_rng(seed)
    labels = ds.train.labels
    shown = min(ds.num_classes, 20)  # beyond 20 classes a grid stops being readable
    picks = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(shown)])
    images, shown_labels, heading = ds.train.take(picks), labels[picks], "Training samples"
    if augment is not None:
        from cnnlab.data.augment import check_preset
        check_preset(augment, images.shape[1:3], ds.num_classes)
        images, shown_labels = _augmented(images, shown_labels, augment, ds.num_classes, seed)
        heading = f"Training samples, --augment {augment}"
    save_figure(samples_figure(images, shown_labels, ds.class_names, per_class, heading=heading), out)
    return out


def _augmented(images: np.ndarray, labels: np.ndarray, preset: str, num_classes: int,
               seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, H, W, C) as one training batch of ``preset`` draws them (seeded)."""
    import torch

    from cnnlab.data.augment import Augmentation, Draw
    from cnnlab.data.batches import model_input
    aug = Augmentation(num_classes, augment=preset)
    x = torch.as_tensor(images).permute(0, 3, 1, 2).contiguous()
    y = torch.as_tensor(labels)
    draw = Draw(torch.Generator().manual_seed(seed), 0, torch.zeros(len(x), dtype=torch.bool), torch.arange(len(x)))
    mixed, soft = aug.mix(model_input(aug(x, draw)), y, draw)
    hard = soft.argmax(1) if soft.ndim == 2 else soft
    out = (mixed * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out, hard.numpy()
