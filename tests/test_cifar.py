"""data/cifar.py: CIFAR-10 and CIFAR-100's python batches and archives, written here in the
official layout: pixels and labels, downloads, DIR or DIR/cifar10, and batches refused unread."""
from __future__ import annotations

import dataclasses
import functools
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from cnnlab.core.errors import CnnlabError
from cnnlab.data import cifar
from cnnlab.data.cifar import load_cifar
from cnnlab.data.download import md5sum
from cnnlab.data.idx import load_idx_dataset
from conftest import make_tar_gz, tree

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer",
                 "dog", "frog", "horse", "ship", "truck"]
PLANE = 32 * 32  # bytes per colour plane in a CIFAR row


# ----------------------------------------------------------------------------- writing the official format
class _Py2StylePickler(pickle._Pickler):
    """Writes ``bytes`` as Python 2 ``str`` opcodes (SHORT_BINSTRING/BINSTRING), as the
    original CIFAR batches were written, instead of Python 3's ``_codecs.encode`` calls."""
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    _Py2StylePickler(buf, protocol=2).dump(obj)
    # Python 2 era NumPy named its module numpy.core; GLOBAL opcodes are plain text lines.
    return buf.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def cifar_rows(rng, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3 * PLANE), dtype=np.uint8)


def rows_to_nhwc(rows: np.ndarray) -> np.ndarray:
    return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def write_cifar10(root: Path, per_batch: int = 2, *, style=py2_pickle, seed=0) -> dict:
    """A CIFAR-10 folder with 5 train batches and a test batch; returns what was written."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {"train_rows": [], "train_labels": []}
    for i in range(1, 6):
        rows, labels = cifar_rows(rng, per_batch), rng.integers(0, 10, per_batch).tolist()
        (folder / f"data_batch_{i}").write_bytes(style({
            b"batch_label": f"training batch {i} of 5".encode(), b"labels": labels,
            b"data": rows, b"filenames": [f"img_{i}_{j}.png".encode() for j in range(per_batch)]}))
        written["train_rows"].append(rows)
        written["train_labels"] += labels
    test_rows, test_labels = cifar_rows(rng, 3), [9, 0, 4]
    (folder / "test_batch").write_bytes(style({
        b"batch_label": b"testing batch 1 of 1", b"labels": test_labels, b"data": test_rows,
        b"filenames": [b"t0.png", b"t1.png", b"t2.png"]}))
    (folder / "batches.meta").write_bytes(style({
        b"num_cases_per_batch": per_batch, b"num_vis": 3 * PLANE,
        b"label_names": [n.encode() for n in CIFAR10_NAMES]}))
    written["train_rows"] = np.concatenate(written["train_rows"])
    written.update(test_rows=test_rows, test_labels=test_labels, folder=folder)
    return written


def write_cifar100(root: Path, *, style=functools.partial(pickle.dumps, protocol=2)) -> dict:
    rng = np.random.default_rng(1)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    fine = [f"class_{i:02d}" for i in range(100)]
    out = {"folder": folder}
    for split, n in (("train", 4), ("test", 2)):
        rows, labels = cifar_rows(rng, n), rng.integers(0, 100, n).tolist()
        (folder / split).write_bytes(style({
            b"batch_label": split.encode(), b"fine_labels": labels,
            b"coarse_labels": [lab // 5 for lab in labels], b"data": rows,
            b"filenames": [f"{split}{j}.png".encode() for j in range(n)]}))
        out[split] = (rows, labels)
    (folder / "meta").write_bytes(style({
        b"fine_label_names": [n.encode() for n in fine],
        b"coarse_label_names": [f"super_{i}".encode() for i in range(20)]}))
    out["names"] = fine
    return out


# ----------------------------------------------------------------------------- reading it
def test_cifar10_folder_python2_pickles_pixel_layout(tmp_path):
    w = write_cifar10(tmp_path)
    ds = load_cifar("cifar10", tmp_path, download=False)
    assert ds.name == "cifar10" and ds.class_names == CIFAR10_NAMES
    assert ds.train.images.shape == (10, 32, 32, 3) and ds.train.images.dtype == np.uint8
    assert ds.test.images.shape == (3, 32, 32, 3)
    assert ds.train.labels.dtype == np.int64
    assert ds.train.labels.tolist() == w["train_labels"]
    assert ds.test.labels.tolist() == w["test_labels"]
    # A row is 1024 R, 1024 G, 1024 B, each plane row-major: pixel (r, c) of channel ch.
    rows = w["train_rows"]
    for i, r, c, ch in [(0, 0, 0, 0), (0, 5, 7, 1), (3, 31, 0, 2), (9, 12, 30, 1)]:
        assert ds.train.images[i, r, c, ch] == rows[i, ch * PLANE + r * 32 + c]
    np.testing.assert_array_equal(ds.train.images, rows_to_nhwc(rows))
    np.testing.assert_array_equal(ds.test.images, rows_to_nhwc(w["test_rows"]))


def test_cifar10_known_pixel(tmp_path):
    w = write_cifar10(tmp_path)
    batch = w["folder"] / "data_batch_1"
    rows = np.zeros((2, 3 * PLANE), np.uint8)
    rows[1, 2 * PLANE + 4 * 32 + 9] = 201  # image 1, blue, row 4, column 9
    batch.write_bytes(py2_pickle({b"data": rows, b"labels": [0, 1]}))
    img = load_cifar("cifar10", tmp_path).train.images[1]
    assert img[4, 9, 2] == 201 and int(img.sum()) == 201


def test_cifar100_fine_labels(tmp_path):
    w = write_cifar100(tmp_path)
    ds = load_cifar("cifar100", tmp_path, download=False)
    assert ds.name == "cifar100" and ds.class_names == w["names"] and ds.num_classes == 100
    np.testing.assert_array_equal(ds.train.images, rows_to_nhwc(w["train"][0]))
    assert ds.train.labels.tolist() == w["train"][1]
    assert ds.test.labels.tolist() == w["test"][1]


def _patch_cifar(monkeypatch, kind: str, **changes):
    monkeypatch.setitem(cifar.CIFAR_KINDS, kind,
                        dataclasses.replace(cifar.CIFAR_KINDS[kind], **changes))


def test_cifar_archive_verified_then_read_in_place(tmp_path, monkeypatch):
    staging = tmp_path / "staging"
    w = write_cifar10(staging)
    root = tmp_path / "root"
    root.mkdir()
    archive = make_tar_gz(root / "cifar-10-python.tar.gz", w["folder"], "cifar-10-batches-py")
    _patch_cifar(monkeypatch, "cifar10", md5=md5sum(archive))
    before = tree(root)
    ds = load_cifar("cifar10", root, download=False)
    np.testing.assert_array_equal(ds.train.images, rows_to_nhwc(w["train_rows"]))
    assert ds.test.labels.tolist() == w["test_labels"]
    assert tree(root) == before   # read from the archive: nothing extracted into the user's folder


def test_cifar_archive_wrong_md5_refused(tmp_path):
    w = write_cifar10(tmp_path / "staging")
    root = tmp_path / "root"
    root.mkdir()
    archive = make_tar_gz(root / "cifar-10-python.tar.gz", w["folder"], "cifar-10-batches-py")
    with pytest.raises(CnnlabError) as err:
        load_cifar("cifar10", root)  # the official MD5 cannot match this tiny archive
    assert str(archive) in str(err.value) and cifar.CIFAR_KINDS["cifar10"].md5 in str(err.value)
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-python.tar.gz"]


def test_cifar_downloads_from_server(tmp_path, monkeypatch, server):
    served, base = server
    w = write_cifar100(tmp_path / "staging")
    archive = make_tar_gz(served / "cifar-100-python.tar.gz", w["folder"], "cifar-100-python")
    monkeypatch.setattr(cifar, "_BASE_URL", base)
    _patch_cifar(monkeypatch, "cifar100", md5=md5sum(archive))
    root = tmp_path / "root"
    with pytest.raises(CnnlabError, match="place the official archive"):
        load_cifar("cifar100", root, download=False)
    ds = load_cifar("cifar100", root, download=True)
    assert ds.class_names == w["names"] and len(ds.train) == 4
    assert (root / "cifar-100-python.tar.gz").read_bytes() == archive.read_bytes()


def test_cifar_corrupt_archive_refused(tmp_path, monkeypatch):
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(b"\x1f\x8b" + os.urandom(500))
    _patch_cifar(monkeypatch, "cifar10", md5=md5sum(archive))
    with pytest.raises(CnnlabError, match="cannot read .*corrupt or truncated") as err:
        load_cifar("cifar10", tmp_path)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-python.tar.gz"]


class _ExecPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


class _SystemPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.mark.parametrize("payload", [_ExecPayload, _SystemPayload])
def test_malicious_batch_never_runs(tmp_path, payload):
    w = write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    batch = w["folder"] / "data_batch_1"
    batch.write_bytes(pickle.dumps({b"data": payload(marker), b"labels": [0]}, protocol=2))
    if payload is _ExecPayload:  # the payload is real: plain pickle would run it
        control = tmp_path / "control"
        pickle.loads(pickle.dumps(payload(control), protocol=2))
        assert control.exists()
    with pytest.raises(CnnlabError, match="refusing to unpickle") as err:
        load_cifar("cifar10", tmp_path)
    assert str(batch) in str(err.value) and "not a CIFAR batch" in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("content, message", [
    ({b"labels": [0, 1]}, "no 'data'"),
    ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, r"expected uint8 \(N, 3072\)"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "2 images but"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, "labels range"),
    ([1, 2, 3], "expected a CIFAR batch dict"),
])
def test_malformed_batch_named(tmp_path, content, message):
    w = write_cifar10(tmp_path)
    batch = w["folder"] / "data_batch_3"
    batch.write_bytes(py2_pickle(content))
    with pytest.raises(CnnlabError, match=message) as err:
        load_cifar("cifar10", tmp_path)
    assert str(batch) in str(err.value)


def test_truncated_batch_and_missing_file(tmp_path):
    w = write_cifar10(tmp_path)
    batch = w["folder"] / "test_batch"
    batch.write_bytes(batch.read_bytes()[:100])
    with pytest.raises(CnnlabError, match="not a readable CIFAR batch") as err:
        load_cifar("cifar10", tmp_path)
    assert str(batch) in str(err.value)
    (w["folder"] / "data_batch_5").unlink()
    with pytest.raises(CnnlabError, match="lacks data_batch_5"):
        load_cifar("cifar10", tmp_path)


def test_unknown_kind(tmp_path):
    with pytest.raises(CnnlabError, match="cifar10, cifar100"):
        load_cifar("cifar11", tmp_path)
    with pytest.raises(CnnlabError, match="mnist, fashion-mnist"):
        load_idx_dataset("kmnist", tmp_path)


# ----------------------------------------------------------------------------- --data-dir: DIR or DIR/cifar10, untouched
@pytest.mark.parametrize("where", ["DIR/cifar10/cifar-10-batches-py", "DIR (the batch files)",
                                   "DIR/cifar10 (the batch files)", "DIR/cifar10/archive"])
def test_cifar_found_in_dir_or_dir_kind_and_nothing_written(tmp_path, monkeypatch, where):
    root = tmp_path / "root"
    w = write_cifar10(tmp_path / "staging")
    if where == "DIR/cifar10/cifar-10-batches-py":
        write_cifar10(root / "cifar10")
    elif where.endswith("(the batch files)"):
        dest = root / "cifar10" if where.startswith("DIR/cifar10") else root
        dest.mkdir(parents=True)
        for f in w["folder"].iterdir():
            (dest / f.name).write_bytes(f.read_bytes())
    else:
        (root / "cifar10").mkdir(parents=True)
        archive = make_tar_gz(root / "cifar10" / "cifar-10-python.tar.gz", w["folder"], "cifar-10-batches-py")
        _patch_cifar(monkeypatch, "cifar10", md5=md5sum(archive))
    before = tree(root)
    ds = load_cifar("cifar10", root, download=False)
    np.testing.assert_array_equal(ds.train.images, rows_to_nhwc(w["train_rows"]))
    assert ds.class_names == CIFAR10_NAMES and ds.test.labels.tolist() == w["test_labels"]
    assert tree(root) == before
