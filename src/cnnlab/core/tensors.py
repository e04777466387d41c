"""Tensors read from a file or about to be written to one: never NaN or infinite.

A model or checkpoint holding a NaN is never a state worth using or going back to: training
from it trains NaN, and predictions from it are meaningless ("cat nan%"). So every reader
refuses one and every writer checks first.
"""
from __future__ import annotations

from typing import Mapping

import torch

from cnnlab.core.errors import CnnlabError


def non_finite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity (one device sync)."""
    floats = {k: t for k, t in tensors.items() if t.is_floating_point()}
    if not floats or torch.stack([torch.isfinite(t).all() for t in floats.values()]).all():
        return []
    return [k for k, t in floats.items() if not torch.isfinite(t).all()]


def few(names: list[str], shown: int = 4) -> str:
    """The first ``shown`` names, and how many more."""
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def require_finite(tensors: Mapping[str, torch.Tensor], what: str, fix: str) -> None:
    """Raise ``CnnlabError`` naming ``what`` and its first non-finite tensors, then ``fix``."""
    bad = non_finite(tensors)
    if bad:
        raise CnnlabError(f"{what} holds nan or inf values in {few(bad)}: {fix}")
