"""CIFAR-10 and CIFAR-100 from the official "python version" archives.

Lookup under ``root``: the extracted folder (``cifar-10-batches-py/`` or ``cifar-100-python/``)
is used as is; else the archive (``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``) is
checked against its MD5 and extracted; else it is downloaded from the authors' site.

The batches are Python 2 pickles. Unpickling can run arbitrary code, so they are read with an
unpickler that only resolves the handful of NumPy names a CIFAR batch contains and refuses
everything else.
"""
from __future__ import annotations

import codecs
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnlab.core.errors import CnnlabError
from cnnlab.data.dataset import Dataset, Split
from cnnlab.data.download import default_data_dir, fetch, safe_extract_tar

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


def read_cifar_pickle(path: str | Path) -> dict[str, object]:
    """A CIFAR batch or meta file as a dict with ``str`` keys, read without running code."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
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


def _read_batch(path: Path, labels_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 32, 32, 3) uint8 and labels (N,) int64 from one batch file."""
    batch = read_cifar_pickle(path)
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


def _read_split(folder: Path, files: tuple[str, ...], spec: CifarSpec, num_classes: int) -> Split:
    parts = [_read_batch(folder / name, spec.labels_key, num_classes) for name in files]
    return Split(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


def _class_names(path: Path, key: str) -> list[str]:
    meta = read_cifar_pickle(path)
    names = meta.get(key)
    if not isinstance(names, (list, tuple)) or not names \
            or not all(isinstance(n, (str, bytes)) for n in names):
        raise CnnlabError(f"{path} has no list of class names under {key!r}: not a CIFAR meta file")
    return [n.decode("utf-8") if isinstance(n, bytes) else n for n in names]


def _ensure_folder(spec: CifarSpec, root: Path, download: bool) -> Path:
    folder = root / spec.folder
    if folder.is_dir():
        return folder
    archive = root / spec.archive
    if not archive.exists() and not download:
        raise CnnlabError(f"{spec.folder}/ not found in {root}: place the official archive at "
                          f"{archive} (from {spec.urls[0]}) or its extracted folder at {folder}, "
                          f"or allow downloading")
    # Verifies an existing archive, or downloads it; raises on a wrong checksum either way.
    fetch(spec.urls, archive, spec.md5)
    safe_extract_tar(archive, root)
    if not folder.is_dir():
        raise CnnlabError(f"{archive} did not contain {spec.folder}/: not the official archive; "
                          f"delete it and retry")
    return folder


def load_cifar(kind: str, root: str | Path | None, download: bool = True) -> Dataset:
    """CIFAR-10 (``kind="cifar10"``) or CIFAR-100 (``"cifar100"``, fine labels) from ``root``.

    ``root`` holds the archive and/or its extracted folder (``None``: the default data
    directory). Missing files are downloaded when ``download`` is true.
    """
    if kind not in CIFAR_KINDS:
        raise CnnlabError(f"unknown CIFAR dataset {kind!r}: expected one of "
                          f"{', '.join(CIFAR_KINDS)}")
    spec = CIFAR_KINDS[kind]
    root = default_data_dir(root)
    folder = _ensure_folder(spec, root, download)
    missing = [n for n in (spec.meta_file, *spec.train_files, *spec.test_files)
               if not (folder / n).is_file()]
    if missing:
        raise CnnlabError(f"{folder} lacks {', '.join(missing)}: the folder is incomplete; delete "
                          f"it so that {spec.archive} is extracted again")
    class_names = _class_names(folder / spec.meta_file, spec.names_key)
    train = _read_split(folder, spec.train_files, spec, len(class_names))
    test = _read_split(folder, spec.test_files, spec, len(class_names))
    return Dataset(name=kind, class_names=class_names, train=train, test=test)
