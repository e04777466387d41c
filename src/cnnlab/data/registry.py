"""The datasets ``--data NAME`` knows: each official source, what it holds and how it loads.

Adding one is a row here and a reader beside ``cifar.py`` and ``idx.py`` (official archive,
its checksum, a reader that refuses anything else). Image folders need no row: any path is one.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

from cnnlab.data.cifar import load_cifar
from cnnlab.data.dataset import Dataset
from cnnlab.data.idx import load_idx_dataset


@dataclass(frozen=True)
class OfficialDataset:
    name: str
    about: str                                  # one line for `cnnlab datasets`
    image_shape: tuple[int, int, int]           # (H, W, C) of every image
    load: Callable[[Path, bool], Dataset]       # (data directory, download when missing)


DATASETS: dict[str, OfficialDataset] = {d.name: d for d in (
    OfficialDataset("cifar10", "60,000 colour photos, 10 classes (Krizhevsky 2009)", (32, 32, 3),
                    partial(load_cifar, "cifar10")),
    OfficialDataset("cifar100", "60,000 colour photos, 100 classes (fine labels)", (32, 32, 3),
                    partial(load_cifar, "cifar100")),
    OfficialDataset("mnist", "70,000 grey handwritten digits, 10 classes (LeCun et al. 1998)", (28, 28, 1),
                    partial(load_idx_dataset, "mnist")),
    OfficialDataset("fashion-mnist", "70,000 grey clothing photos, 10 classes (Xiao et al. 2017)", (28, 28, 1),
                    partial(load_idx_dataset, "fashion-mnist")),
)}


def looks_like_path(spec: str) -> bool:
    return any(sep in spec for sep in ("/", "\\")) or spec.startswith(".")


def official(spec: str) -> OfficialDataset | None:
    """The registered dataset ``--data SPEC`` names, or None for a path (an existing folder
    named like a dataset is read as that folder)."""
    return None if looks_like_path(spec) or Path(spec).is_dir() else DATASETS.get(spec)
