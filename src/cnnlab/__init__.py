"""cnnlab: train, compare, tune, understand and ship convolutional image classifiers.

    import cnnlab
    run = cnnlab.train(data="../shared/data/cifar10", model="resnet20", epochs=5)
    run.evaluate(), run.predict(["cat.jpg"], top_k=3), run.explain("cat.jpg"), run.report()

The calls (``cnnlab.api``) load on first use, so ``import cnnlab`` costs no torch import: the
command line (``cnnlab.cli``, inside this package) parses and refuses bad input before it.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from cnnlab.core.version import __version__

_API = ("train", "load", "show_samples", "summary", "Run", "Report", "Explanation")
__all__ = ["__version__", "models", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        from cnnlab import api
        return getattr(api, name)
    raise AttributeError(f"module 'cnnlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*__all__, *(n for n in globals() if n.startswith("__"))})


class _ModelsPackage(types.ModuleType):
    """``cnnlab.models``, the models package, which called lists the zoo (``cnnlab.api.models``)."""

    def __call__(self, **options: Any) -> list[dict[str, Any]]:
        from cnnlab import api
        return api.models(**options)


class _Package(types.ModuleType):
    """This package's module. ``cnnlab.models()`` and the subpackage ``cnnlab.models`` share a
    name: Python sets a loaded subpackage as its parent's attribute, which would hide a function
    of that name, so the attribute is a property: the import machinery's assignment makes the
    subpackage callable, and reading it loads the subpackage (torch) on first use."""

    @property
    def models(self) -> types.ModuleType:
        if "_models" not in self.__dict__:
            importlib.import_module("cnnlab.models")     # its assignment lands in the setter
        return self.__dict__["_models"]

    @models.setter
    def models(self, package: types.ModuleType) -> None:
        package.__class__ = _ModelsPackage
        self.__dict__["_models"] = package


sys.modules[__name__].__class__ = _Package
