"""Image folders: ``root/{train,val,test}/<class>/<image>``, decoded once and cached.

Every image is converted to one size (``image_size``, default the most common size found)
and one channel count (1 when every image is greyscale, else 3). Decoding uses a process
pool, since Pillow's JPEG decoder holds the GIL; the decoded arrays are cached under the data
directory, keyed by the files' names, sizes and modification times, so a second load only
lists the folder and reads one file.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np

from cnnlab.data import check
from cnnlab.data.check import FolderScan
from cnnlab.data.dataset import Dataset, Split
from cnnlab.data.images import GREY_MODES
from cnnlab.data.listing import SPLITS, FolderListing, _headers, _map_chunks

CACHE_VERSION = 2   # 2: symlinks leaving the root refused; check results cached


def _fingerprint(listing: FolderListing, image_size: int | None) -> str:
    key = f"v{CACHE_VERSION}|{listing.root.resolve()}|{image_size}\n{listing.stamp}"
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def load_image_folder(root: str | Path, *, image_size: int | None = None,
                      cache_dir: Path | None = None, bad_images: str = "error",
                      scan: FolderScan | None = None) -> Dataset:
    """Check and decode an image folder into a ``Dataset`` (from the cache when nothing changed).

    The check is ``cnnlab data check``'s own (``cnnlab.data.check``), made in the same pass as
    the decoding. ``bad_images``: "error" stops with the list of every problem that blocks
    training; "skip" leaves out the unusable files (unreadable, over the pixel limit, symlinks
    leaving the folder) and counts them in ``Dataset.skipped``. Layout problems (missing
    splits, differing or empty classes) stop it either way. ``scan``: the folder's walk
    (``check.scan_folder(root)``) when the caller has made it already.
    """
    listing, report = scan or check.scan_folder(root)
    # Layout errors stop before anything is decoded; unusable files are listed after decoding.
    check.enforce(report, "skip")
    scanned = len(report.problems)   # the walk's findings are redone on every load, never cached
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"folder-{_fingerprint(listing, image_size)}-{bad_images}"
        if cache_file.exists():
            try:
                ds = _read_cache(cache_file, listing)
                cached = json.loads((cache_file / "meta.json").read_text())["problems"]
            except (OSError, ValueError, KeyError):
                pass  # a damaged cache is rebuilt below
            else:
                report.problems += [check.Problem(**p) for p in cached]
                check.enforce(report, bad_images)
                ds.skipped = len(report.skippable)
                return ds
    all_paths = [p for split in listing.files for p, _ in listing.files[split]]
    headers = [h for chunk in _map_chunks(_headers, all_paths) for h in chunk]
    good = [h for h in headers if not isinstance(h, str)] or [((1, 1), "RGB")]   # all bad: reported below
    if image_size is not None:
        size = (image_size, image_size)
    else:
        size = Counter(s for s, _ in good).most_common(1)[0][0]
    channels = 1 if all(m in GREY_MODES for _, m in good) else 3
    images, usable = check.inspect_files(listing, report, decode=(size, channels))
    assert images is not None   # decode was given
    check.enforce(report, bad_images)
    splits, offset = {}, 0
    for split, entries in listing.files.items():
        keep = usable[offset:offset + len(entries)]
        labels = np.array([label for _, label in entries], dtype=np.int64)[keep]
        splits[split] = Split(images[offset:offset + len(entries)][keep], labels)
        offset += len(entries)
    ds = Dataset(listing.root.name, listing.class_names, splits["train"], splits["test"],
                 splits.get("val"), skipped=len(report.skippable))
    if cache_file is not None:
        _write_cache(cache_file, ds, problems=[asdict(p) for p in report.problems[scanned:]])
    return ds


def _write_cache(path: Path, ds: Dataset, problems: list[dict] | None = None) -> None:
    """One .npy per array in a folder, renamed into place whole: loads in a fraction of a second."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        part = getattr(ds, split)
        if part is not None:
            np.save(tmp / f"{split}_images.npy", part.images)
            np.save(tmp / f"{split}_labels.npy", part.labels)
    (tmp / "meta.json").write_text(json.dumps({"class_names": ds.class_names, "skipped": ds.skipped,
                                               "problems": problems or []}))   # the check's, per file
    try:
        os.replace(tmp, path)
    except OSError:  # another process cached the same folder first
        shutil.rmtree(tmp, ignore_errors=True)


def _read_cache(path: Path, listing: FolderListing) -> Dataset:
    meta = json.loads((path / "meta.json").read_text())
    parts = {s: Split(np.load(path / f"{s}_images.npy"), np.load(path / f"{s}_labels.npy"))
             for s in SPLITS if (path / f"{s}_images.npy").exists()}
    return Dataset(listing.root.name, meta["class_names"], parts["train"], parts["test"],
                   parts.get("val"), skipped=meta["skipped"])
