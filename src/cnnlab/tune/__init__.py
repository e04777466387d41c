"""Hyperparameter search with Optuna (``cnnlab tune``) and the learning-rate range test
(``cnnlab lr-find``).

    from cnnlab.config import resolve
    from cnnlab.tune import tune, lr_find
    result = tune(resolve(overrides={"data": "cifar10", "train_size": 5000}), trials=20)
    result.best["config"]            # also written as <out>/best.yaml

Imports are lazy so that ``lr_find`` works without Optuna installed.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "tune": "cnnlab.tune.study", "TuneResult": "cnnlab.tune.study",
    "SearchSpace": "cnnlab.tune.space", "Param": "cnnlab.tune.space", "default_space": "cnnlab.tune.space",
    "load_space": "cnnlab.tune.space", "parse_space": "cnnlab.tune.space",
    "lr_find": "cnnlab.tune.lr_range", "LrFindResult": "cnnlab.tune.lr_range",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cnnlab.tune' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
