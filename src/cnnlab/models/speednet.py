"""SpeedNet: a small, wide-enough CNN for fast CIFAR-scale training (the recipes' network).

Built on the ideas behind the GPU speed records for CIFAR-10 (Page 2018, "How to train your
ResNet"; Jordan 2024, "94% on CIFAR-10 in 3.29 seconds on a single GPU", arXiv:2404.00498):

- a 2x2 patch convolution first, initialised from the whitening transform of image patches
  (eigenvectors of their covariance, and their negatives ahead of the activation) and kept
  frozen; the narrowest net keeps it linear, without the negatives, which halves the input of
  the costliest convolution (the first, at full resolution) and trained no worse;
- three blocks of conv3x3 - maxpool2 - BatchNorm - act - conv3x3 - BatchNorm - act, so the
  spatial size halves early (where the CPU time goes) while the width grows;
- global max pooling and a linear head whose logits are scaled down (``logit_scale``);
- convolutions initialised as partial identities (dirac), BatchNorm scales frozen at 1;
- 3x3 convolutions that train their wide layers on small maps as plain matrix products on a
  CPU (``models/conv.py``: oneDNN's weight gradient there is slow).

Widths, activation and whitening are data (``SPEEDNET_SPECS``); nothing here is specific to
32x32 inputs: any height and width from 9 px up work, square or not (9 -> 8 through the
patch convolution, then 4 -> 2 -> 1 through the three pools).
"""
from __future__ import annotations

from typing import cast

import torch
from torch import nn

from cnnlab.core.config import Config
from cnnlab.core.events import Callback, Setup
from cnnlab.models.conv import Conv3x3
from cnnlab.models.registry import InputSize, Window, register_model, smallest_side

# name -> (widths of the three blocks, activation, whitening filters in +/- pairs through the
# activation). GELU trains a little better per epoch; ReLU costs a third less time in the
# narrow nets, where elementwise work dominates on a CPU. Linear whitening in speednet_xs:
# 73.2% instead of 72.4% after one epoch of speed70's settings, in 12% less time (one seed each).
SPEEDNET_SPECS = {
    "speednet_xs": ((32, 64, 128), nn.ReLU, False),
    "speednet_s": ((64, 128, 128), nn.ReLU, True),
    "speednet": ((64, 256, 256), nn.GELU, True),
    "speednet_l": ((128, 384, 512), nn.GELU, True),
}
PAPER = "Jordan 2024, 94% on CIFAR-10 in 3.29 Seconds on a Single GPU (after Page 2018)"
PATCH = 2           # side of the whitening convolution's patches (pixels, no padding)
# Training side on photo folders: the CIFAR-10 size the recipes are tuned and timed at.
DEFAULT_SIZE = 32


class FrozenScaleBatchNorm(nn.BatchNorm2d):
    """BatchNorm with its scale fixed at 1: only the shift learns (as in the speed records)."""

    def __init__(self, channels: int, momentum: float = 0.4, eps: float = 1e-12):
        super().__init__(channels, momentum=momentum, eps=eps)
        self.weight.requires_grad_(False)


class ConvBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int, act_layer: type[nn.Module]):
        super().__init__(
            Conv3x3(cin, cout),
            nn.MaxPool2d(2),
            FrozenScaleBatchNorm(cout), act_layer(),
            Conv3x3(cout, cout),
            FrozenScaleBatchNorm(cout), act_layer(),
        )
        for conv in (self[0], self[4]):
            _dirac_init(cast(nn.Conv2d, conv))


def _dirac_init(conv: nn.Conv2d) -> None:
    """Identity on the first min(in, out) channels, default init elsewhere: trains faster."""
    w = conv.weight.data
    n = min(w.shape[0], w.shape[1])
    torch.nn.init.dirac_(w[:n])


class SpeedNet(nn.Module):
    def __init__(self, widths: tuple[int, int, int], num_classes: int, in_channels: int,
                 act_layer: type[nn.Module] = nn.GELU, whiten_pairs: bool = True, patch: int = PATCH,
                 logit_scale: float = 1 / 9):
        super().__init__()
        self.whiten_pairs = whiten_pairs
        whiten_width = (2 if whiten_pairs else 1) * in_channels * patch * patch
        self.whiten = nn.Conv2d(in_channels, whiten_width, patch, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)   # set by init_whitening, then frozen
        self.act = act_layer()
        chans = (whiten_width, *widths)
        self.blocks = nn.Sequential(*(ConvBlock(a, b, act_layer) for a, b in zip(chans[:-1], chans[1:])))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(widths[-1], num_classes, bias=False)
        self.logit_scale = logit_scale

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the patch conv to whiten ``images`` (N, C, H, W, normalised): its output
        channels are decorrelated with unit variance (in +/- pairs, so the activation that
        follows keeps both signs)."""
        k = self.whiten.kernel_size[0]
        patches = images.float().unfold(2, k, 1).unfold(3, k, 1)            # (N, C, H', W', k, k)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, images.shape[1] * k * k)
        patches = patches - patches.mean(0)
        cov = patches.T @ patches / len(patches)
        eigvals, eigvecs = torch.linalg.eigh(cov.double())
        w = (eigvecs.T / torch.sqrt(eigvals + eps)[:, None]).float()       # rows: whitening filters
        w = w.reshape(-1, images.shape[1], k, k)
        self.whiten.weight.copy_((torch.cat([w, -w]) if self.whiten_pairs else w).to(self.whiten.weight))
        _whitening_bias(self).zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.whiten(x)
        if self.whiten_pairs:
            x = self.act(x)
        x = self.blocks(x)
        return self.head(self.pool(x).flatten(1)) * self.logit_scale


    def training_callbacks(self, cfg: Config, steps_per_epoch: int) -> list[Callback]:
        """``--whiten``: the patch conv set from the training images; ``--whiten-bias-epochs``:
        its bias frozen after that many epochs."""
        callbacks: list[Callback] = []
        if cfg.whiten:
            callbacks.append(PatchWhitening())
        if cfg.whiten_bias_epochs is not None:
            callbacks.append(FreezeWhiteningBias(round(cfg.whiten_bias_epochs * steps_per_epoch)))
        return callbacks


def _whitening_bias(net: nn.Module) -> torch.Tensor:
    return cast(torch.Tensor, cast(SpeedNet, net).whiten.bias)   # built with bias=True


WHITENING_SAMPLE = 2000  # images whose 2x2 patches set the whitening layer


class PatchWhitening(Callback):
    def on_setup(self, setup: Setup) -> None:
        cast(SpeedNet, setup.model.net).init_whitening(setup.sample(WHITENING_SAMPLE))


class FreezeWhiteningBias(Callback):
    """The whitening bias settles within a few epochs (airbench freezes it after 3); frozen, it
    also spares the backward pass its path through the first convolution."""
    unused_parameters = True

    def __init__(self, after_steps: int):
        self.after_steps = after_steps

    def on_step_begin(self, trainer) -> None:
        _whitening_bias(trainer.model.net).requires_grad_(trainer.state.global_step < self.after_steps)

    def on_backward_end(self, trainer) -> None:
        if trainer.state.global_step >= self.after_steps:   # DDP hands unused parameters a zero gradient; None keeps momentum off it
            _whitening_bias(trainer.model.net).grad = None


def _path(blocks: int) -> list[Window]:
    """The path a side takes: the patch conv, then per block conv 3x3 'same' - pool 2 - conv 3x3."""
    return [Window(PATCH)] + [Window(3, padding=1), Window(2, 2), Window(3, padding=1)] * blocks


def _factory(widths, act_layer, whiten_pairs):
    def make(num_classes: int = 10, in_channels: int = 3, input_size: InputSize = 32) -> nn.Module:
        return SpeedNet(widths, num_classes, in_channels, act_layer, whiten_pairs)   # any size
    return make


for _name, (_widths, *_rest) in SPEEDNET_SPECS.items():
    register_model(_name, family="SpeedNet", year=2024, paper=PAPER, input_sizes=(28, 32),
                   min_size=smallest_side(_path(len(_widths))),
                   default_size=DEFAULT_SIZE, setup_keys=("whiten", "whiten_bias_epochs"))(_factory(_widths, *_rest))
