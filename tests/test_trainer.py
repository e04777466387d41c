"""engine/trainer.py: a loss or weights that turn non-finite stop the run with a clear message,
and model.safetensors and the checkpoint keep the last finite weights."""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from cnnlab.cli import main
from cnnlab.core.config import Config
from cnnlab.core.errors import CnnlabError
from cnnlab.engine import checkpoint as ckpt
from cnnlab.engine import loop, trainer
from cnnlab.engine.checkpoint import loop_state
from conftest import BASE, assert_same_weights, reference

pytestmark = pytest.mark.usefixtures("restore_threads")   # in-process runs set torch's threads


def test_diverging_run_stops_with_a_clear_message(tiny_cifar, tmp_path, capsys):
    run = tmp_path / "diverged"
    code = main(["train", "--data", str(tiny_cifar), "--out", str(run), "--train-size", "60", "--epochs", "2",
                 "--optimizer", "sgd", "--lr", "1e30", "--batch-size", "16", "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "training loss became nan at epoch 1" in err and "learning rate (1e+30)" in err
    assert "no epoch finished" in err and not (run / "model.safetensors").exists()


@pytest.mark.parametrize("checkpoint_every", [0, 1])
def test_nan_mid_training_keeps_the_last_finite_weights(tiny_cifar, tmp_path, monkeypatch, checkpoint_every):
    """The learning rate turns NaN at the third step of epoch 2: the run stops, and no NaN
    reaches a checkpoint or model.safetensors (with step checkpoints, not even for one step)."""
    settings = dict(BASE, model="tutorial", train_size=60, epochs=3, ema=0.5, ema_every=1,
                    checkpoint_every=checkpoint_every)  # 54 train images: 4 steps per epoch
    real_set_lr, calls = trainer.set_lr, []

    def set_lr_nan_at_step_6(optimizer, lr):
        calls.append(lr)
        real_set_lr(optimizer, float("nan") if len(calls) >= 7 else lr)
    monkeypatch.setattr(trainer, "set_lr", set_lr_nan_at_step_6)
    run = tmp_path / "nan"
    with pytest.raises(CnnlabError, match=r"became (nan at|non-finite \(nan or inf\) by) epoch 2, step \d.*"
                                          r"model.safetensors holds the last finite weights"):
        loop.fit(Config(data=str(tiny_cifar), **settings), out=run, progress=False)
    model = load_file(run / "model.safetensors")
    assert all(t.isfinite().all() for t in model.values())
    tensors, meta = ckpt.read_checkpoint(run / "checkpoints" / "last.safetensors")
    assert all(t.isfinite().all() for t in tensors.values() if t.is_floating_point())
    assert json.loads((run / "history.json").read_text())["loss"] == loop_state(meta).history["loss"]
    if checkpoint_every:
        assert (loop_state(meta).epoch, loop_state(meta).step_in_epoch) == (1, 2)  # the last step before the NaN one
    else:  # the end of epoch 1, which an uninterrupted 1-epoch run reproduces
        monkeypatch.setattr(trainer, "set_lr", real_set_lr)
        assert_same_weights(model, reference(tiny_cifar, tmp_path / "one", **dict(settings, epochs=1)))
