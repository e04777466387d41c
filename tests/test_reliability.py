"""Runs you can trust (issue 7), proved through the real CLI where it matters.

Exact resume after kill -9, SIGTERM and SIGINT (bit-identical weights and history on CPU,
shuffling and augmentation on, models with BatchNorm, dropout and EMA); changed configs
refused on resume; checkpoints that survive a full disk; non-finite losses that stop the run
and keep the last finite weights; pickles offered as weights that are refused unread.

Every run uses one thread and a few dozen images: the whole file takes about a minute.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from cnnlab.cli import main
from cnnlab.core.config import Config
from cnnlab.core.errors import CnnlabError
from cnnlab.engine import checkpoint as ckpt
from cnnlab.engine import loop, trainer
from cnnlab.engine.checkpoint import loop_state

# Shared by every run: one thread (identical kernels in and out of process, and fast on
# busy cores), shuffling and all three augmentations on, a fixed seed.
BASE = dict(device="cpu", batch_size=16, threads=1, flip="random", translate=2, cutout=4, seed=5, test_size=20)
# resnet20 has BatchNorm; EMA on. 100 images -> 90 train -> 6 steps per epoch.
BATCHNORM_EMA = dict(BASE, model="resnet20", train_size=100, epochs=2, ema=0.9, ema_every=2,
                     checkpoint_every=2)
# The small AlexNet at 16 px has dropout; SGD with momentum and decoupled decay; keep=best.
DROPOUT_BEST = dict(BASE, model="alexnet", image_size=16, train_size=100, epochs=2, keep="best",
                    optimizer="nesterov", lr=0.02, weight_decay=5e-4, checkpoint_every=2)
# The tutorial net: 200 images -> 180 train -> 12 steps per epoch.
TUTORIAL = dict(BASE, model="tutorial", train_size=200, epochs=2, label_smoothing=0.1, checkpoint_every=3)
WAIT = 300  # seconds before a stuck subprocess fails the test


@pytest.fixture(autouse=True)
def _restore_threads():
    """In-process runs set torch's thread count; give the other tests theirs back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def flags(settings: dict) -> list[str]:
    return [a for k, v in settings.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def reference(data: Path, out: Path, **settings) -> dict[str, torch.Tensor]:
    """An uninterrupted in-process run of the same config: its weights, history, metrics."""
    run = loop.fit(Config(data=str(data), **settings), out=out, progress=False)
    return load_file(run.path / "model.safetensors")


def assert_same_weights(a: Path | dict, b: Path | dict) -> None:
    wa = a if isinstance(a, dict) else load_file(a)
    wb = b if isinstance(b, dict) else load_file(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} of {len(wa)} tensors differ, e.g. {different[:3]}"


def assert_same_history(run_a: Path, run_b: Path) -> None:
    """Every per-epoch figure except wall-clock seconds, exactly."""
    ha, hb = (json.loads((r / "history.json").read_text()) for r in (run_a, run_b))
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "lr"):
        assert ha[key] == hb[key], key
    assert len(ha["seconds"]) == len(hb["seconds"]) and all(s > 0 for s in ha["seconds"])


def assert_same_checkpoint(run_a: Path, run_b: Path) -> None:
    """The final resume state too: live weights (under keep=best or EMA), optimizer moments,
    EMA, best weights, counters. Random-number states differ by design: nothing draws from them."""
    (ta, ma), (tb, mb) = (ckpt.read_checkpoint(r / "checkpoints" / "last.safetensors") for r in (run_a, run_b))
    assert_same_weights({k: v for k, v in ta.items() if not k.startswith("rng.")},
                        {k: v for k, v in tb.items() if not k.startswith("rng.")})
    la, lb = loop_state(ma), loop_state(mb)
    for key in ("epoch", "step_in_epoch", "global_step", "best_val", "best_epoch"):
        assert getattr(la, key) == getattr(lb, key), key
    assert ma["optimizer"] == mb["optimizer"]


def position(run: Path) -> tuple[int, int] | None:
    """(epochs done, steps into the next) of the run's checkpoint, reading only its header."""
    try:
        with safe_open(str(run / "checkpoints" / "last.safetensors"), framework="pt") as f:
            meta = json.loads(f.metadata()["state"])
    except (FileNotFoundError, SafetensorError, OSError, RuntimeError):   # polled while it is replaced
        return None
    state = loop_state(meta)
    return state.epoch, state.step_in_epoch


def train_then_signal(tmp: Path, args: list[str], run: Path, sig: int, *, steps: int, from_epoch: int):
    """Start ``cnnlab train``; once its checkpoint is mid-epoch (epoch >= ``from_epoch``),
    send ``sig``. Returns (exit status, stderr, checkpoint position when signalled)."""
    log = tmp / f"train-{sig}.log"
    with open(log, "w") as err:  # a file, not a pipe: a full pipe would stall the child
        p = subprocess.Popen([sys.executable, "-m", "cnnlab", "train", *args], stdout=subprocess.DEVNULL,
                             stderr=err, cwd=tmp)
        deadline = time.monotonic() + WAIT
        while True:
            pos = position(run)
            if pos is not None and pos[0] >= from_epoch and 0 < pos[1] < steps:
                p.send_signal(sig)
                break
            if p.poll() is not None or time.monotonic() > deadline:
                p.kill()
                pytest.fail(f"training ended before a mid-epoch checkpoint was seen (last {pos}):\n"
                            f"{log.read_text()[-2000:]}")
            time.sleep(0.005)
        code = p.wait(timeout=WAIT)
    return code, log.read_text(), pos


def cli(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnlab", *args], capture_output=True, text=True, cwd=tmp,
                          timeout=WAIT)


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


# ----------------------------------------------------------------------------- one writer per run
@pytest.mark.slow
def test_one_writer_per_run_a_killed_one_leaves_no_stale_lock_and_a_finished_run_is_complete(tiny_cifar,
                                                                                            tmp_path):
    """A trainer holds its run's lock (stopped, so it holds it as long as the test needs): a
    second process resuming the run is refused with exit 2 and the holder's pid. kill -9 the
    trainer: the OS drops its lock, and the next resume takes it and finishes the run. Resuming
    the finished run says it is complete and trains nothing. (The old loop resumed alongside the
    trainer, and retrained a finished run's last epoch from its checkpoint.)"""
    run = tmp_path / "locked"
    log = tmp_path / "trainer.log"
    with open(log, "w") as err:
        trainer = subprocess.Popen([sys.executable, "-m", "cnnlab", "train", "--data", str(tiny_cifar), "--out",
                                    str(run), *flags(TUTORIAL)], stdout=subprocess.DEVNULL, stderr=err, cwd=tmp_path)
        deadline = time.monotonic() + WAIT
        while position(run) is None:   # the first checkpoint (after 3 steps): a run to resume
            if trainer.poll() is not None or time.monotonic() > deadline:
                trainer.kill()
                pytest.fail(f"no checkpoint appeared:\n{log.read_text()[-2000:]}")
            time.sleep(0.005)
        trainer.send_signal(signal.SIGSTOP)
        try:
            assert (run / "run.lock").read_text().strip() == str(trainer.pid)
            refused = cli(tmp_path, "train", "--resume", str(run))
            assert refused.returncode == 2, refused.stderr
            assert f"being written by another process (pid {trainer.pid}" in refused.stderr
            assert "Traceback" not in refused.stderr and "resuming" not in refused.stdout
        finally:
            trainer.kill()   # SIGKILL reaches a stopped process
            trainer.wait(timeout=WAIT)
    assert (run / "run.lock").read_text().strip() == str(trainer.pid)   # left behind, but not held

    with open(tmp_path / "resumer.log", "w") as out:
        resumer = subprocess.Popen([sys.executable, "-m", "cnnlab", "train", "--resume", str(run)], stdout=out,
                                   stderr=subprocess.STDOUT, cwd=tmp_path)
        assert resumer.wait(timeout=WAIT) == 0, (tmp_path / "resumer.log").read_text()
    assert "resuming" in (tmp_path / "resumer.log").read_text()
    assert (run / "run.lock").read_text().strip() == str(resumer.pid)
    assert json.loads((run / "metrics.json").read_text())["steps"] == 24

    files = ("checkpoints/last.safetensors", "model.safetensors", "metrics.json", "report.html")
    before = {f: (run / f).stat().st_mtime_ns for f in files}
    again = cli(tmp_path, "train", "--resume", str(run))
    assert again.returncode == 0, again.stderr
    assert f"{run} is complete: it trained 2 epoch(s), 24 steps" in again.stdout
    assert "resuming" not in again.stdout
    assert {f: (run / f).stat().st_mtime_ns for f in files} == before


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


# ----------------------------------------------------------------------------- atomic writes
class _DiskFullWriter:
    """A file whose write stores the first half of the data, then fails as a full disk does."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[:len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_disk_full_half_way_through_a_checkpoint_keeps_the_previous_one(tiny_cifar, tmp_path,
                                                                         monkeypatch, capsys):
    from cnnlab.core import files as fileio
    writes = []

    def open_filling_the_disk(file, mode="r", *a, **k):
        f = open(file, mode, *a, **k)
        if "w" in mode and Path(file).name.startswith(".last.safetensors"):
            writes.append(file)
            if len(writes) == 3:
                return _DiskFullWriter(f)
        return f
    monkeypatch.setattr(fileio, "open", open_filling_the_disk, raising=False)
    run = tmp_path / "full"
    code = main(["train", "--data", str(tiny_cifar), "--out", str(run), "--train-size", "60", "--epochs", "1",
                 "--checkpoint-every", "1", "--batch-size", "16", "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and "Traceback" not in err
    assert len(writes) == 3
    assert os.listdir(run / "checkpoints") == ["last.safetensors"]
    tensors, meta = ckpt.read_checkpoint(run / "checkpoints" / "last.safetensors")
    assert loop_state(meta).global_step == 2 and all(t.isfinite().all() for t in tensors.values() if t.is_floating_point())


def test_failed_write_of_any_run_file_leaves_the_old_version(tmp_path, monkeypatch):
    from cnnlab.core import files as fileio
    fileio.write_json(tmp_path / "model.json", {"version": 1})
    monkeypatch.setattr(fileio, "open", lambda file, mode="r", *a, **k: _DiskFullWriter(open(file, mode, *a, **k))
                        if "w" in mode else open(file, mode, *a, **k), raising=False)
    with pytest.raises(CnnlabError, match="No space left on device"):
        fileio.write_json(tmp_path / "model.json", {"version": 2})
    assert fileio.read_json(tmp_path / "model.json") == {"version": 1}
    assert os.listdir(tmp_path) == ["model.json"]
    assert (tmp_path / "model.json").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------- NaN / Inf
@pytest.mark.parametrize("lr", ["nan", "inf", "-1"])
def test_non_finite_learning_rate_is_refused_before_anything_is_written(tiny_cifar, tmp_path, capsys, lr):
    code = main(["train", "--data", str(tiny_cifar), "--out", str(tmp_path / "r"), "--lr", lr])
    assert code == 2
    assert f"lr must be a positive number, e.g. --lr 1e-3; got {float(lr)}" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


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
