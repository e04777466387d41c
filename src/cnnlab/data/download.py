"""Getting official dataset files onto disk: where they live, fetching them, unpacking them.

Every file is checked against its published MD5 before use; a download lands in a temporary
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
from pathlib import Path

from cnnlab.core.errors import CnnlabError

__all__ = ["default_data_dir", "md5sum", "fetch", "safe_extract_tar"]

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


def _new_md5():
    # Not a security use: MD5 only matches files against their published checksums.
    # usedforsecurity keeps it usable on FIPS-restricted builds.
    return hashlib.md5(usedforsecurity=False)


def md5sum(path: str | Path) -> str:
    """Hex MD5 of a file, read in chunks so large archives need little memory."""
    h = _new_md5()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _progress(total: int | None, name: str):
    """A tqdm bar on stderr when tqdm is installed and stderr is a terminal, else None."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    # disable=None turns the bar off when stderr is not a TTY (logs, CI, tests).
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
                file=sys.stderr, disable=None, leave=False)


def _download_once(url: str, dest: Path, timeout: float) -> tuple[Path, str]:
    """Stream ``url`` into a new temporary file beside ``dest``; return it and its MD5.

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
                h = _new_md5()
                try:
                    while chunk := resp.read(_CHUNK):
                        out.write(chunk)
                        h.update(chunk)
                        if bar is not None:
                            bar.update(len(chunk))
                finally:
                    if bar is not None:
                        bar.close()
        ok = True
        return tmp, h.hexdigest()
    finally:
        if not ok:
            tmp.unlink(missing_ok=True)


def _reason(err: BaseException) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return str(err.reason)
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def fetch(url_or_urls: str | Sequence[str], dest: str | Path, md5: str, *,
          timeout: float = 60) -> Path:
    """Make sure ``dest`` holds the file with MD5 ``md5``, downloading it if absent.

    ``url_or_urls`` is one URL or a list of mirrors tried in order. An existing ``dest`` with
    the right checksum is returned untouched; one with the wrong checksum is an error (it
    may be the user's own file, so it is never overwritten). ``timeout`` is in seconds per
    network operation.
    """
    dest = Path(dest).expanduser()
    urls = [url_or_urls] if isinstance(url_or_urls, str) else list(url_or_urls)
    md5 = md5.lower()
    if dest.exists():
        try:
            actual = md5sum(dest)
        except OSError as e:
            raise CnnlabError(f"cannot read {dest} to check it: {e}; place the official file "
                              f"(MD5 {md5}) at {dest}") from e
        if actual == md5:
            return dest
        raise CnnlabError(f"{dest} exists but its MD5 is {actual}, expected {md5}: it is not the "
                          f"official file (or is incomplete); delete it and retry, or place the "
                          f"official file at {dest}")
    if not urls:
        raise CnnlabError(f"{dest} is missing and no download URL is known: place the official "
                          f"file (MD5 {md5}) at {dest}")
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
                tmp, actual = _download_once(url, dest, timeout)
            except (OSError, ValueError, http.client.HTTPException) as e:
                # OSError covers socket errors, timeouts and URLError; ValueError an unusable
                # URL; HTTPException a connection cut mid-body (IncompleteRead).
                failures.append(f"{url}: {_reason(e)}")
                continue
            if actual != md5:
                tmp.unlink(missing_ok=True)
                mismatches.append(f"{url} gave MD5 {actual}")
                continue
            os.replace(tmp, dest)
            created = []
            return dest
    finally:
        for d in reversed(created):
            try:
                d.rmdir()   # only when still empty: never anything another process put there
            except OSError:
                break
    if mismatches:
        raise CnnlabError(f"downloaded {dest.name} has the wrong MD5 (expected {md5}; "
                          f"{'; '.join(mismatches)}) and was deleted: delete it and retry, or "
                          f"place the official file at {dest}")
    raise CnnlabError(f"download of {dest.name} failed ({'; '.join(failures)}): check the "
                      f"network, or download the file by hand from {urls[0]} and put it at {dest}")


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
