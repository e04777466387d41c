"""data/download.py: where data lives, fetching from mirrors (a real HTTP server on 127.0.0.1,
so nothing touches the network), checksums, and safe extraction of archives."""
from __future__ import annotations

import hashlib
import io
import os
import socket
import tarfile
import threading
from pathlib import Path

import pytest

from cnnlab.core.errors import CnnlabError
from cnnlab.data.download import default_data_dir, fetch, md5sum, safe_extract_tar
from conftest import make_tar_gz


def md5_of(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def leftovers(folder: Path) -> list[str]:
    """Hidden temporary files or folders a failed step might leave."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


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


@pytest.fixture
def half_served():
    """start(announce) -> the URL of a server that sends 5,000 of a 10,000-byte file and hangs
    up, with a Content-Length of 10,000 or (announce False) none, as HTTP/1.0 allows."""
    listeners = []

    def start(announce: bool) -> str:
        sock = socket.create_server(("127.0.0.1", 0))
        listeners.append(sock)

        def answer():
            with sock.accept()[0] as conn:
                conn.recv(65536)
                length = b"Content-Length: 10000\r\n" if announce else b""
                conn.sendall(b"HTTP/1.0 200 OK\r\n" + length + b"\r\n" + b"x" * 5000)
        threading.Thread(target=answer, daemon=True).start()
        return f"http://127.0.0.1:{sock.getsockname()[1]}/a.tar.gz"
    yield start
    for sock in listeners:
        sock.close()


@pytest.mark.parametrize("announce, message", [
    (True, "download of a.tar.gz failed ({url}: cut short: expected 10,000 bytes, got 5,000)"),
    (False, "{url} gave MD5 " + md5_of(b"x" * 5000) + " after 5,000 bytes with no Content-Length to check: "
            "perhaps cut short"),
])
def test_a_download_cut_short_says_so(half_served, tmp_path, announce, message):
    url = half_served(announce)
    dest = tmp_path / "out" / "a.tar.gz"
    with pytest.raises(CnnlabError) as err:
        fetch(url, dest, md5_of(b"x" * 10000), timeout=5)
    assert message.format(url=url) in str(err.value)
    assert not dest.parent.exists()   # nothing half-written left, not even the folder


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
