"""``--data SPEC``: a dataset name or a path to an image folder, loaded as one ``Dataset``."""
from __future__ import annotations

import difflib
import time
from pathlib import Path
from typing import Any, Mapping

from cnnlab.core.config import Config, ImageSize
from cnnlab.core.errors import CnnlabError
from cnnlab.data import check
from cnnlab.data.check import FolderScan
from cnnlab.data.dataset import Dataset
from cnnlab.data.listing import DEFAULT_TEST_SPLIT
from cnnlab.data.registry import DATASETS, looks_like_path, official


def load_dataset(spec: str, *, data_dir: str | Path | None = None, image_size: ImageSize | None = None,
                 bad_images: str = "error", download: bool = True, scan: FolderScan | None = None,
                 train_size: int | None = None, test_size: int | None = None, seed: int = 0,
                 test_split: float = DEFAULT_TEST_SPLIT, saved_split: Mapping[str, Any] | str | Path | None = None,
                 progress: bool = True) -> Dataset:
    """A registered dataset (``cnnlab.data.registry``) by name, else an image folder by path.

    For an image folder, ``train_size`` / ``test_size`` / ``seed`` decode only the subsets
    ``prepare_splits`` keeps, ``test_split`` / ``seed`` split a flat folder and ``saved_split``
    lists a run's saved split again (``folder.load_image_folder``); official datasets are
    read whole, as their archives hold them.
    """
    from cnnlab.data.download import default_data_dir
    root = default_data_dir(data_dir)
    source = official(spec)
    if source is not None:   # --image-size for it is refused by cnnlab.engine.prepare.check_config
        return source.load(root, download)
    if not Path(spec).exists() and not looks_like_path(spec):
        close = difflib.get_close_matches(spec, DATASETS, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise CnnlabError(f"--data {spec!r} is neither a known dataset nor an existing folder: {hint}"
                          f"use one of {', '.join(DATASETS)} or a path to a folder with "
                          f"train/<class>/<image> and test/<class>/<image>, or with <class>/<image> only")
    from cnnlab.data.folder import load_image_folder
    return load_image_folder(spec, image_size=image_size, cache_dir=root / "cache", bad_images=bad_images,
                             scan=scan, train_size=train_size, test_size=test_size, seed=seed,
                             test_split=test_split, saved_split=saved_split, progress=progress)


def load_for_config(cfg: Config, *, scan: FolderScan | None = None,
                    saved_split: Mapping[str, Any] | str | Path | None = None, progress: bool = True) -> Dataset:
    """``load_dataset`` with everything ``cfg`` says about the data: its seed, subsets and (once
    the config has it) ``test_split``. ``prepare_splits`` with the same config comes next."""
    return load_dataset(cfg.data, data_dir=cfg.data_dir, image_size=cfg.image_size, bad_images=cfg.bad_images,
                        scan=scan, train_size=cfg.train_size, test_size=cfg.test_size, seed=cfg.seed,
                        test_split=cfg.test_split, saved_split=saved_split,
                        progress=progress)


def check_dataset(spec: str, *, data_dir: str | Path | None = None, max_pixels: int | None = None) -> check.CheckReport:
    """Check ``--data SPEC``: an image folder in full, an official dataset by its loaded arrays."""
    if Path(spec).expanduser().is_dir():
        return check.check_folder(spec, max_pixels=max_pixels)
    start = time.perf_counter()
    ds = load_dataset(spec, data_dir=data_dir)   # anything else raises the error training gives
    report = check.report_for_dataset(spec, ds)
    report.seconds = time.perf_counter() - start
    return report
