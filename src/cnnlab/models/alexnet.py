"""AlexNet.

Paper: A. Krizhevsky, I. Sutskever and G. E. Hinton (2012), "ImageNet Classification with
Deep Convolutional Neural Networks", NeurIPS 25.

Five convolutions then three Dense layers, ReLU throughout, overlapping 3x3/2 max pooling
after conv 1, 2 and 5, dropout 0.5 before the first two Dense layers, and no batch norm
(the paper predates it; its local response normalisation is left out, as is usual since
Simonyan & Zisserman found it did not help). Channel widths are 64-192-384-256-256, the
single-tower form of Krizhevsky (2014), "One weird trick for parallelizing convolutional
neural networks", instead of the two-GPU 96-256-384-384-256 split with grouped convolutions.

At 224x224 (any input whose shorter side is above 64 px) the network is the original:
conv 11x11 stride 4 pad 2, conv 5x5 pad 2, three conv 3x3 pad 1, a 6x6 grid (adaptive
average pool, a no-op at 224) flattened into Dense(4096) - Dense(4096) - Dense(classes):
57,044,810 parameters for 3 channels and 10 classes (61,100,840 with 1000 classes,
torchvision's figure).

Changed for small images (shorter side 64 px or less, e.g. 28x28 and 32x32, down to 15x15;
height and width may differ, the adaptive pool makes the grid):

- the first convolution is 3x3 stride 1 pad 1 instead of 11x11 stride 4 pad 2;
- the last feature map (3x3 at 32 px, 2x2 at 28 px) is average-pooled to a 2x2 grid
  instead of 6x6, and the two hidden Dense layers have 512 units instead of 4096,
  so the network is small enough to train on a CPU.

Everything else (the other four convolutions, pooling, dropout) is as in the paper. For
3 input channels and 10 classes at 32x32 that is 3,240,778 parameters.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from cnnlab.models.registry import InputSize, Window, as_hw, register_model, smallest_side

# Inputs up to this side length (pixels) get the small-image stem and classifier.
SMALL_INPUT_MAX = 64

# One row per convolution: (out_channels, kernel, stride, padding, max-pool after it).
_STEM_IMAGENET = (64, 11, 4, 2, True)
_STEM_SMALL = (64, 3, 1, 1, True)
_CONVS = (
    (192, 5, 1, 2, True),
    (384, 3, 1, 1, False),
    (256, 3, 1, 1, False),
    (256, 3, 1, 1, True),
)
# Overlapping pooling, section 3.4 of the paper.
_POOL_KERNEL, _POOL_STRIDE = 3, 2
_DROPOUT = 0.5
# (pooled grid side, hidden Dense width)
_HEAD_IMAGENET = (6, 4096)
_HEAD_SMALL = (2, 512)
# Training side on photo folders: the largest that keeps the small-image network (at 224 it
# would be the paper's, 57M parameters, slow to train on a CPU).
DEFAULT_SIZE = SMALL_INPUT_MAX


def _path(convs) -> list[Window]:
    """The path a side takes through the convolutions and their pools."""
    path = []
    for _, k, s, p, pool in convs:
        path.append(Window(k, s, p))
        if pool:
            path.append(Window(_POOL_KERNEL, _POOL_STRIDE))
    return path


# 15 (15 -> 7 -> 3 -> 1 through the three pools); the ImageNet stem's own minimum (63) is
# below the sizes it is used for, so this is the smallest input of all.
MIN_SIZE = smallest_side(_path((_STEM_SMALL, *_CONVS)))


class AlexNet(nn.Module):
    def __init__(self, convs, grid: int, hidden: int, num_classes: int = 10,
                 in_channels: int = 3, act_layer: Callable[[], nn.Module] = nn.ReLU,
                 dropout: float = _DROPOUT):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for c_out, k, s, p, pool in convs:
            layers += [nn.Conv2d(c_in, c_out, k, stride=s, padding=p), act_layer()]
            if pool:
                layers.append(nn.MaxPool2d(_POOL_KERNEL, _POOL_STRIDE))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(grid)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout), nn.Linear(c_in * grid * grid, hidden), act_layer(),
            nn.Dropout(dropout), nn.Linear(hidden, hidden), act_layer(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)))


@register_model("alexnet", family="AlexNet", year=2012,
                paper="Krizhevsky, Sutskever, Hinton (2012), ImageNet Classification with Deep "
                      "Convolutional Neural Networks",
                input_sizes=(28, 32, 224), min_size=MIN_SIZE, default_size=DEFAULT_SIZE)
def alexnet(num_classes: int = 10, in_channels: int = 3, input_size: InputSize = 32) -> nn.Module:
    h, w = as_hw(input_size)
    if min(h, w) <= SMALL_INPUT_MAX:
        # 32 -> 15 -> 7 -> 3 through the three pools; 28 -> 13 -> 6 -> 2.
        if min(h, w) < MIN_SIZE:
            raise ValueError(f"the small-image AlexNet needs at least {MIN_SIZE}x{MIN_SIZE} pixels, "
                             f"got {w}x{h}")
        return AlexNet((_STEM_SMALL, *_CONVS), *_HEAD_SMALL, num_classes, in_channels)
    return AlexNet((_STEM_IMAGENET, *_CONVS), *_HEAD_IMAGENET, num_classes, in_channels)
