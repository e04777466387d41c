"""data/listing.py: a flat ``<class>/<image>`` folder split by seed, the split saved and read
again, every reader of such a folder, and the progress bar while a folder decodes."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnlab.core.config import Config
from cnnlab.core.errors import CnnlabError
from cnnlab.data import listing
from cnnlab.data.check import check_folder
from cnnlab.data.folder import load_image_folder
from cnnlab.data.listing import list_folder
from cnnlab.data.sources import load_for_config
from cnnlab.data.stream import open_streaming, scan_data_folder
from conftest import COUNTS, flat_folder, split_folder, write_images


def rel_names(entries, root: Path) -> list[str]:
    return [os.path.relpath(p, root) for p, _ in entries]


# ----------------------------------------------------------------------------- the flat split
def test_flat_folder_is_split_stratified_and_seeded(flat):
    a = list_folder(flat, seed=3)
    assert a.layout == "flat" and a.class_names == ["cat", "dog", "frog", "owl"]
    assert (a.test_split, a.seed) == (0.2, 3)
    for label, (cls, n) in enumerate(COUNTS.items()):
        test = [p for p, lbl in a.files["test"] if lbl == label]
        train = [p for p, lbl in a.files["train"] if lbl == label]
        # 20% rounded, at least one each side: 10 -> 2, 7 -> 1, 3 -> 1, 2 -> 1
        assert len(test) == {10: 2, 7: 1, 3: 1, 2: 1}[n] and len(train) == n - len(test), cls
        assert not set(test) & set(train) and all(os.path.basename(os.path.dirname(p)) == cls for p in test)
    assert sorted(rel_names(a.files["train"] + a.files["test"], flat)) == \
        sorted(f"{c}/{j:03d}.png" for c, n in COUNTS.items() for j in range(n))
    assert list_folder(flat, seed=3) == a                      # reproducible
    seeds = {tuple(rel_names(list_folder(flat, seed=s).files["test"], flat)) for s in range(6)}
    assert len(seeds) > 1                                      # and the seed matters
    bigger = list_folder(flat, test_split=0.5, seed=3)
    assert len(bigger.files["test"]) == 5 + 4 + 2 + 1          # round(0.5 n), at most n - 1
    assert bigger.stamp != a.stamp                             # the split is part of the cache key


def test_adding_images_to_one_class_never_moves_another(flat):
    before = list_folder(flat, seed=0)
    write_images(flat / "cat", ["new1.png", "new2.png"], seed=9)
    after = list_folder(flat, seed=0)
    def test_of(lst, cls):
        return [p for p in rel_names(lst.files["test"], flat) if p.startswith(cls + "/")]
    for cls in ("dog", "frog", "owl"):
        assert test_of(after, cls) == test_of(before, cls)


def test_flat_folder_refusals_name_what_is_wrong(tmp_path):
    one = flat_folder(tmp_path / "one", {"cat": 4, "dog": 1})
    with pytest.raises(CnnlabError, match="class dog has 1 image, too few to split") as err:
        list_folder(one)
    assert "\n" not in str(err.value)
    empty = flat_folder(tmp_path / "empty", {"cat": 4, "dog": 3})
    (empty / "bird").mkdir()
    with pytest.raises(CnnlabError, match="bird: class folder holds no images"):
        list_folder(empty)
    mixed = split_folder(tmp_path / "mixed", {"train": {"cat": 2}, "test": {"cat": 1}})
    write_images(mixed / "dog", ["a.png"], seed=5)
    write_images(mixed / "owl", ["a.png"], seed=6)
    with pytest.raises(CnnlabError) as err:
        list_folder(mixed)
    msg = str(err.value)
    assert "mixes split folders (test/, train/) with class folders of images (dog/, owl/)" in msg
    assert "\n" not in msg
    with pytest.raises(CnnlabError, match="test_split must be between 0 and 1"):
        list_folder(empty, test_split=1.0)
    nested = tmp_path / "outer"
    split_folder(nested / "inner", {"train": {"cat": 2}, "test": {"cat": 1}})
    (nested / "x").mkdir()
    write_images(nested / "x", ["a.png", "b.png"], seed=1)
    with pytest.raises(CnnlabError, match="inner: holds train/ or test/ folders.*--data .*inner"):
        list_folder(nested)
    (tmp_path / "bare" / "sub").mkdir(parents=True)
    with pytest.raises(CnnlabError, match="no train/ or test/ folder and no class folders of images"):
        list_folder(tmp_path / "bare")


def test_split_folders_unchanged(tmp_path):
    """A train/test folder lists as before: stamps as older caches keyed them, loose extra
    folders only warned about."""
    root = split_folder(tmp_path / "s", {"train": {"cat": 3, "dog": 2}, "test": {"cat": 1, "dog": 1}})
    (root / "extras" / "nested").mkdir(parents=True)
    found = []
    lst = list_folder(root, report=lambda *a: found.append(a))
    assert lst.layout == "splits" and lst.test_split is None
    assert [k for k, *_ in found] == ["ignored"]
    assert lst.stamp.splitlines()[0].startswith("train/cat/000.png|")
    assert lst.split_files()["test"] == ["test/cat/000.png", "test/dog/000.png"]


# ----------------------------------------------------------------------------- saving the split
def test_saved_split_round_trips_through_json(flat, tmp_path):
    a = list_folder(flat, seed=5)
    files = a.split_files()
    assert set(files) == {"train", "test"} and all(not p.startswith("/") for p in files["train"])
    record = json.loads(json.dumps(a.split_record()))            # plain JSON
    again = list_folder(flat, saved_split=record)
    assert (again.files, again.stamp, again.class_names, again.layout, again.seed) == \
        (a.files, a.stamp, a.class_names, "flat", 5)
    assert again.changed == again.vanished == []
    saved = tmp_path / "splits.json"
    saved.write_text(json.dumps(record))
    assert list_folder(flat, saved_split=saved).files == a.files
    # Moved elsewhere: the saved paths are relative to the folder.
    moved = shutil.copytree(flat, tmp_path / "moved", copy_function=shutil.copy2)
    assert rel_names(list_folder(moved, saved_split=record).files["test"], moved) == files["test"]
    # A new image after the split is not in it: evaluate and resume read the same files.
    write_images(flat / "cat", ["later.png"], seed=11)
    assert list_folder(flat, saved_split=record).files == a.files


def test_saved_split_names_changed_and_vanished_files(flat):
    record = list_folder(flat, seed=0).split_record()
    test_file = record["files"]["test"][0][0]
    train_file = record["files"]["train"][0][0]
    os.unlink(flat / test_file)
    with open(flat / train_file, "ab") as f:
        f.write(b"\0")                                          # bigger: changed
    with pytest.raises(CnnlabError) as err:
        list_folder(flat, saved_split=record)
    msg = str(err.value)
    assert f"1 file of the run's split vanished from {flat}: {test_file}" in msg and "\n" not in msg
    found = []
    lst = list_folder(flat, saved_split=record, report=lambda *a: found.append(a[:3]))
    assert found == [("vanished", "error", test_file), ("changed", "warning", train_file)]
    assert lst.vanished == [test_file] and lst.changed == [train_file]
    assert len(lst.files["test"]) == len(record["files"]["test"]) - 1
    # The loader: refused by name, or left out with --bad-images skip.
    with pytest.raises(CnnlabError, match=test_file.replace(".", r"\.")):
        load_image_folder(flat, saved_split=record)
    ds = load_image_folder(flat, saved_split=record, bad_images="skip")
    assert ds.skipped == 1 and len(ds.test) == len(record["files"]["test"]) - 1


@pytest.mark.parametrize("bad, why", [
    ({"format": 9}, "format 9"),
    ({"files": {"train": []}}, "splits"),
    ({"files": {"train": [["../../etc/passwd", 0, 1, 1]], "test": []}}, "not a path inside"),
    ({"files": {"train": [["cat/000.png", 7, 1, 1]], "test": []}}, "is not \\[path, label"),
])
def test_a_damaged_saved_split_is_refused(flat, bad, why):
    record = list_folder(flat).split_record()
    record.update(bad)
    with pytest.raises(CnnlabError, match=f"the saved split is not a saved split .*{why}"):
        list_folder(flat, saved_split=record)


# ----------------------------------------------------------------------------- every reader of a flat folder
def test_flat_folder_in_memory_streamed_and_checked(flat, tmp_path):
    ds = load_image_folder(flat, seed=2, cache_dir=tmp_path / "cache")
    lst = list_folder(flat, seed=2)
    assert ds.class_names == lst.class_names and len(ds.train) == len(lst.files["train"])
    assert ds.test.labels.tolist() == [lbl for _, lbl in lst.files["test"]]
    first_test = np.asarray(Image.open(lst.files["test"][0][0]))
    assert np.array_equal(ds.test.images[0], first_test)
    saved = load_image_folder(flat, saved_split=lst.split_record(), cache_dir=tmp_path / "cache")
    assert np.array_equal(saved.test.images, ds.test.images)

    cfg = Config(data=str(flat), loader="stream", workers=0, seed=2, val_split=0.0)
    streamed = open_streaming(cfg, scan=scan_data_folder(cfg))
    assert streamed is not None and streamed.train.paths == [p for p, _ in lst.files["train"]]
    assert streamed.test.paths == [p for p, _ in lst.files["test"]]
    again = open_streaming(cfg, scan=scan_data_folder(cfg, saved_split=lst.split_record()))
    assert again is not None and again.test.paths == streamed.test.paths
    memory = load_for_config(cfg.replace(loader="memory"), scan=scan_data_folder(cfg))
    assert np.array_equal(memory.test.images, ds.test.images)

    report = check_folder(flat, seed=2)
    assert report.ok and report.layout == "flat" and not report.problems, report.format()
    assert report.counts["test"] == {"cat": 2, "dog": 1, "frog": 1, "owl": 1}
    assert "4 class folders split 80/20 into train/test (seed 2)" in report.summary()
    r = subprocess.run([sys.executable, "-m", "cnnlab", "data", "check", str(flat)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "class folders split 80/20" in r.stdout and "ready to train" in r.stdout, \
        r.stdout + r.stderr


# ----------------------------------------------------------------------------- progress
class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal_and_when_asked(big_split, monkeypatch):
    monkeypatch.setattr(listing, "PROGRESS_DELAY", 0.0)
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    load_image_folder(big_split, progress=False)
    assert term.getvalue() == ""
    load_image_folder(big_split)
    assert "decoding big" in term.getvalue() and "0/104" in term.getvalue()
    plain = io.StringIO()                                       # not a terminal: no bar
    monkeypatch.setattr(sys, "stderr", plain)
    load_image_folder(big_split)
    assert plain.getvalue() == ""
