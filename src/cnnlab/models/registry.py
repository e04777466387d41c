"""Models by name: ``register_model``, ``create_model``, ``list_models``; and the input sizes
each takes: ``min_input_size``, ``check_input_size``, ``default_image_size``.

Every registered factory takes the same keywords, ``num_classes``, ``in_channels`` and
``input_size`` (``(height, width)`` in pixels; ``create_model`` also takes one int for a square),
and returns an ``nn.Module`` mapping normalised ``(N, in_channels, H, W)`` floats to
``(N, num_classes)`` logits. Families with a size-dependent part (a Flatten-Dense head, a
small-image stem) decide it from both sides; the stem from the shorter one.

Each family registers the smallest side it takes (``min_size``), computed from its own layer
table with ``smallest_side``: the smallest input at which every window fits and no
down-sampling layer is handed fewer pixels than its stride (below that the last stages would
pool a one-pixel map, or the network would not run at all). Each also registers the square
side it trains at by default on photo folders (``default_size``), a cap on the images'
shorter side chosen per family for what the architecture was designed for and what a CPU can train.
"""
from __future__ import annotations

import difflib
import operator
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence, Union

from torch import nn

from cnnlab.core.errors import CnnlabError

# Every family is registered before this module can be used: importing cnnlab.models.registry
# first runs cnnlab/models/__init__.py, which imports each family module.

# An input size: one int for a square, or (height, width), e.g. a model card's [h, w] list.
InputSize = Union[int, Sequence[int]]


def as_hw(input_size: InputSize) -> tuple[int, int]:
    """``(height, width)`` from an int (a square side) or a (height, width) pair."""
    try:
        if isinstance(input_size, Sequence) and not isinstance(input_size, str):
            if len(input_size) != 2:
                raise TypeError
            h, w = (operator.index(v) for v in input_size)
        else:
            h = w = operator.index(input_size)
    except TypeError:
        raise CnnlabError(f"an input size is one int (a square side) or (height, width), "
                          f"got {input_size!r}") from None
    return h, w


def format_hw(hw: tuple[int, int]) -> str:
    """``WxH``, the order the rest of cnnlab prints image sizes in."""
    return f"{hw[1]}x{hw[0]}"


@dataclass(frozen=True)
class Window:
    """One convolution or pooling window along a network's path, as far as the map size goes."""
    kernel: int
    stride: int = 1
    padding: int = 0
    ceil_mode: bool = False

    def output_side(self, side: int) -> int:
        """The side after this layer (``nn.Conv2d``/``nn.MaxPool2d``'s formula, dilation 1);
        0 where the window does not fit or the layer would down-sample fewer pixels than its stride."""
        span = side + 2 * self.padding - self.kernel    # negative: only rounding up can fit it
        out = (-(-span // self.stride) if self.ceil_mode else span // self.stride) + 1
        if self.ceil_mode and (out - 1) * self.stride >= side + self.padding:
            out -= 1    # torch drops a last window that would start in the right padding
        return out if out >= 1 and side >= self.stride else 0


def map_side(side: int, path: Iterable[Window]) -> int:
    """The side of the map after ``path``, 0 where it collapses on the way."""
    for window in path:
        side = window.output_side(side)
        if side < 1:
            return 0
    return side


# No zoo network needs more than this; a path that does is a bug in its table.
_LARGEST_MINIMUM = 4096


def smallest_side(path: Sequence[Window]) -> int:
    """The smallest input side that ``path`` maps to at least one pixel."""
    for side in range(1, _LARGEST_MINIMUM + 1):
        if map_side(side, path):
            return side
    raise ValueError(f"no input up to {_LARGEST_MINIMUM} px gets through {path}")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    factory: Callable[..., nn.Module] = field(repr=False)
    family: str
    year: int
    paper: str
    # Input sizes (square, pixels) the architecture is meant for; others may still work.
    input_sizes: tuple[int, ...] = (28, 32, 224)
    # The smallest height and width it takes (pixels), from its own down-sampling.
    min_size: int = 1
    # The square side it trains at on photo folders whose images are at least that large.
    default_size: int = 224
    # Config switches only this family acts on, through the training callbacks it offers
    # (training_callbacks, cnnlab.core.events): SpeedNet's ("whiten", "whiten_bias_epochs").
    setup_keys: tuple[str, ...] = ()


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(name: str, *, family: str, year: int, paper: str,
                   input_sizes: tuple[int, ...] = (28, 32, 224), min_size: int = 1,
                   default_size: int | None = None, setup_keys: tuple[str, ...] = ()):
    """Decorator: register ``factory(num_classes, in_channels, input_size=(h, w)) -> nn.Module``.

    ``min_size``: the smallest side it takes (``smallest_side`` of its layer path);
    ``default_size``: its training side on photo folders (default: the largest of ``input_sizes``);
    ``setup_keys``: the config switches its ``training_callbacks`` act on.
    """
    if default_size is None:
        default_size = max(input_sizes)
    if not 1 <= min_size <= default_size:
        raise ValueError(f"model {name!r}: min_size {min_size} must be between 1 and its "
                         f"default_size {default_size}")

    def wrap(factory):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = ModelInfo(name, factory, family, year, paper, tuple(input_sizes),
                                    min_size, default_size, tuple(setup_keys))
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


def min_input_size(name: str) -> int:
    """The smallest height and width (pixels) model ``name`` takes."""
    return model_info(name).min_size


def check_input_size(name: str, input_size: InputSize, hint: str | None = "raise --image-size") -> None:
    """Refuse, before any training, an input that model ``name`` is too small for; the message
    names the smallest size it takes and ends with ``hint`` (the fix, in the caller's terms)."""
    hw = as_hw(input_size)
    smallest = min_input_size(name)
    if min(hw) < smallest:
        fix = f": {hint}" if hint else ""
        raise CnnlabError(f"{name} needs images of at least {smallest}x{smallest} pixels; "
                          f"got {format_hw(hw)}{fix}")


def default_image_size(name: str, shorter_side: int) -> tuple[int, str]:
    """The square side to train model ``name`` at on images whose shorter side is
    ``shorter_side`` pixels, and why: that side, capped at the family's training size, and
    never below the smallest size the model takes. The reason is a clause for a header line,
    e.g. ``224x224 (resnet18 trains at up to 224 px; the images' shorter side is 375 px)``."""
    info = model_info(name)
    if shorter_side < 1:
        raise CnnlabError(f"an image's shorter side is at least 1 pixel, got {shorter_side}")
    if shorter_side > info.default_size:
        return info.default_size, (f"{name} trains at up to {info.default_size} px; "
                                   f"the images' shorter side is {shorter_side} px")
    if shorter_side >= info.min_size:
        return shorter_side, (f"the images' shorter side; {name} trains at up to "
                              f"{info.default_size} px")
    return info.min_size, (f"the smallest {name} takes: the images' shorter side is "
                           f"{shorter_side} px, so they are scaled up")


def create_model(name: str, num_classes: int = 10, in_channels: int = 3,
                 input_size: InputSize = 32) -> nn.Module:
    """Model ``name`` for ``input_size``: one int (a square side) or (height, width)."""
    hw = as_hw(input_size)
    if num_classes < 1 or in_channels < 1 or min(hw) < 1:
        raise CnnlabError(f"num_classes, in_channels and input_size must be >= 1, got "
                          f"{num_classes}, {in_channels} and {format_hw(hw)}")
    info = model_info(name)
    if min(hw) < info.min_size:
        raise CnnlabError(f"model {name!r} cannot take {format_hw(hw)} input: it needs at least "
                          f"{info.min_size}x{info.min_size} pixels")
    try:
        return info.factory(num_classes=num_classes, in_channels=in_channels, input_size=hw)
    except ValueError as e:  # a family refusing an input size it cannot handle
        raise CnnlabError(f"model {name!r} cannot take {format_hw(hw)} input: {e}") from None
