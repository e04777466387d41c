"""LeNet-5.

Paper: Y. LeCun, L. Bottou, Y. Bengio and P. Haffner (1998), "Gradient-Based Learning
Applied to Document Recognition", Proceedings of the IEEE 86(11).

Layout: Conv(6, 5x5) - pool 2 - Conv(16, 5x5) - pool 2 - Flatten - Dense(120) - Dense(84) -
Dense(classes). With 3 input channels, 10 classes and 32x32 input that is exactly
**62,006 parameters** (456 + 2,416 + 48,120 + 10,164 + 850); with 1 input channel, 61,706.

Changed from the paper, for a modern small-image baseline:

- ReLU instead of the scaled tanh squashing, and 2x2 max pooling instead of the trainable
  average "subsampling" layers (S2, S4, which had a coefficient and bias per map).
- C3 is fully connected to all 6 maps of S2 (the paper's hand-made sparse connection table
  is dropped), and C5 is a Dense layer on the flattened 16x5x5 maps, which is what the
  paper's 5x5 C5 convolution amounts to on a 5x5 map.
- The output is a plain Dense layer giving logits, not the Euclidean RBF units.

Input sizes: the paper fed 28x28 MNIST digits padded to 32x32. Inputs whose shorter side is
under 32 px get that same 2-pixel padding in the first convolution, so 28x28 and 32x32 both
flatten to 16*5*5 = 400; for any other size, square or not, the flatten width is computed
from the height and width given. The smallest input is 12x12 (padded to 16, then 12 -> 6 -> 2 -> 1).
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from cnnlab.models.registry import InputSize, Window, as_hw, map_side, register_model, smallest_side

# Side length the original network was designed for (28x28 MNIST padded to 32x32).
_DESIGN_SIZE = 32
_MNIST_PAD = 2
_KERNEL = 5
_POOL = 2
# (output channels) per conv stage and hidden widths of the Dense layers, from the paper.
_CONV_WIDTHS = (6, 16)
_HIDDEN_WIDTHS = (120, 84)


def _path(padding: int) -> tuple[Window, ...]:
    """The path a side takes: per stage a valid 5x5 conv (the first padded by ``padding``), pool 2."""
    return tuple(w for i, _ in enumerate(_CONV_WIDTHS)
                 for w in (Window(_KERNEL, padding=padding if i == 0 else 0), Window(_POOL, _POOL)))


MIN_SIZE = smallest_side(_path(_MNIST_PAD))     # 12; sizes from _DESIGN_SIZE up need no padding


class LeNet5(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size: InputSize = 32,
                 act_layer: Callable[[], nn.Module] = nn.ReLU,
                 pool_layer: Callable[[int], nn.Module] = nn.MaxPool2d):
        super().__init__()
        h, w = as_hw(input_size)
        padding = _MNIST_PAD if min(h, w) < _DESIGN_SIZE else 0
        fh, fw = map_side(h, _path(padding)), map_side(w, _path(padding))
        if not (fh and fw):
            raise ValueError(f"LeNet-5 needs at least {MIN_SIZE}x{MIN_SIZE} pixels, got {w}x{h}")
        layers: list[nn.Module] = []
        c_in = in_channels
        for i, c_out in enumerate(_CONV_WIDTHS):
            layers += [nn.Conv2d(c_in, c_out, _KERNEL, padding=padding if i == 0 else 0),
                       act_layer(), pool_layer(_POOL)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        widths = (c_in * fh * fw, *_HIDDEN_WIDTHS)
        head: list[nn.Module] = [nn.Flatten()]
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            head += [nn.Linear(w_in, w_out), act_layer()]
        head.append(nn.Linear(widths[-1], num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, x):
        return self.classifier(self.features(x))


@register_model("lenet5", family="LeNet", year=1998,
                paper="LeCun, Bottou, Bengio, Haffner (1998), Gradient-Based Learning Applied "
                      "to Document Recognition",
                input_sizes=(28, 32), min_size=MIN_SIZE, default_size=_DESIGN_SIZE)
def lenet5(num_classes: int = 10, in_channels: int = 3, input_size: InputSize = 32) -> nn.Module:
    return LeNet5(num_classes, in_channels, input_size)
