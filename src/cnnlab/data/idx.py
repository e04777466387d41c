"""MNIST and Fashion-MNIST from the official IDX files.

The four files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``) live in ``root/<kind>/``, e.g.
``root/mnist/`` or ``root/fashion-mnist/``, each either gzipped (the published ``.gz``) or
already decompressed; the plain file is preferred when both exist. Files already present are
used as found (their structure is validated, not their checksum, so a decompressed copy
works); missing ones are downloaded as ``.gz`` and checked against the published MD5s.

IDX format (http://yann.lecun.com/exdb/mnist/): two zero bytes, a type code, the number of
dimensions, then one big-endian uint32 per dimension, then the values, big-endian, row-major.
"""
from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnlab.core.errors import CnnlabError
from cnnlab.data.dataset import Dataset, Split
from cnnlab.data.download import default_data_dir, fetch

__all__ = ["load_idx_dataset", "read_idx", "IDX_KINDS"]

# IDX type code -> element type, big-endian as the format stores it.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
_SIDE = 28  # MNIST and Fashion-MNIST images are 28x28 greyscale

SPLIT_FILES = {  # split -> (images file, labels file), names without ".gz"
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class IdxSpec:
    class_names: tuple[str, ...]
    mirrors: tuple[str, ...]     # base URLs, tried in order; the file name is appended
    md5: dict[str, str]          # published MD5 of each ".gz" file


IDX_KINDS: dict[str, IdxSpec] = {
    "mnist": IdxSpec(
        class_names=tuple(str(d) for d in range(10)),
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/",
                 "http://yann.lecun.com/exdb/mnist/"),
        md5={
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        }),
    "fashion-mnist": IdxSpec(
        class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                     "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                 "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"),
        md5={
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        }),
}


def _read_bytes(path: Path) -> bytes:
    """The file's content, decompressed when it starts with the gzip magic bytes."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise CnnlabError(f"cannot read {path}: {e}") from e
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise CnnlabError(f"{path} is a damaged gzip file ({e}): delete it and download it "
                          f"again") from e


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in an IDX file (gzipped or not), in native byte order."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise CnnlabError(f"{path} is not an IDX file: header {data[:4].hex() or 'empty'}, expected "
                          f"00 00 <type code {'/'.join(f'{c:02x}' for c in IDX_DTYPES)}> <ndim>")
    dtype, ndim = IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise CnnlabError(f"{path} is truncated: its header declares {ndim} dimensions but the "
                          f"file has {len(data)} bytes")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise CnnlabError(f"{path} has {len(data)} bytes but its header {shape} of {dtype.name} "
                          f"needs {expected}: the file is truncated or damaged; delete it and "
                          f"download it again")
    values = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return values.astype(dtype.newbyteorder("="), copy=True)


def _find_or_fetch(folder: Path, name: str, spec: IdxSpec, download: bool) -> Path:
    for candidate in (folder / name, folder / (name + ".gz")):
        if candidate.is_file():
            return candidate
    gz = name + ".gz"
    if not download:
        raise CnnlabError(f"{name} not found in {folder}: place {gz} (from {spec.mirrors[0]}{gz}) "
                          f"or its decompressed form there, or allow downloading")
    return fetch([base + gz for base in spec.mirrors], folder / gz, spec.md5[gz])


def _read_split(folder: Path, split: str, spec: IdxSpec, download: bool) -> Split:
    image_name, label_name = SPLIT_FILES[split]
    image_path = _find_or_fetch(folder, image_name, spec, download)
    label_path = _find_or_fetch(folder, label_name, spec, download)
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.dtype != np.uint8 or images.shape[1:] != (_SIDE, _SIDE):
        raise CnnlabError(f"{image_path} holds {images.dtype} {images.shape}, expected uint8 "
                          f"(N, {_SIDE}, {_SIDE}) images")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise CnnlabError(f"{label_path} holds {labels.dtype} {labels.shape}, expected uint8 (N,) "
                          f"labels")
    if len(images) != len(labels):
        raise CnnlabError(f"{image_path} has {len(images)} images but {label_path} has "
                          f"{len(labels)} labels: the files come from different releases")
    k = len(spec.class_names)
    if len(labels) and labels.max() >= k:
        raise CnnlabError(f"{label_path} has label {labels.max()}, expected 0..{k - 1}")
    return Split(images[..., None], labels.astype(np.int64))  # (N, 28, 28, 1)


def load_idx_dataset(kind: str, root: str | Path | None, download: bool = True) -> Dataset:
    """MNIST (``kind="mnist"``) or Fashion-MNIST (``"fashion-mnist"``) from ``root/<kind>/``.

    ``root`` of ``None`` means the default data directory. Missing files are downloaded when
    ``download`` is true.
    """
    if kind not in IDX_KINDS:
        raise CnnlabError(f"unknown IDX dataset {kind!r}: expected one of {', '.join(IDX_KINDS)}")
    spec = IDX_KINDS[kind]
    folder = default_data_dir(root) / kind
    train = _read_split(folder, "train", spec, download)
    test = _read_split(folder, "test", spec, download)
    return Dataset(name=kind, class_names=list(spec.class_names), train=train, test=test)
