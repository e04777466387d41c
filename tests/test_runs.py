"""engine/runs.py: one writer per run folder (its lock), and the published weights a config asks for."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from cnnlab.cli import main
from cnnlab.core.config import Config
from cnnlab.core.errors import CnnlabError
from cnnlab.engine.runs import load_run, model_card, requested_weights, save_config, save_model
from cnnlab.models import classifier
from cnnlab.models.classifier import build_classifier
from conftest import TUTORIAL, WAIT, flags, poison, position
from conftest import cnnlab_in as cli


@pytest.mark.usefixtures("restore_threads")
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


def test_requested_weights_follow_the_config():
    from cnnlab.core.config import Config
    assert requested_weights(Config(model="resnet50")) is None
    assert requested_weights(Config(model="resnet50", pretrained=True)).tag == "imagenet1k_v2"
    assert requested_weights(Config(model="resnet50", weights="imagenet1k_v1")).tag == "imagenet1k_v1"


# ----------------------------------------------------------------------------- model.json and model.safetensors
CLASSES = ["cat", "dog", "frog"]


def _run_folder(path: Path, classes: list[str] = CLASSES) -> Path:
    """A small tutorial-net run folder with a model (32x32 RGB), as training writes one."""
    cfg = Config(model="tutorial")
    save_model(path, build_classifier("tutorial", len(classes), 32, [0.5] * 3, [0.25] * 3),
               model_card(cfg, classes, (32, 32, 3), [0.5] * 3, [0.25] * 3))
    save_config(path, cfg, {})
    return path


def _no_network(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a network was built from a card that should have been refused")
    monkeypatch.setattr(classifier, "create_model", refuse)


@pytest.mark.parametrize("key, value, expected", [
    ("num_classes", None, "it lacks num_classes (cnnlab writes arch, num_classes, "),
    ("num_classes", "3", "num_classes must be a whole number from 1 to 100,000, got '3'"),
    ("num_classes", 2e9, "num_classes must be a whole number from 1 to 100,000, got 2000000000.0"),
    ("num_classes", 2_000_000_000, "num_classes must be a whole number from 1 to 100,000, got 2000000000"),
    ("class_names", ["cat", "dog"], "class_names must be a list of num_classes (3) names, got ['cat', 'dog']"),
    ("class_names", ["cat", "dog", 3], "class_names must be a list of num_classes (3) names"),
    ("arch", ["tutorial"], "arch must be a model name"),
    ("in_channels", True, "in_channels must be 1 (grey) or 3 (RGB), got True"),
    ("input_size", [32], "input_size must be [height, width], each from 1 to 4096 pixels, got [32]"),
    ("input_size", [32, 10 ** 9], "input_size must be [height, width]"),
    ("mean", [0.5, float("nan"), 0.5], "mean must be a number per channel"),
    ("std", [0.25, 0.0, 0.25], "std must be as many numbers as mean, each above 0"),
    ("resample", ["x"], "resample must be one of bilinear, bicubic"),
])
def test_a_damaged_model_card_is_refused_before_anything_is_built(tmp_path, monkeypatch, key, value, expected):
    """Issue 38 finding 10: missing keys, wrong types and values out of bounds in model.json are
    one line naming the file and the key, before any network is built (2e9 classes asked for
    512 GB)."""
    run = _run_folder(tmp_path / "run")
    card = json.loads((run / "model.json").read_text())
    if value is None:
        del card[key]
    else:
        card[key] = value
    (run / "model.json").write_text(json.dumps(card))
    _no_network(monkeypatch)
    with pytest.raises(CnnlabError) as e:
        load_run(run)
    assert str(e.value).startswith(f"{run / 'model.json'}") and expected in str(e.value)
    assert "\n" not in str(e.value)


def test_short_class_names_stop_predict_not_an_index_error(tmp_path, capsys):
    run = _run_folder(tmp_path / "run")
    card = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps({**card, "class_names": ["cat"]}))
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    assert main(["predict", str(run), str(tmp_path / "x.png"), "--top-k", "3"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"cnnlab: error: {run / 'model.json'}: class_names must be a list of "
                                        f"num_classes (3) names, got ['cat']; the file is damaged: train the run "
                                        f"again, or restore it from a copy"]


def test_a_card_that_disagrees_with_the_weights_is_refused_from_the_header(tmp_path, monkeypatch):
    """num_classes and arch are checked against model.safetensors' header before any tensor of
    it is read or any network built."""
    run = _run_folder(tmp_path / "run")
    card = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps({**card, "num_classes": 5, "class_names": list("abcde")}))
    _no_network(monkeypatch)
    with pytest.raises(CnnlabError) as e:
        load_run(run).model()
    assert str(e.value) == (f"{run / 'model.json'} does not match {run / 'model.safetensors'}: it says tutorial "
                            f"with 5 classes, the weights are tutorial with 3; restore the run's own model.json")
    (run / "model.json").write_text(json.dumps({**card, "arch": "lenet5"}))
    with pytest.raises(CnnlabError, match="it says lenet5 with 3 classes, the weights are tutorial with 3"):
        load_run(run).model()
    monkeypatch.undo()
    # A file written before the header named the head still loads.
    (run / "model.json").write_text(json.dumps(card))
    save_file(load_file(run / "model.safetensors"), run / "model.safetensors", metadata={"arch": "tutorial"})
    assert load_run(run).model()(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


def test_a_model_with_nan_is_never_written(tmp_path):
    """Issue 38 finding 2: save_model refuses non-finite weights, so the file keeps the last
    good ones (the non-finite handler writes through it)."""
    run = _run_folder(tmp_path / "run")
    before = (run / "model.safetensors").read_bytes()
    model = build_classifier("tutorial", 3, 32, [0.5] * 3, [0.25] * 3)
    with torch.no_grad():
        model.net[-1].weight[0, 0] = float("nan")
    with pytest.raises(CnnlabError, match=r"the model for .*model.safetensors holds nan or inf values in "
                                          r"net\.\d+\.weight: it was not written"):
        save_model(run, model, model_card(Config(model="tutorial"), CLASSES, (32, 32, 3), [0.5] * 3, [0.25] * 3))
    assert (run / "model.safetensors").read_bytes() == before


def test_nan_outputs_are_refused_not_printed_as_percentages(tmp_path, capsys):
    """A model whose weights are finite but whose outputs are not (its std buffer zeroed):
    predict stops with one line instead of printing "cat nan%"."""
    run = _run_folder(tmp_path / "run")
    poison(run / "model.safetensors", "std", 0.0)
    Image.new("RGB", (32, 32), (128, 128, 128)).save(tmp_path / "x.png")
    assert main(["predict", str(run), str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "cnnlab: error: run: the model's outputs are nan or inf for 1 of 1 image(s), so it has no prediction "
        "to give; its weights or normalisation are damaged: train the run again"]
