"""Models by name: ``register_model``, ``create_model``, ``list_models``.

Every registered factory takes the same keywords, ``num_classes``, ``in_channels`` and
``input_size`` (the square input side in pixels; families that adapt to any size ignore it),
and returns an ``nn.Module`` mapping normalised ``(N, in_channels, H, W)`` floats to
``(N, num_classes)`` logits.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from cnnlab.core.errors import CnnlabError

# Every family is registered before this module can be used: importing cnnlab.models.registry
# first runs cnnlab/models/__init__.py, which imports each family module.


@dataclass(frozen=True)
class ModelInfo:
    name: str
    factory: Callable[..., nn.Module] = field(repr=False)
    family: str
    year: int
    paper: str
    # Input sizes (square, pixels) the architecture is meant for; others may still work.
    input_sizes: tuple[int, ...] = (28, 32, 224)


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(name: str, *, family: str, year: int, paper: str,
                   input_sizes: tuple[int, ...] = (28, 32, 224)):
    """Decorator: register ``factory(num_classes, in_channels, input_size) -> nn.Module``."""
    def wrap(factory):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = ModelInfo(name, factory, family, year, paper, tuple(input_sizes))
        return factory
    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_info(name: str) -> ModelInfo:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}?" if close else "run `cnnlab models` to list them"
        raise CnnlabError(f"unknown model {name!r}: {hint} (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


def create_model(name: str, num_classes: int = 10, in_channels: int = 3,
                 input_size: int = 32) -> nn.Module:
    if num_classes < 1 or in_channels < 1 or input_size < 1:
        raise CnnlabError(f"num_classes, in_channels and input_size must be >= 1, got "
                          f"{num_classes}, {in_channels} and {input_size}")
    info = model_info(name)
    try:
        return info.factory(num_classes=num_classes, in_channels=in_channels, input_size=input_size)
    except ValueError as e:  # a family refusing an input size it cannot handle
        raise CnnlabError(f"model {name!r} cannot take {input_size}x{input_size} input: {e}") from None
