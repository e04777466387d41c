"""``--data SPEC``: a dataset name or a path to an image folder, loaded as one ``Dataset``."""
from __future__ import annotations

import difflib
import time
from pathlib import Path

from cnnlab.core.errors import CnnlabError
from cnnlab.data import check
from cnnlab.data.check import FolderScan
from cnnlab.data.dataset import Dataset
from cnnlab.data.registry import DATASETS, looks_like_path, official


def load_dataset(spec: str, *, data_dir: str | Path | None = None, image_size: int | None = None,
                 bad_images: str = "error", download: bool = True, scan: FolderScan | None = None) -> Dataset:
    """A registered dataset (``cnnlab.data.registry``) by name, else an image folder by path."""
    from cnnlab.data.download import default_data_dir
    root = default_data_dir(data_dir)
    source = official(spec)
    if source is not None:
        if image_size is not None:
            h, w, _ = source.image_shape
            raise CnnlabError(f"--image-size applies to image folders; {spec} is always {h}x{w}")
        return source.load(root, download)
    if not Path(spec).exists() and not looks_like_path(spec):
        close = difflib.get_close_matches(spec, DATASETS, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise CnnlabError(f"--data {spec!r} is neither a known dataset nor an existing folder: {hint}"
                          f"use one of {', '.join(DATASETS)} or a path to a folder with "
                          f"train/<class>/<image> and test/<class>/<image>")
    from cnnlab.data.folder import load_image_folder
    return load_image_folder(spec, image_size=image_size, cache_dir=root / "cache", bad_images=bad_images,
                             scan=scan)


def check_dataset(spec: str, *, data_dir: str | Path | None = None, max_pixels: int | None = None) -> check.CheckReport:
    """Check ``--data SPEC``: an image folder in full, an official dataset by its loaded arrays."""
    if Path(spec).expanduser().is_dir():
        return check.check_folder(spec, max_pixels=max_pixels)
    start = time.perf_counter()
    ds = load_dataset(spec, data_dir=data_dir)   # anything else raises the error training gives
    report = check.report_for_dataset(spec, ds)
    report.seconds = time.perf_counter() - start
    return report
