"""Exponential moving average of the weights, with an optional lookahead.

Every ``every`` steps: ``avg <- avg + (1 - d**every) * (live - avg)`` for parameters
(buffers such as BatchNorm statistics are copied), where ``d`` is ``decay``, or with ``ramp``
``decay * progress**3`` so the average only reaches back in time late in training. With
``lookahead`` the live weights are then reset to the average, which is what makes the
trick help at high learning rates.
"""
from __future__ import annotations

import torch
from torch import nn


class WeightAverage:
    def __init__(self, model: nn.Module, decay: float, every: int = 1, lookahead: bool = False,
                 ramp_steps: int = 0):
        self.decay, self.every, self.lookahead, self.ramp_steps = decay, every, lookahead, ramp_steps
        self.params = [p for p in model.parameters()]
        self.buffers = [b for b in model.buffers()]
        self.avg_params = [p.detach().clone().float() for p in self.params]
        self.avg_buffers = [b.detach().clone() for b in self.buffers]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Call after optimizer step ``step`` (0-based); acts on every ``every``-th."""
        if (step + 1) % self.every:
            return
        decay = self.decay * ((step + 1) / self.ramp_steps) ** 3 if self.ramp_steps else self.decay
        rate = 1.0 - decay ** self.every   # the same total pull as ``every`` single updates
        live = [p.detach().float() for p in self.params]
        torch._foreach_lerp_(self.avg_params, live, rate)
        for a, b in zip(self.avg_buffers, self.buffers):
            a.copy_(b)
        if self.lookahead:
            for p, a in zip(self.params, self.avg_params):
                p.copy_(a)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for p, a in zip(model.parameters(), self.avg_params):
            p.copy_(a)
        for b, a in zip(model.buffers(), self.avg_buffers):
            b.copy_(a)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"p{i}": t for i, t in enumerate(self.avg_params)}
        out.update({f"b{i}": t for i, t in enumerate(self.avg_buffers)})
        return out

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for i, t in enumerate(self.avg_params):
            t.copy_(tensors[f"p{i}"])
        for i, t in enumerate(self.avg_buffers):
            t.copy_(tensors[f"b{i}"])
