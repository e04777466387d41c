"""data/idx.py: MNIST and Fashion-MNIST's IDX files, written here as documented (gzipped or
not), read, downloaded from mirrors, and found in DIR or DIR/<dataset> without a write."""
from __future__ import annotations

import dataclasses
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from cnnlab.core.errors import CnnlabError
from cnnlab.data import idx
from cnnlab.data.download import md5sum
from cnnlab.data.idx import load_idx_dataset, read_idx
from conftest import tree


def write_idx(path: Path, arr: np.ndarray, code: int, big_endian_dtype: str, *, gz: bool) -> Path:
    """IDX as documented: 00 00 <code> <ndim>, big-endian uint32 dims, big-endian data."""
    payload = (bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
               + arr.astype(big_endian_dtype).tobytes())
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("code, dtype", [
    (0x08, ">u1"), (0x09, ">i1"), (0x0B, ">i2"), (0x0C, ">i4"), (0x0D, ">f4"), (0x0E, ">f8")])
def test_read_idx_round_trip(tmp_path, gz, code, dtype):
    rng = np.random.default_rng(code)
    arr = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    # The file name says nothing: gzip is recognised by its magic bytes.
    path = write_idx(tmp_path / "data", arr, code, dtype, gz=gz)
    got = read_idx(path)
    assert got.shape == (3, 4, 5) and got.dtype == np.dtype(dtype).newbyteorder("=")
    np.testing.assert_array_equal(got, arr)


def test_read_idx_rejects_bad_files(tmp_path):
    bad_magic = tmp_path / "bad"
    bad_magic.write_bytes(b"\x01\x00\x08\x01" + struct.pack(">I", 2) + b"\x00\x01")
    with pytest.raises(CnnlabError, match=f"{bad_magic} is not an IDX file"):
        read_idx(bad_magic)
    bad_code = tmp_path / "code"
    bad_code.write_bytes(b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(CnnlabError, match="not an IDX file"):
        read_idx(bad_code)
    short = write_idx(tmp_path / "short", np.arange(10, dtype=np.uint8), 0x08, ">u1", gz=False)
    short.write_bytes(short.read_bytes()[:-1])
    with pytest.raises(CnnlabError, match="truncated or damaged"):
        read_idx(short)
    gz = write_idx(tmp_path / "g.gz", np.arange(100, dtype=np.uint8), 0x08, ">u1", gz=True)
    gz.write_bytes(gz.read_bytes()[:-12])
    with pytest.raises(CnnlabError, match=f"{gz} is a damaged gzip file"):
        read_idx(gz)


def write_idx_set(folder: Path, n_train=6, n_test=4, *, gz_names=(), seed=0) -> dict:
    """The four MNIST-layout files; those listed in ``gz_names`` are written gzipped."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images_name, labels_name = idx.SPLIT_FILES[split]
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        for name, arr in ((images_name, images), (labels_name, labels)):
            gz = name in gz_names
            write_idx(folder / (name + ".gz" if gz else name), arr, 0x08, ">u1", gz=gz)
        out[split] = (images, labels)
    return out


def test_mnist_mixed_gzip_and_plain(tmp_path):
    w = write_idx_set(tmp_path / "mnist",
                      gz_names=("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))
    ds = load_idx_dataset("mnist", tmp_path, download=False)
    assert ds.name == "mnist" and ds.class_names == [str(d) for d in range(10)]
    assert ds.train.images.shape == (6, 28, 28, 1) and ds.train.images.dtype == np.uint8
    assert ds.image_shape == (28, 28, 1)
    np.testing.assert_array_equal(ds.train.images[..., 0], w["train"][0])
    np.testing.assert_array_equal(ds.test.labels, w["test"][1].astype(np.int64))


def test_fashion_mnist_names_and_mismatch(tmp_path):
    write_idx_set(tmp_path / "fashion-mnist")
    ds = load_idx_dataset("fashion-mnist", tmp_path, download=False)
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[-1] == "Ankle boot"
    assert len(ds.class_names) == 10
    labels = tmp_path / "fashion-mnist" / "t10k-labels-idx1-ubyte"
    write_idx(labels, np.zeros(3, np.uint8), 0x08, ">u1", gz=False)
    with pytest.raises(CnnlabError, match="4 images but .* has 3 labels"):
        load_idx_dataset("fashion-mnist", tmp_path, download=False)


def test_mnist_missing_without_download(tmp_path):
    with pytest.raises(CnnlabError, match="mnist not found: looked for train-images-idx3-ubyte") as err:
        load_idx_dataset("mnist", tmp_path, download=False)
    assert f"in {tmp_path / 'mnist'} and in {tmp_path}:" in str(err.value)


def test_mnist_downloads_from_mirrors(tmp_path, monkeypatch, server, dead_url):
    served, base = server
    w = write_idx_set(served, gz_names=[n for pair in idx.SPLIT_FILES.values() for n in pair])
    md5 = {p.name: md5sum(p) for p in served.iterdir()}
    spec = dataclasses.replace(idx.IDX_KINDS["mnist"], mirrors=(dead_url + "/", base), md5=md5)
    monkeypatch.setitem(idx.IDX_KINDS, "mnist", spec)
    ds = load_idx_dataset("mnist", tmp_path / "root")
    np.testing.assert_array_equal(ds.test.images[..., 0], w["test"][0])
    assert sorted(p.name for p in (tmp_path / "root" / "mnist").iterdir()) == sorted(md5)


def test_corrupt_download_source_named(tmp_path):
    folder = tmp_path / "mnist"
    write_idx_set(folder)
    bad = folder / "train-labels-idx1-ubyte"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(CnnlabError, match=str(bad)):
        load_idx_dataset("mnist", tmp_path, download=False)


# ----------------------------------------------------------------------------- --data-dir: DIR or DIR/<dataset>, untouched
IDX_NAMES = [n for pair in idx.SPLIT_FILES.values() for n in pair]


@pytest.mark.parametrize("nested", [True, False], ids=["DIR/kind", "DIR"])
@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
def test_idx_files_found_in_dir_or_dir_kind_and_nothing_written(tmp_path, nested, gz):
    kind = "fashion-mnist"
    folder = tmp_path / kind if nested else tmp_path
    w = write_idx_set(folder, gz_names=IDX_NAMES if gz else ())
    (tmp_path / "notes.txt").write_text("the user's own file")
    before = tree(tmp_path)
    ds = load_idx_dataset(kind, tmp_path, download=False)
    np.testing.assert_array_equal(ds.train.images[..., 0], w["train"][0])
    np.testing.assert_array_equal(ds.test.labels, w["test"][1].astype(np.int64))
    assert ds.class_names[0] == "T-shirt/top"
    assert load_idx_dataset(kind, tmp_path).train.images.shape == (6, 28, 28, 1)   # download allowed: not needed
    assert tree(tmp_path) == before


def test_idx_dir_kind_is_preferred_and_a_partial_set_is_named(tmp_path):
    inner = write_idx_set(tmp_path / "mnist", seed=1)
    write_idx_set(tmp_path, seed=2)
    ds = load_idx_dataset("mnist", tmp_path, download=False)
    np.testing.assert_array_equal(ds.train.images[..., 0], inner["train"][0])
    for name in IDX_NAMES[1:]:
        (tmp_path / "mnist" / name).unlink()
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(CnnlabError) as err:
        load_idx_dataset("mnist", tmp_path, download=False)
    msg = str(err.value)
    assert f"{tmp_path / 'mnist'} has 1 of the 4" in msg and f"{tmp_path} has 3 of the 4, lacking " \
        "t10k-labels-idx1-ubyte" in msg and "\n" not in msg


def test_idx_gz_of_the_other_dataset_refused(tmp_path, monkeypatch):
    """MNIST and Fashion-MNIST share file names: DIR holding MNIST's .gz files is not Fashion-MNIST."""
    write_idx_set(tmp_path, gz_names=IDX_NAMES)
    md5 = {p.name: md5sum(p) for p in tmp_path.iterdir()}
    monkeypatch.setitem(idx.IDX_KINDS, "mnist", dataclasses.replace(idx.IDX_KINDS["mnist"], md5=md5))
    assert load_idx_dataset("mnist", tmp_path, download=False).num_classes == 10
    with pytest.raises(CnnlabError, match="is mnist's .*not fashion-mnist's .*use --data mnist"):
        load_idx_dataset("fashion-mnist", tmp_path, download=False)


def test_fashion_mnist_gz_files_directly_in_data_dir_through_load_dataset(tmp_path):
    """`--data fashion-mnist --data-dir DIR` with the four official .gz files directly in DIR."""
    from cnnlab.data.sources import load_dataset
    w = write_idx_set(tmp_path, gz_names=IDX_NAMES)
    before = tree(tmp_path)
    ds = load_dataset("fashion-mnist", data_dir=tmp_path)
    np.testing.assert_array_equal(ds.test.images[..., 0], w["test"][0])
    assert tree(tmp_path) == before and not (tmp_path / "fashion-mnist").exists()
