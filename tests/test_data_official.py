"""Official-format readers: CIFAR python archives, IDX files, downloads and safe extraction.

Every archive and file here is written by the tests in the official layout, and every
download is served by a real HTTP server on 127.0.0.1, so nothing touches the network.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import http.server
import io
import os
import pickle
import socket
import struct
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from cnnlab.core.errors import CnnlabError
from cnnlab.data import cifar, idx
from cnnlab.data.cifar import load_cifar
from cnnlab.data.download import default_data_dir, fetch, md5sum, safe_extract_tar
from cnnlab.data.idx import load_idx_dataset, read_idx

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer",
                 "dog", "frog", "horse", "ship", "truck"]
PLANE = 32 * 32  # bytes per colour plane in a CIFAR row


# ---------------------------------------------------------------- writing official formats

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


def make_tar_gz(archive: Path, source: Path, arcname: str) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname=arcname)
    return archive


def write_idx(path: Path, arr: np.ndarray, code: int, big_endian_dtype: str, *, gz: bool) -> Path:
    """IDX as documented: 00 00 <code> <ndim>, big-endian uint32 dims, big-endian data."""
    payload = (bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
               + arr.astype(big_endian_dtype).tobytes())
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def tree(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every entry under ``folder``: (mode, mtime_ns, bytes of files): any write shows."""
    return {str(p.relative_to(folder)): (p.stat().st_mode, p.stat().st_mtime_ns,
                                         p.read_bytes() if p.is_file() else b"")
            for p in sorted(folder.rglob("*"))}


def leftovers(folder: Path) -> list[str]:
    """Hidden temporary files or folders a failed step might leave."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------- a real local HTTP server

class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def server(tmp_path):
    """(folder served, base URL) of an HTTP server on 127.0.0.1 in a thread."""
    served = tmp_path / "served"
    served.mkdir()
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture
def dead_url():
    """A URL on a local port nothing listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/nothing-here"


def md5_of(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# ---------------------------------------------------------------- download.py

def test_default_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("CNNLAB_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_data_dir(tmp_path / "given") == tmp_path / "given"
    assert default_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("CNNLAB_DATA")
    assert default_data_dir(None) == tmp_path / "xdg" / "cnnlab" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_data_dir(None) == Path.home() / ".cache" / "cnnlab" / "data"


def test_md5sum_streams_whole_file(tmp_path):
    data = os.urandom(3 * (1 << 20) + 17)  # spans several read chunks
    (tmp_path / "f").write_bytes(data)
    assert md5sum(tmp_path / "f") == md5_of(data)


def test_fetch_tries_mirrors_in_order(server, dead_url, tmp_path):
    served, base = server
    data = os.urandom(5000)
    (served / "file.bin").write_bytes(data)
    dest = tmp_path / "out" / "file.bin"
    got = fetch([dead_url, base + "missing.bin", base + "file.bin"], dest, md5_of(data), timeout=5)
    assert got == dest and dest.read_bytes() == data
    umask = os.umask(0o022)
    os.umask(umask)
    assert dest.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600
    assert leftovers(dest.parent) == []
    # Present with the right checksum: returned without touching the (dead) network.
    assert fetch(dead_url, dest, md5_of(data), timeout=5) == dest


def test_fetch_wrong_md5_leaves_nothing(server, tmp_path):
    served, base = server
    data = b"not the official bytes"
    (served / "a.tar.gz").write_bytes(data)
    dest = tmp_path / "out" / "a.tar.gz"
    with pytest.raises(CnnlabError) as err:
        fetch(base + "a.tar.gz", dest, "0" * 32, timeout=5)
    msg = str(err.value)
    assert "0" * 32 in msg and md5_of(data) in msg and str(dest) in msg
    assert not dest.exists() and not dest.parent.exists()   # the folder made for it went too


def test_fetch_all_mirrors_fail_says_how_to_fix(dead_url, server, tmp_path):
    _, base = server
    dest = tmp_path / "x.gz"
    with pytest.raises(CnnlabError, match="download of x.gz failed") as err:
        fetch([dead_url, base + "absent.gz"], dest, "0" * 32, timeout=5)
    assert "HTTP 404" in str(err.value) and f"put it at {dest}" in str(err.value)
    assert list(tmp_path.iterdir()) == [tmp_path / "served"]


def test_fetch_refuses_to_overwrite_wrong_existing_file(dead_url, tmp_path):
    dest = tmp_path / "mine.tar.gz"
    dest.write_bytes(b"user data")
    with pytest.raises(CnnlabError, match="mine.tar.gz exists but its MD5"):
        fetch(dead_url, dest, "0" * 32, timeout=5)
    assert dest.read_bytes() == b"user data"


def test_extract_places_archive_contents(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f.txt").write_text("hello")
    archive = make_tar_gz(tmp_path / "a.tar.gz", src, "top")
    dest = tmp_path / "dest"
    assert safe_extract_tar(archive, dest) == [dest / "top"]
    assert (dest / "top" / "sub" / "f.txt").read_text() == "hello"
    assert leftovers(dest) == []
    with pytest.raises(CnnlabError, match="top already exist"):
        safe_extract_tar(archive, dest)


def test_extract_refuses_corrupt_archives(tmp_path):
    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(os.urandom(2048))
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(100_000))
    whole = make_tar_gz(tmp_path / "whole.tar.gz", src, "top").read_bytes()
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(whole[: len(whole) // 2])
    for archive in (garbage, truncated):
        dest = tmp_path / f"dest-{archive.stem}"
        with pytest.raises(CnnlabError, match=f"cannot extract {archive}"):
            safe_extract_tar(archive, dest)
        assert list(dest.iterdir()) == []  # nothing half-written


def _tar_with(archive: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        member.size = len(data) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return archive


def test_extract_refuses_path_traversal(tmp_path):
    archive = _tar_with(tmp_path / "evil.tar.gz", tarfile.TarInfo("../evil"), b"pwned")
    dest = tmp_path / "dest"
    with pytest.raises(CnnlabError, match="evil.tar.gz"):
        safe_extract_tar(archive, dest)
    assert not (tmp_path / "evil").exists() and list(dest.iterdir()) == []


def test_extract_refuses_links_outside(tmp_path):
    link = tarfile.TarInfo("escape")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    archive = _tar_with(tmp_path / "link.tar.gz", link)
    with pytest.raises(CnnlabError, match="link.tar.gz"):
        safe_extract_tar(archive, tmp_path / "dest")
    assert list((tmp_path / "dest").iterdir()) == []


# ---------------------------------------------------------------- cifar.py

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


# ---------------------------------------------------------------- idx.py

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


def test_the_registry_names_every_official_dataset_and_loads_each_by_name(tmp_path, monkeypatch):
    """``--data NAME`` resolves through the registry alone: names, shapes, loaders, the hints."""
    from cnnlab.data.registry import DATASETS, official
    from cnnlab.data.sources import load_dataset
    assert list(DATASETS) == ["cifar10", "cifar100", "mnist", "fashion-mnist"]
    assert official("cifar10") is DATASETS["cifar10"] and official("./cifar10") is None
    (tmp_path / "mnist").mkdir()
    monkeypatch.chdir(tmp_path)
    assert official("mnist") is None            # a folder of that name is read as the folder
    monkeypatch.chdir(Path(__file__).parent)
    calls = []
    monkeypatch.setitem(DATASETS, "cifar10", dataclasses.replace(
        DATASETS["cifar10"], load=lambda root, download: calls.append((root, download)) or "loaded"))
    assert load_dataset("cifar10", data_dir=tmp_path, download=False) == "loaded"
    assert calls == [(tmp_path, False)]
    from cnnlab.core.config import Config
    from cnnlab.engine.prepare import check_config
    with pytest.raises(CnnlabError, match="cifar10 is always 32x32"):
        check_config(Config(data="cifar10", image_size=64))
    with pytest.raises(CnnlabError, match="did you mean 'fashion-mnist'.*use one of cifar10, cifar100, mnist, "
                                          "fashion-mnist"):
        load_dataset("fashion-mnst", data_dir=tmp_path)


def test_cnnlab_data_list_prints_the_registry():
    import json
    import subprocess
    import sys

    from cnnlab.data.registry import DATASETS
    out = subprocess.run([sys.executable, "-m", "cnnlab", "data", "list", "--json"], capture_output=True,
                         text=True, check=True).stdout
    assert [(r["name"], tuple(r["image_shape"])) for r in json.loads(out)] == \
        [(d.name, d.image_shape) for d in DATASETS.values()]


# ---------------------------------------------------------------- --data-dir: DIR or DIR/<dataset>, untouched

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


@pytest.mark.parametrize("kind", ["mnist", "fashion-mnist", "cifar10", "cifar100"])
def test_missing_dataset_leaves_dir_untouched_and_names_both_places(tmp_path, kind):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"\xff\xd8 not really")
    (tmp_path / "readme.txt").write_text("mine")
    before = tree(tmp_path)
    with pytest.raises(CnnlabError) as err:
        from cnnlab.data.registry import DATASETS
        DATASETS[kind].load(tmp_path, False)
    msg = str(err.value)
    both = (f"in {tmp_path / kind} and in {tmp_path}:", f"in {tmp_path} and in {tmp_path / kind}:")
    assert f"{kind} not found" in msg and any(b in msg for b in both), msg
    assert "\n" not in msg
    assert tree(tmp_path) == before


@pytest.mark.parametrize("kind", ["fashion-mnist", "cifar10"])
def test_failed_download_leaves_dir_untouched(tmp_path, monkeypatch, dead_url, kind):
    """The issue's case: no files, the download fails, and no empty DIR/<kind>/ is left behind."""
    if kind == "cifar10":
        monkeypatch.setattr(cifar, "_BASE_URL", dead_url + "/")
    else:
        monkeypatch.setitem(idx.IDX_KINDS, kind, dataclasses.replace(idx.IDX_KINDS[kind], mirrors=(dead_url + "/",)))
    (tmp_path / "readme.txt").write_text("mine")
    before = tree(tmp_path)
    with pytest.raises(CnnlabError, match="download of .* failed"):
        from cnnlab.data.registry import DATASETS
        DATASETS[kind].load(tmp_path, True)
    assert tree(tmp_path) == before


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


def test_fashion_mnist_gz_files_directly_in_data_dir_through_load_dataset(tmp_path):
    """`--data fashion-mnist --data-dir DIR` with the four official .gz files directly in DIR."""
    from cnnlab.data.sources import load_dataset
    w = write_idx_set(tmp_path, gz_names=IDX_NAMES)
    before = tree(tmp_path)
    ds = load_dataset("fashion-mnist", data_dir=tmp_path)
    np.testing.assert_array_equal(ds.test.images[..., 0], w["test"][0])
    assert tree(tmp_path) == before and not (tmp_path / "fashion-mnist").exists()
