"""core/files.py: atomic writes: a disk that fills part-way through a checkpoint, or through any
run file, leaves the previous version whole and no temporary file."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from cnnlab.cli import main
from cnnlab.core.errors import CnnlabError
from cnnlab.engine import checkpoint as ckpt
from cnnlab.engine.checkpoint import loop_state

pytestmark = pytest.mark.usefixtures("restore_threads")   # in-process runs set torch's threads


class _DiskFullWriter:
    """A file whose write stores the first half of the data, then fails as a full disk does."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[:len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_disk_full_half_way_through_a_checkpoint_keeps_the_previous_one(tiny_cifar, tmp_path,
                                                                         monkeypatch, capsys):
    from cnnlab.core import files as fileio
    writes = []

    def open_filling_the_disk(file, mode="r", *a, **k):
        f = open(file, mode, *a, **k)
        if "w" in mode and Path(file).name.startswith(".last.safetensors"):
            writes.append(file)
            if len(writes) == 3:
                return _DiskFullWriter(f)
        return f
    monkeypatch.setattr(fileio, "open", open_filling_the_disk, raising=False)
    run = tmp_path / "full"
    code = main(["train", "--data", str(tiny_cifar), "--out", str(run), "--train-size", "60", "--epochs", "1",
                 "--checkpoint-every", "1", "--batch-size", "16", "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and "Traceback" not in err
    assert len(writes) == 3
    assert os.listdir(run / "checkpoints") == ["last.safetensors"]
    tensors, meta = ckpt.read_checkpoint(run / "checkpoints" / "last.safetensors")
    assert loop_state(meta).global_step == 2 and all(t.isfinite().all() for t in tensors.values() if t.is_floating_point())


def test_failed_write_of_any_run_file_leaves_the_old_version(tmp_path, monkeypatch):
    from cnnlab.core import files as fileio
    fileio.write_json(tmp_path / "model.json", {"version": 1})
    monkeypatch.setattr(fileio, "open", lambda file, mode="r", *a, **k: _DiskFullWriter(open(file, mode, *a, **k))
                        if "w" in mode else open(file, mode, *a, **k), raising=False)
    with pytest.raises(CnnlabError, match="No space left on device"):
        fileio.write_json(tmp_path / "model.json", {"version": 2})
    assert fileio.read_json(tmp_path / "model.json") == {"version": 1}
    assert os.listdir(tmp_path) == ["model.json"]
    assert (tmp_path / "model.json").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
