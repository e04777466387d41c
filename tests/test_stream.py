"""data/stream.py: the streaming loader reads a run's saved split, and stops at (or with
--bad-images skip, leaves out) the files that vanished from it."""
from __future__ import annotations

import os

import pytest

from cnnlab.core.config import Config
from cnnlab.core.errors import CnnlabError
from cnnlab.data.listing import list_folder
from cnnlab.data.stream import open_streaming, scan_data_folder


def test_vanished_files_stop_the_streaming_loader_too(flat):
    cfg = Config(data=str(flat), loader="stream", workers=0, val_split=0.0)
    record = list_folder(flat).split_record()
    gone = record["files"]["train"][2][0]
    os.unlink(flat / gone)
    with pytest.raises(CnnlabError, match=gone):
        open_streaming(cfg, scan=scan_data_folder(cfg, saved_split=record))
    skip = open_streaming(cfg.replace(bad_images="skip"), scan=scan_data_folder(cfg, saved_split=record))
    assert skip is not None and len(skip.train) == len(record["files"]["train"]) - 1
