"""Augmentation of whole batches with tensor ops, on the training device.

Randomness comes from an explicit ``torch.Generator`` the caller seeds from (seed, epoch,
step), so any batch can be regenerated exactly: that is what makes resume bit-identical.
All functions take and return ``(N, C, H, W)`` tensors.

``AUGMENTATIONS`` is the table a run's batches go through: a config field's name, and the
function applied when that field is not at its default (off). Adding an augmentation is a
field in ``cnnlab.core.config.Config`` and a row here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from cnnlab.core.config import Config


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    mask = torch.rand(x.shape[0], generator=gen, device=gen.device) < 0.5
    return torch.where(mask.to(x.device)[:, None, None, None], x.flip(-1), x)


def alternating_flip(x: torch.Tensor, base_flip: torch.Tensor, epoch: int) -> torch.Tensor:
    """Epoch 0 flips the images whose ``base_flip`` bit is set; each later epoch flips the
    opposite set from the epoch before, so every image is seen both ways on alternate epochs.

    ``base_flip`` is a bool per image of this batch, drawn once for the whole run.
    """
    mask = base_flip if epoch % 2 == 0 else ~base_flip
    return torch.where(mask.to(x.device)[:, None, None, None], x.flip(-1), x)


def random_translate(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``pad`` pixels in each direction, filling by reflection.

    One gather for the whole batch: output pixel (i, j) of image n reads padded pixel
    (i + dy[n], j + dx[n]).
    """
    if pad == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=gen.device).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=gen.device).to(x.device)
    rows = (torch.arange(h, device=x.device)[None, :] + dy[:, None])[:, None, :, None]   # (N, 1, H, 1)
    cols = (torch.arange(w, device=x.device)[None, :] + dx[:, None])[:, None, None, :]   # (N, 1, 1, W)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


def cutout(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Zero one ``size`` x ``size`` square per image (centre uniform, square clipped at edges)."""
    if size == 0:
        return x
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n,), generator=gen, device=gen.device).to(x.device)
    cx = torch.randint(0, w, (n,), generator=gen, device=gen.device).to(x.device)
    ys = torch.arange(h, device=x.device)[None, :]
    xs = torch.arange(w, device=x.device)[None, :]
    in_y = (ys >= (cy - size // 2)[:, None]) & (ys < (cy - size // 2 + size)[:, None])   # (N, H)
    in_x = (xs >= (cx - size // 2)[:, None]) & (xs < (cx - size // 2 + size)[:, None])   # (N, W)
    hole = (in_y[:, :, None] & in_x[:, None, :])[:, None]                                 # (N, 1, H, W)
    return x.masked_fill(hole, 0.0)


@dataclass(frozen=True)
class Draw:
    """What one batch's augmentations draw on."""
    gen: torch.Generator          # seeded from (seed, epoch, step[, rank])
    epoch: int
    base_flip: torch.Tensor       # the run's fixed bit per image (alternating flip)
    index: torch.Tensor           # this batch's items, indexing ``base_flip``


def _flip(x: torch.Tensor, mode: str, draw: Draw) -> torch.Tensor:
    if mode == "random":
        return random_flip(x, draw.gen)
    return alternating_flip(x, draw.base_flip[draw.index], draw.epoch)


# Applied in this order: the order fixes which random numbers each one draws, so it is part of
# what makes a seeded run reproducible.
AUGMENTATIONS: dict[str, Callable[[torch.Tensor, Any, Draw], torch.Tensor]] = {
    "flip": _flip,
    "translate": lambda x, pad, draw: random_translate(x, pad, draw.gen),
    "cutout": lambda x, size, draw: cutout(x, size, draw.gen),
}
_OFF = Config()   # each field's default is its "off" value


class Augmentation:
    """The settings of ``AUGMENTATIONS`` a run uses (any left out are off)."""

    def __init__(self, **settings: Any):
        unknown = sorted(set(settings) - set(AUGMENTATIONS))
        if unknown:
            raise ValueError(f"unknown augmentation {', '.join(unknown)}: known are {', '.join(AUGMENTATIONS)}")
        self.settings = {name: settings.get(name, getattr(_OFF, name)) for name in AUGMENTATIONS}
        self._on = [(AUGMENTATIONS[n], v) for n, v in self.settings.items() if v != getattr(_OFF, n)]

    @classmethod
    def from_config(cls, cfg: Config) -> "Augmentation":
        return cls(**{name: getattr(cfg, name) for name in AUGMENTATIONS})

    @property
    def active(self) -> bool:
        return bool(self._on)

    def __call__(self, x: torch.Tensor, draw: Draw) -> torch.Tensor:
        for fn, value in self._on:
            x = fn(x, value, draw)
        return x

    def __repr__(self) -> str:
        return f"Augmentation({', '.join(f'{k}={v!r}' for k, v in self.settings.items())})"
