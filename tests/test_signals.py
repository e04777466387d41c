"""engine/signals.py: SIGTERM and SIGINT stop `cnnlab train` at a step with a resumable checkpoint
(exit 143 and 130), and the resumed run equals the uninterrupted one."""
from __future__ import annotations

import json
import signal

import pytest

from conftest import (
    BASE,
    TUTORIAL,
    assert_same_checkpoint,
    assert_same_history,
    assert_same_weights,
    flags,
    position,
    reference,
    train_then_signal,
)
from conftest import cnnlab_in as cli

pytestmark = pytest.mark.usefixtures("restore_threads")   # in-process runs set torch's threads


# The small AlexNet at 16 px has dropout; SGD with momentum and decoupled decay; keep=best.
DROPOUT_BEST = dict(BASE, model="alexnet", image_size=16, train_size=100, epochs=2, keep="best",
                    optimizer="nesterov", lr=0.02, weight_decay=5e-4, checkpoint_every=2)


@pytest.mark.slow
def test_sigterm_saves_resumable_checkpoint_exit_143(tiny_cifar, tmp_path):
    """Dropout, SGD momentum, decoupled weight decay and the kept best weights come back."""
    run = tmp_path / "termed"
    code, log, _ = train_then_signal(tmp_path, ["--data", str(tiny_cifar), "--out", str(run),
                                                *flags(DROPOUT_BEST)], run, signal.SIGTERM,
                                     steps=6, from_epoch=1)
    assert code == 128 + signal.SIGTERM, log
    assert f"interrupted by SIGTERM: checkpoint saved; continue with `cnnlab train --resume {run}`" in log
    assert "Traceback" not in log
    epoch, step = position(run)
    assert epoch == 1 and step > 0

    r = cli(tmp_path, "train", "--resume", str(run))
    assert r.returncode == 0, r.stderr
    expected = reference(tiny_cifar, tmp_path / "whole", **DROPOUT_BEST)
    assert_same_weights(run / "model.safetensors", expected)
    assert_same_history(run, tmp_path / "whole")
    assert_same_checkpoint(run, tmp_path / "whole")


@pytest.mark.slow
def test_sigint_exit_130_then_resume_with_more_epochs(tiny_cifar, tmp_path):
    """Interrupt a 2-epoch run, resume it for 3: the same as 3 epochs in one go (constant lr)."""
    run = tmp_path / "interrupted"
    code, log, _ = train_then_signal(tmp_path, ["--data", str(tiny_cifar), "--out", str(run),
                                                *flags(TUTORIAL)], run, signal.SIGINT,
                                     steps=12, from_epoch=0)
    assert code == 128 + signal.SIGINT, log
    assert "interrupted by SIGINT" in log and "--resume" in log

    # Repeating a saved value is not a change; --epochs is the one change allowed.
    r = cli(tmp_path, "train", "--resume", str(run), "--epochs", "3", "--lr", "0.001", "--model", "tutorial")
    assert r.returncode == 0, r.stderr
    expected = reference(tiny_cifar, tmp_path / "whole", **dict(TUTORIAL, epochs=3))
    assert_same_weights(run / "model.safetensors", expected)
    assert_same_history(run, tmp_path / "whole")
    assert_same_checkpoint(run, tmp_path / "whole")
    assert json.loads((run / "config.json").read_text())["config"]["epochs"] == 3
