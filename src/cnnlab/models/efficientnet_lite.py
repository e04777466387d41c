"""EfficientNet-Lite0/1/2: EfficientNet made for mobile CPUs and integer accelerators.

Papers: M. Tan and Q. V. Le (2019), "EfficientNet: Rethinking Model Scaling for Convolutional
Neural Networks", ICML 2019; the Lite variants from the authors' TensorFlow release (2020).

Lite is EfficientNet-B0's layer table with three changes that quantise and run well on
phones: no squeeze-and-excitation, ReLU6 in place of swish, and a stem (32 channels) and head
(1280 channels) that stay fixed while the rest is scaled by width and depth. A network is a
stem (3x3 stride-2 conv), seven stages of inverted-residual blocks (a 1x1 expansion, a
depthwise kxk conv, a 1x1 projection; a residual where the shape allows), a 1x1 head conv,
global average pooling, dropout and a Dense layer.

The published weights were trained in TensorFlow, whose "same" padding of a stride-2 conv
puts the odd pixel at the bottom and right; ``SameConv2d`` pads the same way, so the
ImageNet weights give TensorFlow's outputs at any input size.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.models.registry import InputSize, Window, register_model, smallest_side

_PAPER = "Tan, Le (2019), EfficientNet: Rethinking Model Scaling for CNNs; Lite variants (2020)"

# One row per stage: (repeats, kernel, stride, expansion, input channels, output channels).
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM, HEAD = 32, 1280
# name: (width multiplier, depth multiplier, training side in px, dropout before the head)
VARIANTS = {
    "efficientnet_lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": (1.1, 1.2, 260, 0.3),
}
# TensorFlow's batch norm: epsilon 1e-3, moving-average decay 0.99 (PyTorch momentum 0.01).
BN_EPS, BN_MOMENTUM = 1e-3, 0.01
CHANNEL_DIVISOR = 8


def scale_channels(channels: int, width: float) -> int:
    """``channels * width`` rounded to a multiple of 8, never more than 10% below it."""
    scaled = channels * width
    rounded = max(CHANNEL_DIVISOR, int(scaled + CHANNEL_DIVISOR / 2) // CHANNEL_DIVISOR * CHANNEL_DIVISOR)
    return rounded + CHANNEL_DIVISOR if rounded < 0.9 * scaled else rounded


class SameConv2d(nn.Conv2d):
    """A conv padded as TensorFlow's ``padding="same"``: output side ``ceil(input / stride)``,
    the odd padding pixel on the bottom and right."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for side, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(side / s) - 1) * s + k - side, 0)
            pads += [total // 2, total - total // 2]     # (left, right, top, bottom)
        return super().forward(F.pad(x, pads) if any(pads) else x)


def conv_bn(c_in: int, c_out: int, kernel: int = 1, stride: int = 1, groups: int = 1,
            act: bool = True) -> nn.Sequential:
    """conv (no bias), batch norm and ReLU6; a stride-2 conv pads as TensorFlow does."""
    if stride == 1:
        conv: nn.Conv2d = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, groups=groups, bias=False)
    else:
        conv = SameConv2d(c_in, c_out, kernel, stride=stride, groups=groups, bias=False)
    layers: list[nn.Module] = [conv, nn.BatchNorm2d(c_out, eps=BN_EPS, momentum=BN_MOMENTUM)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """1x1 expansion (absent at expansion 1), depthwise kxk, 1x1 projection; plus the input
    where stride and channels allow."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expansion: int):
        super().__init__()
        mid = c_in * expansion
        self.expand = conv_bn(c_in, mid) if expansion != 1 else nn.Identity()
        self.depthwise = conv_bn(mid, mid, kernel, stride, groups=mid)
        self.project = conv_bn(mid, c_out, act=False)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return out + x if self.residual else out


class EfficientNetLite(nn.Module):
    def __init__(self, width: float, depth: float, dropout: float, num_classes: int = 1000,
                 in_channels: int = 3):
        super().__init__()
        self.stem = conv_bn(in_channels, STEM, 3, 2)            # (N, C, H, W) -> (N, 32, H/2, W/2)
        stages, c = [], STEM
        for i, (repeats, kernel, stride, expansion, _, c_out) in enumerate(STAGES):
            c_out = scale_channels(c_out, width)
            if 0 < i < len(STAGES) - 1:   # the first and last stages keep their depth
                repeats = math.ceil(repeats * depth)
            blocks = []
            for j in range(repeats):
                blocks.append(InvertedResidual(c, c_out, kernel, stride if j == 0 else 1, expansion))
                c = c_out
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head = conv_bn(c, HEAD)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(HEAD, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.uniform_(m.weight, -1 / math.sqrt(m.in_features), 1 / math.sqrt(m.in_features))
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.head(self.stages(self.stem(x)))))


# The stem and four stride-2 stages each halve the side (rounding up).
_PATH = [Window(3, 2, 1)] * 5


def _factory(name: str):
    width, depth, side, dropout = VARIANTS[name]

    def factory(num_classes: int = 10, in_channels: int = 3, input_size: InputSize = 224) -> nn.Module:
        return EfficientNetLite(width, depth, dropout, num_classes=num_classes, in_channels=in_channels)
    factory.__name__ = factory.__qualname__ = name
    return register_model(name, family="EfficientNet-Lite", year=2020, paper=_PAPER, input_sizes=(side,),
                          min_size=smallest_side(_PATH), default_size=side)(factory)


efficientnet_lite0 = _factory("efficientnet_lite0")
efficientnet_lite1 = _factory("efficientnet_lite1")
efficientnet_lite2 = _factory("efficientnet_lite2")


def from_reference(tensors: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """The state dict of the ``efficientnet-lite-pytorch`` package's network (the names its
    ImageNet weight packages use) in this module's names. The package numbers its blocks
    across stages (``_blocks.12``), this module within each (``stages.4.1``); a name that
    matches no layer here is kept as it is, so a caller sees it left over."""
    _, depth, _, _ = VARIANTS[arch]
    prefixes = {"_conv_stem.": "stem.0.", "_bn0.": "stem.1.", "_conv_head.": "head.0.", "_bn1.": "head.1.",
                "_fc.": "fc.2."}
    block = 0
    for i, (repeats, _, _, expansion, _, _) in enumerate(STAGES):
        if 0 < i < len(STAGES) - 1:
            repeats = math.ceil(repeats * depth)
        for j in range(repeats):
            ours, theirs = f"stages.{i}.{j}.", f"_blocks.{block}."
            if expansion != 1:
                prefixes[theirs + "_expand_conv."] = ours + "expand.0."
                prefixes[theirs + "_bn0."] = ours + "expand.1."
            prefixes[theirs + "_depthwise_conv."] = ours + "depthwise.0."
            prefixes[theirs + "_bn1."] = ours + "depthwise.1."
            prefixes[theirs + "_project_conv."] = ours + "project.0."
            prefixes[theirs + "_bn2."] = ours + "project.1."
            block += 1
    renamed = {}
    for name, tensor in tensors.items():
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        renamed[prefixes[prefix] + name[len(prefix):] if prefix else name] = tensor
    return renamed
