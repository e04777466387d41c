"""Residual networks: the CIFAR ResNet-20/56 and the ImageNet ResNet-18/34/50.

Paper: K. He, X. Zhang, S. Ren and J. Sun (2015), "Deep Residual Learning for Image
Recognition", CVPR 2016.

**ResNet-20 and ResNet-56** are the paper's CIFAR-10 networks (section 4.2), unchanged:
a 3x3 conv of 16 channels, then three stages of n basic blocks (n = 3 and 9) with 16, 32
and 64 channels on 32x32, 16x16 and 8x8 maps, global average pooling and a Dense layer.
Shortcuts are the paper's option A: identity, and where the shape changes, the input
subsampled by 2 and zero-padded to the new channel count (no parameters). For 3 input
channels and 10 classes: ResNet-20 has **269,722** parameters and ResNet-56 **853,018**
(the paper's 0.27M and 0.85M). They are meant for 28x28 and 32x32 inputs (at 28 the maps
are 28, 14, 7).

**ResNet-18, 34 and 50** are the paper's ImageNet networks (table 1): four stages of 64,
128, 256 and 512 base channels, basic blocks (two 3x3 convs) for 18/34 and bottleneck
blocks (1x1, 3x3, 1x1 with 4x expansion) for 50, and option B shortcuts (a 1x1 conv + BN
projection where the shape changes, identity elsewhere). As in torchvision, the bottleneck
strides in its 3x3 conv rather than in the first 1x1 ("ResNet v1.5"; same parameters).

Changed for small images (shorter side 64 px or less): the ImageNet stem, a 7x7 stride 2
conv followed by a 3x3 stride 2 max pool, is replaced by one 3x3 stride 1 conv and no max
pool, so a 32x32 input reaches the four stages at 32, 16, 8 and 4 px (the common CIFAR
adaptation). Above 64 px (e.g. 224x224) the original stem is used. For 3 input channels and 10 classes
at 32x32, ResNet-18 has **11,173,962** parameters (11,181,642 with the ImageNet stem).

Any height and width work, square or not (global average pooling), down to the size where
each stride-2 stage still halves a map of at least two pixels: 3 px for the three-stage
ResNet-20/56, 5 px for the four-stage ResNet-18/34/50.

Every conv is followed by batch norm and has no bias; ReLU comes after the addition.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.models.registry import InputSize, Window, as_hw, register_model, smallest_side

_PAPER = ("He, Zhang, Ren, Sun (2015), Deep Residual Learning for Image Recognition")

# Inputs up to this side length (pixels) get the 3x3 stride-1 stem without max pool.
SMALL_INPUT_MAX = 64
# Training sides on photo folders: the papers' CIFAR-10 and ImageNet sizes.
CIFAR_SIZE, IMAGENET_SIZE = 32, 224

NormLayer = Callable[[int], nn.Module]


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


def conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)


class PadShortcut(nn.Module):
    """Option A: subsample by ``stride`` and zero-pad the new channels (no parameters)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        if c_out < c_in:
            raise ValueError(f"a zero-padding shortcut cannot reduce {c_in} to {c_out} channels")
        self.stride, self.extra = stride, c_out - c_in

    def forward(self, x):
        x = x[:, :, ::self.stride, ::self.stride]
        # Pad spec runs from the last dim backwards: (W, W, H, H, C before, C after).
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))


def pad_shortcut(c_in: int, c_out: int, stride: int, norm_layer: NormLayer) -> nn.Module:
    return PadShortcut(c_in, c_out, stride)


def projection_shortcut(c_in: int, c_out: int, stride: int, norm_layer: NormLayer) -> nn.Module:
    """Option B: a strided 1x1 conv and norm."""
    return nn.Sequential(conv1x1(c_in, c_out, stride), norm_layer(c_out))


Shortcut = Callable[[int, int, int, NormLayer], nn.Module]


class _Block(nn.Module):
    """out = ReLU(residual(x) + shortcut(x)); the shortcut is identity unless the shape changes."""

    expansion = 1

    def __init__(self, c_in: int, c_out: int, stride: int, norm_layer: NormLayer,
                 shortcut: Shortcut):
        super().__init__()
        self.shortcut = (shortcut(c_in, c_out, stride, norm_layer)
                         if stride != 1 or c_in != c_out else nn.Identity())
        self.relu_out = nn.ReLU(inplace=True)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu_out(self.residual(x) + self.shortcut(x))


class BasicBlock(_Block):
    """Two 3x3 convs; the first one strides."""

    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int = 1,
                 norm_layer: NormLayer = nn.BatchNorm2d,
                 shortcut: Shortcut = projection_shortcut):
        super().__init__(c_in, width * self.expansion, stride, norm_layer, shortcut)
        self.conv1, self.bn1 = conv3x3(c_in, width, stride), norm_layer(width)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = conv3x3(width, width), norm_layer(width)

    def residual(self, x):
        return self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))


class Bottleneck(_Block):
    """1x1 reduce to ``width``, 3x3 (strides), 1x1 expand to ``4 * width``."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int = 1,
                 norm_layer: NormLayer = nn.BatchNorm2d,
                 shortcut: Shortcut = projection_shortcut):
        c_out = width * self.expansion
        super().__init__(c_in, c_out, stride, norm_layer, shortcut)
        self.conv1, self.bn1 = conv1x1(c_in, width), norm_layer(width)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = conv3x3(width, width, stride), norm_layer(width)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3, self.bn3 = conv1x1(width, c_out), norm_layer(c_out)

    def residual(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.bn3(self.conv3(x))


class ResNet(nn.Module):
    """``stem`` maps the input to ``widths[0]`` channels; stage i has ``depths[i]`` blocks of
    base width ``widths[i]``, the first striding by 2 (except in stage 0)."""

    def __init__(self, block: type[_Block], depths: tuple[int, ...],
                 widths: tuple[int, ...], shortcut: Shortcut, imagenet_stem: bool,
                 num_classes: int = 10, in_channels: int = 3,
                 norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        c = widths[0]
        if imagenet_stem:   # (N, C, 224, 224) -> (N, 64, 56, 56)
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, c, 7, stride=2, padding=3, bias=False), norm_layer(c),
                nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1))
        else:               # (N, C, H, W) -> (N, widths[0], H, W)
            self.stem = nn.Sequential(conv3x3(in_channels, c), norm_layer(c), nn.ReLU(inplace=True))
        stages = []
        for i, (depth, width) in enumerate(zip(depths, widths)):
            blocks = []
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block(c, width, stride, norm_layer, shortcut))
                c = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(c, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.avgpool(self.stages(self.stem(x))))


# name: (block, blocks per stage, base widths per stage, shortcut, ImageNet network?)
ARCHS: dict[str, tuple] = {
    "resnet20": (BasicBlock, (3, 3, 3), (16, 32, 64), pad_shortcut, False),
    "resnet56": (BasicBlock, (9, 9, 9), (16, 32, 64), pad_shortcut, False),
    "resnet18": (BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), projection_shortcut, True),
    "resnet34": (BasicBlock, (3, 4, 6, 3), (64, 128, 256, 512), projection_shortcut, True),
    "resnet50": (Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), projection_shortcut, True),
}


def _path(depths: tuple[int, ...]) -> list[Window]:
    """The path a side takes with the small stem: a 3x3 stride-1 conv, then every stage after
    the first halves it (a 3x3 stride-2 conv, padding 1, beside a shortcut of the same size)."""
    return [Window(3, 1, 1)] + [Window(3, 2, 1)] * (len(depths) - 1)


def _factory(name: str):
    block, depths, widths, shortcut, imagenet = ARCHS[name]

    def factory(num_classes: int = 10, in_channels: int = 3, input_size: InputSize = 32) -> nn.Module:
        return ResNet(block, depths, widths, shortcut,
                      imagenet_stem=imagenet and min(as_hw(input_size)) > SMALL_INPUT_MAX,
                      num_classes=num_classes, in_channels=in_channels)
    factory.__name__ = factory.__qualname__ = name
    sizes = (28, 32, 224) if imagenet else (28, 32)
    # The ImageNet stem (7x7 stride-2 conv, 3x3 stride-2 pool, padded) takes any size above
    # SMALL_INPUT_MAX, so the small stem's minimum is the network's.
    return register_model(name, family="ResNet", year=2015, paper=_PAPER, input_sizes=sizes,
                          min_size=smallest_side(_path(depths)),
                          default_size=IMAGENET_SIZE if imagenet else CIFAR_SIZE)(factory)


resnet20 = _factory("resnet20")
resnet56 = _factory("resnet56")
resnet18 = _factory("resnet18")
resnet34 = _factory("resnet34")
resnet50 = _factory("resnet50")
