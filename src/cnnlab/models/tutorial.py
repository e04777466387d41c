"""The classic Keras CIFAR-10 lesson's network, layer for layer.

Conv(32,3x3)-ReLU-MaxPool2 - Conv(64,3x3)-ReLU-MaxPool2 - Conv(64,3x3)-ReLU - Flatten -
Dense(64)-ReLU - Dense(classes). Keras uses 'valid' padding, so a 32x32 input shrinks
30 -> 15 -> 13 -> 6 -> 4, and the flattened features are 4*4*64 = 1024; with 3 input
channels and 10 classes that is 122,570 parameters, the figure Keras reports.
Other input sizes work, square or not, from 18x18 up: the flatten width is computed from
the height and width given (an input 40 high and 56 wide flattens 64 * 6 * 10 features).
"""
from torch import nn

from cnnlab.models.registry import InputSize, Window, as_hw, map_side, register_model, smallest_side

# The path a side takes: conv 3x3 valid, pool 2, conv 3x3 valid, pool 2, conv 3x3 valid.
_PATH = (Window(3), Window(2, 2), Window(3), Window(2, 2), Window(3))
MIN_SIZE = smallest_side(_PATH)     # 18: 16 -> 8 -> 6 -> 3 -> 1
# The lesson's CIFAR-10 size; the Dense head grows with the image's area above it.
DEFAULT_SIZE = 32
_WIDTH = 64                         # channels of the last convolution


@register_model("tutorial", family="Tutorial CNN", year=2019,
                paper="TensorFlow 'Convolutional Neural Network (CNN)' tutorial (Keras)",
                input_sizes=(28, 32), min_size=MIN_SIZE, default_size=DEFAULT_SIZE)
def tutorial(num_classes: int = 10, in_channels: int = 3, input_size: InputSize = 32) -> nn.Module:
    h, w = as_hw(input_size)
    fh, fw = map_side(h, _PATH), map_side(w, _PATH)
    if not (fh and fw):
        raise ValueError(f"the tutorial network needs inputs of at least {MIN_SIZE}x{MIN_SIZE} pixels")
    net = nn.Sequential(
        nn.Conv2d(in_channels, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, _WIDTH, 3), nn.ReLU(),
        # Keras flattens NHWC; the order differs from NCHW but the function class is the same.
        nn.Flatten(),                                   # (N, 64 * fh * fw)
        nn.Linear(_WIDTH * fh * fw, 64), nn.ReLU(),
        nn.Linear(64, num_classes),
    )
    # Keras's defaults, so the lesson's numbers carry over: Glorot-uniform kernels, zero biases.
    for layer in net:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
    return net
