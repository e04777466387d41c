"""The trained artefact: a zoo network behind its input normalisation.

``Classifier`` takes float images in [0, 1], (N, C, H, W), normalises them with the
training set's per-channel mean and std, or the ones pretrained weights were trained with
(stored as buffers, so they travel with the weights), and returns logits. The network sees
one channel per entry of the mean: a greyscale batch given to a network that sees three
(ImageNet weights) is repeated into them. Predict, evaluate, export and serve all use it as is.
"""
from __future__ import annotations

import torch
from torch import nn

from cnnlab.models.registry import InputSize, create_model


class Classifier(nn.Module):
    mean: torch.Tensor   # (1, C, 1, 1) buffers: the normalisation travels with the weights
    std: torch.Tensor

    def __init__(self, net: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1 and self.mean.shape[1] > 1:
            x = x.expand(-1, self.mean.shape[1], -1, -1)
        return self.net((x - self.mean) / self.std)


def build_classifier(arch: str, num_classes: int, input_size: InputSize,
                     mean: list[float], std: list[float]) -> Classifier:
    """A network for ``len(mean)`` channels behind its normalisation. ``input_size``:
    (height, width), e.g. a model card's ``[h, w]`` list, or one int for a square."""
    if len(mean) != len(std):
        raise ValueError(f"mean and std differ in channels: {len(mean)} and {len(std)}")
    return Classifier(create_model(arch, num_classes=num_classes, in_channels=len(mean),
                                   input_size=input_size), mean, std)
