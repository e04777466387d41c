"""engine/inference.py, `cnnlab predict`: folders walked recursively, bad files reported and
skipped, CSV, and the ImageNet classes of real photos named by published weights."""
from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnlab.cli import main
from cnnlab.engine.inference import predict_files
from cnnlab.models.weights import class_names
from conftest import IMAGENET_SAMPLE
from conftest import cifar_test_images as _cifar_test_images
from conftest import imagenet_photos as _photos


@pytest.fixture
def photo_folder(tiny_cifar, tmp_path):
    """3 CIFAR JPEGs, a subfolder with a big RGBA PNG and a 16-bit grey PNG, and things to skip."""
    paths, _ = _cifar_test_images(tiny_cifar, per_class=1)
    root = tmp_path / "photos"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    for p in paths[:3]:
        shutil.copy(p, root / f"{p.parent.name}.jpg")
    rgba = np.zeros((300, 400, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128
    Image.fromarray(rgba, "RGBA").save(root / "sub" / "big_rgba.png")
    Image.fromarray(np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)).save(
        root / "sub" / "deeper" / "grey16.png")
    good = paths[0].read_bytes()
    (root / "sub" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "text.jpg").write_text("not a picture")
    (root / "notes.txt").write_text("ignored: not an image name")
    shutil.copy(paths[0], root / ".hidden" / "skipped.jpg")
    shutil.copy(paths[0], root / ".dotfile.jpg")
    return root


def test_predict_folder_recursive_skips_and_reports_bad_files(trained_run, photo_folder, capsys):
    assert main(["predict", str(trained_run.path), str(photo_folder), "--json", "--top-k", "2",
                 "--batch-size", "2"]) == 0
    captured = capsys.readouterr()
    results = json.loads(captured.out)
    files = {Path(r["file"]).relative_to(photo_folder).as_posix(): r for r in results}
    assert sorted(files) == ["airplane.jpg", "automobile.jpg", "bird.jpg", "sub/big_rgba.png",
                             "sub/deeper/grey16.png", "sub/truncated.jpg", "text.jpg"]
    errors = {f for f, r in files.items() if "error" in r}
    assert errors == {"sub/truncated.jpg", "text.jpg"}
    assert all(len(r["top"]) == 2 for f, r in files.items() if f not in errors)
    assert "skipped" in captured.err and "truncated.jpg" in captured.err and "text.jpg" in captured.err

    # Batching does not change the answers.
    one_batch = {r["file"]: r for r in predict_files(trained_run, [photo_folder], top_k=2, batch_size=64)}
    for name, r in one_batch.items():
        if "top" in r:
            got = next(x for x in results if x["file"] == name)["top"]
            assert [t["class"] for t in got] == [t["class"] for t in r["top"]]
            # Another batch size, another oneDNN blocking: float32 rounding of probabilities <= 1.
            assert got[0]["probability"] == pytest.approx(r["top"][0]["probability"], abs=1e-5)


def test_predict_csv_and_all_bad_inputs(trained_run, photo_folder, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    assert main(["predict", str(trained_run.path), str(photo_folder / "airplane.jpg"),
                 str(photo_folder / "text.jpg"), "--csv", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [Path(r["file"]).name for r in rows] == ["airplane.jpg", "text.jpg"]
    assert rows[0]["class_1"] in trained_run.class_names and not rows[0]["error"]
    assert rows[1]["error"] and not rows[1]["class_1"]
    capsys.readouterr()
    assert main(["predict", str(trained_run.path), str(photo_folder / "text.jpg"), str(tmp_path / "nope")]) == 2
    assert "no image could be classified" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(trained_run.path), str(tmp_path / "empty")]) == 2
    assert "no image files found" in capsys.readouterr().err


def test_predict_names_that_are_not_utf8(trained_run, photo_folder, tmp_path, capsys):
    """Linux file names may hold any bytes: the CSV keeps the name's own bytes, the screen escapes them."""
    folder = tmp_path / "odd"
    folder.mkdir()
    shutil.copy(photo_folder / "airplane.jpg", os.fsencode(folder) + b"/plane\xff.jpg")
    out = tmp_path / "preds.csv"
    assert main(["predict", str(trained_run.path), str(folder), "--csv", str(out)]) == 0
    text = out.read_bytes()
    assert b"plane\xff.jpg" in text and text.count(b"\n") == 2   # the header and one row
    assert main(["predict", str(trained_run.path), str(folder)]) == 0
    assert "plane\\udcff.jpg: " in capsys.readouterr().out


# ----------------------------------------------------------------------------- published weights
SAMPLE = IMAGENET_SAMPLE   # one real ImageNet photo per class, named after it (../shared/data)
TOP1_FLOOR = 0.70   # the bar for EfficientNet-Lite0 on the 1,000 sample photos (88.1% measured)


@pytest.mark.shared_data(IMAGENET_SAMPLE)
def test_predict_names_imagenet_classes_of_real_photos(lite0_weights, tmp_path, capsys):
    """`cnnlab predict efficientnet_lite0` on the 1,000 sample photos (one per class, named
    after it): top-1 at or above the bar."""
    photos = _photos(1000)
    out = tmp_path / "predictions.csv"
    assert main(["predict", "efficientnet_lite0", str(SAMPLE), "--top-k", "1", "--csv", str(out)]) == 0
    import csv
    rows = list(csv.DictReader(out.open()))
    names = class_names("imagenet-1k")
    truth = {p.name: names[i] for i, p in enumerate(sorted(SAMPLE.iterdir()))}
    assert len(rows) == len(photos) == 1000
    top1 = np.mean([r["class_1"] == truth[Path(r["file"]).name] for r in rows])
    assert top1 >= TOP1_FLOOR, f"top-1 {top1:.1%}"
