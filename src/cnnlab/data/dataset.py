"""The dataset shape every reader returns, and the splits made from it.

A split is anything with the ``ImageSplit`` protocol: ``Split`` holds decoded images in
memory, ``cnnlab.data.stream.FileSplit`` holds file paths and decodes per batch. Training,
evaluation and the run folder use only the protocol, never which kind it is.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Iterator, Protocol, Sequence

import numpy as np
import torch

from cnnlab.core.errors import CnnlabError
from cnnlab.data.augment import Augmentation
from cnnlab.data.batches import BatchStream, model_input

Index = Sequence[int] | np.ndarray


class ImageSplit(Protocol):
    """What every split offers: labels, subsets, images by index and the two kinds of batches."""
    labels: np.ndarray                # int64 (N,)
    streamed: ClassVar[bool]          # decoded per batch from files, not held in memory

    def __len__(self) -> int: ...

    def subset(self, index: np.ndarray) -> "ImageSplit": ...

    def take(self, index: Index) -> np.ndarray:
        """uint8 (len(index), H, W, C): the images at ``index`` (a streamed split's centre crop)."""
        ...

    def stats_sample(self) -> "Split":
        """The images channel statistics are computed on, in memory."""
        ...

    def eval_batches(self, batch_size: int, device: torch.device, channels_last: bool = False,
                     shard: tuple[int, int] = (0, 1)) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Fixed-order (float (B, C, H, W) in [0, 1], labels) batches; ``shard=(rank, world)``
        takes items ``rank::world`` only."""
        ...

    def train_batches(self, batch_size: int, device: torch.device, *, seed: int, aug: Augmentation | None = None,
                      drop_last: bool = False, channels_last: bool = False,
                      shard: tuple[int, int] = (0, 1)) -> BatchStream:
        """Seeded, augmented training batches (``cnnlab.data.batches.BatchStream``)."""
        ...


@dataclass
class Split:
    """A split decoded in memory."""
    images: np.ndarray   # uint8 (N, H, W, C)
    labels: np.ndarray   # int64 (N,)
    streamed: ClassVar[bool] = False

    def __post_init__(self):
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, H, W, C), got {self.images.dtype} {self.images.shape}")
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> "Split":
        return Split(self.images[index], self.labels[index])

    def take(self, index: Index) -> np.ndarray:
        return self.images[np.asarray(index, dtype=np.int64)]

    def stats_sample(self) -> "Split":
        return self

    def eval_batches(self, batch_size: int, device: torch.device, channels_last: bool = False,
                     shard: tuple[int, int] = (0, 1)) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rank, world = shard
        images = torch.as_tensor(self.images[rank::world])   # uint8 stays on the host until needed
        labels = torch.as_tensor(self.labels[rank::world])
        for i in range(0, len(labels), batch_size):
            x = images[i:i + batch_size].to(device).permute(0, 3, 1, 2)
            yield model_input(x, channels_last), labels[i:i + batch_size].to(device)

    def train_batches(self, batch_size: int, device: torch.device, **options) -> BatchStream:
        return BatchStream(self, batch_size, device, **options)


@dataclass
class Dataset:
    """Images as uint8 NHWC arrays, integer labels indexing ``class_names``."""
    name: str
    class_names: list[str]
    train: ImageSplit
    test: ImageSplit
    val: ImageSplit | None = None
    skipped: int = 0     # unreadable files left out (``--bad-images skip``)
    # An image folder's split file lists (``FolderListing.split_record``): saved with a run as
    # splits.json, so evaluate and resume read the same held-out files.
    split_record: dict | None = None
    size_reason: str = ""   # why an image folder was decoded at this size, for the run header

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every image."""
        h, w, c = self.train.take(np.zeros(0, np.int64)).shape[1:]   # no image read: an empty take
        return h, w, c


def stratified_indices(labels: np.ndarray, count: int | float, rng: np.random.Generator) -> np.ndarray:
    """A sorted index of ``count`` items (a fraction when < 1) keeping class proportions.

    Each class gets its share rounded down, then the largest remainders take what is left,
    so the total is exact and every class present keeps at least its proportional share.
    """
    n = len(labels)
    want = int(round(count * n)) if isinstance(count, float) and count < 1 else int(count)
    want = max(0, min(want, n))
    classes, counts = np.unique(labels, return_counts=True)
    share = counts * want / n
    take = np.floor(share).astype(int)
    for i in np.argsort(-(share - take), kind="stable")[: want - take.sum()]:
        take[i] += 1
    picked = []
    for c, k in zip(classes, take):
        members = np.flatnonzero(labels == c)
        picked.append(rng.permutation(members)[:k])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


# One generator per purpose, so the test subset does not depend on the train options.
TRAIN_SUBSET, VAL_HOLDOUT, TEST_SUBSET = 1, 2, 3


def split_rng(seed: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng([seed, purpose])


def subset_index(labels: np.ndarray, size: int, seed: int, purpose: int) -> np.ndarray:
    """The ``--train-size`` (``purpose=TRAIN_SUBSET``) or ``--test-size`` (``TEST_SUBSET``)
    subset ``prepare_splits`` takes: the image folder reader decodes only these."""
    return stratified_indices(labels, size, split_rng(seed, purpose))


def prepare_splits(ds: Dataset, *, val_split: float, train_size: int | None,
                   test_size: int | None, seed: int) -> Dataset:
    """Carve the validation hold-out and the optional subsets, reproducibly from ``seed``.

    The validation set is ``val/`` when the source has one, else a stratified hold-out from
    train. The test split is only ever subset, never looked at. The values are the config's,
    already checked by ``cnnlab.core.config.validate``. A split already cut to its size (the
    image folder reader's) comes back unchanged: the subset of all of it is all of it.
    """
    train, val = ds.train, ds.val
    if train_size is not None:
        # The subset covers train + hold-out so `--train-size 1000 --val-split 0.1` trains on 900.
        train = train.subset(subset_index(train.labels, train_size, seed, TRAIN_SUBSET))
    if val is None and val_split > 0:
        held = stratified_indices(train.labels, float(val_split), split_rng(seed, VAL_HOLDOUT))
        keep = np.setdiff1d(np.arange(len(train)), held)
        val, train = train.subset(held), train.subset(keep)
    test = ds.test
    if test_size is not None:
        test = test.subset(subset_index(test.labels, test_size, seed, TEST_SUBSET))
    if len(train) == 0 and train_size != 0:   # 0: no training split asked for (evaluate)
        raise CnnlabError("no training images left after the validation split: lower --val-split "
                          "or raise --train-size")
    return dataclasses.replace(ds, train=train, test=test, val=val)


def channel_stats(train: Split, normalize: str) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of ``train``'s pixels in [0, 1] (zeros and ones for
    ``normalize: none``): the normalisation every model carries."""
    c = train.images.shape[-1]
    if normalize == "none":
        return [0.0] * c, [1.0] * c
    # From a histogram of the 256 pixel values per channel (no float copy of the data), over
    # an evenly spaced sample of at most ~2,500 images: plenty for two numbers per channel.
    sample = train.images[::max(1, len(train.images) // 2_500)]
    values = np.arange(256, dtype=np.float64) / 255.0
    mean, std = [], []
    for ch in range(c):
        counts = np.bincount(sample[..., ch].ravel(), minlength=256)
        p = counts / counts.sum()
        m = float(p @ values)
        mean.append(m)
        std.append(float(np.sqrt(max(p @ values ** 2 - m * m, 0.0))))
    return [float(m) for m in mean], [float(max(s, 1e-3)) for s in std]
