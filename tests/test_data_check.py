"""`cnnlab data check`: every kind of bad data named before training, and training follows the policy.

The messy folder mixes good CIFAR-10-like JPEGs with files crafted to be wrong in one way each;
the pixel tests prove that the images the check calls "converted" are converted correctly.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnlab.core.errors import CnnlabError
from cnnlab.data import folder, images, listing
from cnnlab.data.check import check_folder, scan_folder
from cnnlab.data.folder import load_image_folder
from cnnlab.data.images import ImageError, open_image
from cnnlab.data.sources import check_dataset
from conftest import POSTSCRIPT, flat_folder

ORIENTATION = 0x0112
GREY16 = np.array([[0, 1000, 30000, 65535]], dtype=np.uint16)   # 16-bit values, one row


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnlab", *args], capture_output=True, text=True, timeout=300)


# ----------------------------------------------------------------------------- crafted files
def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims ``width`` x ``height``: a decompression bomb's first bytes."""
    data = bytearray(png_bytes(Image.new("L", (1, 1))))
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")     # IHDR width, height
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")        # IHDR CRC over type + data
    return bytes(data)


def rgba_with_hidden_colour() -> Image.Image:
    """Column 0 opaque blue, column 1 fully transparent red, column 2 black at alpha 128."""
    a = np.zeros((2, 3, 4), dtype=np.uint8)
    a[:, 0] = (0, 0, 255, 255)
    a[:, 1] = (255, 0, 0, 0)
    a[:, 2] = (0, 0, 0, 128)
    return Image.fromarray(a, "RGBA")


def exif_rotated_jpeg() -> bytes:
    """16x8 stored sideways, red left half and blue right, EXIF orientation 6 (turn 90 degrees clockwise)."""
    img = Image.new("RGB", (16, 8), (255, 0, 0))
    img.paste((0, 0, 255), (8, 0, 16, 8))
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif, quality=95)
    return buf.getvalue()


def cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(buf, "JPEG", quality=95)   # pure red in CMYK
    return buf.getvalue()


def palette_png(transparent: bool = False) -> bytes:
    img = Image.new("P", (2, 1))
    img.putpalette([0, 128, 0, 200, 100, 50] + [0] * 762)
    img.putdata([0, 1])
    buf = io.BytesIO()
    img.save(buf, "PNG", **({"transparency": 1} if transparent else {}))
    return buf.getvalue()


# ----------------------------------------------------------------------------- the messy folder
# Relative path -> kind, for every file that blocks training.
MESSY_ERRORS = {
    "train/cat/truncated.jpg": "damaged",
    "train/cat/halved.jpg": "damaged",
    "train/cat/empty.jpg": "empty-file",
    "train/dog/notes.jpg": "not-image",
    "train/dog/bomb.png": "too-large",
    "train/frog/outside.jpg": "symlink",
    "train/bird": "empty-class",
    "test/bird": "empty-class",
}
MESSY_CONVERTED = {"train/dog/grey16.png": "16-bit greyscale", "train/dog/rgba.png": "transparency",
                   "train/frog/cmyk.jpg": "CMYK", "train/frog/palette.png": "palette",
                   "test/cat/rotated.jpg": "EXIF orientation 6"}
MESSY_IGNORED = {"train/.cache": "hidden", "train/cat/.DS_Store": "hidden",
                 "train/cat/labels.csv": "unsupported", "train/readme.txt": "ignored"}
N_REAL = (6, 3)   # real JPEGs per class in train, test


@pytest.fixture
def messy(make_subset, tmp_path) -> Path:
    """Real JPEGs (cat, dog, frog) plus one file or folder for each kind of problem."""
    root = make_subset({"train": N_REAL[0], "test": N_REAL[1]}, classes=["cat", "dog", "frog"], name="messy")
    real = sorted((root / "train" / "cat").glob("*.jpg"))
    jpeg = real[0].read_bytes()
    files = {
        "train/cat/truncated.jpg": real[1].read_bytes()[:-100],   # opens, fails on decode
        "train/cat/halved.jpg": real[3].read_bytes()[:450],       # the header itself is cut
        "train/cat/empty.jpg": b"",
        "train/dog/notes.jpg": b"this is a text file, not a JPEG\n",
        "train/dog/bomb.png": bomb_png(8000, 6000),   # 48M pixels, over the 40M limit
        "train/dog/grey16.png": png_bytes(Image.fromarray(GREY16)),
        "train/dog/rgba.png": png_bytes(rgba_with_hidden_colour()),
        "train/dog/big.png": png_bytes(Image.new("RGB", (64, 64), (10, 20, 30))),
        "train/frog/cmyk.jpg": cmyk_jpeg(),
        "train/frog/palette.png": palette_png(),
        "test/cat/rotated.jpg": exif_rotated_jpeg(),
        "test/dog/dup.jpg": jpeg,   # the same bytes as a train/cat image: leakage
        "train/.cache/x.jpg": jpeg,
        "train/cat/.DS_Store": b"\0\0\0\1Bud1",
        "train/cat/labels.csv": b"file,label\n",
        "train/readme.txt": b"notes\n",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(real[2].read_bytes())
    os.symlink(outside, root / "train/frog/outside.jpg")
    (root / "train/bird").mkdir()
    (root / "test/bird").mkdir()
    return root


def by_path(problems) -> dict[str, list]:
    out: dict[str, list] = {}
    for p in problems:
        out.setdefault(p.path, []).append(p)
    return out


def test_report_names_every_bad_file(messy):
    report = check_folder(messy)
    errors = by_path(report.errors)
    assert {path: [p.kind for p in ps] for path, ps in errors.items()} == \
        {path: [kind] for path, kind in MESSY_ERRORS.items()}
    assert "truncated pixel data (image file is truncated" in errors["train/cat/truncated.jpg"][0].message
    assert "outside the dataset folder" in errors["train/frog/outside.jpg"][0].message
    warnings = by_path(report.warnings)
    for path, words in MESSY_CONVERTED.items():
        assert [p.kind for p in warnings[path]] == ["converted"] and words in warnings[path][0].message, path
    for path, kind in MESSY_IGNORED.items():
        assert [p.kind for p in warnings[path]] == [kind], path
    dup = warnings["test/dog/dup.jpg"][0]
    first_real = sorted((messy / "train/cat").glob("*.jpg"))[0].name   # its bytes were copied
    assert dup.kind == "duplicate" and dup.related == [f"train/cat/{first_real}"] and "leakage" in dup.message
    # The rest is clean: real JPEGs and the big PNG raise nothing.
    assert set(errors) | set(warnings) == set(MESSY_ERRORS) | set(MESSY_CONVERTED) | set(MESSY_IGNORED) | {
        "test/dog/dup.jpg"}
    assert report.class_names == ["bird", "cat", "dog", "frog"]
    assert report.counts["train"] == {"bird": 0, "cat": N_REAL[0], "dog": N_REAL[0] + 3, "frog": N_REAL[0] + 2}
    assert report.counts["test"] == {"bird": 0, "cat": N_REAL[1] + 1, "dog": N_REAL[1] + 1, "frog": N_REAL[1]}
    assert report.imbalance is None and not report.ok   # an empty class: no finite ratio


def test_pixel_limit_is_read_when_checking(messy, monkeypatch):
    """MAX_PIXELS patched small: the 64x64 PNG is refused too, the 32x32 JPEGs are not."""
    monkeypatch.setattr(images, "MAX_PIXELS", 2000)
    errors = by_path(check_folder(messy).errors)
    assert errors["train/dog/big.png"][0].kind == "too-large" and "4,096 pixels" in errors["train/dog/big.png"][0].message
    assert len(errors) == len(MESSY_ERRORS) + 1


def test_imbalance_and_clean_folder(make_subset):
    root = make_subset({"train": 22, "test": 2}, classes=["cat", "dog"])
    report = check_folder(root)
    assert report.ok and not report.problems and report.imbalance == 1.0
    for p in sorted((root / "train/dog").iterdir())[2:]:
        p.unlink()
    report = check_folder(root)
    assert report.ok and report.imbalance == 11.0
    assert [(p.kind, p.severity) for p in report.problems] == [("imbalance", "warning")]


# ----------------------------------------------------------------------------- conversions, pixel by pixel
def test_16bit_greyscale_is_scaled_not_clipped():
    notes: list[str] = []
    img = open_image(png_bytes(Image.fromarray(GREY16)), notes=notes)
    assert img.mode == "L"
    assert np.asarray(img).tolist() == [[0, 4, 117, 255]]   # round(v / 65535 * 255)
    assert notes == ["16-bit greyscale (I;16) scaled to 8 bits"]


def test_alpha_is_composited_on_white():
    notes: list[str] = []
    a = np.asarray(open_image(png_bytes(rgba_with_hidden_colour()), notes=notes))
    assert a[0, 0].tolist() == [0, 0, 255]          # opaque: unchanged
    assert a[0, 1].tolist() == [255, 255, 255]      # transparent: white, the hidden red never shows
    assert np.abs(a[0, 2].astype(int) - 127).max() <= 1   # half-transparent black: mid grey
    assert notes == ["RGBA: transparency composited on white"]
    la = Image.fromarray(np.array([[[0, 0], [0, 255]]], dtype=np.uint8), "LA")
    assert np.asarray(open_image(png_bytes(la))).tolist() == [[255, 0]]


def test_palette_cmyk_and_exif_orientation():
    notes: list[str] = []
    assert np.asarray(open_image(palette_png(), notes=notes)).tolist() == [[[0, 128, 0], [200, 100, 50]]]
    assert notes == ["palette expanded to RGB"]
    transparent = np.asarray(open_image(palette_png(transparent=True)))
    assert transparent.tolist() == [[[0, 128, 0], [255, 255, 255]]]
    notes = []
    red = np.asarray(open_image(cmyk_jpeg(), notes=notes)).astype(int)
    assert np.abs(red - [255, 0, 0]).max() <= 6 and notes == ["CMYK to RGB"]
    notes = []
    upright = open_image(exif_rotated_jpeg(), notes=notes)
    assert upright.size == (8, 16) and notes == ["turned upright (EXIF orientation 6)"]
    a = np.asarray(upright).astype(int)
    assert np.abs(a[2, 4] - [255, 0, 0]).max() <= 8     # the left (red) half is now on top
    assert np.abs(a[13, 4] - [0, 0, 255]).max() <= 8


def test_open_image_names_the_kind_of_failure(tmp_path):
    cases = {"empty-file": b"", "not-image": b"<html>", "too-large": bomb_png(20_000, 20_000)}
    for kind, data in cases.items():
        with pytest.raises(ImageError) as e:
            open_image(data)
        assert e.value.kind == kind
    with pytest.raises(ImageError, match="no such file"):
        open_image(tmp_path / "missing.png")


def test_postscript_named_jpg_never_reaches_ghostscript(make_subset, tmp_path, monkeypatch):
    """Issue 38 finding 1: only the decoders of the documented formats run; the file is one
    skippable unreadable image, and a stand-in ``gs`` on PATH is never started."""
    from PIL import EpsImagePlugin
    marker = tmp_path / "gs-ran"
    fake = tmp_path / "bin" / "gs"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\ntouch {marker}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)   # look for gs again, on this PATH
    root = make_subset({"train": 2, "test": 1}, classes=["cat", "dog"])
    photo = root / "train/cat/photo.jpg"
    photo.write_bytes(POSTSCRIPT)
    with pytest.raises(ImageError) as e:
        open_image(photo)
    assert e.value.kind == "not-image" and str(e.value).count("\n") == 0
    assert "its bytes are EPS" in str(e.value) and "JPEG, PNG" in str(e.value)
    with pytest.raises(ImageError):
        open_image(POSTSCRIPT)
    assert [p.kind for p in check_folder(root).errors] == ["not-image"]
    assert load_image_folder(root, bad_images="skip").skipped == 1
    assert not marker.exists()


def test_every_supported_suffix_decodes():
    """Each suffix cnnlab lists is one of the allowed decoders, and each decoder still reads
    its format (MPO, a phone's multi-picture JPEG, through the JPEG decoder)."""
    assert {Image.registered_extensions()[s] for s in images.IMAGE_SUFFIXES} <= set(images.FORMATS)
    picture = Image.new("RGB", (4, 3), (200, 30, 60))
    for fmt in (*images.FORMATS, "MPO"):
        buf = io.BytesIO()
        picture.save(buf, fmt, **({"save_all": True, "append_images": [picture]} if fmt == "MPO" else {}))
        decoded = open_image(buf.getvalue())
        assert decoded.size == (4, 3) and decoded.mode == "RGB", fmt
        assert np.abs(np.asarray(decoded, dtype=int)[1, 1] - [200, 30, 60]).max() <= 12, fmt


@pytest.mark.parametrize("error", [NotImplementedError, AttributeError, IndexError, KeyError, RuntimeError])
@pytest.mark.parametrize("stage", ["_open", "load"])
def test_any_decoder_exception_is_one_skippable_damaged_file(make_subset, monkeypatch, error, stage):
    """Issue 38 finding 4: whatever a decoder raises on a crafted file (a mutated DDS gave
    NotImplementedError, SPIDER AttributeError) is the one-line damaged-file error."""
    from PIL import PngImagePlugin

    def broken(self, *args):
        raise error("crafted")
    monkeypatch.setattr(PngImagePlugin.PngImageFile, stage, broken)
    with pytest.raises(ImageError) as e:
        open_image(png_bytes(Image.new("RGB", (2, 2))))
    # Pillow itself turns some of these, raised while opening, into "cannot identify".
    assert e.value.kind == "damaged" and "\n" not in str(e.value)
    assert f"the decoder failed ({error.__name__}: " in str(e.value) or "damaged PNG header" in str(e.value)
    root = make_subset({"train": 2, "test": 1}, classes=["cat", "dog"])
    Image.new("RGB", (32, 32)).save(root / "train/dog/broken.png")
    assert load_image_folder(root, bad_images="skip").skipped == 1


def test_memory_error_is_not_called_a_damaged_file(monkeypatch):
    from PIL import PngImagePlugin

    def out_of_memory(self):
        raise MemoryError
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", out_of_memory)
    with pytest.raises(MemoryError):
        open_image(png_bytes(Image.new("RGB", (2, 2))))


# ----------------------------------------------------------------------------- the loader's policy
def test_loader_policy_and_cache(messy, tmp_path, monkeypatch):
    with pytest.raises(CnnlabError) as e:
        load_image_folder(messy, bad_images="skip")    # empty classes block whatever the policy
    assert "train/bird" in str(e.value) and "test/bird" in str(e.value)
    shutil.rmtree(messy / "train/bird"), shutil.rmtree(messy / "test/bird")
    with pytest.raises(CnnlabError) as e:
        load_image_folder(messy)
    message = str(e.value)
    for rel, kind in MESSY_ERRORS.items():
        assert (rel in message) == (kind != "empty-class"), rel
    assert "--bad-images skip" in message
    cache = tmp_path / "cache"
    ds = load_image_folder(messy, bad_images="skip", cache_dir=cache)
    assert ds.skipped == 6
    assert len(ds.train) == 3 * N_REAL[0] + 5 and len(ds.test) == 3 * N_REAL[1] + 2
    assert ds.image_shape == (32, 32, 3)

    def no_decoding(*args):
        raise AssertionError("decoded images although the cache was valid")
    monkeypatch.setattr(folder, "_map_chunks", no_decoding)
    again = load_image_folder(messy, bad_images="skip", cache_dir=cache)
    assert again.skipped == 6 and np.array_equal(again.train.images, ds.train.images)
    monkeypatch.undo()
    # A symlink leaving the folder added later is refused although the cache is still valid.
    os.symlink(tmp_path / "outside.jpg", messy / "train/cat/late.jpg")
    assert load_image_folder(messy, bad_images="skip", cache_dir=cache).skipped == 7
    with pytest.raises(CnnlabError, match="late.jpg"):
        load_image_folder(messy, cache_dir=cache)


def test_listing_never_follows_symlinks_out(messy, tmp_path):
    shutil.rmtree(messy / "train/bird"), shutil.rmtree(messy / "test/bird")
    listed = [p for files in listing.list_folder(messy, report=lambda *a: None).files.values() for p, _ in files]
    assert not any(p.endswith("outside.jpg") for p in listed)
    assert all(os.path.realpath(p).startswith(os.path.realpath(messy)) for p in listed)
    with pytest.raises(CnnlabError, match="outside.jpg.*outside the dataset folder"):
        listing.list_folder(messy)


# ----------------------------------------------------------------------------- through the CLI
@pytest.mark.slow
def test_cli_exit_codes_and_json(messy, make_subset, tmp_path):
    r = cli("data", "check", str(messy))
    assert r.returncode == 1, r.stderr
    for rel in MESSY_ERRORS:
        assert rel in r.stdout, rel
    assert "block training" in r.stdout and "ready to train" not in r.stdout
    r = cli("data", "check", str(messy), "--json")
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    assert not doc["ok"] and doc["errors"] == len(MESSY_ERRORS)
    assert {p["path"] for p in doc["problems"] if p["severity"] == "error"} == set(MESSY_ERRORS)

    clean = make_subset({"train": 3, "test": 1}, classes=["cat", "dog"], name="clean")
    r = cli("data", "check", str(clean))
    assert r.returncode == 0 and "ready to train" in r.stdout, r.stdout + r.stderr
    (clean / "train/cat/.DS_Store").write_bytes(b"x")      # warnings alone keep exit 0
    assert cli("data", "check", str(clean)).returncode == 0

    r = cli("data", "check", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_cli_official_dataset_counts_from_arrays(tmp_path):
    from tests.test_cifar import write_cifar10
    write_cifar10(tmp_path / "data")
    r = cli("data", "check", "cifar10", "--data-dir", str(tmp_path / "data"), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert sum(doc["counts"]["train"].values()) == 10 and sum(doc["counts"]["test"].values()) == 3
    assert len(doc["class_names"]) == 10 and doc["problems"] == []
    with pytest.raises(CnnlabError) as e:
        check_dataset("cifar1O")
    assert "did you mean 'cifar10'" in str(e.value)


@pytest.mark.slow
def test_train_stops_with_the_list_or_skips_and_counts(messy, tmp_path):
    shutil.rmtree(messy / "train/bird"), shutil.rmtree(messy / "test/bird")
    args = ("train", "--data", str(messy), "--epochs", "1", "--batch-size", "16", "--val-split", "0")
    r = cli(*args, "--out", str(tmp_path / "run1"))
    assert r.returncode == 2
    for rel, kind in MESSY_ERRORS.items():
        if kind != "empty-class":
            assert rel in r.stderr, rel
    assert not (tmp_path / "run1").exists()
    r = cli(*args, "--bad-images", "skip", "--out", str(tmp_path / "run2"))
    assert r.returncode == 0, r.stderr
    assert "skipped 6 unreadable image(s)" in r.stdout
    assert (tmp_path / "run2" / "model.safetensors").is_file()


def test_scan_folder_passes_the_split_options(flat):
    lst, report = scan_folder(flat, test_split=0.5, seed=7)
    assert (lst.test_split, lst.seed, report.layout, report.seed) == (0.5, 7, "flat", 7)


# ----------------------------------------------------------------------------- names that are not UTF-8
@pytest.mark.usefixtures("restore_threads")
def test_a_file_name_that_is_not_utf8_is_checked_and_trained_on(make_subset, tmp_path, capsys):
    """Linux lets a name hold any bytes; Python reads those that are not UTF-8 as surrogates."""
    from cnnlab.cli import main
    root = make_subset({"train": 6, "test": 2}, classes=["cat", "dog"])
    cat = os.fsencode(root / "train" / "cat")
    os.rename(cat + b"/0000.jpg", cat + b"/odd\xff.jpg")
    (Path(os.fsdecode(cat + b"/notes\xfe.txt"))).write_text("not an image")
    assert main(["data", "check", str(root)]) == 0
    out = capsys.readouterr().out
    assert "train/cat/notes\\udcfe.txt: .txt is not an image type" in out and "ready to train" in out

    run = tmp_path / "run"
    assert main(["train", "--data", str(root), "--epochs", "1", "--threads", "1", "--out", str(run)]) == 0
    files = json.loads((run / "splits.json").read_text())["files"]["train"]
    assert os.fsdecode(b"train/cat/odd\xff.jpg") in [f[0] for f in files]


def test_a_class_folder_name_that_is_not_utf8_is_refused_readably(tmp_path, capsys):
    from cnnlab.cli import main
    root = flat_folder(tmp_path / "pets", {"cat": 3, "dog": 3, "owl": 3})
    os.rename(os.fsencode(root / "owl"), os.fsencode(root) + b"/o\xffl")
    refusal = f"{root}/o\\xffl: a class folder's name must be UTF-8 text"
    assert main(["data", "check", str(root)]) == 1
    assert refusal in capsys.readouterr().out

    run = tmp_path / "run"
    assert main(["train", "--data", str(root), "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and refusal in err[0], err
    assert not run.exists()
