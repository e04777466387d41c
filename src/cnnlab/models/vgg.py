"""VGG-11/13/16/19 with batch normalisation.

Paper: K. Simonyan and A. Zisserman (2014), "Very Deep Convolutional Networks for
Large-Scale Image Recognition", ICLR 2015 (configurations A, B, D and E of its table 1).
Batch normalisation after every convolution follows S. Ioffe and C. Szegedy (2015),
"Batch Normalization: Accelerating Deep Network Training by Reducing Internal Covariate
Shift"; the original VGG had none (it is the "-BN" variant of torchvision and timm).

The convolutions are the paper's at every input size: 3x3 stride 1 pad 1 convolutions
(conv - BN - ReLU) in five blocks of 64, 128, 256, 512 and 512 channels, each block ending
in a 2x2 stride 2 max pool. Changed from the paper, at every input size:

- the three-layer classifier (Dense 4096 - 4096 - classes on a 7x7x512 map, 120M+
  parameters at 224) is replaced by a single Dense(512, classes) layer, the common CIFAR
  VGG head. At 32x32 the five pools leave a 1x1x512 map which is fed to it directly; for
  any other size the map is first average-pooled to 1x1 (adaptive pooling; a no-op at 32).
- the pools round up (``ceil_mode``), so that sizes not divisible by 32 keep a non-empty
  map: 28 -> 14 -> 7 -> 4 -> 2 -> 1, where floor rounding would reach 0 at the fifth pool.
  For sizes divisible by 32 (32, 224) this is the same as the paper's pooling.
- no dropout (there is no hidden Dense layer for it to regularise; BN regularises the
  convolutions).

Any height and width from 17 px up work (square or not: the map is pooled to 1x1); below
17 the fifth pool would be handed a single pixel (17 -> 9 -> 5 -> 3 -> 2 -> 1).

Parameters for 3 input channels and 10 classes: VGG-16-BN has **14,728,266** (14.73M).
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from cnnlab.models.registry import InputSize, Window, register_model, smallest_side

_PAPER = ("Simonyan, Zisserman (2014), Very Deep Convolutional Networks for Large-Scale "
          "Image Recognition; BN per Ioffe, Szegedy (2015)")

# Table 1 of the paper: output channels of each 3x3 convolution, "M" a 2x2 max pool.
CONFIGS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"),
}

# Training side on photo folders: twice CIFAR's 32; the paper's 224 has 49x the FLOPs of
# 32 px, too slow to train on a CPU.
DEFAULT_SIZE = 64


def _path(config) -> list[Window]:
    """The path a side takes: 3x3 'same' convolutions and 2x2 pools that round up."""
    return [Window(2, 2, ceil_mode=True) if item == "M" else Window(3, padding=1) for item in config]


class VGG(nn.Module):
    def __init__(self, config, num_classes: int = 10, in_channels: int = 3,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
                 act_layer: Callable[[], nn.Module] = nn.ReLU):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                # The conv bias is redundant before BN but kept, as in torchvision's
                # vgg*_bn, so parameter counts match the figures usually quoted.
                layers += [nn.Conv2d(c_in, item, 3, padding=1),
                           norm_layer(item), act_layer()]
                c_in = item
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)      # (N, 512, 1, 1) at any input size
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c_in, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)))


def _factory(name: str):
    def factory(num_classes: int = 10, in_channels: int = 3, input_size: InputSize = 32) -> nn.Module:
        return VGG(CONFIGS[name], num_classes, in_channels)
    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"{name.upper()}-BN (configuration table entry {name!r})."
    return register_model(name, family="VGG", year=2014, paper=_PAPER,
                          input_sizes=(28, 32, 224), min_size=smallest_side(_path(CONFIGS[name])),
                          default_size=DEFAULT_SIZE)(factory)


vgg11 = _factory("vgg11")
vgg13 = _factory("vgg13")
vgg16 = _factory("vgg16")
vgg19 = _factory("vgg19")
