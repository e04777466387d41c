"""``cnnlab data check``: everything wrong with a dataset, found before training starts.

torchvision's ImageFolder crashes mid-epoch on a corrupt file and Keras silently skips hidden
folders but not broken images; here one walk lists every problem up front. The walk is
``listing.list_folder``'s (layout, hidden entries, symlinks, other file types), and every image
is fully decoded through ``images.open_image`` (the loader's own code, so the report and the
loader cannot disagree): a truncated JPEG opens fine and only fails when its pixels are read.

``load_image_folder`` runs this same check on every load and applies the ``bad_images``
policy to its result, so training and ``cnnlab data check`` always agree on what blocks.

Severities: "error" blocks training (with ``--bad-images skip`` the unusable files among
them are left out instead: ``FILE_ERRORS``); "warning" never does (converted images,
duplicates, imbalance, ignored entries).
"""
from __future__ import annotations

import hashlib
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from cnnlab.core.errors import CnnlabError
from cnnlab.data import images
from cnnlab.data.dataset import Dataset
from cnnlab.data.listing import DEFAULT_TEST_SPLIT, SPLITS, FolderListing, _map_chunks, list_folder, progress_bar

# Per-file errors: --bad-images skip leaves these files out. Every other error (layout,
# empty classes) blocks training whatever the policy.
# "vanished": listed in a run's saved split, no longer in the folder.
FILE_ERRORS = frozenset({"missing-file", "empty-file", "not-image", "damaged", "too-large", "symlink", "vanished"})
# Largest / smallest class size above which the check warns: past about 10x a plain
# cross-entropy classifier tends to neglect the small classes.
IMBALANCE_WARNING = 10.0
_KIND_ORDER = ("layout", "empty-class", "small-class", "symlink", "vanished", "too-large", "empty-file",
               "not-image", "damaged", "missing-file", "changed", "duplicate", "imbalance", "converted", "hidden",
               "unsupported", "ignored")
_WARNINGS_SHOWN = 20   # per kind in the text report; errors are always listed in full


@dataclass
class Problem:
    kind: str        # one of _KIND_ORDER
    severity: str    # "error" blocks training, "warning" does not
    path: str        # relative to the dataset folder, "." for the folder itself
    message: str
    related: list[str] = field(default_factory=list)   # the other files involved (duplicates)


@dataclass
class CheckReport:
    source: str                                   # the folder, or the dataset name
    class_names: list[str] = field(default_factory=list)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)   # split -> class -> usable images
    problems: list[Problem] = field(default_factory=list)
    files_checked: int = 0
    image_sizes: dict[str, int] = field(default_factory=dict)         # "WxH" -> usable images, commonest first
    imbalance: float | None = None                # largest / smallest train class; None if one is empty
    seconds: float = 0.0
    layout: str = "splits"                        # image folders: listing.LAYOUTS; "flat" is split by seed
    test_split: float | None = None               # flat: the fraction of each class held out for test
    seed: int | None = None

    def add(self, kind: str, severity: str, path: str, message: str, related: list[str] | None = None) -> None:
        self.problems.append(Problem(kind, severity, path, message, list(related or [])))

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        """True when nothing blocks training (warnings allowed)."""
        return not self.errors

    @property
    def skippable(self) -> list[Problem]:
        """The unusable files: what ``--bad-images skip`` leaves out."""
        return [p for p in self.errors if p.kind in FILE_ERRORS]

    def blocking(self, bad_images: str = "error") -> list[Problem]:
        """The errors that stop training under the ``bad_images`` policy ("error" or "skip")."""
        return [p for p in self.errors if bad_images != "skip" or p.kind not in FILE_ERRORS]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(ok=self.ok, errors=len(self.errors), warnings=len(self.warnings))
        return d

    def summary(self) -> str:
        total = sum(sum(c.values()) for c in self.counts.values())
        per_split = ", ".join(f"{s} {sum(c.values()):,}" for s, c in self.counts.items())
        ratio = "-" if self.imbalance is None else f"{self.imbalance:.1f}x"
        n_err, n_warn = len(self.errors), len(self.warnings)
        classes = f"{len(self.class_names)} classes"
        if self.layout == "flat" and self.test_split is not None:
            held = round(100 * self.test_split)
            classes = (f"{len(self.class_names)} class folders split {100 - held}/{held} into train/test "
                       f"(seed {self.seed})")
        return (f"{self.source}: {classes}, {total:,} usable images ({per_split}), "
                f"imbalance {ratio}; {n_err} error{'s' * (n_err != 1)}, {n_warn} warning{'s' * (n_warn != 1)} "
                f"({self.files_checked:,} files checked in {self.seconds:.1f} s)")

    def format(self, max_classes: int = 30) -> str:
        """The human-readable report: summary, class counts, problems grouped by kind."""
        lines = [self.summary()]
        splits = list(self.counts)
        if self.class_names and splits:
            width = max(len("class"), *(len(c) for c in self.class_names[:max_classes]))
            lines.append("")
            lines.append(f"  {'class':<{width}}" + "".join(f"  {s:>7}" for s in splits))
            for name in self.class_names[:max_classes]:
                lines.append(f"  {name:<{width}}" + "".join(f"  {self.counts[s].get(name, 0):>7,}" for s in splits))
            if len(self.class_names) > max_classes:
                lines.append(f"  ... and {len(self.class_names) - max_classes} more classes (--json lists them all)")
        for severity, title in (("error", "errors (block training)"), ("warning", "warnings (training goes on)")):
            chosen = [p for p in self.problems if p.severity == severity]
            if not chosen:
                continue
            lines += ["", f"{title}:"]
            by_kind: dict[str, list[Problem]] = defaultdict(list)
            for p in chosen:
                by_kind[p.kind].append(p)
            for kind in sorted(by_kind, key=lambda k: (_KIND_ORDER + (k,)).index(k)):
                group = by_kind[kind]
                lines.append(f"  {kind} ({len(group)}):")
                shown = group if severity == "error" else group[:_WARNINGS_SHOWN]
                lines += [f"    {p.path}: {p.message}" if p.path != "." else f"    {p.message}" for p in shown]
                if len(shown) < len(group):
                    lines.append(f"    ... and {len(group) - len(shown)} more (--json lists them all)")
        lines.append("")
        if self.errors:
            skip = len(self.skippable)
            lines.append(f"{len(self.errors)} problem{'s' * (len(self.errors) != 1)} block training"
                         + (f"; `--bad-images skip` would leave out the {skip} unusable file"
                            f"{'s' * (skip != 1)}" if skip else ""))
        else:
            lines.append("ready to train" + (" (see the warnings above)" if self.warnings else ""))
        return "\n".join(lines)


# ----------------------------------------------------------------------------- image folders
FolderScan = tuple[FolderListing, CheckReport]


def scan_folder(root: str | Path, *, test_split: float = DEFAULT_TEST_SPLIT, seed: int = 0,
                saved_split: Mapping[str, Any] | str | Path | None = None) -> FolderScan:
    """The walk without decoding: layout, hidden entries, symlinks, other file types.
    ``test_split``, ``seed`` and ``saved_split``: ``listing.list_folder``'s."""
    report = CheckReport(str(Path(root).expanduser()))
    listing = list_folder(root, report=report.add, test_split=test_split, seed=seed, saved_split=saved_split)
    report.class_names = list(listing.class_names)
    report.layout, report.test_split, report.seed = listing.layout, listing.test_split, listing.seed
    return listing, report


def _inspect_chunk(task: tuple[list[str], int, tuple[int, int] | None, int]):
    """Decode each file fully; (kind, reason, conversions, content hash, size) per file, and
    the images as a (N, H, W, C) uint8 batch when ``size`` (width, height) is given."""
    paths, max_pixels, size, channels = task
    batch = None if size is None else np.zeros((len(paths), size[1], size[0], channels), dtype=np.uint8)
    results: list[tuple[str | None, str | None, tuple[str, ...], bytes | None, tuple[int, int] | None]] = []
    for i, p in enumerate(paths):
        notes: list[str] = []
        try:
            with open(p, "rb") as f:
                data = f.read()   # read once: decoded and hashed from memory
            img = images.open_image(data, max_pixels=max_pixels, notes=notes, name=p)
        except images.ImageError as e:
            results.append((e.kind, e.reason, (), None, None))
            continue
        except OSError as e:
            kind = "missing-file" if isinstance(e, FileNotFoundError) else "damaged"
            results.append((kind, f"cannot read the file ({e.strerror or e})", (), None, None))
            continue
        if batch is not None:
            batch[i] = images.to_array(img, size, channels)
        results.append((None, None, tuple(notes), hashlib.blake2b(data, digest_size=16).digest(), img.size))
    return batch, results


def inspect_files(listing: FolderListing, report: CheckReport, *, max_pixels: int | None = None,
                  decode: tuple[tuple[int, int], int] | None = None,
                  progress: bool = False) -> tuple[np.ndarray | None, np.ndarray]:
    """Decode every listed file, adding per-file problems, duplicates, counts and imbalance
    to ``report``. Returns (images, usable): the (N, H, W, C) images in listing order when
    ``decode`` = ((width, height), channels) is given, else None; ``usable`` a bool mask.
    ``progress``: a bar on a terminal when it takes more than a couple of seconds."""
    limit = images.MAX_PIXELS if max_pixels is None else max_pixels   # read now: tests may patch it
    entries = [(split, path, label, rel) for split, files in listing.files.items()
               for (path, label), (rel, _, _) in zip(files, listing.records[split])]
    paths = [path for _, path, _, _ in entries]
    size, channels = decode if decode is not None else (None, 3)
    bar = progress_bar(len(paths), f"{'decoding' if decode else 'checking'} {listing.root.name}", progress)
    try:
        chunks = _map_chunks(_inspect_chunk, paths, limit, size, channels, done=bar.update if bar else None)
    finally:
        if bar is not None:
            bar.close()
    results = [r for _, chunk in chunks for r in chunk]
    usable = np.array([r[0] is None for r in results], dtype=bool)
    report.files_checked += len(paths)

    counts = {split: dict.fromkeys(listing.class_names, 0) for split in listing.files}
    listed = {split: Counter(label for _, label in files) for split, files in listing.files.items()}
    by_hash: dict[bytes, list[tuple[str, str, str]]] = defaultdict(list)   # digest -> [(split, class, rel)]
    sizes: Counter[str] = Counter()
    for (split, path, label, rel), (kind, reason, notes, digest, wh) in zip(entries, results):
        cls = listing.class_names[label]
        if kind is not None:
            report.add(kind, "error", rel, reason or kind)
            continue
        assert wh is not None and digest is not None   # a usable file has both
        counts[split][cls] += 1
        sizes[f"{wh[0]}x{wh[1]}"] += 1
        by_hash[digest].append((split, cls, rel))
        if notes:
            report.add("converted", "warning", rel, "converted: " + "; ".join(notes))
    for split, per_class in counts.items():
        for label, (cls, n) in enumerate(per_class.items()):
            if n == 0 and listed[split][label]:   # folders with no image files at all: list_folder's
                where = cls if listing.layout == "flat" else f"{split}/{cls}"
                report.add("empty-class", "error", where, f"none of its {listed[split][label]} "
                           f"{split} files is a usable image: no images left for this class")
    _add_duplicates(report, by_hash)
    report.counts = counts
    report.image_sizes = dict(sizes.most_common(10))
    _add_imbalance(report)
    if decode is None:
        return None, usable
    (width, height), _ = decode
    return (np.concatenate([b for b, _ in chunks]) if chunks
            else np.zeros((0, height, width, channels), np.uint8)), usable


def _add_duplicates(report: CheckReport, by_hash: dict[bytes, list[tuple[str, str, str]]]) -> None:
    """Identical files in different splits (leakage) or under different classes (conflicting labels)."""
    order = {s: i for i, s in enumerate(("test", "val", "train"))}
    for group in by_hash.values():
        if len(group) < 2:
            continue
        splits = sorted({s for s, _, _ in group}, key=order.__getitem__)
        classes = sorted({c for _, c, _ in group})
        if len(splits) < 2 and len(classes) < 2:
            continue   # copies within one class of one split: wasteful, not wrong
        group = sorted(group, key=lambda g: (order[g[0]], g[2]))
        first, others = group[0][2], [g[2] for g in group[1:]]
        if len(splits) > 1:
            why = (f"the same image is in {' and '.join(s + '/' for s in splits)}: {splits[0]} accuracy is "
                   f"inflated (leakage)")
        else:
            why = f"the same image is labelled {' and '.join(classes)}"
        report.add("duplicate", "warning", first, f"identical bytes to {', '.join(others)}: {why}", others)


def _add_imbalance(report: CheckReport) -> None:
    train = report.counts.get("train") or {}
    if not train:
        return
    low, high = min(train, key=train.__getitem__), max(train, key=train.__getitem__)
    report.imbalance = train[high] / train[low] if train[low] else None
    if report.imbalance is not None and report.imbalance > IMBALANCE_WARNING:
        report.add("imbalance", "warning", "train", f"classes range from {train[low]:,} images ({low}) to "
                   f"{train[high]:,} ({high}), {report.imbalance:.1f}x, above {IMBALANCE_WARNING:.0f}x: the "
                   f"small classes may be neglected; collect more of them or oversample")


def check_folder(root: str | Path, *, max_pixels: int | None = None, test_split: float = DEFAULT_TEST_SPLIT,
                 seed: int = 0, progress: bool = True) -> CheckReport:
    """Check an image folder without loading it: every problem, class counts, imbalance.

    ``max_pixels`` defaults to ``images.MAX_PIXELS``. A missing root raises ``CnnlabError``
    (the same one training gives); everything else is reported. A flat folder is counted as
    ``test_split`` and ``seed`` split it for training.
    """
    start = time.perf_counter()
    listing, report = scan_folder(root, test_split=test_split, seed=seed)
    inspect_files(listing, report, max_pixels=max_pixels, progress=progress)
    report.seconds = time.perf_counter() - start
    return report


def enforce(report: CheckReport, bad_images: str, *, limit: int = 50) -> None:
    """Raise ``CnnlabError`` listing what blocks training under the ``bad_images`` policy."""
    blocking = report.blocking(bad_images)
    if not blocking:
        return
    root = Path(report.source)
    if len(blocking) == 1 and blocking[0].path == ".":
        raise CnnlabError(blocking[0].message)
    files = sum(p.kind in FILE_ERRORS for p in blocking)
    fix = (f"fix or remove them, or pass --bad-images skip to train without the {files} unusable "
           f"file{'s' * (files != 1)}" if files and bad_images != "skip" else "fix them")
    shown = [f"  {p.message}" if p.path == "." else f"  {root / p.path}: {p.message}" for p in blocking[:limit]]
    if len(blocking) > limit:
        shown.append(f"  ... and {len(blocking) - limit} more")
    raise CnnlabError(f"{len(blocking)} problem{'s' * (len(blocking) != 1)} in {root} block training:\n"
                      + "\n".join(shown) + f"\n{fix}; `cnnlab data check {root}` gives the full report")


# ----------------------------------------------------------------------------- any --data SPEC
def report_for_dataset(source: str, ds: Dataset) -> CheckReport:
    """Counts and imbalance of an already loaded dataset (official ones are validated by their readers)."""
    report = CheckReport(source, list(ds.class_names))
    for split in SPLITS:
        part = getattr(ds, split)
        if part is not None:
            per = np.bincount(part.labels, minlength=ds.num_classes)
            report.counts[split] = {name: int(n) for name, n in zip(ds.class_names, per)}
            report.files_checked += len(part)
    h, w, _ = ds.image_shape
    report.image_sizes = {f"{w}x{h}": report.files_checked}
    _add_imbalance(report)
    return report
