"""A pretrained model as a run folder: published weights made usable at once.

``pretrained_folder(weights)`` fetches (or finds) the weights' source file, checks its hash,
reads it into cnnlab's network and writes a run folder into the weights cache
(``models.weights.weights_dir()/ARCH.TAG``): ``model.safetensors`` (the network behind the
weights' own normalisation), ``model.json`` (classes, input size, the weights' centre crop
and resampling), ``config.json`` and ``pretrained.json`` (where the weights came from, and
the SHA-256 of ``model.safetensors`` as written). So ``predict``, ``explain``, ``serve``,
``export`` and ``cnnlab.load`` take a model name where they take a run (``load_run``), and
``--pretrained`` starts training from the folder as ``--init-from`` does from any run.

A folder whose ``model.safetensors`` no longer hashes as written is refused, never used.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from cnnlab.core.config import Config
from cnnlab.core.errors import CnnlabError
from cnnlab.core.files import read_json, write_json
from cnnlab.core.run_folder import RunFolder
from cnnlab.core.version import __version__
from cnnlab.data.download import sha256sum
from cnnlab.engine.runs import model_card, save_config, save_model
from cnnlab.models.classifier import build_classifier
from cnnlab.models.weights import Download, WeightsInfo, find_weights, read_source, source_file, weights_dir

RECORD = "pretrained.json"


def requested_weights(cfg: Config) -> WeightsInfo | None:
    """The weights a config starts from (``--pretrained``, ``--weights TAG``), or None."""
    if not (cfg.pretrained or cfg.weights):
        return None
    return find_weights(cfg.model, cfg.weights)


def pretrained_folder(info: WeightsInfo, timeout: float = 60) -> Path:
    """The run folder of ``info``'s weights in the cache, made on first use (fetching the
    source when it is a download). Raises ``CnnlabError`` with the fix when it cannot be had."""
    folder = weights_dir() / info.name
    if (folder / RECORD).is_file():
        check_unchanged(folder)
        return folder
    source = source_file(info, timeout)
    tensors = read_source(info, source)
    pre = info.preprocessing
    names = info.class_names
    model = build_classifier(info.arch, len(names), pre.size, list(pre.mean), list(pre.std))
    try:
        model.net.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise CnnlabError(f"{source} does not fit {info.arch}: {str(e).splitlines()[1].strip()}") from None
    cfg = Config(model=info.arch, weights=info.name, image_size=pre.size, data=info.classes)
    card = {**model_card(cfg, names, (pre.size, pre.size, 3), list(pre.mean), list(pre.std)),
            "center_crop": pre.center_crop, "resample": pre.interpolation, "weights": info.name}
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{info.name}.", dir=folder.parent))
    try:
        save_model(staging, model, card)
        save_config(staging, cfg, {"cnnlab": __version__, "weights": describe(info)})
        write_json(staging / RECORD, {**describe(info), "model_sha256": sha256sum(RunFolder(staging).weights_file)})
        try:
            os.replace(staging, folder)
        except OSError:
            if not (folder / RECORD).is_file():   # not another process that got there first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if isinstance(info.source, Download):
        source.unlink(missing_ok=True)   # kept as safetensors from now on
    return folder


def check_unchanged(folder: Path) -> None:
    """Refuse a cached pretrained folder whose weights changed since they were written."""
    record = read_json(folder / RECORD)
    weights = RunFolder(folder).weights_file
    actual = sha256sum(weights) if weights.is_file() else "missing"
    if actual != record.get("model_sha256"):
        raise CnnlabError(f"{weights} changed on disk since cnnlab wrote it (SHA-256 {actual}, written as "
                          f"{record.get('model_sha256')}): delete {folder} and run `cnnlab weights fetch "
                          f"{folder.name}` again")


def describe(info: WeightsInfo) -> dict[str, Any]:
    """What ``cnnlab weights list`` and the folder's record say of an entry."""
    pre = info.preprocessing
    return {"weights": info.name, "arch": info.arch, "default": info.default, "source": info.source.describe(),
            "file": info.source.filename, info.source.checksum.algorithm: info.source.checksum.hexdigest,
            "classes": info.classes, "num_classes": len(info.class_names), "license": info.license,
            "imagenet_top1": info.top1, "input_size": pre.size, "resize": pre.resize,
            "interpolation": pre.interpolation, "mean": list(pre.mean), "std": list(pre.std)}


def is_cached(info: WeightsInfo) -> bool:
    return (weights_dir() / info.name / RECORD).is_file()
