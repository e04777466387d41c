"""MNIST and Fashion-MNIST from the official IDX files.

The four files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``) are looked for in ``root/<kind>/``
(e.g. ``root/fashion-mnist/``, where downloads go) and then in ``root`` itself (as the official
repositories and Linux packages lay them out), each either gzipped (the published ``.gz``) or
already decompressed; the plain file is preferred when both exist, and the first folder that
holds all four is used. Files already present are used as found (their structure is
validated, not their checksum, so a decompressed copy works), except that a ``.gz`` whose MD5
is the other dataset's published one is refused: the two share their file names. Nothing is
written unless files are missing and may be downloaded: they are then fetched as ``.gz`` into
``root/<kind>/`` and checked against the published MD5s.

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
from cnnlab.data.download import default_data_dir, fetch, md5sum

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


def _present(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / (name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _refuse_other_kind(kind: str, paths: list[Path]) -> None:
    """MNIST and Fashion-MNIST share file names: a published .gz of the other one is refused."""
    theirs = {md5: (other, name) for other, spec in IDX_KINDS.items() if other != kind
              for name, md5 in spec.md5.items()}
    for path in paths:
        if path.suffix == ".gz" and (hit := theirs.get(md5sum(path))):
            other, name = hit
            raise CnnlabError(f"{path} is {other}'s {name}, not {kind}'s (its MD5 is {other}'s published one): "
                              f"use --data {other}, or put {kind}'s files in {path.parent / kind}")


def _locate(kind: str, root: Path, download: bool) -> dict[str, Path]:
    """File name (without .gz) -> path, from the first folder that holds all four; else the
    missing ones downloaded into ``root/<kind>/``."""
    spec = IDX_KINDS[kind]
    names = [n for pair in SPLIT_FILES.values() for n in pair]
    places = (root / kind, root)
    found = {place: {n: p for n in names if (p := _present(place, n)) is not None} for place in places}
    for place in places:
        if len(found[place]) == len(names):
            _refuse_other_kind(kind, list(found[place].values()))
            return found[place]
    if not download:
        partial = "".join(f"; {place} has {len(have)} of the 4, lacking {', '.join(n for n in names if n not in have)}"
                          for place, have in found.items() if have)
        raise CnnlabError(f"{kind} not found: looked for {', '.join(names)} (each .gz or decompressed) in "
                          f"{places[0]} and in {places[1]}{partial}: put the four files (from "
                          f"{spec.mirrors[0]}) in either folder, or allow downloading")
    folder = places[0]
    have = found[folder]
    _refuse_other_kind(kind, list(have.values()))
    return {n: have.get(n) or fetch([base + n + ".gz" for base in spec.mirrors], folder / (n + ".gz"),
                                    spec.md5[n + ".gz"]) for n in names}


def _read_split(image_path: Path, label_path: Path, spec: IdxSpec) -> Split:
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
    """MNIST (``kind="mnist"``) or Fashion-MNIST (``"fashion-mnist"``) from ``root/<kind>/``
    or ``root`` itself.

    ``root`` of ``None`` means the default data directory. Missing files are downloaded into
    ``root/<kind>/`` when ``download`` is true; nothing is written otherwise.
    """
    if kind not in IDX_KINDS:
        raise CnnlabError(f"unknown IDX dataset {kind!r}: expected one of {', '.join(IDX_KINDS)}")
    spec = IDX_KINDS[kind]
    paths = _locate(kind, default_data_dir(root), download)
    train, test = (_read_split(paths[SPLIT_FILES[s][0]], paths[SPLIT_FILES[s][1]], spec) for s in ("train", "test"))
    return Dataset(name=kind, class_names=list(spec.class_names), train=train, test=test)
