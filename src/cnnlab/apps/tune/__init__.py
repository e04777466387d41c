"""Hyperparameter search with Optuna (``cnnlab tune``) and the learning-rate range test
(``cnnlab lr-find``).

    from cnnlab.core.config import resolve
    from cnnlab.apps.tune import tune, lr_find
    result = tune(resolve(overrides={"data": "cifar10", "train_size": 5000}), trials=20)
    result.best["config"]            # also written as <out>/best.yaml

Imports are lazy so that ``lr_find`` works without Optuna installed.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "tune": "cnnlab.apps.tune.study", "TuneResult": "cnnlab.apps.tune.study",
    "SearchSpace": "cnnlab.apps.tune.space", "Param": "cnnlab.apps.tune.space", "default_space": "cnnlab.apps.tune.space",
    "load_space": "cnnlab.apps.tune.space", "parse_space": "cnnlab.apps.tune.space",
    "lr_find": "cnnlab.apps.tune.lr_range", "LrFindResult": "cnnlab.apps.tune.lr_range",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cnnlab.apps.tune' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
