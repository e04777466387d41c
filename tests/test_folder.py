"""data/folder.py: image folders decoded at their most common size and cached, refused when
malformed, and only the subset asked for decoded."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from cnnlab.core.errors import CnnlabError
from cnnlab.data.dataset import prepare_splits
from cnnlab.data.folder import load_image_folder
from cnnlab.data.listing import list_folder
from cnnlab.data.sources import load_dataset
from conftest import CIFAR_FOLDER, counting_decoder, flat_folder


def test_folder_reader_sizes_modes_and_cache(tmp_path):
    root = tmp_path / "shapes"
    for split, n in (("train", 3), ("test", 2)):
        for cls, colour in (("red", 200), ("blue", 40)):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                size = (20, 16) if i else (40, 30)  # most common: 20x16
                Image.new("L", size, colour).save(d / f"{i}.png")
    cache = tmp_path / "cache"
    ds = load_image_folder(root, cache_dir=cache)
    assert ds.class_names == ["blue", "red"]
    assert ds.train.images.shape == (6, 16, 20, 1)          # greyscale -> 1 channel
    assert ds.test.images.shape == (4, 16, 20, 1)
    assert ds.train.images[ds.train.labels == 1].min() == 200
    again = load_image_folder(root, cache_dir=cache)
    assert np.array_equal(again.train.images, ds.train.images)
    (root / "train" / "red" / "3.png").write_bytes((root / "train" / "red" / "0.png").read_bytes())
    changed = load_image_folder(root, cache_dir=cache)   # a new file invalidates the cache
    assert len(changed.train) == 7


@pytest.mark.parametrize("layout, message", [
    ({}, "does not exist"),
    ({"train/cat/a.png": 1}, "no test/ folder"),
    ({"train/a.png": 1, "test/a.png": 1}, "no class folders under"),
    ({"train/cat/a.png": 1, "train/dog/a.png": 1, "test/cat/a.png": 1}, "missing from test/: dog"),
])
def test_folder_layout_errors(tmp_path, layout, message):
    root = tmp_path / "data"
    for rel in layout:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(root / rel)
    with pytest.raises(CnnlabError, match=message):
        load_image_folder(root)


@pytest.mark.shared_data(CIFAR_FOLDER)
@pytest.mark.slow
def test_second_load_of_shared_cifar_comes_from_the_cache(tmp_path, monkeypatch):
    """All 60,000 real JPEGs (the real folder's counts): decoded once, then read from the cache."""
    from cnnlab.data import folder
    cache = tmp_path / "cache"
    first = load_image_folder(CIFAR_FOLDER, cache_dir=cache)
    assert first.train.images.shape == (50000, 32, 32, 3) and first.test.images.shape == (10000, 32, 32, 3)
    assert np.bincount(first.train.labels).tolist() == [5000] * 10

    def no_decoding(*args):
        raise AssertionError("decoded images although the cache was valid")
    monkeypatch.setattr(folder, "_map_chunks", no_decoding)
    second = load_image_folder(CIFAR_FOLDER, cache_dir=cache)
    assert np.array_equal(first.test.images, second.test.images)


# ----------------------------------------------------------------------------- decoding only the subset
@pytest.mark.parametrize("train_size, test_size, val_split, seed", [
    (30, 9, 0.1, 0), (30, 9, 0.1, 1), (7, None, 0.2, 4), (None, 5, 0.0, 2), (200, 200, 0.1, 0)])
def test_subset_decoded_is_exactly_what_prepare_splits_picks(big_split, monkeypatch, train_size, test_size,
                                                             val_split, seed):
    def splits(ds):
        out = prepare_splits(ds, val_split=val_split, train_size=train_size, test_size=test_size, seed=seed)
        return {s: (getattr(out, s).images, getattr(out, s).labels) for s in ("train", "val", "test")
                if getattr(out, s) is not None}
    old = splits(load_image_folder(big_split))                 # decode all, then subset (the old path)
    opened = counting_decoder(monkeypatch)
    new_ds = load_image_folder(big_split, train_size=train_size, test_size=test_size, seed=seed)
    assert len(opened) == min(train_size or 80, 80) + min(test_size or 24, 24)
    new = splits(new_ds)
    assert new.keys() == old.keys()
    for split in old:
        assert np.array_equal(new[split][0], old[split][0]) and np.array_equal(new[split][1], old[split][1]), split


def test_subset_cache_follows_the_subset(big_split, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    a = load_image_folder(big_split, train_size=12, test_size=6, seed=0, cache_dir=cache)
    b = load_image_folder(big_split, train_size=12, test_size=6, seed=1, cache_dir=cache)
    full = load_image_folder(big_split, cache_dir=cache)
    assert len(a.train) == len(b.train) == 12 and len(full.train) == 80
    assert not np.array_equal(a.train.images, b.train.images)   # a changed seed is a new subset, not a stale one
    opened = counting_decoder(monkeypatch)
    again = load_image_folder(big_split, train_size=12, test_size=6, seed=0, cache_dir=cache)
    assert opened == [] and np.array_equal(again.train.images, a.train.images)
    bigger = load_image_folder(big_split, train_size=20, test_size=6, seed=0, cache_dir=cache)
    assert len(bigger.train) == 20 and len(opened) == 26
    assert len(list(cache.iterdir())) == 4


def test_flat_folder_subset_and_split(tmp_path, monkeypatch):
    root = flat_folder(tmp_path / "flat", {"a": 30, "b": 20})
    lst = list_folder(root, seed=1)
    opened = counting_decoder(monkeypatch)
    ds = load_dataset(str(root), data_dir=tmp_path / "d", train_size=10, test_size=4, seed=1)
    assert len(opened) == 14 and len(ds.train) == 10 and len(ds.test) == 4
    chosen = {os.path.relpath(p, root) for p in opened}
    assert chosen <= set(lst.split_files()["train"]) | set(lst.split_files()["test"])


@pytest.mark.usefixtures("restore_threads")
@pytest.mark.parametrize("failure", ["read-only", "disk full"])
def test_a_cache_that_cannot_be_written_warns_once_and_training_goes_on(failure, tiny_cifar, tmp_path, monkeypatch,
                                                                        capsys):
    import errno

    from cnnlab.cli import main
    from cnnlab.data import folder
    cache = tmp_path / "data" / "cache"
    cache.mkdir(parents=True)
    save = np.save
    if failure == "read-only":
        cache.chmod(0o500)
        if os.access(cache, os.W_OK):   # root writes anyway: fail as a read-only mount would
            def refuse(path, array):
                raise PermissionError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            monkeypatch.setattr(folder.np, "save", refuse)
    else:
        def fill_disk(path, array):   # part of the first file, then the disk is full
            save(path, array[:1])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(folder.np, "save", fill_disk)
    try:
        for run in ("a", "b"):   # a second load in the same process says nothing more
            args = ["train", "--data", str(tiny_cifar), "--data-dir", str(cache.parent), "--train-size", "100",
                    "--epochs", "1", "--threads", "1", "--out", str(tmp_path / run)]
            assert main(args) == 0
            assert (tmp_path / run / "model.safetensors").is_file()
        warnings = [line for line in capsys.readouterr().err.splitlines() if "decoded-image cache" in line]
        assert len(warnings) == 1 and f"cannot write the decoded-image cache in {cache}" in warnings[0]
        assert "training goes on from memory" in warnings[0]
        assert list(cache.iterdir()) == []   # no partial copy left behind
    finally:
        cache.chmod(0o700)
