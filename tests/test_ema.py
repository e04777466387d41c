"""engine/ema.py: the weight average and its lookahead, against a hand computation."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cnnlab.engine.ema import WeightAverage


def test_ema_matches_a_hand_computation():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = WeightAverage(model, decay=0.9, every=2)
    expected = 1.0
    for step, value in enumerate([2.0, 3.0, 4.0, 5.0]):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update(step)
        if (step + 1) % 2 == 0:      # updates on every 2nd step, pulling by 1 - 0.9**2
            expected = expected + (1 - 0.9 ** 2) * (value - expected)
    assert ema.avg_params[0][0, 0].item() == pytest.approx(expected)
    look = WeightAverage(model, decay=0.5, every=1, lookahead=True)
    with torch.no_grad():
        model.weight.fill_(9.0)
    look.update(0)
    # the average started at 5 and moved half way to 9; lookahead puts the live weight there too
    assert model.weight[0, 0].item() == pytest.approx(7.0)
