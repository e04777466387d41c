"""CIFAR-10 and CIFAR-100 from the official "python version" archives.

Lookup in ``root`` and ``root/<kind>/`` (e.g. ``root/cifar10/``): the extracted folder
(``cifar-10-batches-py/`` or ``cifar-100-python/``), or its files directly in either, are used as
they are; else the archive (``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``) is
checked against its MD5 and read in place, without extracting (a second or so for CIFAR-10;
extract it yourself to save that); else it is downloaded from the authors' site into ``root``
and extracted there. Nothing is written into ``root`` unless it downloads.

The batches are Python 2 pickles. Unpickling can run arbitrary code, so they are read with an
unpickler that only resolves the handful of NumPy names a CIFAR batch contains and refuses
everything else.
"""
from __future__ import annotations

import codecs
import io
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from cnnlab.core.errors import CnnlabError
from cnnlab.data.dataset import Dataset, Split
from cnnlab.data.download import _reason, default_data_dir, fetch, safe_extract_tar

__all__ = ["load_cifar", "CIFAR_KINDS", "read_cifar_pickle"]

# Images are 32x32 RGB, each row 3072 bytes: 1024 red, then 1024 green, then 1024 blue,
# each plane row-major (https://www.cs.toronto.edu/~kriz/cifar.html).
_SIDE = 32
_CHANNELS = 3
_ROW_BYTES = _CHANNELS * _SIDE * _SIDE
_BASE_URL = "https://www.cs.toronto.edu/~kriz/"


@dataclass(frozen=True)
class CifarSpec:
    archive: str           # file name of the official archive
    md5: str               # published MD5 of the archive
    folder: str            # top-level folder inside the archive
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    names_key: str         # key of the class-name list in the meta pickle
    labels_key: str        # key of the label list in each batch

    @property
    def urls(self) -> list[str]:
        return [_BASE_URL + self.archive]


CIFAR_KINDS: dict[str, CifarSpec] = {
    "cifar10": CifarSpec(
        archive="cifar-10-python.tar.gz", md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)), test_files=("test_batch",),
        meta_file="batches.meta", names_key="label_names", labels_key="labels"),
    "cifar100": CifarSpec(
        archive="cifar-100-python.tar.gz", md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python",
        train_files=("train",), test_files=("test",),
        meta_file="meta", names_key="fine_label_names", labels_key="fine_labels"),
}


def _latin1_encode(text, encoding="latin1", errors="strict"):
    # Python 3 writes bytes into protocol-2 pickles as _codecs.encode(text, "latin1"); only
    # that exact use is let through, not arbitrary codecs.
    if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1" or errors != "strict":
        raise pickle.UnpicklingError("unexpected _codecs.encode call")
    return text.encode("latin1")


def _empty_bytes():
    # Python 3 writes b"" into protocol-2 pickles as bytes(); no other call is allowed.
    return b""


# numpy's array reconstructor, taken from an array rather than imported from numpy.core
# (renamed numpy._core in NumPy 2, with a deprecation warning on the old name).
_RECONSTRUCT = np.zeros(0).__reduce__()[0]

# (module, name) -> object: everything a CIFAR batch written by Python 2 (or by Python 3
# with protocol 2) refers to. Both NumPy module spellings map to the same objects.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("builtins", "bytes"): _empty_bytes,
}


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the names in ``_ALLOWED``."""

    def __init__(self, file, source: Path):
        # latin1 maps Python 2 byte strings (including NumPy's raw array data) one to one.
        super().__init__(file, encoding="latin1")
        self._source = source

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise CnnlabError(f"refusing to unpickle {module}.{name} from {self._source}: not a "
                              f"CIFAR batch (the file may be tampered with); delete it and use "
                              f"the official archive") from None


def _key(k) -> str:
    return k.decode("latin1") if isinstance(k, bytes) else k


def read_cifar_pickle(path: str | Path, data: bytes | None = None) -> dict[str, object]:
    """A CIFAR batch or meta file as a dict with ``str`` keys, read without running code.
    ``data``: the file's bytes when already read (from an archive; ``path`` names it)."""
    path = Path(path)
    try:
        with (open(path, "rb") if data is None else io.BytesIO(data)) as f:
            obj = _CifarUnpickler(f, path).load()
    except CnnlabError:
        raise
    except OSError as e:
        raise CnnlabError(f"cannot read {path}: {e}") from e
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise CnnlabError(f"{path} is not a readable CIFAR batch ({type(e).__name__}: {e}): "
                          f"delete the folder it is in and extract the official archive "
                          f"again") from e
    if not isinstance(obj, dict):
        raise CnnlabError(f"{path} holds a {type(obj).__name__}, expected a CIFAR batch dict")
    return {_key(k): v for k, v in obj.items()}


# Member name -> (its content as read_cifar_pickle returns it, how messages name it).
Members = Callable[[str], tuple[dict[str, object], Path]]


def _folder_members(folder: Path) -> Members:
    return lambda name: (read_cifar_pickle(folder / name), folder / name)


def _archive_members(archive: Path, spec: CifarSpec) -> Members:
    """Every file a CIFAR load needs, read from the archive in one pass, nothing written."""
    names = (spec.meta_file, *spec.train_files, *spec.test_files)
    wanted = {f"{spec.folder}/{n}": n for n in names}
    read: dict[str, tuple[dict[str, object], Path]] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = wanted.get(member.name.removeprefix("./"))
                if name is None or name in read:
                    continue
                f = tar.extractfile(member) if member.isfile() else None
                if f is None:
                    raise CnnlabError(f"{archive}: {member.name} is not a regular file: not the official "
                                      f"archive; delete it and retry")
                shown = Path(f"{archive}:{member.name}")
                read[name] = (read_cifar_pickle(shown, f.read()), shown)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        # EOFError/zlib.error: a truncated or damaged compressed stream.
        why = _reason(e).splitlines()[0].rstrip(":")   # tarfile's ReadError lists each method tried
        raise CnnlabError(f"cannot read {archive}: {why}; the archive is corrupt or truncated: delete "
                          f"it and retry, or replace it with the official file") from e
    missing = [n for n in names if n not in read]
    if missing:
        raise CnnlabError(f"{archive} lacks {', '.join(spec.folder + '/' + n for n in missing)}: not the "
                          f"official archive; delete it and retry")
    return read.__getitem__


def _read_batch(batch: dict[str, object], path: Path, labels_key: str,
                num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 32, 32, 3) uint8 and labels (N,) int64 from one batch file."""
    missing = [k for k in ("data", labels_key) if k not in batch]
    if missing:
        raise CnnlabError(f"{path} has no {' or '.join(repr(k) for k in missing)} entry (found "
                          f"{', '.join(sorted(map(repr, batch))) or 'nothing'}): not a CIFAR batch")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != _ROW_BYTES:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise CnnlabError(f"{path}: 'data' is {desc}, expected uint8 (N, {_ROW_BYTES})")
    try:
        labels = np.asarray(batch[labels_key], dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise CnnlabError(f"{path}: {labels_key!r} is not a list of integers ({e})") from e
    if labels.shape != (len(data),):
        raise CnnlabError(f"{path}: {len(data)} images but {labels_key!r} has shape {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise CnnlabError(f"{path}: labels range {labels.min()}..{labels.max()}, expected "
                          f"0..{num_classes - 1}")
    # (N, 3072) -> (N, C, H, W) planes -> (N, H, W, C)
    images = data.reshape(-1, _CHANNELS, _SIDE, _SIDE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _read_split(members: Members, files: tuple[str, ...], spec: CifarSpec, num_classes: int) -> Split:
    parts = [_read_batch(*members(name), spec.labels_key, num_classes) for name in files]
    return Split(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


def _class_names(meta: dict[str, object], path: Path, key: str) -> list[str]:
    names = meta.get(key)
    if not isinstance(names, (list, tuple)) or not names \
            or not all(isinstance(n, (str, bytes)) for n in names):
        raise CnnlabError(f"{path} has no list of class names under {key!r}: not a CIFAR meta file")
    return [n.decode("utf-8") if isinstance(n, bytes) else n for n in names]


def _locate(kind: str, spec: CifarSpec, root: Path, download: bool) -> Members:
    """Where the batches are: an extracted folder, a folder holding the files, or the archive,
    in ``root`` or ``root/<kind>/``; else downloaded into ``root``."""
    names = (spec.meta_file, *spec.train_files, *spec.test_files)
    places = (root, root / kind)
    for folder in (place / spec.folder for place in places):
        if folder.is_dir():
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise CnnlabError(f"{folder} lacks {', '.join(missing)}: the folder is incomplete; delete "
                                  f"it so that {spec.archive} is extracted again")
            return _folder_members(folder)
    for place in places:
        if all((place / n).is_file() for n in names):
            return _folder_members(place)
    for archive in (place / spec.archive for place in places):
        if archive.exists():
            fetch(spec.urls, archive, spec.md5)   # verifies it; raises on a wrong checksum
            return _archive_members(archive, spec)
    if not download:
        raise CnnlabError(f"{kind} not found: looked for {spec.folder}/, its files, or {spec.archive} in "
                          f"{places[0]} and in {places[1]}: place the official archive (from {spec.urls[0]}) "
                          f"or its extracted folder in either, or allow downloading")
    archive = fetch(spec.urls, root / spec.archive, spec.md5)
    safe_extract_tar(archive, root)
    folder = root / spec.folder
    if not folder.is_dir():
        raise CnnlabError(f"{archive} did not contain {spec.folder}/: not the official archive; "
                          f"delete it and retry")
    return _folder_members(folder)


def load_cifar(kind: str, root: str | Path | None, download: bool = True) -> Dataset:
    """CIFAR-10 (``kind="cifar10"``) or CIFAR-100 (``"cifar100"``, fine labels) from ``root``.

    ``root`` (``None``: the default data directory) or ``root/<kind>/`` holds the archive
    and/or its extracted folder. Missing files are downloaded when ``download`` is true.
    """
    if kind not in CIFAR_KINDS:
        raise CnnlabError(f"unknown CIFAR dataset {kind!r}: expected one of "
                          f"{', '.join(CIFAR_KINDS)}")
    spec = CIFAR_KINDS[kind]
    members = _locate(kind, spec, default_data_dir(root), download)
    class_names = _class_names(*members(spec.meta_file), spec.names_key)
    train = _read_split(members, spec.train_files, spec, len(class_names))
    test = _read_split(members, spec.test_files, spec, len(class_names))
    return Dataset(name=kind, class_names=class_names, train=train, test=test)
