"""Listing an image folder: ``root/{train,val,test}/<class>/<image>`` or ``root/<class>/<image>``,
walked once without decoding, with every oddity reported (hidden entries, symlinks leaving the
root, other file types) to the checker that builds on it."""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image

from cnnlab.core.errors import CnnlabError
from cnnlab.data.images import IMAGE_SUFFIXES, is_image_name
from cnnlab.data.registry import DATASETS

SPLITS = ("train", "val", "test")
_CHUNK = 512            # files per worker task
_PARALLEL_FROM = 2_000  # below this many files a pool costs more than it saves



@dataclass
class FolderListing:
    root: Path
    class_names: list[str]
    files: dict[str, list[tuple[str, int]]]    # split -> [(path, label)]; str: 60,000 Paths cost 0.2 s
    stamp: str                                  # names, sizes and mtimes: changes when any file does


def _visible_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


# (kind, severity, path relative to the root, message): how list_folder reports what it finds.
Report = Callable[[str, str, str, str], None]
# Root-level folder names people use for a split, with the name cnnlab expects.
_SPLIT_ALIASES = {"training": "train", "valid": "val", "validation": "val", "dev": "val", "testing": "test"}


def _visible(d: Path | str, rel: str, root_real: str, found: Report) -> list[os.DirEntry]:
    """Entries of ``d`` (``rel`` from the root), sorted by name. Hidden entries and symlinks
    that are broken or leave the root are reported instead of returned."""
    out = []
    for e in sorted(os.scandir(d), key=lambda e: e.name):
        if e.name.startswith("."):
            found("hidden", "warning", _rel(rel, e), f"hidden {'folder' if e.is_dir() else 'file'}: ignored")
        elif e.is_symlink() and not _inside(e.path, root_real):
            target = os.path.realpath(e.path)
            found("symlink", "error", _rel(rel, e), f"broken symlink (to {target}): refused" if not os.path.exists(target)
                  else f"symlink to {target}, outside the dataset folder: refused")
        else:
            out.append(e)
    return out


def _rel(rel: str, e: os.DirEntry) -> str:
    return f"{rel}/{e.name}" if rel else e.name


def _inside(path: str, root_real: str) -> bool:
    """Whether ``path`` exists and, symlinks followed, lies inside ``root_real``."""
    target = os.path.realpath(path)
    return os.path.exists(target) and os.path.commonpath([target, root_real]) == root_real


def list_folder(root: str | Path, *, report: Report | None = None) -> FolderListing:
    """Find splits, classes and image files, refusing layouts that cannot be trained on.

    Without ``report`` the first problem that blocks training raises ``CnnlabError``. With
    it, every finding goes to ``report(kind, severity, path, message)`` and the walk goes on
    (the data checker); a root that is missing or not a folder raises either way. Hidden
    entries, other file types and symlinks that leave the root are never listed.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise CnnlabError(f"data folder {root} does not exist: give a path to a folder with "
                          f"train/<class>/<image> and test/<class>/<image>, or a dataset name "
                          f"({', '.join(DATASETS)})")
    if not root.is_dir():
        raise CnnlabError(f"{root} is a file, not a folder: expected {root}/train/<class>/<image>")
    root_real = os.path.realpath(root)

    def found(kind: str, severity: str, rel: str, message: str) -> None:
        if report is not None:
            report(kind, severity, rel, message)
        elif severity == "error":
            raise CnnlabError(message if rel == "." else f"{root / rel}: {message}")

    split_dirs: dict[str, Path] = {}
    for e in _visible(root, "", root_real, found):
        if e.is_dir() and e.name in SPLITS:
            split_dirs[e.name] = Path(e.path)
        elif e.is_dir():
            alias = _SPLIT_ALIASES.get(e.name.lower())
            found("ignored", "warning", e.name, "not a split folder (train, val, test): ignored"
                  + (f"; rename it to {alias}/ if it is one" if alias else ""))
        elif is_image_name(e.name):
            found("ignored", "warning", e.name, "image outside train/, val/ and test/: ignored")
    present = [s for s in SPLITS if s in split_dirs]
    missing = [s for s in ("train", "test") if s not in split_dirs]
    if missing:
        found_dirs = ", ".join(p.name + "/" for p in _visible_dirs(root)) or "no subfolders"
        found("layout", "error", ".", f"{root} has no {' or '.join(m + '/' for m in missing)} folder: "
              f"expected {root}/train/<class>/<image> and {root}/test/<class>/<image>; found {found_dirs}")
    classes: dict[str, list[str]] = {}
    for split in present:
        d = split_dirs[split]
        names, loose = [], 0
        for e in _visible(d, split, root_real, found):
            if e.is_dir():
                names.append(e.name)
            else:
                loose += is_image_name(e.name)
                found("ignored", "warning", _rel(split, e), "not in a class folder: ignored")
        if not names:
            found("layout", "error", ".", f"no class folders under {d}: expected {d}/<class>/<image>; "
                  f"found {loose} loose image file{'s' if loose != 1 else ''}")
            continue
        classes[split] = names
    reference = classes.get("train") or next(iter(classes.values()), [])
    for split, names in classes.items():
        if set(names) != set(reference):
            extra, lacking = sorted(set(names) - set(reference)), sorted(set(reference) - set(names))
            parts = ([f"only in {split}/: {', '.join(extra)}"] if extra else []) + \
                    ([f"missing from {split}/: {', '.join(lacking)}"] if lacking else [])
            found("layout", "error", ".", f"train/ and {split}/ have different classes ({'; '.join(parts)}): "
                  f"every split needs the same class folders")
    # Only reached with differing classes when reporting: label by the union, so all are checked.
    class_names = sorted(set().union(*map(set, classes.values())))
    files: dict[str, list[tuple[str, int]]] = {}
    stamp: list[str] = []
    for split, names in classes.items():
        entries: list[tuple[str, int]] = []
        for name in names:
            label, cdir, found_files = class_names.index(name), split_dirs[split] / name, []
            # scandir + plain strings: listing 60,000 files must stay well under a second.
            for e in _visible(cdir, f"{split}/{name}", root_real, found):
                if e.is_dir():
                    found("ignored", "warning", f"{split}/{name}/{e.name}", "folder inside a class folder: "
                          "ignored (images must sit directly in the class folder)")
                elif is_image_name(e.name):
                    found_files.append((e.path, e.name, e.stat()))
                else:
                    found("unsupported", "warning", f"{split}/{name}/{e.name}", f"{os.path.splitext(e.name)[1] or 'no extension'}"
                          f" is not an image type cnnlab reads: ignored (reads "
                          f"{', '.join(sorted(IMAGE_SUFFIXES))})")
            if not found_files:
                found("empty-class", "error", f"{split}/{name}", "class folder holds no images: add "
                      "images or remove it from every split")
            entries.extend((path, label) for path, _, _ in found_files)
            stamp.extend(f"{split}/{name}/{f}|{st.st_size}|{st.st_mtime_ns}" for _, f, st in found_files)
        files[split] = entries
    return FolderListing(root, class_names, files, "\n".join(stamp))


def _headers(paths: Sequence[str | Path]) -> list[tuple[tuple[int, int], str] | str]:
    """(size, mode) per file without decoding pixels; an error string for unreadable ones."""
    out: list[tuple[tuple[int, int], str] | str] = []
    for p in paths:
        try:
            with Image.open(p) as img:
                out.append((img.size, img.mode))
        except Exception as e:  # noqa: BLE001  (any failure means: not an image we can use)
            out.append(f"{type(e).__name__}: {e}")
    return out


def _map_chunks(fn, paths: Sequence[str | Path], *extra):
    chunks = [paths[i:i + _CHUNK] for i in range(0, len(paths), _CHUNK)]
    tasks = [(c, *extra) if extra else c for c in chunks]
    if len(paths) < _PARALLEL_FROM or (os.cpu_count() or 1) < 2:
        return [fn(t) for t in tasks]
    with ProcessPoolExecutor(max_workers=min(os.cpu_count() or 1, 8)) as pool:
        return list(pool.map(fn, tasks))
