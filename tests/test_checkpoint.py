"""engine/checkpoint.py: resume state in one safetensors file: a run killed or crashed anywhere
resumes to the uninterrupted run's weights, a changed config is refused, and pickles are never run."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
from pathlib import Path

import pytest
import torch

from cnnlab.cli import main
from cnnlab.core.config import Config
from cnnlab.engine import loop, trainer
from cnnlab.engine.checkpoint import loop_state
from conftest import (
    BASE,
    TUTORIAL,
    assert_same_checkpoint,
    assert_same_history,
    assert_same_weights,
    flags,
    poison,
    position,
    reference,
    train_then_signal,
)
from conftest import cnnlab_in as cli

pytestmark = pytest.mark.usefixtures("restore_threads")   # in-process runs set torch's threads


# resnet20 has BatchNorm; EMA on. 100 images -> 90 train -> 6 steps per epoch.
BATCHNORM_EMA = dict(BASE, model="resnet20", train_size=100, epochs=2, ema=0.9, ema_every=2,
                     checkpoint_every=2)


# ----------------------------------------------------------------------------- exact resume
@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_equals_uninterrupted_run(tiny_cifar, tmp_path):
    """BatchNorm statistics, Adam moments, the EMA and the epoch's position all come back."""
    run = tmp_path / "killed"
    code, log, pos = train_then_signal(tmp_path, ["--data", str(tiny_cifar), "--out", str(run),
                                                  *flags(BATCHNORM_EMA)], run, signal.SIGKILL,
                                       steps=6, from_epoch=1)
    assert code == -signal.SIGKILL
    epoch, step = position(run)
    assert epoch == 1 and 0 < step < 6, f"killed at {(epoch, step)}, not mid-epoch"
    assert not (run / "model.safetensors").exists()

    r = cli(tmp_path, "train", "--resume", str(run))
    assert r.returncode == 0, r.stderr
    assert f"resuming {run} at epoch 2, step {step}" in r.stdout
    expected = reference(tiny_cifar, tmp_path / "whole", **BATCHNORM_EMA)
    assert_same_weights(run / "model.safetensors", expected)
    assert_same_history(run, tmp_path / "whole")
    assert_same_checkpoint(run, tmp_path / "whole")
    metrics = [json.loads((r / "metrics.json").read_text()) for r in (run, tmp_path / "whole")]
    assert metrics[0]["test_accuracy"] == metrics[1]["test_accuracy"] and metrics[0]["steps"] == 12
    assert os.listdir(run / "checkpoints") == ["last.safetensors"]  # no temp file left by the kill


def test_crash_between_last_step_and_epoch_end_resumes_exactly(tiny_cifar, tmp_path, monkeypatch):
    """The awkward position: a step checkpoint at the last batch, then death before the epoch
    closes (here, during the validation pass). The resumed run must not redo or lose anything."""
    settings = dict(TUTORIAL, checkpoint_every=12)  # 12 steps per epoch: the last batch of each
    real_evaluate = trainer.evaluate

    def crash(*a, **k):
        raise RuntimeError("simulated crash during validation")
    monkeypatch.setattr(trainer, "evaluate", crash)
    run = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        loop.fit(Config(data=str(tiny_cifar), **settings), out=run, progress=False)
    assert position(run) == (0, 12)
    monkeypatch.setattr(trainer, "evaluate", real_evaluate)
    loop.resume(run, progress=False)
    expected = reference(tiny_cifar, tmp_path / "whole", **settings)
    assert_same_weights(run / "model.safetensors", expected)
    assert_same_history(run, tmp_path / "whole")
    assert_same_checkpoint(run, tmp_path / "whole")


# ----------------------------------------------------------------------------- resume refusals
@pytest.fixture(scope="module")
def finished_run(tiny_cifar, tmp_path_factory) -> Path:
    """A finished 1-epoch run (2 steps), cosine schedule, with its last checkpoint."""
    out = tmp_path_factory.mktemp("finished") / "run"
    n = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:  # the function-scoped cache fixture is not active yet
        mp.setenv("CNNLAB_DATA", str(tmp_path_factory.mktemp("cnnlab-data")))
        loop.fit(Config(data=str(tiny_cifar), **dict(BASE, train_size=30, epochs=1, schedule="cosine")),
                 out=out, progress=False)
    torch.set_num_threads(n)
    return out


def test_resume_with_changed_config_is_refused_listing_the_differences(finished_run, capsys):
    before = (finished_run / "checkpoints" / "last.safetensors").stat().st_mtime_ns
    code = main(["train", "--resume", str(finished_run), "--lr", "0.5", "--batch-size", "16", "--seed", "9"])
    err = capsys.readouterr().err
    assert code == 2
    assert "lr 0.001 -> 0.5" in err and "seed 5 -> 9" in err and "batch_size" not in err
    assert "--epochs" in err and len(err.strip().splitlines()) == 1
    # A schedule that decays over the run's length cannot be stretched after the fact.
    assert main(["train", "--resume", str(finished_run), "--epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert "cosine" in err and "epochs 1 -> 3" in err
    assert (finished_run / "checkpoints" / "last.safetensors").stat().st_mtime_ns == before


# ----------------------------------------------------------------------------- unsafe files
class _Plant:
    """Unpickling this calls open(marker, "w"): a file appears if the pickle is ever loaded."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _plant(kind: str, marker: Path) -> bytes:
    if kind == "pickle":
        return pickle.dumps({"model.weight": _Plant(marker)})
    path = marker.with_suffix(".pt")
    torch.save({"state_dict": {"weight": torch.zeros(3)}, "hook": _Plant(marker)}, path)
    return path.read_bytes()


def test_the_planted_pickles_do_run_code_when_unpickled(tmp_path):
    """The payloads below are live: loading them the unsafe way creates the marker."""
    for kind in ("pickle", "torch.save"):
        marker = tmp_path / f"marker-{kind}"
        data = _plant(kind, marker)
        (tmp_path / "f").write_bytes(data)
        if kind == "pickle":
            pickle.loads(data)
        else:
            torch.load(tmp_path / "f", weights_only=False)
        assert marker.exists()


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
@pytest.mark.parametrize("command", ["resume", "evaluate", "predict"])
def test_pickle_offered_as_weights_is_refused_and_never_run(finished_run, tiny_cifar, tmp_path, capsys,
                                                            kind, command):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    marker = tmp_path / "MARKER"
    target = run / ("checkpoints/last.safetensors" if command == "resume" else "model.safetensors")
    target.write_bytes(_plant(kind, marker))
    args = {"resume": ["train", "--resume", str(run)], "evaluate": ["evaluate", str(run)],
            "predict": ["predict", str(run), str(next((tiny_cifar / "test" / "cat").iterdir()))]}[command]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{target} is not" in err and "safetensors" in err and "never" in err
    assert len(err.strip().splitlines()) == 1
    assert not marker.exists()



def test_nan_in_the_model_is_refused_by_every_reader(finished_run, tiny_cifar, tmp_path, capsys):
    """Issue 38 finding 2: a model.safetensors holding a NaN is refused by predict (exit 2, one
    line, not "cat nan%"), by resume (not reported complete), evaluate, and --init-from."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    name = poison(run / "model.safetensors", "net.")
    image = str(next((tiny_cifar / "test" / "cat").iterdir()))
    refused = cli(tmp_path, "predict", str(run), image)
    assert refused.returncode == 2 and not refused.stdout
    assert refused.stderr.strip().splitlines() == [
        f"cnnlab: error: {run}/model.safetensors holds nan or inf values in {name}: cnnlab never writes such a "
        f"model, so the file is damaged; train the run again, or restore the file from a copy"]
    for args in (["train", "--resume", str(run)], ["evaluate", str(run)],
                 ["train", "--data", str(tiny_cifar), "--init-from", str(run), "--out", str(tmp_path / "tuned"),
                  *flags(dict(BASE, train_size=30, epochs=1))]):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and f"model.safetensors holds nan or inf values in {name}" in err


def test_nan_in_the_checkpoint_is_refused_at_resume_and_the_model_kept(finished_run, tmp_path, capsys):
    """A checkpoint is never resumed from (nor restored after a NaN) when it holds one: before,
    the NaN trained on and then replaced the good model.safetensors."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    model = (run / "model.safetensors").read_bytes()
    name = poison(run / "checkpoints" / "last.safetensors", "model.net.", float("inf"))
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert f"checkpoints/last.safetensors holds nan or inf values in {name}: " in err and "cannot be resumed" in err
    assert (run / "model.safetensors").read_bytes() == model

def test_a_checkpoint_from_before_named_state_still_reads():
    """Checkpoints written before the loop's state was saved by name (top-level keys and an
    ``epoch_partial`` list) give the same state as the named form."""
    old = {"epoch": 2, "step_in_epoch": 3, "global_step": 23, "history": {"loss": [1.0, 0.5]}, "best_val": None,
           "best_epoch": 1, "train_seconds": 9.5, "epoch_partial": [1.25, 7, 12, 0.75]}
    state = loop_state(old)
    assert (state.epoch, state.step_in_epoch, state.global_step, state.best_epoch) == (2, 3, 23, 1)
    assert state.best_val == float("-inf") and state.history == {"loss": [1.0, 0.5]}
    assert (state.epoch_loss, state.epoch_correct, state.epoch_seen, state.epoch_seconds) == (1.25, 7, 12, 0.75)
    import dataclasses
    named = {"loop": {**dataclasses.asdict(state), "best_val": None}}
    assert loop_state(named) == state
