"""A practitioner's own photos, end to end: a flat folder of real, non-square ImageNet photos
trains at a size chosen from the data and the model, its split is saved and read again by
evaluate and resume, and files that vanish later are named."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cnnlab.core.config import Config
from cnnlab.core.errors import CnnlabError
from cnnlab.engine import loop, prepare
from conftest import IMAGENET_SAMPLE, train_then_crash

pytestmark = pytest.mark.shared_data(IMAGENET_SAMPLE)     # real photos of real, varied sizes
# Three superclasses by ImageNet class index, a few photos each (mostly 500x375, some other sizes).
GROUPS = {"bird": range(7, 19), "dog": range(151, 163), "reptile": range(33, 45)}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    files = sorted(IMAGENET_SAMPLE.glob("*.JPEG"))
    assert len(files) == 1000, f"{IMAGENET_SAMPLE} should hold one photo for each ImageNet class"
    root = tmp_path_factory.mktemp("own") / "photos"
    for name, indices in GROUPS.items():
        (root / name).mkdir(parents=True)
        for i in indices:
            shutil.copy2(files[i], root / name / files[i].name)
    return root


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnlab", *args], capture_output=True, text=True)


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


def test_the_training_size_follows_the_model_family(photos):
    from cnnlab.data.stream import scan_data_folder
    cfg = Config(data=str(photos))
    headers = prepare.training_headers(scan_data_folder(cfg))
    size, why = prepare.image_size_for(cfg.replace(model="resnet18"), headers, None)
    assert size == 224 and why.startswith("resnet18 trains at up to 224 px; the images' shorter side is")
    assert prepare.image_size_for(cfg.replace(model="alexnet"), headers, None)[0] == 64
    assert prepare.image_size_for(cfg.replace(image_size=48), headers, None) == (48, "--image-size")
    with pytest.raises(CnnlabError, match="alexnet needs images of at least 15x15 pixels; got 12x12"):
        prepare.check_config(cfg.replace(model="alexnet", image_size=12))


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
