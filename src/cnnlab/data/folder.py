"""Image folders (``root/{train,val,test}/<class>/<image>`` or ``root/<class>/<image>``),
decoded once and cached.

Every image is converted to one size (``image_size``, default the most common size among the
decoded images) and one channel count (1 when every decoded image is greyscale, else 3).
Only the images asked for are decoded: with ``train_size`` / ``test_size`` the reader takes
the very subsets ``dataset.prepare_splits`` would take (the same stratified indices from the
same generators), so CIFAR-10's first ``--train-size 500`` load decodes 10,500 files, not
60,000. Decoding uses a process pool, since Pillow's JPEG decoder holds the GIL; the decoded
arrays are cached under the data directory, keyed by the files' names, sizes and modification
times and by the subset chosen, so a second load only lists the folder and reads one file.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from cnnlab.core.config import ImageSize
from cnnlab.data import check
from cnnlab.data.check import FolderScan
from cnnlab.data.dataset import TEST_SUBSET, TRAIN_SUBSET, Dataset, Split, subset_index
from cnnlab.data.images import GREY_MODES
from cnnlab.data.listing import DEFAULT_TEST_SPLIT, SPLITS, FolderListing, _headers, _map_chunks, progress_bar

CACHE_VERSION = 2   # 2: symlinks leaving the root refused; check results cached


def _fingerprint(listing: FolderListing, image_size: ImageSize | None, chosen: Mapping[str, np.ndarray]) -> str:
    key = f"v{CACHE_VERSION}|{listing.root.resolve()}|{image_size}\n{listing.stamp}"
    if chosen:   # a subset: which files, so a changed --train-size or seed never reads a stale cache
        key += "\n" + "\n".join(f"{split}:{hashlib.sha256(ix.astype(np.int64).tobytes()).hexdigest()}"
                                for split, ix in sorted(chosen.items()))
    return hashlib.sha256(os.fsencode(key)).hexdigest()[:24]   # fsencode: names need not be UTF-8


def chosen_subsets(listing: FolderListing, train_size: int | None, test_size: int | None,
                   seed: int) -> dict[str, np.ndarray]:
    """split -> the listing indices ``prepare_splits`` keeps for ``train_size`` / ``test_size``;
    a split kept whole is absent."""
    out = {}
    for split, size, purpose in (("train", train_size, TRAIN_SUBSET), ("test", test_size, TEST_SUBSET)):
        files = listing.files.get(split)
        if size is not None and files is not None and size < len(files):
            labels = np.array([label for _, label in files], dtype=np.int64)
            out[split] = subset_index(labels, size, seed, purpose)
    return out


def load_image_folder(root: str | Path, *, image_size: ImageSize | None = None,
                      cache_dir: Path | None = None, bad_images: str = "error",
                      scan: FolderScan | None = None, train_size: int | None = None,
                      test_size: int | None = None, seed: int = 0, test_split: float = DEFAULT_TEST_SPLIT,
                      saved_split: Mapping[str, Any] | str | Path | None = None,
                      progress: bool = True) -> Dataset:
    """Check and decode an image folder into a ``Dataset`` (from the cache when nothing changed).

    The check is ``cnnlab data check``'s own (``cnnlab.data.check``), made in the same pass as
    the decoding. ``bad_images``: "error" stops with the list of every problem that blocks
    training; "skip" leaves out the unusable files (unreadable, over the pixel limit, symlinks
    leaving the folder) and counts them in ``Dataset.skipped``. Layout problems (missing
    splits, differing or empty classes) stop it either way. ``scan``: the folder's walk
    (``check.scan_folder(root, ...)``) when the caller has made it already; else the folder
    is walked with ``test_split``, ``seed`` and ``saved_split`` (``listing.list_folder``'s).

    ``train_size`` / ``test_size`` / ``seed``: decode only the subsets ``prepare_splits``
    takes with the same values (which then keeps them whole); the validation split is never
    subset. Only the chosen files are checked. ``progress``: a bar on stderr when decoding
    takes more than a couple of seconds and stderr is a terminal.
    """
    listing, report = scan or check.scan_folder(root, test_split=test_split, seed=seed, saved_split=saved_split)
    # Layout errors stop before anything is decoded; unusable files are listed after decoding.
    check.enforce(report, "skip")
    scanned = len(report.problems)   # the walk's findings are redone on every load, never cached
    chosen = chosen_subsets(listing, train_size, test_size, seed)
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"folder-{_fingerprint(listing, image_size, chosen)}-{bad_images}"
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
    wanted = listing.subset(chosen) if chosen else listing
    all_paths = [p for split in wanted.files for p, _ in wanted.files[split]]
    bar = progress_bar(len(all_paths), f"sizing {listing.root.name}", progress)
    try:
        chunks = _map_chunks(_headers, all_paths, done=bar.update if bar else None)
    finally:
        if bar is not None:
            bar.close()
    headers = [h for chunk in chunks for h in chunk]
    good = [h for h in headers if not isinstance(h, str)] or [((1, 1), "RGB")]   # all bad: reported below
    if image_size is not None:   # (width, height), as Pillow sizes go
        size = (image_size, image_size) if isinstance(image_size, int) else (image_size[1], image_size[0])
    else:
        size = Counter(s for s, _ in good).most_common(1)[0][0]
    channels = 1 if all(m in GREY_MODES for _, m in good) else 3
    images, usable = check.inspect_files(wanted, report, decode=(size, channels), progress=progress)
    assert images is not None   # decode was given
    check.enforce(report, bad_images)
    splits, offset = {}, 0
    for split, entries in wanted.files.items():
        keep = usable[offset:offset + len(entries)]
        labels = np.array([label for _, label in entries], dtype=np.int64)[keep]
        splits[split] = Split(images[offset:offset + len(entries)][keep], labels)
        offset += len(entries)
    ds = Dataset(listing.root.name, listing.class_names, splits["train"], splits["test"],
                 splits.get("val"), skipped=len(report.skippable))
    if cache_file is not None:
        _write_cache(cache_file, ds, problems=[asdict(p) for p in report.problems[scanned:]])
    return ds


_unwritable: set[Path] = set()   # cache folders this process has warned about


def _write_cache(path: Path, ds: Dataset, problems: list[dict] | None = None) -> None:
    """One .npy per array in a folder, renamed into place whole: loads in a fraction of a second.
    Best effort: a folder that cannot take it (read-only, disk full) costs the next load its
    decoding, not this run; the partial copy is removed and one warning says so."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            part = getattr(ds, split)
            if part is not None:
                np.save(tmp / f"{split}_images.npy", part.images)
                np.save(tmp / f"{split}_labels.npy", part.labels)
        (tmp / "meta.json").write_text(json.dumps({"class_names": ds.class_names, "skipped": ds.skipped,
                                                   "problems": problems or []}))   # the check's, per file
        os.replace(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if path.exists() or path.parent in _unwritable:   # another process cached the same folder first
            return
        _unwritable.add(path.parent)
        print(f"warning: cannot write the decoded-image cache in {path.parent} ({e.strerror or e}): training "
              f"goes on from memory, and the next run decodes the images again; free some space or give a "
              f"writable --data-dir", file=sys.stderr, flush=True)


def _read_cache(path: Path, listing: FolderListing) -> Dataset:
    meta = json.loads((path / "meta.json").read_text())
    parts = {s: Split(np.load(path / f"{s}_images.npy"), np.load(path / f"{s}_labels.npy"))
             for s in SPLITS if (path / f"{s}_images.npy").exists()}
    return Dataset(listing.root.name, meta["class_names"], parts["train"], parts["test"],
                   parts.get("val"), skipped=meta["skipped"])
