"""GoogLeNet (Inception v1).

Paper: C. Szegedy, W. Liu, Y. Jia, P. Sermanet, S. Reed, D. Anguelov, D. Erhan,
V. Vanhoucke and A. Rabinovich (2014), "Going Deeper with Convolutions", CVPR 2015.

Nine Inception modules with the branch widths of the paper's table 1, max pools (3x3
stride 2) after 3b and 4e, global average pooling, dropout 0.4 and a Dense layer. Each
module concatenates four branches: 1x1; 1x1 reduce then 3x3; 1x1 reduce then 5x5 (the
paper's 5x5, not the 3x3 torchvision uses); 3x3 stride 1 max pool then 1x1 projection.

Changed from the paper, at every input size:

- batch norm after every convolution (conv without bias - BN - ReLU); the paper had none,
  BN arrived with Inception v2 (Ioffe & Szegedy 2015). Local response normalisation in the
  stem is left out.
- no auxiliary classifiers (the paper's two side heads on 4a and 4d were a training aid,
  discarded at test time); the network has one output.

At 224x224 (any input whose shorter side is above 64 px) the stem is the original: 7x7/2
conv (64), 3x3/2 max pool, 1x1 conv (64), 3x3 conv (192), 3x3/2 max pool, so Inception 3a
sees 28x28 maps; the max pools round up, as in the original Caffe model.

Changed for small images (shorter side 64 px or less): that stem is replaced by a single 3x3
stride 1 conv to 192 channels with no pooling (the common CIFAR adaptation), so 3a/3b see
32x32, 4a-4e 16x16 and 5a/5b 8x8 maps for a 32x32 input (28, 14, 7 for 28x28). Any height and
width work, square or not (global average pooling), from 4 px up: 4 -> 2 -> 1 through the
two pools.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from cnnlab.models.registry import InputSize, Window, as_hw, register_model, smallest_side

SMALL_INPUT_MAX = 64
# Training side on photo folders: the paper's ImageNet size.
DEFAULT_SIZE = 224
_DROPOUT = 0.4

NormLayer = Callable[[int], nn.Module]

# Table 1 of the paper. Each module: (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj);
# "M" is a 3x3 stride 2 max pool between groups.
INCEPTION_TABLE: tuple = (
    ("3a", (64, 96, 128, 16, 32, 32)),
    ("3b", (128, 128, 192, 32, 96, 64)),
    "M",
    ("4a", (192, 96, 208, 16, 48, 64)),
    ("4b", (160, 112, 224, 24, 64, 64)),
    ("4c", (128, 128, 256, 24, 64, 64)),
    ("4d", (112, 144, 288, 32, 64, 64)),
    ("4e", (256, 160, 320, 32, 128, 128)),
    "M",
    ("5a", (256, 160, 320, 32, 128, 128)),
    ("5b", (384, 192, 384, 48, 128, 128)),
)
STEM_CHANNELS = 192
_POOL = (3, 2)      # kernel, stride of the pools between groups (and in the ImageNet stem)


def conv_norm_act(c_in: int, c_out: int, kernel: int, stride: int = 1,
                  norm_layer: NormLayer = nn.BatchNorm2d) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=False),
                         norm_layer(c_out), nn.ReLU(inplace=True))


def _max_pool() -> nn.MaxPool2d:
    return nn.MaxPool2d(*_POOL, ceil_mode=True)


def _path(table) -> list[Window]:
    """The path a side takes with the small stem: a 3x3 'same' conv, then Inception modules
    (every branch keeps the size) and the pools between groups."""
    return [Window(3, padding=1)] + [Window(*_POOL, ceil_mode=True) for item in table if item == "M"]


# The ImageNet stem takes any size above SMALL_INPUT_MAX, so the small stem's minimum is the network's.
MIN_SIZE = smallest_side(_path(INCEPTION_TABLE))


class Inception(nn.Module):
    def __init__(self, c_in: int, widths: tuple[int, ...], norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        n1, r3, n3, r5, n5, proj = widths
        self.branch1 = conv_norm_act(c_in, n1, 1, norm_layer=norm_layer)
        self.branch3 = nn.Sequential(conv_norm_act(c_in, r3, 1, norm_layer=norm_layer),
                                     conv_norm_act(r3, n3, 3, norm_layer=norm_layer))
        self.branch5 = nn.Sequential(conv_norm_act(c_in, r5, 1, norm_layer=norm_layer),
                                     conv_norm_act(r5, n5, 5, norm_layer=norm_layer))
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1),
                                         conv_norm_act(c_in, proj, 1, norm_layer=norm_layer))
        self.out_channels = n1 + n3 + n5 + proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = (self.branch1, self.branch3, self.branch5, self.branch_pool)
        return torch.cat([b(x) for b in branches], dim=1)   # (N, out_channels, H, W)


class GoogLeNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, imagenet_stem: bool = False,
                 table=INCEPTION_TABLE, norm_layer: NormLayer = nn.BatchNorm2d,
                 dropout: float = _DROPOUT):
        super().__init__()
        if imagenet_stem:   # (N, C, 224, 224) -> (N, 192, 28, 28)
            self.stem = nn.Sequential(
                conv_norm_act(in_channels, 64, 7, stride=2, norm_layer=norm_layer), _max_pool(),
                conv_norm_act(64, 64, 1, norm_layer=norm_layer),
                conv_norm_act(64, STEM_CHANNELS, 3, norm_layer=norm_layer), _max_pool())
        else:               # (N, C, H, W) -> (N, 192, H, W)
            self.stem = conv_norm_act(in_channels, STEM_CHANNELS, 3, norm_layer=norm_layer)
        blocks = nn.Sequential()
        c, name = STEM_CHANNELS, ""
        for item in table:
            if item == "M":    # named after the stage it closes: pool3, pool4
                blocks.add_module(f"pool{name[:1]}", _max_pool())
            else:
                name, widths = item
                module = Inception(c, widths, norm_layer)
                blocks.add_module(f"inception{name}", module)
                c = module.out_channels
        self.inception = blocks
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.avgpool(self.inception(self.stem(x))))


@register_model("googlenet", family="GoogLeNet", year=2014,
                paper="Szegedy et al. (2014), Going Deeper with Convolutions",
                input_sizes=(28, 32, 224), min_size=MIN_SIZE, default_size=DEFAULT_SIZE)
def googlenet(num_classes: int = 10, in_channels: int = 3, input_size: InputSize = 32) -> nn.Module:
    return GoogLeNet(num_classes, in_channels, imagenet_stem=min(as_hw(input_size)) > SMALL_INPUT_MAX)
