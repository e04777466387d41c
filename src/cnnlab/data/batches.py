"""Whole-dataset, in-memory batches, augmented on the training device.

The dataset lives on the device as one uint8 tensor; each epoch draws a permutation and
yields float batches in [0, 1]. Every random choice is drawn from a generator seeded by
(seed, epoch) for the order and (seed, epoch, step) for augmentation, so batch ``k`` of
epoch ``e`` is the same whether the run was interrupted or not.

Data-parallel: with ``shard=(rank, world)`` each process takes every ``world``-th item of
the same global batch of ``batch_size * world`` items, so N processes see exactly the items
one process would see with an N times larger batch (``cnnlab.engine.distributed``).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from cnnlab.data.augment import Augmentation, Draw


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integer keys (counter-based randomness)."""
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(2, np.uint64)[0] >> 1)


def to_nchw(images: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (N, H, W, C) array -> uint8 (N, C, H, W) tensor on ``device``."""
    t = torch.as_tensor(images)
    return t.permute(0, 3, 1, 2).contiguous().to(device)


def model_input(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 (N, C, H, W) -> what every model takes: float32 in [0, 1], in the model's memory
    layout (normalisation is inside the model). The one place pixels become floats."""
    if images.dtype != torch.uint8:
        raise TypeError(f"model_input takes uint8 pixels, got {images.dtype}")
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return images.to(dtype=torch.float32, memory_format=layout).div_(255.0)


class BatchStream:
    """Training batches over one split, reproducible from (seed, epoch, step)."""

    def __init__(self, split, batch_size: int, device: torch.device, *, seed: int,
                 aug: Augmentation | None = None, drop_last: bool = False,
                 channels_last: bool = False, shard: tuple[int, int] = (0, 1)):
        """``split``: an in-memory ``cnnlab.data.dataset.Split`` (uint8 images (N, H, W, C) and
        int64 labels), copied to ``device`` whole."""
        self.images = to_nchw(split.images, device)               # uint8 (N, C, H, W)
        self.labels = torch.as_tensor(split.labels).to(device)    # int64 (N,)
        self._configure(batch_size, device, seed=seed, aug=aug, drop_last=drop_last,
                        channels_last=channels_last, shard=shard)

    def _configure(self, batch_size: int, device: torch.device, *, seed: int, aug: Augmentation | None,
                   drop_last: bool, channels_last: bool, shard: tuple[int, int]) -> None:
        """Everything but the images; ``self.labels`` must be set (its device holds the order)."""
        self.batch_size, self.device, self.seed = batch_size, device, seed
        self.aug = aug or Augmentation()
        self.decoded_crop = False   # the streaming decoder's random crop stands in for a preset's
        self.drop_last, self.channels_last = drop_last, channels_last
        self.rank, self.world = shard
        self.global_batch = batch_size * self.world
        # Alternating flip needs one fixed random bit per image for the whole run.
        g = torch.Generator().manual_seed(derive_seed(seed, 0xF11F))
        self.base_flip = (torch.rand(len(self.labels), generator=g) < 0.5).to(self.labels.device)

    def __len__(self) -> int:
        """Batches per epoch (global batches: every process takes the same number of steps)."""
        n = len(self.labels)
        return n // self.global_batch if self.drop_last else -(-n // self.global_batch)

    def order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, 0x0D))
        return torch.randperm(len(self.labels), generator=g).to(self.labels.device)

    def indices(self, order: torch.Tensor, step: int) -> torch.Tensor:
        """This process's items of global batch ``step``: every ``world``-th, from ``rank``."""
        return order[step * self.global_batch:(step + 1) * self.global_batch][self.rank::self.world]

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (images float (B, C, H, W) in [0, 1], labels) from batch ``start_step`` on:
        int labels (B,), or soft ones (B, classes) when the augmentation mixes images."""
        order = self.order(epoch)
        for step in range(start_step, len(self)):
            idx = self.indices(order, step)
            yield self.finish(self.images[idx], self.labels[idx], idx, epoch, step)

    def finish(self, images: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, epoch: int,
               step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, C, H, W) on the device -> float in [0, 1], batch augmentation applied.

        Crops, flips, shifts and cutout only move or zero pixels, so they run on the uint8 batch
        (a quarter of the bytes) and the float conversion comes last, in the model's layout;
        mixing images (MixUp, CutMix) needs floats and comes after it."""
        if not self.aug.active:
            return model_input(images, self.channels_last), labels
        # Each process draws its own augmentation (rank in the key) under data parallelism.
        rank_key = (self.rank,) if self.world > 1 else ()
        g = torch.Generator(device=self.device).manual_seed(derive_seed(self.seed, epoch, step, 0xA6, *rank_key))
        draw = Draw(g, epoch, self.base_flip, idx, cropped=self.decoded_crop)
        return self.aug.mix(model_input(self.aug(images, draw), self.channels_last), labels, draw)


class FeatureBatches:
    """Batches of precomputed rows (a frozen body's features) in the order, and of the size,
    that ``batches`` gives its images: the same steps, so a run resumes at the same place."""

    def __init__(self, batches: BatchStream, features: torch.Tensor):
        if len(features) != len(batches.labels):
            raise ValueError(f"{len(features)} feature rows for {len(batches.labels)} images")
        self.batches, self.features = batches, features

    def __len__(self) -> int:
        return len(self.batches)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.batches.order(epoch)
        for step in range(start_step, len(self)):
            idx = self.batches.indices(order, step)
            yield self.features[idx], self.batches.labels[idx]
