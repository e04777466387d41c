"""Augmentation of whole batches with tensor ops, on the training device.

Randomness comes from an explicit ``torch.Generator`` the caller seeds from (seed, epoch,
step), so any batch can be regenerated exactly: that is what makes resume bit-identical.
All functions take and return ``(N, C, H, W)`` tensors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
