"""Listing an image folder, walked once without decoding, with every oddity reported (hidden
entries, symlinks leaving the root, other file types) to the checker that builds on it.

Two layouts:

- split folders, ``root/{train,[val,]test}/<class>/<image>``: the splits are the folders;
- flat class folders, ``root/<class>/<image>`` (Keras ``image_dataset_from_directory``,
  torchvision ``ImageFolder``): train and test are a seeded split, stratified by class, with
  ``test_split`` of each class held out for test. The validation hold-out is carved from
  train later (``dataset.prepare_splits``), as for split folders without ``val/``.

A listing saves its exact split (``FolderListing.split_record()``, JSON-ready, relative paths
with each file's size and modification time) and ``list_folder(root, saved_split=...)``
rebuilds it, naming every file that changed or vanished since: evaluation and a resumed run
read exactly the files the run was split into.
"""
from __future__ import annotations

import json
import os
import stat as stat_mod
import sys
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from cnnlab.core.errors import CnnlabError
from cnnlab.data.images import FORMATS, IMAGE_SUFFIXES, is_image_name
from cnnlab.data.registry import DATASETS

SPLITS = ("train", "val", "test")
LAYOUTS = ("splits", "flat")     # split folders; flat class folders split by seed
DEFAULT_TEST_SPLIT = 0.2         # flat folders: fraction of each class held out for test
SPLIT_FORMAT = 1                 # version of split_record()'s layout
_FLAT_TEST_KEY = 4               # generator purpose, beside dataset.TRAIN_SUBSET etc. (1-3)
_CHUNK = 512            # files per worker task
_PARALLEL_FROM = 2_000  # below this many files a pool costs more than it saves
_NAMES_SHOWN = 10       # files named in a one-line error
PROGRESS_DELAY = 2.0    # seconds: a decode that ends sooner never shows its progress bar

FileStamp = tuple[str, int, int]   # (path relative to the root, size in bytes, mtime in ns)


@dataclass
class FolderListing:
    root: Path
    class_names: list[str]
    files: dict[str, list[tuple[str, int]]]    # split -> [(path, label)]; str: 60,000 Paths cost 0.2 s
    stamp: str                                  # names, splits, sizes and mtimes: changes when any file does
    layout: str = "splits"                      # one of LAYOUTS
    records: dict[str, list[FileStamp]] = field(default_factory=dict)   # split -> stamps, as ``files``
    test_split: float | None = None             # flat: the fraction held out for test, and its seed
    seed: int | None = None
    changed: list[str] = field(default_factory=list)    # rebuilt from a saved split: files whose
    vanished: list[str] = field(default_factory=list)   # size/mtime differ, files no longer there

    def split_files(self) -> dict[str, list[str]]:
        """split -> the files' paths relative to the root ("/"-separated), in listing order."""
        return {split: [rel for rel, _, _ in recs] for split, recs in self.records.items()}

    def split_record(self) -> dict[str, Any]:
        """The split as JSON-ready data (a run's ``splits.json``): ``list_folder(root,
        saved_split=record)`` lists exactly these files again."""
        return {"format": SPLIT_FORMAT, "layout": self.layout, "test_split": self.test_split,
                "seed": self.seed, "class_names": list(self.class_names),
                "files": {split: [[rel, label, size, mtime] for (rel, size, mtime), (_, label)
                                  in zip(self.records[split], self.files[split])] for split in self.files}}

    def subset(self, index: Mapping[str, np.ndarray | None]) -> "FolderListing":
        """The listing with only the files at ``index[split]`` (None or absent: all of them);
        ``stamp`` still covers the whole folder."""
        def pick(items: list, ix) -> list:
            return items if ix is None else [items[int(i)] for i in ix]
        return replace(self, files={s: pick(f, index.get(s)) for s, f in self.files.items()},
                       records={s: pick(r, index.get(s)) for s, r in self.records.items()})


def _stamp(layout: str, records: dict[str, list[FileStamp]]) -> str:
    # Split folders' paths start with their split already (and keep the stamps of older caches).
    return "\n".join(f"{rel if layout == 'splits' else split + '/' + rel}|{size}|{mtime}"
                     for split, recs in records.items() for rel, size, mtime in recs)


def _text_class_name(path: Path, found: "Report") -> bool:
    """Whether a class folder's name is UTF-8 text, as a class name must be: it is a label in
    model.json, the report and every prediction. Linux names may hold any bytes (Python reads
    the others as surrogates); such a folder is refused, its name shown with them escaped."""
    try:
        path.name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        found("layout", "error", ".", f"{shown}: a class folder's name must be UTF-8 text (class names are saved "
                                      f"and shown as text): rename the folder")
        return False


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
            found("symlink", "error", _rel(rel, e), _symlink_message(e.path))
        else:
            out.append(e)
    return out


def _symlink_message(path: str) -> str:
    target = os.path.realpath(path)
    return (f"broken symlink (to {target}): refused" if not os.path.exists(target)
            else f"symlink to {target}, outside the dataset folder: refused")


def _rel(rel: str, e: os.DirEntry) -> str:
    return f"{rel}/{e.name}" if rel else e.name


def _inside(path: str, root_real: str) -> bool:
    """Whether ``path`` exists and, symlinks followed, lies inside ``root_real``."""
    target = os.path.realpath(path)
    return os.path.exists(target) and os.path.commonpath([target, root_real]) == root_real


def _holds_images(path: str) -> bool:
    """Whether the folder has an image file directly inside (stops at the first)."""
    try:
        with os.scandir(path) as it:
            return any(is_image_name(e.name) and e.is_file() for e in it)
    except OSError:
        return False


def _dirs_text(names: Sequence[str]) -> str:
    shown = ", ".join(n + "/" for n in names[:_NAMES_SHOWN])
    return shown + (f" and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else "")


def _names_text(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_NAMES_SHOWN])
    return shown + (f" and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else "")


def list_folder(root: str | Path, *, report: Report | None = None, test_split: float = DEFAULT_TEST_SPLIT,
                seed: int = 0, saved_split: Mapping[str, Any] | str | Path | None = None) -> FolderListing:
    """Find the layout, splits, classes and image files, refusing what cannot be trained on.

    Without ``report`` the first problem that blocks training raises ``CnnlabError``. With
    it, every finding goes to ``report(kind, severity, path, message)`` and the walk goes on
    (the data checker); a root that is missing or not a folder raises either way. Hidden
    entries, other file types and symlinks that leave the root are never listed.

    ``test_split`` and ``seed`` split a flat folder (split folders ignore them). With
    ``saved_split`` (a ``split_record()``, or the path of the JSON file holding one) the
    folder is not walked: exactly the saved files are listed again, and files changed since
    (size or mtime) are reported as warnings, files vanished as errors (``changed`` and
    ``vanished`` name them too).
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise CnnlabError(f"data folder {root} does not exist: give a path to a folder with "
                          f"train/<class>/<image> and test/<class>/<image>, or with <class>/<image> "
                          f"only, or a dataset name ({', '.join(DATASETS)})")
    if not root.is_dir():
        raise CnnlabError(f"{root} is a file, not a folder: expected {root}/train/<class>/<image> "
                          f"or {root}/<class>/<image>")
    root_real = os.path.realpath(root)

    def found(kind: str, severity: str, rel: str, message: str) -> None:
        if report is not None:
            report(kind, severity, rel, message)
        elif severity == "error":
            raise CnnlabError(message if rel == "." else f"{root / rel}: {message}")

    if saved_split is not None:
        return _from_saved(root, root_real, saved_split, found, raising=report is None)
    top = _visible(root, "", root_real, found)
    split_dirs = {e.name: Path(e.path) for e in top if e.is_dir() and e.name in SPLITS}
    others = [e for e in top if e.is_dir() and e.name not in SPLITS]
    image_dirs = [e.name for e in others if _holds_images(e.path)]
    if split_dirs:
        if image_dirs:
            found("layout", "error", ".", f"{root} mixes split folders ({_dirs_text(sorted(split_dirs))}) "
                  f"with class folders of images ({_dirs_text(image_dirs)}): use either "
                  f"{root}/train/<class>/<image> and {root}/test/<class>/<image>, or {root}/<class>/<image> alone")
        return _list_splits(root, root_real, top, split_dirs, set(image_dirs), found)
    if image_dirs:
        if not 0 < test_split < 1:
            raise CnnlabError(f"test_split must be between 0 and 1 (the fraction of each class held out "
                              f"for test), got {test_split}: e.g. 0.2")
        return _list_flat(root, root_real, top, test_split, seed, found)
    for e in top:
        _ignore_top(e, found)
    found_dirs = ", ".join(p.name + "/" for p in _visible_dirs(root)) or "no subfolders"
    found("layout", "error", ".", f"{root} has no train/ or test/ folder and no class folders of images: "
          f"expected {root}/train/<class>/<image> and {root}/test/<class>/<image>, or {root}/<class>/<image>; "
          f"found {found_dirs}")
    return FolderListing(root, [], {}, "")


def _ignore_top(e: os.DirEntry, found: Report, where: str = "train/, val/ and test/") -> None:
    """Warn about a root entry that is not part of the dataset."""
    if e.is_dir():
        alias = _SPLIT_ALIASES.get(e.name.lower())
        found("ignored", "warning", e.name, "not a split folder (train, val, test): ignored"
              + (f"; rename it to {alias}/ if it is one" if alias else ""))
    elif is_image_name(e.name):
        found("ignored", "warning", e.name, f"image outside {where}: ignored")


def _class_files(cdir: Path, rel: str, root_real: str, found: Report) -> list[tuple[str, str, os.stat_result]]:
    """(path, name, stat) of the images directly in one class folder (``rel`` from the root)."""
    out = []
    # scandir + plain strings: listing 60,000 files must stay well under a second.
    for e in _visible(cdir, rel, root_real, found):
        if e.is_dir():
            found("ignored", "warning", f"{rel}/{e.name}", "folder inside a class folder: "
                  "ignored (images must sit directly in the class folder)")
        elif is_image_name(e.name):
            out.append((e.path, e.name, e.stat()))
        else:
            found("unsupported", "warning", f"{rel}/{e.name}", f"{os.path.splitext(e.name)[1] or 'no extension'}"
                  f" is not an image type cnnlab reads: ignored (reads "
                  f"{', '.join(sorted(IMAGE_SUFFIXES))})")
    return out


def _list_splits(root: Path, root_real: str, top: list[os.DirEntry], split_dirs: dict[str, Path],
                 class_like: set[str], found: Report) -> FolderListing:
    for e in top:
        if e.name not in split_dirs and e.name not in class_like:   # class-like ones: the mixing error
            _ignore_top(e, found)
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
                if _text_class_name(d / e.name, found):
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
    records: dict[str, list[FileStamp]] = {}
    for split, names in classes.items():
        entries: list[tuple[str, int]] = []
        recs: list[FileStamp] = []
        for name in names:
            label, rel = class_names.index(name), f"{split}/{name}"
            found_files = _class_files(split_dirs[split] / name, rel, root_real, found)
            if not found_files:
                found("empty-class", "error", rel, "class folder holds no images: add "
                      "images or remove it from every split")
            entries.extend((path, label) for path, _, _ in found_files)
            recs.extend((f"{rel}/{f}", st.st_size, st.st_mtime_ns) for _, f, st in found_files)
        files[split], records[split] = entries, recs
    return FolderListing(root, class_names, files, _stamp("splits", records), "splits", records)


def _list_flat(root: Path, root_real: str, top: list[os.DirEntry], test_split: float, seed: int,
               found: Report) -> FolderListing:
    for e in top:
        if not e.is_dir() and is_image_name(e.name):
            found("ignored", "warning", e.name, "image outside the class folders: ignored")
    class_names = [e.name for e in top if e.is_dir() and _text_class_name(root / e.name, found)]
    files: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    records: dict[str, list[FileStamp]] = {"train": [], "test": []}
    for label, name in enumerate(class_names):
        if any((root / name / s).is_dir() for s in ("train", "test")):
            found("layout", "error", name, f"holds train/ or test/ folders, not images: give --data "
                  f"{root / name} if that is the dataset")
            continue
        found_files = _class_files(root / name, name, root_real, found)
        n = len(found_files)
        if n == 0:
            found("empty-class", "error", name, "class folder holds no images: add images or remove it")
            continue
        if n < 2:
            found("small-class", "error", name, f"class {name} has {n} image, too few to split: a flat "
                  f"folder needs at least 2 per class (one for train, one for test); add images or remove it")
            continue
        test = set(_flat_test_index(name, n, test_split, seed).tolist())
        for i, (path, f, st) in enumerate(found_files):
            split = "test" if i in test else "train"
            files[split].append((path, label))
            records[split].append((f"{name}/{f}", st.st_size, st.st_mtime_ns))
    return FolderListing(root, class_names, files, _stamp("flat", records), "flat", records,
                         test_split=test_split, seed=seed)


def _flat_test_index(name: str, n: int, test_split: float, seed: int) -> np.ndarray:
    """Which of a class's ``n`` files (in name order) go to test: ``test_split`` of them,
    rounded, at least 1 and leaving 1 for train. Each class draws from its own generator, so
    adding images to one class never moves another's."""
    k = min(max(1, int(np.floor(test_split * n + 0.5))), n - 1)
    rng = np.random.default_rng([seed, _FLAT_TEST_KEY, zlib.crc32(name.encode())])
    return np.sort(rng.permutation(n)[:k])


# ----------------------------------------------------------------------------- saved splits
def _read_saved(saved: Mapping[str, Any] | str | Path) -> tuple[dict[str, Any], str]:
    """The saved split and how to name it in messages."""
    if isinstance(saved, (str, Path)):
        try:
            return json.loads(Path(saved).read_text()), str(saved)
        except (OSError, ValueError) as e:
            raise CnnlabError(f"cannot read the saved split {saved}: {e}; it is the splits.json a run "
                              f"wrote: restore it, or start a new run") from e
    return dict(saved), "the saved split"


def _check_saved(saved: Any, name: str) -> None:
    def bad(why: str) -> CnnlabError:
        return CnnlabError(f"{name} is not a saved split ({why}): expected the splits.json a run wrote")
    if not isinstance(saved, dict) or saved.get("format") != SPLIT_FORMAT:
        raise bad(f"format {saved.get('format') if isinstance(saved, dict) else type(saved).__name__!r}, "
                  f"expected {SPLIT_FORMAT}")
    names, files = saved.get("class_names"), saved.get("files")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise bad("no list of class names")
    if not isinstance(files, dict) or not {"train", "test"} <= set(files) or not set(files) <= set(SPLITS):
        raise bad(f"splits {sorted(files) if isinstance(files, dict) else files!r}, expected train, test "
                  f"and maybe val")
    for split, rows in files.items():
        for row in rows if isinstance(rows, list) else [None]:
            if not (isinstance(row, list) and len(row) == 4 and isinstance(row[0], str)
                    and all(isinstance(v, int) for v in row[1:]) and 0 <= row[1] < len(names)):
                raise bad(f"{split} entry {row!r} is not [path, label, size, mtime_ns]")
            parts = PurePosixPath(row[0]).parts
            if not parts or row[0].startswith("/") or ".." in parts or "\\" in row[0]:
                raise bad(f"{row[0]!r} is not a path inside the data folder")


def _from_saved(root: Path, root_real: str, saved_split: Mapping[str, Any] | str | Path, found: Report,
                raising: bool) -> FolderListing:
    saved, name = _read_saved(saved_split)
    _check_saved(saved, name)
    files: dict[str, list[tuple[str, int]]] = {}
    records: dict[str, list[FileStamp]] = {}
    changed: list[str] = []
    vanished: list[str] = []
    base = str(root)
    for split, rows in saved["files"].items():
        entries, recs = files.setdefault(split, []), records.setdefault(split, [])
        for rel, label, size, mtime in rows:
            path = os.path.join(base, rel)
            try:
                st = os.lstat(path)
                if stat_mod.S_ISLNK(st.st_mode):
                    if not _inside(path, root_real):
                        found("symlink", "error", rel, _symlink_message(path))
                        continue
                    st = os.stat(path)
            except FileNotFoundError:
                vanished.append(rel)
                continue
            if (st.st_size, st.st_mtime_ns) != (size, mtime):
                changed.append(rel)
            entries.append((path, label))
            recs.append((rel, st.st_size, st.st_mtime_ns))
    if vanished and raising:
        raise CnnlabError(f"{len(vanished)} file{'s' * (len(vanished) != 1)} of the run's split vanished from "
                          f"{root}: {_names_text(vanished)}; restore them, or start a new run to split the "
                          f"folder afresh")
    for rel in vanished:
        found("vanished", "error", rel, "in the run's saved split but no longer in the folder: restore it")
    for rel in changed:
        found("changed", "warning", rel, "changed since the run's split was saved (size or modification "
              "time differ): results may differ from the run's")
    layout = str(saved.get("layout")) if saved.get("layout") in LAYOUTS else "splits"
    return FolderListing(root, list(saved["class_names"]), files, _stamp(layout, records), layout, records,
                         test_split=saved.get("test_split"), seed=saved.get("seed"), changed=changed,
                         vanished=vanished)


def _headers(paths: Sequence[str | Path]) -> list[tuple[tuple[int, int], str] | str]:
    """(size, mode) per file without decoding pixels; an error string for unreadable ones."""
    out: list[tuple[tuple[int, int], str] | str] = []
    for p in paths:
        try:
            with Image.open(p, formats=FORMATS) as img:
                out.append((img.size, img.mode))
        except Exception as e:  # noqa: BLE001  (any failure means: not an image we can use)
            out.append(f"{type(e).__name__}: {e}")
    return out


def progress_bar(total: int, desc: str, enabled: bool = True):
    """A tqdm bar on stderr that appears once ``PROGRESS_DELAY`` seconds have passed; None when
    not ``enabled``. Off as well when stderr is not a terminal (logs, CI, tests)."""
    if not enabled or total == 0:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=None, delay=PROGRESS_DELAY,
                leave=False, dynamic_ncols=True)


def _map_chunks(fn, paths: Sequence[str | Path], *extra, done: Callable[[int], None] | None = None):
    """``fn`` over chunks of ``paths`` (in worker processes for many), results in order;
    ``done(n)`` after each chunk of ``n`` paths (a progress bar)."""
    chunks = [paths[i:i + _CHUNK] for i in range(0, len(paths), _CHUNK)]
    tasks = [(c, *extra) if extra else c for c in chunks]
    out = []
    pool = None
    results: Iterator = map(fn, tasks)
    if len(paths) >= _PARALLEL_FROM and (os.cpu_count() or 1) >= 2:
        pool = ProcessPoolExecutor(max_workers=min(os.cpu_count() or 1, 8))
        results = pool.map(fn, tasks)
    try:
        for chunk, result in zip(chunks, results):
            out.append(result)
            if done is not None:
                done(len(chunk))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return out
