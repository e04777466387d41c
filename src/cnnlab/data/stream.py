"""Streaming image folders: decode and crop in DataLoader worker processes, batch by batch.

For folders too large to hold decoded in memory (ImageNet: 1.28 million photos of about
500x375, some 700 GB as uint8 pixels). The in-memory path (``cnnlab.data.folder``) stays
for small datasets; ``loader: auto`` picks by the decoded size (``choose_loader``).

One loop serves both. ``StreamBatches`` is a ``BatchStream`` whose images come from files:
the same seeded order, the same data-parallel sharding, the same batch augmentation (flip,
translate, cutout on the device), and it yields the same (float (B, C, N, N) in [0, 1],
labels) batches. Per image, in the workers:

- training: a random-resized crop (a box of 8%-100% of the area, aspect ratio 3/4-4/3,
  resized to N x N: Szegedy et al. 2015, "Going deeper with convolutions", sec. 6), drawn
  from a generator seeded by (seed, epoch, image index), so any batch of any epoch can be
  rebuilt exactly on resume, in any process;
- evaluation (and ``crop: center`` training): the centre square of ``center_crop`` times the
  shorter side, resized to N x N: the ImageNet convention "shorter side to N / 0.875, centre
  crop N" in one resampling. With ``center_crop: 1`` a square image becomes exactly what the
  in-memory reader makes of it (the same Pillow decode and bilinear resize).

Files are read with ``images.open_image`` (any mode, EXIF orientation, 16-bit grey).
"""
from __future__ import annotations

import math
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Mapping, Sequence, cast

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cnnlab.core.config import Config
from cnnlab.core.errors import CnnlabError
from cnnlab.data.augment import Augmentation
from cnnlab.data.batches import BatchStream, derive_seed, model_input
from cnnlab.data.dataset import Dataset, Split, prepare_splits
from cnnlab.data.images import FORMATS, GREY_MODES, ImageError, center_box, open_image

if TYPE_CHECKING:
    from cnnlab.data.check import FolderScan

IMAGENET_SIZE = 224                  # the default streamed image side (ResNet/ImageNet convention)
RRC_SCALE = (0.08, 1.0)              # random-resized crop: fraction of the image area
RRC_RATIO = (3 / 4, 4 / 3)           # ... and aspect ratio (width / height), drawn log-uniformly
RRC_TRIES = 10                       # boxes tried before falling back to a centre crop
# The in-memory path holds train/val/test decoded (and copies train to the device): pick it
# only below this many bytes, and below a quarter of the RAM shared by this machine's processes.
MEMORY_BUDGET = 2 * 1024 ** 3
HEADER_SAMPLE = 64                   # file headers read to guess sizes and channels
# Channel mean/std come from this many pixels of training images at most (all of a small
# split, so streamed and in-memory runs of a small folder normalise identically).
STATS_PIXELS = 16_000_000            # about 320 images at 224 px; 15,600 at 32 px
PREFETCH = 4                         # batches each worker decodes ahead
_CROP_KEY, _STATS_KEY = 0xC0, 0x57


# ----------------------------------------------------------------------------- transforms
def random_resized_box(width: int, height: int, rng: np.random.Generator,
                       scale: tuple[float, float] = RRC_SCALE,
                       ratio: tuple[float, float] = RRC_RATIO) -> tuple[int, int, int, int]:
    """A random box (left, top, right, bottom) of ``scale`` of the area at aspect ``ratio``."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(RRC_TRIES):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return (left, top, left + w, top + h)
    # Very elongated images: the largest centred box whose aspect is within ``ratio``.
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return (left, top, left + w, top + h)


@dataclass(frozen=True)
class Decoding:
    """How files become arrays; shared by every split of a streamed dataset."""
    size: int                      # output side N: every image becomes N x N
    channels: int                  # 1 (all grey) or 3
    center_crop: float = 0.875
    workers: int = 0               # DataLoader worker processes (0: decode in this process)
    bad_images: str = "error"      # error | skip (use the next readable file instead)
    random_crop: bool = True       # training crops: random-resized (else the evaluation crop)


def decode(path: str, decoding: Decoding, rng: np.random.Generator | None = None) -> np.ndarray:
    """uint8 (N, N, C): a random-resized crop when ``rng`` is given, else the centre crop."""
    img = open_image(path)
    img = img.convert("L" if decoding.channels == 1 else "RGB")
    w, h = img.size
    n = decoding.size
    box = random_resized_box(w, h, rng) if rng is not None else center_box(w, h, decoding.center_crop)
    if box is not None or (w, h) != (n, n):
        # reducing_gap as the in-memory reader (images.to_array): identical pixels when no crop.
        img = img.resize((n, n), Image.Resampling.BILINEAR, box=box, reducing_gap=3.0)
    a = np.array(img, dtype=np.uint8)       # a writable copy: torch.from_numpy shares it
    return a[:, :, None] if a.ndim == 2 else a


# ----------------------------------------------------------------------------- splits
class _Files(torch.utils.data.Dataset):
    """Map-style dataset keyed by (index, epoch); epoch < 0 means the centre crop.

    Returns a uint8 (C, N, N) tensor, or the error message of an unreadable file (the
    collate function turns it into one clean error in the training process).
    """

    def __init__(self, paths: Sequence[str], decoding: Decoding, crop_seed: int | None):
        self.paths, self.decoding, self.crop_seed = paths, decoding, crop_seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor | str:
        index, epoch = key
        n = len(self.paths)
        for attempt in range(n):
            path = self.paths[(index + attempt) % n]
            rng = None
            if self.crop_seed is not None and epoch >= 0:
                # Seeded by the image, not by the position in a batch: the same crop whatever
                # the batch size, the number of processes or where training resumed.
                rng = np.random.default_rng(derive_seed(self.crop_seed, epoch, index, _CROP_KEY))
            try:
                return torch.from_numpy(decode(path, self.decoding, rng)).permute(2, 0, 1)
            except ImageError as e:
                if self.decoding.bad_images != "skip":
                    return str(e)
                print(f"cnnlab: skipped {e} (--bad-images skip: the next file stands in)", file=sys.stderr)
        return "no readable image left in the split"


def _collate(items: list[torch.Tensor | str]) -> torch.Tensor | list[str]:
    errors = [i for i in items if isinstance(i, str)]
    return errors if errors else torch.stack(cast("list[torch.Tensor]", items))


def _images_or_raise(batch: torch.Tensor | list[str]) -> torch.Tensor:
    if isinstance(batch, list):
        more = f" (and {len(batch) - 1} more in this batch)" if len(batch) > 1 else ""
        raise CnnlabError(f"{batch[0]}{more}: the streaming loader stops at an unusable image; run "
                          f"`cnnlab data check DATA` to list every problem, or train with --bad-images skip")
    return batch


class _KeyBatches:
    """The batch sampler: lists of (index, epoch) keys, replaced before each pass."""

    def __init__(self):
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


@dataclass
class FileSplit:
    """A split as file paths and labels; images are decoded when a batch needs them
    (``cnnlab.data.dataset.ImageSplit``)."""
    paths: list[str]
    labels: np.ndarray             # int64 (N,)
    decoding: Decoding
    streamed: ClassVar[bool] = True

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.paths) != len(self.labels):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> "FileSplit":
        return FileSplit([self.paths[i] for i in index], self.labels[index], self.decoding)

    def loader(self, batches: _KeyBatches, *, crop_seed: int | None = None, pin: bool = False,
               persistent: bool = False) -> DataLoader:
        w = self.decoding.workers
        # Its own generator: a DataLoader otherwise draws its workers' base seed from the global
        # torch RNG, which would shift the weight initialisation (crops use per-image seeds).
        return DataLoader(_Files(self.paths, self.decoding, crop_seed), batch_sampler=batches, num_workers=w,
                          collate_fn=_collate, pin_memory=pin, persistent_workers=persistent and w > 0,
                          prefetch_factor=PREFETCH if w else None, generator=torch.Generator().manual_seed(0))

    def take(self, index: Sequence[int] | np.ndarray, batch_size: int = 64) -> np.ndarray:
        """uint8 (len(index), N, N, C) at the evaluation crop."""
        index = [int(i) for i in index]
        if not index:
            d = self.decoding
            return np.zeros((0, d.size, d.size, d.channels), np.uint8)
        keys = _KeyBatches()
        keys.batches = [[(i, -1) for i in index[s:s + batch_size]] for s in range(0, len(index), batch_size)]
        out = [_images_or_raise(b) for b in self.loader(keys)]
        return torch.cat(out).permute(0, 2, 3, 1).numpy()

    def stats_sample(self) -> Split:
        """A seeded sample of at most ``STATS_PIXELS`` pixels (all of the split when that is enough)."""
        n, side = len(self), self.decoding.size
        k = min(n, max(1, STATS_PIXELS // (side * side)))
        index = np.arange(n) if k == n else np.sort(
            np.random.default_rng(derive_seed(_STATS_KEY)).choice(n, k, replace=False))
        return Split(self.take(index), self.labels[index])

    def eval_batches(self, batch_size: int, device: torch.device, channels_last: bool = False,
                     shard: tuple[int, int] = (0, 1)) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Items ``rank::world`` in order, centre-cropped."""
        rank, world = shard
        index = list(range(rank, len(self), world))
        keys = _KeyBatches()
        keys.batches = [[(i, -1) for i in index[s:s + batch_size]] for s in range(0, len(index), batch_size)]
        labels = torch.as_tensor(self.labels)
        for keys_b, batch in zip(keys.batches, self.loader(keys, pin=device.type == "cuda")):
            x = _images_or_raise(batch).to(device, non_blocking=True)
            yield model_input(x, channels_last), labels[[i for i, _ in keys_b]].to(device)

    def train_batches(self, batch_size: int, device: torch.device, **options) -> "StreamBatches":
        return StreamBatches(self, batch_size, device, **options)


@dataclass
class StreamingDataset(Dataset):
    """A ``Dataset`` whose splits are ``FileSplit``s (same fields, same ``prepare_splits``)."""
    decoding: Decoding = field(default_factory=lambda: Decoding(IMAGENET_SIZE, 3))


# ----------------------------------------------------------------------------- training batches
class StreamBatches(BatchStream):
    """``BatchStream`` over files: decoded in worker processes, then augmented on the device."""

    def __init__(self, split: FileSplit, batch_size: int, device: torch.device, *, seed: int,
                 aug: Augmentation | None = None, drop_last: bool = False, channels_last: bool = False,
                 shard: tuple[int, int] = (0, 1)):
        self.files = split
        self.labels = torch.as_tensor(split.labels)        # int64 (N,) on the host, as the order
        self._configure(batch_size, device, seed=seed, aug=aug, drop_last=drop_last,
                        channels_last=channels_last, shard=shard)
        self._keys = _KeyBatches()
        self.decoded_crop = split.decoding.random_crop
        # Persistent workers: started once, fed a new key list each epoch.
        self.loader = split.loader(self._keys, crop_seed=seed if split.decoding.random_crop else None,
                                   pin=device.type == "cuda", persistent=True)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.order(epoch)
        steps = range(start_step, len(self))
        idx = [self.indices(order, step) for step in steps]
        self._keys.batches = [[(int(i), epoch) for i in ix] for ix in idx]
        for step, ix, batch in zip(steps, idx, self.loader):
            x = _images_or_raise(batch).to(self.device, non_blocking=True)
            yield self.finish(x, self.labels[ix].to(self.device, non_blocking=True), ix, epoch, step)


# ----------------------------------------------------------------------------- loading
def _is_official(cfg: Config) -> bool:
    """A dataset name read from archives (as ``sources.load_dataset`` decides), not a folder."""
    from cnnlab.data.registry import official
    return official(cfg.data) is not None


Header = tuple[tuple[int, int], str]   # (width, height), Pillow's mode


def sample_headers(paths: list[str]) -> list[Header]:
    """(size, mode) of up to ``HEADER_SAMPLE`` evenly spaced files (unreadable ones left out)."""
    step = max(1, len(paths) // HEADER_SAMPLE)
    out = []
    for p in paths[::step][:HEADER_SAMPLE]:
        try:
            with Image.open(p, formats=FORMATS) as img:
                out.append((img.size, img.mode))
        except Exception:  # noqa: BLE001  (sizing only: the decoder reports bad files later)
            continue
    return out


def memory_budget(processes: int = 1) -> int:
    """Bytes of decoded images the in-memory path may hold per process."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        ram = 4 * MEMORY_BUDGET
    return min(MEMORY_BUDGET, ram // 4 // max(1, processes))


def choose_loader(cfg: Config, listing=None, processes: int = 1, headers: list[Header] | None = None) -> str:
    """"memory" or "stream" for ``cfg`` (``listing``: the folder's, when already made;
    ``headers``: a sample of its files' headers, when already read); the config is
    ``check_config``'s (--loader stream names an image folder)."""
    official = _is_official(cfg)
    if cfg.loader != "auto":
        return cfg.loader
    if official:
        return "memory"
    if cfg.crop == "random_resized":
        return "stream"
    return "stream" if decoded_bytes(cfg, listing, headers) > memory_budget(processes) else "memory"


def decoded_bytes(cfg: Config, listing=None, headers: list[Header] | None = None) -> int:
    """What the in-memory path would hold: every listed image at its decoded size."""
    from cnnlab.data.listing import list_folder
    listing = listing or list_folder(cfg.data, test_split=cfg.test_split, seed=cfg.seed)
    paths = [p for files in listing.files.values() for p, _ in files]
    headers = sample_headers(paths) if headers is None else headers
    if isinstance(cfg.image_size, int):
        w = h = cfg.image_size
    elif cfg.image_size is not None:
        h, w = cfg.image_size
    else:
        (w, h), _ = Counter(s for s, _ in headers).most_common(1)[0] if headers else ((1, 1), 0)
    channels = 1 if headers and all(m in GREY_MODES for _, m in headers) else 3
    return len(paths) * w * h * channels


def default_workers(processes: int = 1) -> int:
    """Decode processes per training process: its share of the cores, less one for itself."""
    from cnnlab.core.hardware import available_cores
    return max(0, available_cores() // max(1, processes) - 1)


def scan_data_folder(cfg: Config, saved_split: Mapping[str, Any] | str | Path | None = None) -> FolderScan | None:
    """The walk of ``--data`` when it is an image folder (else None), made once and handed to
    whichever loader reads it: 0.45 s for CIFAR-10's 60,000 files. A flat folder is split by
    ``cfg.seed`` and its ``test_split``; ``saved_split`` (a run's ``splits.json``, or the
    record read from it) lists that split again instead (``listing.list_folder``)."""
    if _is_official(cfg) or not Path(cfg.data).expanduser().is_dir():
        return None
    from cnnlab.data import check
    return check.scan_folder(cfg.data, test_split=cfg.test_split, seed=cfg.seed,
                             saved_split=saved_split)


def open_streaming(cfg: Config, processes: int = 1, scan: FolderScan | None = None,
                   headers: list[Header] | None = None) -> StreamingDataset | None:
    """The streamed dataset for ``cfg``, or None when the in-memory path should load it.
    ``scan`` is ``scan_data_folder(cfg)``: the same walk as the in-memory reader's, so a
    messy folder gets the full list of problems either way; ``headers``: a sample of its
    training files' headers when the caller has read them (else read here)."""
    if scan is None or cfg.loader == "memory":
        return None                  # the in-memory reader (and its messages for bad --data)
    from cnnlab.data import check
    listing, report = scan
    train_paths = [p for p, _ in listing.files["train"]]
    headers = sample_headers(train_paths) if headers is None else headers
    if choose_loader(cfg, listing, processes, headers) == "memory":
        return None
    check.enforce(report, "skip")   # layout problems; unreadable files follow cfg.bad_images when decoded
    if cfg.bad_images != "skip":       # files of a saved split gone since: refused as the in-memory path does
        check.enforce(check.CheckReport(report.source, problems=[p for p in report.problems
                                                                   if p.kind == "vanished"]), cfg.bad_images)
    channels = 1 if headers and all(m in GREY_MODES for _, m in headers) else 3
    workers = cfg.workers if cfg.workers is not None else default_workers(processes)
    if isinstance(cfg.image_size, tuple):
        raise CnnlabError(f"--image-size {cfg.image_size[0]},{cfg.image_size[1]}: streamed images are cropped "
                          f"square; give one side (--image-size N), or decode in memory with --loader memory")
    decoding = Decoding(cfg.image_size or IMAGENET_SIZE, channels, cfg.center_crop, workers, cfg.bad_images,
                        random_crop=cfg.crop != "center")
    splits = {split: FileSplit([p for p, _ in files], np.array([lbl for _, lbl in files], np.int64), decoding)
              for split, files in listing.files.items()}
    # The same hold-out as the in-memory path's: prepare_splits reads only labels.
    plain = Dataset(listing.root.name, listing.class_names, splits["train"], splits["test"], splits.get("val"))
    ds = prepare_splits(plain, val_split=cfg.val_split, train_size=cfg.train_size,
                        test_size=cfg.test_size, seed=cfg.seed)
    return StreamingDataset(ds.name, ds.class_names, ds.train, ds.test, ds.val, decoding=decoding)


def describe(data: Dataset) -> str | None:
    """One header line about streaming, or None for in-memory data."""
    if not isinstance(data, StreamingDataset):
        return None
    d = data.decoding
    who = (f"{d.workers} worker process{'es' if d.workers != 1 else ''} per training process" if d.workers
           else "the training process itself (--workers 0)")
    return f"  streaming from disk: {d.size}x{d.size} crops decoded by {who}"


__all__ = ["Decoding", "FileSplit", "StreamBatches", "StreamingDataset", "choose_loader",
           "decode", "open_streaming", "scan_data_folder", "random_resized_box"]
