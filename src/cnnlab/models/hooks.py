"""What a network may ask of the training loop, without the loop knowing the network.

A network that needs set-up from the data, or a change of its own during training, offers
``training_hooks(cfg, steps_per_epoch) -> list[TrainingHook]``; the loop calls each hook at
the points below and nothing else about the network is special-cased (SpeedNet's patch
whitening and its frozen bias are the example).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

# sample(n): up to n training images, evenly spaced over the split, normalised as the
# network sees them: float (N, C, H, W) on the training device.
Sample = Callable[[int], torch.Tensor]


class TrainingHook:
    """Every hook point, doing nothing."""
    # Some parameters stop taking gradients part-way: data-parallel training must not wait
    # for their gradients (DDP's find_unused_parameters).
    unused_parameters = False

    def setup(self, net: nn.Module, sample: Sample) -> None:
        """Once, before training (and before a resumed run restores its weights)."""

    def before_step(self, net: nn.Module, step: int) -> None:
        """Before the forward pass of global step ``step``."""

    def after_backward(self, net: nn.Module, step: int) -> None:
        """After the backward pass, before the optimizer steps."""
