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
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cnnlab.data.dataset import Dataset, Split
from cnnlab.data.images import GREY_MODES, is_image_file, is_image_name, load_image
from cnnlab.errors import CnnlabError

SPLITS = ("train", "val", "test")
CACHE_VERSION = 1
_CHUNK = 512            # files per worker task
_PARALLEL_FROM = 2_000  # below this many files a pool costs more than it saves


@dataclass
class FolderListing:
    root: Path
    class_names: list[str]
    files: dict[str, list[tuple[Path, int]]]   # split -> [(path, label)]
    stamp: str                                  # names, sizes and mtimes: changes when any file does


def _visible_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_folder(root: str | Path) -> FolderListing:
    """Find splits, classes and image files, refusing layouts that cannot be trained on."""
    root = Path(root).expanduser()
    if not root.exists():
        raise CnnlabError(f"data folder {root} does not exist: give a path to a folder with "
                          f"train/<class>/<image> and test/<class>/<image>, or a dataset name "
                          f"(cifar10, cifar100, mnist, fashion-mnist)")
    if not root.is_dir():
        raise CnnlabError(f"{root} is a file, not a folder: expected {root}/train/<class>/<image>")
    present = {s for s in SPLITS if (root / s).is_dir()}
    missing = [s for s in ("train", "test") if s not in present]
    if missing:
        found = ", ".join(p.name + "/" for p in _visible_dirs(root)) or "no subfolders"
        raise CnnlabError(f"{root} has no {' or '.join(m + '/' for m in missing)} folder: expected "
                          f"{root}/train/<class>/<image> and {root}/test/<class>/<image>; found {found}")
    classes: dict[str, list[str]] = {}
    for split in SPLITS:
        if split not in present:
            continue
        d = root / split
        names = [p.name for p in _visible_dirs(d)]
        if not names:
            loose = sum(1 for p in d.iterdir() if p.is_file() and is_image_file(p))
            raise CnnlabError(f"no class folders under {d}: expected {d}/<class>/<image>; found "
                              f"{loose} loose image file{'s' if loose != 1 else ''}")
        classes[split] = names
    train_set = set(classes["train"])
    for split, names in classes.items():
        if set(names) != train_set:
            extra, lacking = sorted(set(names) - train_set), sorted(train_set - set(names))
            parts = ([f"only in {split}/: {', '.join(extra)}"] if extra else []) + \
                    ([f"missing from {split}/: {', '.join(lacking)}"] if lacking else [])
            raise CnnlabError(f"train/ and {split}/ have different classes ({'; '.join(parts)}): "
                              f"every split needs the same class folders")
    class_names = classes["train"]
    files: dict[str, list[tuple[Path, int]]] = {}
    stamp = []
    for split in classes:
        entries = []
        for label, name in enumerate(class_names):
            cdir = root / split / name
            # scandir + plain strings: listing 60,000 files must stay well under a second.
            found = sorted((e.name, e.stat()) for e in os.scandir(cdir)
                           if e.is_file() and is_image_name(e.name))
            if not found:
                raise CnnlabError(f"class folder {cdir} holds no images: add images or remove it "
                                  f"from every split")
            entries.extend((cdir / f, label) for f, _ in found)
            stamp.extend(f"{split}/{name}/{f}|{st.st_size}|{st.st_mtime_ns}" for f, st in found)
        files[split] = entries
    return FolderListing(root, class_names, files, "\n".join(stamp))


def _fingerprint(listing: FolderListing, image_size: int | None) -> str:
    key = f"v{CACHE_VERSION}|{listing.root.resolve()}|{image_size}\n{listing.stamp}"
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def _headers(paths: list[Path]) -> list[tuple[tuple[int, int], str] | str]:
    """(size, mode) per file without decoding pixels; an error string for unreadable ones."""
    out = []
    for p in paths:
        try:
            with Image.open(p) as img:
                out.append((img.size, img.mode))
        except Exception as e:  # noqa: BLE001  (any failure means: not an image we can use)
            out.append(f"{type(e).__name__}: {e}")
    return out


def _decode(args: tuple[list[Path], tuple[int, int], int]) -> tuple[np.ndarray, list[tuple[int, str]]]:
    paths, size, channels = args
    batch = np.zeros((len(paths), size[1], size[0], channels), dtype=np.uint8)
    bad = []
    for i, p in enumerate(paths):
        try:
            batch[i] = load_image(p, size, channels)
        except CnnlabError as e:
            bad.append((i, str(e)))
    return batch, bad


def _map_chunks(fn, paths: list[Path], *extra):
    chunks = [paths[i:i + _CHUNK] for i in range(0, len(paths), _CHUNK)]
    tasks = [(c, *extra) if extra else c for c in chunks]
    if len(paths) < _PARALLEL_FROM or (os.cpu_count() or 1) < 2:
        return [fn(t) for t in tasks]
    with ProcessPoolExecutor(max_workers=min(os.cpu_count() or 1, 8)) as pool:
        return list(pool.map(fn, tasks))


def load_image_folder(root: str | Path, *, image_size: int | None = None,
                      cache_dir: Path | None = None, bad_images: str = "error") -> Dataset:
    """Decode an image folder into a ``Dataset`` (from the cache when nothing changed).

    ``bad_images``: "error" stops with the list of unreadable files; "skip" leaves them out.
    """
    listing = list_folder(root)
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"folder-{_fingerprint(listing, image_size)}-{bad_images}"
        if cache_file.exists():
            try:
                return _read_cache(cache_file, listing)
            except (OSError, ValueError, KeyError):
                pass  # a damaged cache is rebuilt below
    all_paths = [p for split in listing.files for p, _ in listing.files[split]]
    headers = [h for chunk in _map_chunks(_headers, all_paths) for h in chunk]
    good = [h for h in headers if not isinstance(h, str)]
    if not good:
        raise CnnlabError(f"none of the {len(all_paths)} files under {listing.root} could be read as images")
    if image_size is not None:
        size = (image_size, image_size)
    else:
        size = Counter(s for s, _ in good).most_common(1)[0][0]
    channels = 1 if all(m in GREY_MODES for _, m in good) else 3
    results = _map_chunks(_decode, all_paths, size, channels)
    images = np.concatenate([r[0] for r in results])
    bad: list[tuple[Path, str]] = []
    offset = 0
    for (batch, failures) in results:
        bad.extend((all_paths[offset + i], why) for i, why in failures)
        offset += len(batch)
    if bad and bad_images != "skip":
        shown = "; ".join(why for _, why in bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise CnnlabError(f"{len(bad)} unreadable image{'s' if len(bad) > 1 else ''} in {listing.root}: "
                          f"{shown}. Fix or remove them, run `cnnlab data check {listing.root}`, "
                          f"or pass --bad-images skip")
    bad_set = {p for p, _ in bad}
    splits, offset = {}, 0
    for split, entries in listing.files.items():
        keep = np.array([p not in bad_set for p, _ in entries], dtype=bool)
        imgs = images[offset:offset + len(entries)][keep]
        labels = np.array([label for _, label in entries], dtype=np.int64)[keep]
        splits[split] = Split(imgs, labels)
        offset += len(entries)
    ds = Dataset(listing.root.name, listing.class_names, splits["train"], splits["test"],
                 splits.get("val"), skipped=len(bad))
    if cache_file is not None:
        _write_cache(cache_file, ds)
    return ds


def _write_cache(path: Path, ds: Dataset) -> None:
    """One .npy per array in a folder, renamed into place whole: loads in a fraction of a second."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        part = getattr(ds, split)
        if part is not None:
            np.save(tmp / f"{split}_images.npy", part.images)
            np.save(tmp / f"{split}_labels.npy", part.labels)
    (tmp / "meta.json").write_text(json.dumps({"class_names": ds.class_names, "skipped": ds.skipped}))
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
