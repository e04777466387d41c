"""Atomic file writes: temp file in the same folder, flush and fsync, then rename.

A crash or a full disk part-way leaves the previous version of the file intact and no
temp file behind (a process killed with SIGKILL mid-write can leave one; ``discard_temps``
removes them). Every file in a run folder is written through here.
"""
from __future__ import annotations

import json
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from cnnlab.core.errors import CnnlabError

_TEMP_SUFFIX = ".tmp"


def _temp_name(path: Path) -> str:
    return f".{path.name}.{secrets.token_hex(4)}{_TEMP_SUFFIX}"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path to write; on success it replaces ``path``, on failure it vanishes.

    An ``OSError`` (disk full, permission denied) becomes a ``CnnlabError`` naming the file.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            tmp_path = path.parent / _temp_name(path)
            try:
                # 0o666 less the umask, as a plain open() would give (mkstemp gives 0o600).
                os.close(os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                break
            except FileExistsError:
                continue
    except OSError as e:
        raise CnnlabError(f"could not write {path}: {e.strerror or e}") from e
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except OSError as e:
        raise CnnlabError(f"could not write {path}: {e.strerror or e}; its previous version, if any, "
                          f"is unchanged") from e
    finally:
        tmp_path.unlink(missing_ok=True)


def discard_temps(folder: str | Path, name: str) -> None:
    """Remove temp files an earlier process left behind while writing ``folder/name``."""
    for stale in Path(folder).glob(f".{name}.*{_TEMP_SUFFIX}"):
        stale.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename is still atomic
    finally:
        os.close(fd)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_text(path: str | Path, text: str) -> None:
    # surrogateescape: a file name that is not UTF-8 (Python reads its bytes as surrogates) is
    # written back as those bytes, the name it has on disk.
    write_bytes(path, text.encode("utf-8", "surrogateescape"))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, allow_nan=True) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())
