"""data/folder.py: image folders decoded at their most common size and cached, refused when
malformed, and only the subset asked for decoded."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cnnlab.core.errors import CnnlabError
from cnnlab.data.folder import load_image_folder
from conftest import CIFAR_FOLDER


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
