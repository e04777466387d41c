"""Every registered model trains end to end through the real `cnnlab train` command.

A minute and a half over the zoo on 2 cores: the whole sweep is slow (test_models checks every
model's forward and backward in the fast tier)."""
from __future__ import annotations

import json

import pytest

from cnnlab.cli import main
from cnnlab.models import list_models
from conftest import write_synthetic_cifar

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def micro_cifar(tmp_path_factory):
    return write_synthetic_cifar(tmp_path_factory.mktemp("micro"), {"train": 4, "test": 2})


@pytest.mark.parametrize("name", list_models())
def test_model_trains_through_the_cli(name, micro_cifar, tmp_path):
    out = tmp_path / name
    code = main(["train", "--data", str(micro_cifar), "--model", name, "--epochs", "1", "--batch-size", "8",
                 "--val-split", "0.25", "--optimizer", "sgd", "--lr", "0.01", "--out", str(out),
                 "--threads", "1"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and 0.0 <= metrics["test_accuracy"] <= 1.0
    history = json.loads((out / "history.json").read_text())
    assert all(v == v for v in history["loss"])     # finite, not NaN
