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


class FreezeBody(TrainingHook):
    """``--freeze-epochs``: for the first ``steps`` steps only the head (the parameters under
    ``head``) trains, so a new head fits the started-from body before the body moves (fastai's
    ``fine_tune``). Parameters frozen for their own reasons stay frozen."""
    unused_parameters = True

    def __init__(self, head: str, steps: int):
        self.head, self.steps = head, steps
        self._frozen: bool | None = None

    def setup(self, net: nn.Module, sample: Sample) -> None:
        self.body = [p for name, p in net.named_parameters()
                     if p.requires_grad and not name.startswith(self.head + ".")]

    def before_step(self, net: nn.Module, step: int) -> None:
        frozen = step < self.steps
        if frozen != self._frozen:   # only at the start and at the thaw
            for p in self.body:
                p.requires_grad_(not frozen)
            self._frozen = frozen

    def after_backward(self, net: nn.Module, step: int) -> None:
        if step < self.steps:        # DDP hands unused parameters a zero gradient; None skips them
            for p in self.body:
                p.grad = None
