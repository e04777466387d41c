"""``--data SPEC``: a dataset name or a path to an image folder, loaded as one ``Dataset``."""
from __future__ import annotations

import difflib
import time
from pathlib import Path

from cnnlab.core.errors import CnnlabError
from cnnlab.data import check
from cnnlab.data.check import FolderScan
from cnnlab.data.dataset import Dataset

OFFICIAL = ("cifar10", "cifar100", "mnist", "fashion-mnist")


def load_dataset(spec: str, *, data_dir: str | Path | None = None, image_size: int | None = None,
                 bad_images: str = "error", download: bool = True, scan: FolderScan | None = None) -> Dataset:
    from cnnlab.data.download import default_data_dir
    root = default_data_dir(data_dir)
    looks_like_path = any(sep in spec for sep in ("/", "\\")) or spec.startswith(".") or Path(spec).is_dir()
    if spec in OFFICIAL and not looks_like_path:
        if image_size is not None:
            raise CnnlabError(f"--image-size applies to image folders; {spec} is always "
                              f"{'32x32' if spec.startswith('cifar') else '28x28'}")
        if spec.startswith("cifar"):
            from cnnlab.data.cifar import load_cifar
            return load_cifar(spec, root, download=download)
        from cnnlab.data.idx import load_idx_dataset
        return load_idx_dataset(spec, root, download=download)
    if not looks_like_path and not Path(spec).exists():
        close = difflib.get_close_matches(spec, OFFICIAL, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise CnnlabError(f"--data {spec!r} is neither a known dataset nor an existing folder: {hint}"
                          f"use one of {', '.join(OFFICIAL)} or a path to a folder with "
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
