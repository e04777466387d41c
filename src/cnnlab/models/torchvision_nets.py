"""Modern CNNs defined by torchvision: MobileNetV3, EfficientNet-B0, RegNetY, ConvNeXt.

torchvision's definitions are the ones its published ImageNet weights were trained with, so
cnnlab builds these networks with ``torchvision.models.get_model`` rather than copying them;
its weights registry (``cnnlab.models.weights``) reads each network's weights, their
preprocessing and accuracy from torchvision's ``Weights`` metadata.

A network for other than three input channels gets its first conv rebuilt for them; the
classifier head is sized by ``num_classes``.
"""
from __future__ import annotations

from typing import cast

from torch import nn

from cnnlab.models.registry import InputSize, Window, register_model, smallest_side

# name: (family, year, paper, the path a side takes through its down-sampling)
# The stem and four stride-2 stages each halve the side (3x3 or 5x5 windows, padded).
_HALVING = [Window(3, 2, 1)] * 5
# ConvNeXt: a 4x4 stride-4 patchify stem, then three 2x2 stride-2 down-sampling layers, unpadded.
_PATCHIFY = [Window(4, 4), Window(2, 2), Window(2, 2), Window(2, 2)]
NETWORKS = {
    "mobilenet_v3_small": ("MobileNetV3", 2019, "Howard et al. (2019), Searching for MobileNetV3", _HALVING),
    "mobilenet_v3_large": ("MobileNetV3", 2019, "Howard et al. (2019), Searching for MobileNetV3", _HALVING),
    "efficientnet_b0": ("EfficientNet", 2019, "Tan, Le (2019), EfficientNet: Rethinking Model Scaling for CNNs",
                        _HALVING),
    "regnet_y_400mf": ("RegNet", 2020, "Radosavovic et al. (2020), Designing Network Design Spaces", _HALVING),
    "convnext_tiny": ("ConvNeXt", 2022, "Liu et al. (2022), A ConvNet for the 2020s", _PATCHIFY),
}
IMAGENET_SIZE = 224


def with_input_channels(net: nn.Module, in_channels: int) -> nn.Module:
    """``net`` with its first conv rebuilt for ``in_channels`` (same shape otherwise)."""
    for parent in net.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels != in_channels:
                    pair = tuple[int, int]
                    setattr(parent, child_name, nn.Conv2d(   # every first conv here is a dense one
                        in_channels, child.out_channels, cast(pair, child.kernel_size), cast(pair, child.stride),
                        cast(pair, child.padding), bias=child.bias is not None))
                return net
    raise ValueError(f"{type(net).__name__} has no nn.Conv2d to take {in_channels} channels")


def _factory(name: str):
    family, year, paper, path = NETWORKS[name]

    def factory(num_classes: int = 10, in_channels: int = 3, input_size: InputSize = IMAGENET_SIZE) -> nn.Module:
        from torchvision.models import get_model  # torchvision's import takes a second: only when used
        return with_input_channels(get_model(name, weights=None, num_classes=num_classes), in_channels)
    factory.__name__ = factory.__qualname__ = name
    return register_model(name, family=family, year=year, paper=paper, input_sizes=(IMAGENET_SIZE,),
                          min_size=smallest_side(path), default_size=IMAGENET_SIZE)(factory)


for _name in NETWORKS:
    _factory(_name)
