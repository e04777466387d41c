"""models/classifier.py: the network behind its input normalisation; greyscale into three channels."""
from __future__ import annotations

import torch

from cnnlab.models.classifier import build_classifier


def test_a_greyscale_batch_is_repeated_into_the_networks_three_channels():
    torch.manual_seed(0)
    model = build_classifier("resnet20", 5, 32, [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]).eval()
    grey = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(grey), model(grey.expand(-1, 3, -1, -1)))
    assert model.net.stem[0].in_channels == 3
