"""data/registry.py: the official datasets ``--data NAME`` knows, each loaded by name; one that is
absent, or whose download fails, leaves --data-dir untouched."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cnnlab.core.errors import CnnlabError
from cnnlab.data import cifar, idx
from conftest import tree


def test_the_registry_names_every_official_dataset_and_loads_each_by_name(tmp_path, monkeypatch):
    """``--data NAME`` resolves through the registry alone: names, shapes, loaders, the hints."""
    from cnnlab.data.registry import DATASETS, official
    from cnnlab.data.sources import load_dataset
    assert list(DATASETS) == ["cifar10", "cifar100", "mnist", "fashion-mnist"]
    assert official("cifar10") is DATASETS["cifar10"] and official("./cifar10") is None
    (tmp_path / "mnist").mkdir()
    monkeypatch.chdir(tmp_path)
    assert official("mnist") is None            # a folder of that name is read as the folder
    monkeypatch.chdir(Path(__file__).parent)
    calls = []
    monkeypatch.setitem(DATASETS, "cifar10", dataclasses.replace(
        DATASETS["cifar10"], load=lambda root, download: calls.append((root, download)) or "loaded"))
    assert load_dataset("cifar10", data_dir=tmp_path, download=False) == "loaded"
    assert calls == [(tmp_path, False)]
    from cnnlab.core.config import Config
    from cnnlab.engine.prepare import check_config
    with pytest.raises(CnnlabError, match="cifar10 is always 32x32"):
        check_config(Config(data="cifar10", image_size=64))
    with pytest.raises(CnnlabError, match="did you mean 'fashion-mnist'.*use one of cifar10, cifar100, mnist, "
                                          "fashion-mnist"):
        load_dataset("fashion-mnst", data_dir=tmp_path)


def test_cnnlab_data_list_prints_the_registry():
    import json
    import subprocess
    import sys

    from cnnlab.data.registry import DATASETS
    out = subprocess.run([sys.executable, "-m", "cnnlab", "data", "list", "--json"], capture_output=True,
                         text=True, check=True).stdout
    assert [(r["name"], tuple(r["image_shape"])) for r in json.loads(out)] == \
        [(d.name, d.image_shape) for d in DATASETS.values()]


@pytest.mark.parametrize("kind", ["mnist", "fashion-mnist", "cifar10", "cifar100"])
def test_missing_dataset_leaves_dir_untouched_and_names_both_places(tmp_path, kind):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"\xff\xd8 not really")
    (tmp_path / "readme.txt").write_text("mine")
    before = tree(tmp_path)
    with pytest.raises(CnnlabError) as err:
        from cnnlab.data.registry import DATASETS
        DATASETS[kind].load(tmp_path, False)
    msg = str(err.value)
    both = (f"in {tmp_path / kind} and in {tmp_path}:", f"in {tmp_path} and in {tmp_path / kind}:")
    assert f"{kind} not found" in msg and any(b in msg for b in both), msg
    assert "\n" not in msg
    assert tree(tmp_path) == before


@pytest.mark.parametrize("kind", ["fashion-mnist", "cifar10"])
def test_failed_download_leaves_dir_untouched(tmp_path, monkeypatch, dead_url, kind):
    """The issue's case: no files, the download fails, and no empty DIR/<kind>/ is left behind."""
    if kind == "cifar10":
        monkeypatch.setattr(cifar, "_BASE_URL", dead_url + "/")
    else:
        monkeypatch.setitem(idx.IDX_KINDS, kind, dataclasses.replace(idx.IDX_KINDS[kind], mirrors=(dead_url + "/",)))
    (tmp_path / "readme.txt").write_text("mine")
    before = tree(tmp_path)
    with pytest.raises(CnnlabError, match="download of .* failed"):
        from cnnlab.data.registry import DATASETS
        DATASETS[kind].load(tmp_path, True)
    assert tree(tmp_path) == before
