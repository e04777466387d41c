"""The classic Keras CIFAR-10 lesson's network, layer for layer.

Conv(32,3x3)-ReLU-MaxPool2 - Conv(64,3x3)-ReLU-MaxPool2 - Conv(64,3x3)-ReLU - Flatten -
Dense(64)-ReLU - Dense(classes). Keras uses 'valid' padding, so a 32x32 input shrinks
30 -> 15 -> 13 -> 6 -> 4, and the flattened features are 4*4*64 = 1024; with 3 input
channels and 10 classes that is 122,570 parameters, the figure Keras reports.
Other input sizes work: the flatten width is computed from the size given.
"""
from torch import nn

from cnnlab.models.registry import register_model


def _flat_size(size: int) -> int:
    size = (size - 2) // 2      # conv 3x3 valid, pool 2
    size = (size - 2) // 2
    size = size - 2
    if size < 1:
        raise ValueError("the tutorial network needs inputs of at least 18x18 pixels")
    return size


@register_model("tutorial", family="Tutorial CNN", year=2019,
                paper="TensorFlow 'Convolutional Neural Network (CNN)' tutorial (Keras)",
                input_sizes=(28, 32))
def tutorial(num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> nn.Module:
    s = _flat_size(input_size)
    net = nn.Sequential(
        nn.Conv2d(in_channels, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3), nn.ReLU(),
        # Keras flattens NHWC; the order differs from NCHW but the function class is the same.
        nn.Flatten(),
        nn.Linear(64 * s * s, 64), nn.ReLU(),
        nn.Linear(64, num_classes),
    )
    # Keras's defaults, so the lesson's numbers carry over: Glorot-uniform kernels, zero biases.
    for layer in net:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
    return net
