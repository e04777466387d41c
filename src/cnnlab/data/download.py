"""Getting official files onto disk (datasets, model weights): where they live, fetching them,
unpacking them.

Every file is checked against its published checksum (a dataset's MD5, a weights file's
SHA-256) before use; a download lands in a temporary
file beside its destination and is renamed into place only once verified, and an archive is
extracted into a temporary folder and moved into place only once complete, so an interrupted
or failed step never leaves a half-written file where a later run would trust it.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import secrets
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cnnlab.core.errors import CnnlabError

__all__ = ["Checksum", "default_data_dir", "md5sum", "sha256sum", "fetch", "safe_extract_tar"]

DATA_ENV = "CNNLAB_DATA"
_CHUNK = 1 << 20  # bytes read per step when hashing or downloading
_USER_AGENT = "cnnlab-dataset-fetch"


def default_data_dir(data_dir: str | Path | None = None) -> Path:
    """Where datasets live: ``data_dir`` if given, else ``$CNNLAB_DATA``, else a user cache.

    The cache is ``$XDG_CACHE_HOME/cnnlab/data``, or ``~/.cache/cnnlab/data`` when that
    variable is unset. The folder is not created here.
    """
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(cache).expanduser() if cache else Path.home() / ".cache"
    return base / "cnnlab" / "data"


# A published SHA-256 is sometimes only its first hex digits (torchvision's file names carry 8).
MIN_PREFIX = 8


@dataclass(frozen=True)
class Checksum:
    """What a file must hash to: ``algorithm`` "md5" or "sha256", and the published hex digest
    (for SHA-256, possibly its first ``MIN_PREFIX`` or more digits)."""
    algorithm: str
    hexdigest: str

    def __post_init__(self):
        full = {"md5": 32, "sha256": 64}.get(self.algorithm)
        digits = self.hexdigest.lower()
        if full is None or not all(c in "0123456789abcdef" for c in digits) or not (
                len(digits) == full or (self.algorithm == "sha256" and MIN_PREFIX <= len(digits) < full)):
            raise ValueError(f"not a published {self.algorithm} digest: {self.hexdigest!r}")
        object.__setattr__(self, "hexdigest", digits)

    @property
    def label(self) -> str:
        return {"md5": "MD5", "sha256": "SHA-256"}[self.algorithm]

    def new(self):
        # Not a security use for MD5: it only matches files against published checksums.
        # usedforsecurity keeps it usable on FIPS-restricted builds.
        return hashlib.new(self.algorithm, usedforsecurity=self.algorithm != "md5")

    def matches(self, actual: str) -> bool:
        return actual.startswith(self.hexdigest)

    def of(self, path: str | Path) -> str:
        """This algorithm's hex digest of a file, read in chunks so large files need little memory."""
        h = self.new()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        return h.hexdigest()


def md5sum(path: str | Path) -> str:
    """Hex MD5 of a file."""
    return Checksum("md5", "0" * 32).of(path)


def sha256sum(path: str | Path) -> str:
    """Hex SHA-256 of a file."""
    return Checksum("sha256", "0" * 64).of(path)


def _progress(total: int | None, name: str):
    """A tqdm bar on stderr when tqdm is installed and stderr is a terminal, else None."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    # disable=None turns the bar off when stderr is not a TTY (logs, CI, tests).
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
                file=sys.stderr, disable=None, leave=False)


class _CutShort(ConnectionError):
    """A body that ended before the length its Content-Length header announced."""


@dataclass(frozen=True)
class _Download:
    tmp: Path              # the temporary file beside the destination
    digest: str            # its hex digest
    size: int              # bytes received
    announced: bool        # whether the server said how many to expect (Content-Length)


def _download_once(url: str, dest: Path, checksum: Checksum, timeout: float) -> _Download:
    """Stream ``url`` into a new temporary file beside ``dest``.

    The temporary file is removed if anything goes wrong.
    """
    # Not mkstemp: its 0600 mode would stick to the dataset file; this honours the umask.
    tmp = dest.parent / f".{dest.name}.{secrets.token_hex(4)}.part"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    ok = False
    try:
        with os.fdopen(fd, "wb") as out:
            request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
            resp = urllib.request.urlopen(request, timeout=timeout)
            with resp:
                length = resp.headers.get("Content-Length")
                bar = _progress(int(length) if length and length.isdigit() else None, dest.name)
                h = checksum.new()
                received = 0
                try:
                    while chunk := resp.read(_CHUNK):
                        out.write(chunk)
                        h.update(chunk)
                        received += len(chunk)
                        if bar is not None:
                            bar.update(len(chunk))
                finally:
                    if bar is not None:
                        bar.close()
                # http.client ends a body cut short like a whole one: count it.
                announced = bool(length and length.isdigit())
                if announced and received != int(length):
                    raise _CutShort(f"cut short: expected {int(length):,} bytes, got {received:,}")
        ok = True
        return _Download(tmp, h.hexdigest(), received, announced)
    finally:
        if not ok:
            tmp.unlink(missing_ok=True)


def _reason(err: BaseException) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return str(err.reason)
    if isinstance(err, _CutShort):
        return str(err)
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def fetch(url_or_urls: str | Sequence[str], dest: str | Path, checksum: str | Checksum, *,
          timeout: float = 60, by_hand: str | None = None) -> Path:
    """Make sure ``dest`` holds the file with ``checksum`` (a str: its MD5), downloading it if absent.

    ``url_or_urls`` is one URL or a list of mirrors tried in order. An existing ``dest`` with
    the right checksum is returned untouched; one with the wrong checksum is an error (it
    may be the user's own file, so it is never overwritten). ``timeout`` is in seconds per
    network operation. ``by_hand`` ends the messages that ask the user to place the file
    themselves (default: "put it at DEST").
    """
    dest = Path(dest).expanduser()
    urls = [url_or_urls] if isinstance(url_or_urls, str) else list(url_or_urls)
    if isinstance(checksum, str):
        checksum = Checksum("md5", checksum)
    want = f"{checksum.label} {checksum.hexdigest}"
    place = by_hand or f"put it at {dest}"
    if dest.exists():
        try:
            actual = checksum.of(dest)
        except OSError as e:
            raise CnnlabError(f"cannot read {dest} to check it: {e}; place the official file "
                              f"({want}) at {dest}") from e
        if checksum.matches(actual):
            return dest
        raise CnnlabError(f"{dest} exists but its {checksum.label} is {actual}, expected {checksum.hexdigest}: "
                          f"it is not the official file (or is incomplete); delete it and retry, or place "
                          f"the official file at {dest}")
    if not urls:
        raise CnnlabError(f"{dest} is missing and no download URL is known: place the official "
                          f"file ({want}) at {dest}")
    # The folders made for the download, outermost first: removed again if it fails, so a
    # failed download leaves the data folder as it was.
    created = [d for d in reversed(dest.parents) if not d.exists()]
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CnnlabError(f"cannot create the folder {dest.parent} for {dest.name}: {e}; choose "
                          f"another data folder with --data-dir or ${DATA_ENV}") from e
    failures: list[str] = []
    mismatches: list[str] = []
    try:
        for url in urls:
            try:
                got = _download_once(url, dest, checksum, timeout)
            except (OSError, ValueError, http.client.HTTPException) as e:
                # OSError covers socket errors, timeouts, URLError and _CutShort; ValueError an
                # unusable URL; HTTPException a connection cut mid-chunk (IncompleteRead).
                failures.append(f"{url}: {_reason(e)}")
                continue
            if not checksum.matches(got.digest):
                got.tmp.unlink(missing_ok=True)
                # Without a Content-Length a body cut short ends like a whole one: its size tells.
                unchecked = "" if got.announced else " with no Content-Length to check: perhaps cut short"
                mismatches.append(f"{url} gave {checksum.label} {got.digest} after {got.size:,} bytes{unchecked}")
                continue
            os.replace(got.tmp, dest)
            created = []
            return dest
    finally:
        for d in reversed(created):
            try:
                d.rmdir()   # only when still empty: never anything another process put there
            except OSError:
                break
    if mismatches:
        raise CnnlabError(f"downloaded {dest.name} has the wrong {checksum.label} (expected {checksum.hexdigest}; "
                          f"{'; '.join(mismatches)}) and was deleted: retry later, or download the "
                          f"official file by hand from {urls[0]} and {place}")
    raise CnnlabError(f"download of {dest.name} failed ({'; '.join(failures)}): check the "
                      f"network, or download the file by hand from {urls[0]} and {place}")


def safe_extract_tar(archive: str | Path, dest: str | Path) -> list[Path]:
    """Unpack a (possibly compressed) tar archive into ``dest``; return the top-level paths.

    Uses tarfile's 'data' filter, which refuses absolute paths, ``..`` members, links that
    leave the destination, and device files. Members are unpacked into a temporary folder
    inside ``dest`` and moved into place only when the whole archive has been read, so a
    corrupt archive leaves nothing behind. An existing top-level entry is never replaced.
    """
    archive, dest = Path(archive).expanduser(), Path(dest).expanduser()
    if not hasattr(tarfile, "data_filter"):
        raise CnnlabError(f"Python {sys.version.split()[0]} lacks tarfile's safe extraction "
                          f"filter needed to unpack {archive}: use Python 3.10.12+, 3.11.4+ or "
                          f"3.12+, or unpack the archive by hand into {dest}")
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{archive.name}.", suffix=".extracting", dir=dest))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                tar.extractall(staging, filter="data")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            # TarError includes the filter's refusals (e.g. OutsideDestinationError);
            # EOFError/zlib.error come from a truncated or damaged compressed stream.
            raise CnnlabError(f"cannot extract {archive}: {_reason(e)}; the archive is corrupt, "
                              f"truncated or unsafe: delete it and retry, or replace it with the "
                              f"official file") from e
        entries = sorted(staging.iterdir())
        if not entries:
            raise CnnlabError(f"{archive} is an empty archive: delete it and retry")
        clashes = [e.name for e in entries if os.path.lexists(dest / e.name)]
        if clashes:
            raise CnnlabError(f"cannot extract {archive}: {', '.join(clashes)} already exist in "
                              f"{dest}; delete them to unpack the archive again")
        placed = []
        for entry in entries:
            os.replace(entry, dest / entry.name)
            placed.append(dest / entry.name)
        return placed
    finally:
        shutil.rmtree(staging, ignore_errors=True)
