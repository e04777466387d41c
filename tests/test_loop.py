"""engine/loop.py: `fit` and `resume`: a seed gives the same weights, a run that fails early
leaves no folder, and a flat folder of one's own photos trains, keeps its split and resumes."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from cnnlab.core.config import Config
from cnnlab.core.errors import CnnlabError
from cnnlab.engine import loop
from conftest import GROUPS, IMAGENET_SAMPLE, train_then_crash


def test_same_seed_gives_identical_weights(tiny_cifar, tmp_path):
    from safetensors.torch import load_file

    from cnnlab.engine.loop import fit
    cfg = Config(data=str(tiny_cifar), epochs=1, batch_size=32, flip="random", translate=2, seed=7)
    a = fit(cfg, out=tmp_path / "a", progress=False)
    b = fit(cfg, out=tmp_path / "b", progress=False)
    wa, wb = load_file(a.path / "model.safetensors"), load_file(b.path / "model.safetensors")
    assert all((wa[k] == wb[k]).all() for k in wa)


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(tiny_cifar, tmp_path, monkeypatch):
    from cnnlab.engine import loop
    from cnnlab.engine.trainer import Trainer
    cfg = Config(data=str(tiny_cifar), epochs=1, batch_size=50, threads=1)
    real = Trainer.run_epoch

    def crash(self, *args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(Trainer, "run_epoch", crash)
    with pytest.raises(RuntimeError, match="mat1"):
        loop.fit(cfg, out=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(Trainer, "run_epoch", real)
    run = loop.fit(cfg, out=tmp_path / "run", progress=False)     # the same --out works at once
    assert run.weights_file.is_file()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's")
    monkeypatch.setattr(Trainer, "run_epoch", crash)
    with pytest.raises(CnnlabError, match="already exists"):
        loop.fit(cfg, out=tmp_path / "mine", progress=False)       # a folder cnnlab did not make is never removed
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError):
        loop.fit(cfg, out=tmp_path / "empty", progress=False)
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())   # emptied, kept


# ----------------------------------------------------------------------------- a folder of one's own photos
def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnlab", *args], capture_output=True, text=True)


@pytest.mark.shared_data(IMAGENET_SAMPLE)
@pytest.mark.slow
def test_a_flat_photo_folder_trains_evaluates_and_keeps_its_split(photos, tmp_path):
    out = tmp_path / "run"
    p = cli("train", "--data", str(photos), "--epochs", "1", "--batch-size", "8", "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert "images decoded at 32x32: the images' shorter side" not in p.stdout       # capped, not the side
    assert "images decoded at 32x32: tutorial trains at up to 32 px; the images' shorter side is" in p.stdout
    saved = json.loads((out / "config.json").read_text())["config"]
    assert saved["image_size"] == 32 and saved["test_split"] == 0.2
    splits = json.loads((out / "splits.json").read_text())
    tests = [rel for rel, *_ in splits["files"]["test"]]        # [path, label, size, mtime] each
    assert len(tests) == 6 and {t.split("/")[0] for t in tests} == set(GROUPS)   # 20% of 12: 2 a class
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_images"] == 6
    ev = cli("evaluate", str(out), "--json")
    assert ev.returncode == 0, ev.stderr
    result = json.loads(ev.stdout)
    assert result["test_images"] == 6 and result["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    # A held-out photo deleted later is named, and --bad-images skip scores the rest.
    gone = photos / tests[0]
    kept = gone.read_bytes()
    gone.unlink()
    try:
        ev = cli("evaluate", str(out))
        assert ev.returncode == 2 and gone.name in ev.stderr and "Traceback" not in ev.stderr
        ev = cli("evaluate", str(out), "--bad-images", "skip", "--json")
        assert ev.returncode == 0 and json.loads(ev.stdout)["test_images"] == 5
    finally:
        gone.write_bytes(kept)


@pytest.mark.shared_data(IMAGENET_SAMPLE)
def test_resume_reads_the_saved_split_even_after_the_folder_grew(photos, tmp_path):
    cfg = Config(data=str(photos), model="tutorial", epochs=2, batch_size=8, seed=4, threads=1)
    whole = loop.fit(cfg, out=tmp_path / "whole", progress=False)
    train_then_crash(loop.fit, cfg, tmp_path / "cut")
    extra = photos / "dog" / "added-later.JPEG"
    shutil.copy2(next((photos / "bird").iterdir()), extra)       # a seeded split would now change
    try:
        resumed = loop.resume(tmp_path / "cut", progress=False)
    finally:
        extra.unlink()
    a, b = load_file(whole.weights_file), load_file(resumed.weights_file)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.shared_data(IMAGENET_SAMPLE)
def test_a_height_and_width_train_in_memory_and_streaming_refuses_them(photos, tmp_path):
    cfg = Config(data=str(photos), model="tutorial", epochs=1, batch_size=8, threads=1, image_size=(24, 40))
    run = loop.fit(cfg, out=tmp_path / "wide", progress=False)
    assert run.card["input_size"] == [24, 40] and run.config.image_size == (24, 40)
    assert json.loads((run.path / "config.json").read_text())["config"]["image_size"] == [24, 40]
    p = cli("evaluate", str(run.path), "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["test_images"] == run.metrics["test_images"]
    with pytest.raises(CnnlabError, match="streamed images are cropped square; give one side"):
        loop.fit(cfg.replace(loader="stream"), out=tmp_path / "streamed", progress=False)
    assert not (tmp_path / "streamed").exists()
