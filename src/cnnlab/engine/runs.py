"""Writing a run folder, and loading one back with its typed config and model; published
weights as a run folder.

The layout and the plain reads are ``cnnlab.core.run_folder.RunFolder``'s; ``Run`` adds what
needs the engine: the config validated as a ``Config``, the model, predictions.

``pretrained_folder(weights)`` fetches (or finds) published weights' source file, checks its
hash, reads it into cnnlab's network and writes a run folder into the weights cache
(``models.weights.weights_dir()/ARCH.TAG``): ``model.safetensors`` (the network behind the
weights' own normalisation), ``model.json`` (classes, input size, the weights' centre crop
and resampling), ``config.json`` and ``pretrained.json`` (where the weights came from, and
the SHA-256 of ``model.safetensors`` as written). So ``load_run`` takes a model name where it
takes a run folder (``predict``, ``explain``, ``serve``, ``export``, ``cnnlab.load``), and
``--pretrained`` starts training from that folder as ``--init-from`` does from any run. A
folder whose ``model.safetensors`` no longer hashes as written is refused, never used.
"""
from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import os
import platform
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from cnnlab.core.config import Config, merge
from cnnlab.core.errors import CnnlabError
from cnnlab.core.files import read_json, write_bytes, write_json, write_text
from cnnlab.core.hardware import Precision
from cnnlab.core.hardware import describe as describe_hardware
from cnnlab.core.run_folder import RunFolder, finite
from cnnlab.core.tensors import require_finite
from cnnlab.core.version import __version__
from cnnlab.data.dataset import Dataset, ImageSplit
from cnnlab.data.download import sha256sum
from cnnlab.data.images import RESAMPLING, open_image, to_array
from cnnlab.engine.evaluation import Evaluation
from cnnlab.models.classifier import Classifier, build_classifier
from cnnlab.models.inspect import gradcam_heatmaps
from cnnlab.models.pretrained import head_name
from cnnlab.models.weights import (
    Download,
    WeightsInfo,
    find_weights,
    read_source,
    resolve_name,
    source_file,
    suggest,
    weights_dir,
)

HISTORY_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds")
RUNS_ROOT = Path("runs")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# model.json's bounds. ImageNet-21k has 21,841 classes and cnnlab trains at a few hundred
# pixels a side: a card past these is damaged, and building its network could ask for terabytes.
MAX_CLASSES = 100_000
MAX_INPUT_SIDE = 4096
CARD_KEYS = ("arch", "num_classes", "in_channels", "input_size", "class_names", "mean", "std")


def run_path(*, out: str | Path | None, name: str | None, default_name: str) -> Path:
    """Where a new run goes: ``--out PATH``, else ``runs/NAME``; names stay inside runs/."""
    if out is not None and name is not None:
        raise CnnlabError("give either --out PATH or --name NAME, not both")
    if out is not None:
        return Path(out)
    name = name or default_name
    if not _SAFE_NAME.match(name) or ".." in name:
        raise CnnlabError(f"run name {name!r} is not allowed: use letters, digits, '.', '_' and '-' "
                          f"only (no path separators or '..'), or give a path with --out")
    return RUNS_ROOT / name


def default_run_name(cfg: Config) -> str:
    data = Path(cfg.data).name if cfg.data else "data"
    return f"{cfg.model}-{re.sub(r'[^A-Za-z0-9._-]', '_', data)}-{datetime.now():%Y%m%d-%H%M%S}"


def is_empty_run_folder(path: Path) -> bool:
    """No folder yet, or one holding nothing but a lock file (a run that never got further)."""
    lock = RunFolder(path).lock_file.name
    return not path.exists() or (path.is_dir() and all(p.name == lock for p in path.iterdir()))


def check_new_run_folder(path: Path) -> None:
    """Refuse a run folder that already holds files: a run is never overwritten silently."""
    if not is_empty_run_folder(path):
        raise CnnlabError(f"run folder {path} already exists: choose another --name/--out, "
                          f"remove it, or continue it with --resume {path}")


# ----------------------------------------------------------------------------- one writer
class RunBusy(CnnlabError):
    """Another process holds the run folder's lock."""


LOCK_PID_WAIT = 1.0   # seconds to wait for a holder that has just locked to write its pid


@contextmanager
def writing_run(path: str | Path) -> Iterator[None]:
    """Hold the run folder's lock while this process trains or resumes it: one writer per run.

    An exclusive ``flock`` on ``RunFolder.lock_file``, taken without waiting: another holder
    makes this raise ``RunBusy`` naming its pid (written into the file). The kernel drops the
    lock when the holder's file is closed, however the process ends (``kill -9`` included), so
    a lock is never stale and nothing needs cleaning up; the file itself stays (removing it
    would let two processes lock two different files of the same name).
    """
    lock = RunFolder(path).lock_file
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            raise RunBusy(f"{path} is being written by another process ({holder}, holding {lock}): "
                          f"one process trains or resumes a run at a time. Wait for it to finish, or "
                          f"stop it and resume then") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)   # releases the lock


def _lock_holder(fd: int) -> str:
    """The holder's pid as the lock file says it ("pid N"); one that has only just locked may
    not have written it yet, so wait a moment for it."""
    deadline = time.monotonic() + LOCK_PID_WAIT
    while True:
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if text.isdigit() or time.monotonic() > deadline:
            return f"pid {text}" if text.isdigit() else "pid unknown"
        time.sleep(0.02)


# ----------------------------------------------------------------------------- test set identity
def split_identity(split: ImageSplit, files: list[str] | None = None) -> dict[str, Any]:
    """What tells two test sets apart: the image count, a hash of the labels in order, and of
    the files' paths relative to the data folder when an image folder lists them
    (``files``, the same length as the split), so ``cnnlab compare`` can tell when runs were
    tested on different images."""
    labels = np.asarray(split.labels, dtype="<i8")
    identity: dict[str, Any] = {"images": int(len(labels)),
                                "labels_sha256": hashlib.sha256(labels.tobytes()).hexdigest()}
    if files is not None and len(files) == len(labels):
        identity["files_sha256"] = hashlib.sha256(os.fsencode("\n".join(files))).hexdigest()   # any bytes a name holds
    return identity


def environment(device: torch.device, precision: Precision) -> dict[str, Any]:
    """Versions and the hardware a run ran on: device, its name, torch's CPU ISA level and the
    precision that actually ran, with the reason it was chosen."""
    return {
        "cnnlab": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "numpy": np.__version__, "platform": platform.platform(), **describe_hardware(device, precision),
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "started": datetime.now().isoformat(timespec="seconds"),
    }


def save_config(run: Path, cfg: Config, env: dict[str, Any]) -> None:
    write_json(RunFolder(run).config_file, {"config": cfg.to_dict(), "environment": env})


def model_card(cfg: Config, class_names: list[str], image_shape: tuple[int, int, int],
               mean: list[float], std: list[float]) -> dict[str, Any]:
    h, w, c = image_shape
    return {"arch": cfg.model, "num_classes": len(class_names), "in_channels": c,
            "input_size": [h, w], "class_names": list(class_names), "mean": mean, "std": std,
            "input": "float32 (N, C, H, W) RGB or grey scaled to [0, 1]; normalisation is inside the model",
            "cnnlab": __version__}


def save_model(run: Path, model: Classifier, card: dict[str, Any]) -> None:
    """``model.safetensors``, whose header names the architecture and the head (``load_model``
    checks model.json against them), and ``model.json``."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    folder = RunFolder(run)
    require_finite(state, f"the model for {folder.weights_file}", "it was not written, so the file keeps "
                                                                  "what it held")
    header = {"arch": card["arch"], "head": f"net.{head_name(model.net)}"}
    write_bytes(folder.weights_file, save(state, metadata=header))
    write_json(folder.card_file, card)


def empty_history() -> dict[str, list]:
    return {k: [] for k in HISTORY_KEYS}


def save_history(run: Path, history: dict[str, list]) -> None:
    folder = RunFolder(run)
    write_json(folder.history_file, history)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["epoch", *HISTORY_KEYS])
    for i in range(len(history["loss"])):
        writer.writerow([i + 1, *("" if history[k][i] is None else history[k][i] for k in HISTORY_KEYS)])
    write_text(folder.history_csv_file, buf.getvalue())


class Run(RunFolder):
    """A finished (or checkpointed) run folder, loaded back: its config as a ``Config``, its model."""

    def __init__(self, path: str | Path, config: Config):
        super().__init__(path)
        self.config = config
        self._models: dict[str, Classifier] = {}

    @property
    def input_size(self) -> tuple[int, int]:
        h, w = self.card["input_size"]
        return h, w

    @property
    def in_channels(self) -> int:
        return self.card["in_channels"]

    def image_array(self, img: Image.Image) -> np.ndarray:
        """uint8 (H, W, C) as this model takes an opened image: its input size and channels,
        and for pretrained weights their centre crop and resampling (``model.json``)."""
        h, w = self.input_size
        return to_array(img, (w, h), self.in_channels, center_crop=self.card.get("center_crop"),
                        resample=self.card.get("resample", "bilinear"))

    def load_image(self, source: str | Path | bytes) -> np.ndarray:
        """An image file (or its bytes) as this model takes it; ``ImageError`` if unreadable."""
        return self.image_array(open_image(source))

    def model(self, device: str | torch.device = "cpu", channels_last: bool = False) -> Classifier:
        """The trained model in eval mode on ``device``; ``channels_last``: in NHWC, the layout
        a CPU runs convolutions fastest in (for inference; exports want the default)."""
        key = f"{device}{'-nhwc' if channels_last else ''}"
        if key not in self._models:
            model = load_model(self, self.card).to(device).eval()
            self._models[key] = model.to(memory_format=torch.channels_last) if channels_last else model
        return self._models[key]

    def predict(self, inputs: Sequence[str | Path] | np.ndarray, top_k: int = 5,
                device: str | torch.device = "cpu", batch_size: int = 256) -> list[dict[str, Any]]:
        """Top-k predictions for image files or a uint8 (N, H, W, C) array (any size/mode for files)."""
        from cnnlab.engine.inference import (
            predict,  # local: predict imports this module
        )
        return predict(self, inputs, top_k=top_k, device=device, batch_size=batch_size)


def check_card(card: Any, path: Path) -> None:
    """Refuse a model.json cnnlab could not have written, before anything is built from it."""
    if not isinstance(card, dict) or any(k not in card for k in CARD_KEYS):
        missing = [k for k in CARD_KEYS if k not in card] if isinstance(card, dict) else ["an object"]
        raise CnnlabError(f"{path} is damaged: it lacks {', '.join(missing)} (cnnlab writes "
                          f"{', '.join(CARD_KEYS)}); train the run again, or restore the file from a copy")
    n = card["num_classes"]
    rules = {   # in order: each may rely on the keys before it
        "arch": (lambda v: isinstance(v, str), "a model name, as `cnnlab models` lists"),
        "num_classes": (lambda v: _whole(v, 1, MAX_CLASSES), f"a whole number from 1 to {MAX_CLASSES:,}"),
        "class_names": (lambda v: isinstance(v, list) and len(v) == n and all(isinstance(c, str) for c in v),
                        f"a list of num_classes ({n}) names"),
        "in_channels": (lambda v: _whole(v, 1, 3) and v != 2, "1 (grey) or 3 (RGB)"),
        "input_size": (lambda v: isinstance(v, list) and len(v) == 2
                       and all(_whole(side, 1, MAX_INPUT_SIDE) for side in v),
                       f"[height, width], each from 1 to {MAX_INPUT_SIDE} pixels"),
        "mean": (lambda v: _numbers(v) and len(v) in (1, 3) and len(v) >= card["in_channels"],
                 "a number per channel the network sees (1 or 3, at least in_channels)"),
        "std": (lambda v: _numbers(v) and len(v) == len(card["mean"]) and min(v) > 0,
                "as many numbers as mean, each above 0"),
        "center_crop": (lambda v: v is None or (finite(v) and 0 < v <= 1), "a fraction from 0 to 1"),
        "resample": (lambda v: isinstance(v, str) and v in RESAMPLING, f"one of {', '.join(RESAMPLING)}"),
    }
    for key, (ok, expected) in rules.items():
        if key in card and not ok(card[key]):
            shown = repr(card[key])
            raise CnnlabError(f"{path}: {key} must be {expected}, got {shown[:60]}{'...' * (len(shown) > 60)}; "
                              f"the file is damaged: train the run again, or restore it from a copy")


def _whole(v: Any, low: int, high: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _numbers(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(finite(x) for x in v)


def _read_weights(folder: RunFolder, card: dict[str, Any]) -> dict[str, torch.Tensor]:
    """model.safetensors' tensors, once its header agrees with model.json: the header is read
    first, so a card that disagrees with the weights fails before anything is allocated."""
    weights = folder.weights_file
    try:
        with safe_open(str(weights), framework="pt") as f:
            header = f.metadata() or {}
            arch, head = header.get("arch", card["arch"]), header.get("head")   # older files name no head
            classes = (f.get_slice(f"{head}.weight").get_shape() or [None])[0] if head else card["num_classes"]
            if (arch, classes) != (card["arch"], card["num_classes"]):
                raise CnnlabError(f"{folder.card_file} does not match {weights}: it says {card['arch']} with "
                                  f"{card['num_classes']} classes, the weights are {arch} with {classes}; "
                                  f"restore the run's own model.json")
            state = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise CnnlabError(f"{weights} is missing: the run did not finish saving its model") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CnnlabError(f"{weights} is not a valid safetensors file ({e}); cnnlab only loads "
                          f"safetensors weights, never pickles") from None
    require_finite(state, str(weights), "cnnlab never writes such a model, so the file is damaged; train "
                                        "the run again, or restore the file from a copy")
    return state


def load_model(run: str | Path | RunFolder, card: dict[str, Any]) -> Classifier:
    """The network ``card`` (a model.json checked by ``check_card``) describes, with its weights."""
    folder = run if isinstance(run, RunFolder) else RunFolder(run)
    weights = folder.weights_file
    state = _read_weights(folder, card)
    model = build_classifier(card["arch"], card["num_classes"], card["input_size"], card["mean"], card["std"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CnnlabError(f"{weights} does not match model.json's architecture "
                          f"{card['arch']!r}: {str(e).splitlines()[0]}") from None
    return model


def load_run(path: str | Path) -> Run:
    """A run folder with a model (finished or checkpointed), its config validated; or, for a
    name that is no folder here, published weights by name (``efficientnet_lite0``,
    ``resnet50.imagenet1k_v1``), fetched once into the weights cache."""
    folder = RunFolder(path)
    if not folder.path.exists():
        weights = resolve_name(str(path))
        if weights is None:
            raise CnnlabError(f"{folder.path} is neither a run folder (no such folder) nor published weights"
                              f"{suggest(str(path))}: give a folder written by `cnnlab train`, or a name "
                              f"from `cnnlab weights list`")
        folder = RunFolder(pretrained_folder(weights))
    if not folder.card_file.is_file():
        raise CnnlabError(f"{folder.path} is not a cnnlab run folder: expected {folder.card_file}, "
                          f"written by `cnnlab train`")
    if not folder.config_file.is_file():
        raise CnnlabError(f"cannot read run folder {folder.path}: {folder.config_file} is missing")
    check_card(folder.card, folder.card_file)
    cfg = merge(Config(), folder.saved_config, source=str(folder.config_file))
    run = Run(folder.path, cfg)
    run.card, run.history, run.metrics   # noqa: B018  (damaged files fail here, not at first use)
    return run


SAMPLES_PER_CLASS = 8
# Streamed data: samples of the first 20 classes only, which the samples grid shows
# (report.plots.MAX_SAMPLE_CLASSES): 1,000 ImageNet classes x 8 at 224 px would be 1.2 GB.
STREAMED_SAMPLE_CLASSES = 20
MISTAKES_KEPT = 36
# The most confident of them get a Grad-CAM heatmap for the report (one backward pass each):
# computed here, with the model at hand, so the report draws from the folder alone.
MISTAKE_HEATMAPS = 12
CORRECT_HEATMAPS = 6   # and the most confident right answers, for contrast


def save_evaluation(run: Path, data: Dataset, test: Evaluation, model: torch.nn.Module) -> None:
    """``evaluation.npz``: test logits and labels, plus the few images the plots show and the
    Grad-CAM heatmaps (for the predicted class) of the most confident mistakes and of the most
    confident right answers (what the model gets right, and why).

    Plots and reports read only the run folder, so they can be rebuilt after the data moved.
    """
    probs = torch.softmax(test.logits, 1)
    conf, pred = probs.max(1)
    wrong = torch.nonzero(pred != test.labels).squeeze(1)
    worst = wrong[conf[wrong].argsort(descending=True)][:MISTAKES_KEPT].numpy()
    labels = data.train.labels
    kept = min(data.num_classes, STREAMED_SAMPLE_CLASSES) if data.train.streamed else data.num_classes
    samples = np.concatenate([np.flatnonzero(labels == c)[:SAMPLES_PER_CLASS] for c in range(kept)])
    mistakes = data.test.take(worst)
    shown = worst[:MISTAKE_HEATMAPS]
    heatmaps = gradcam_heatmaps(model, mistakes[:len(shown)], [int(pred[i]) for i in shown])   # (n, H, W)
    right = torch.nonzero(pred == test.labels).squeeze(1)
    surest = right[conf[right].argsort(descending=True)][:CORRECT_HEATMAPS].numpy()
    correct = data.test.take(surest)
    correct_heatmaps = gradcam_heatmaps(model, correct, [int(pred[i]) for i in surest])
    buf = io.BytesIO()
    np.savez(buf, logits=test.logits.numpy().astype(np.float32), labels=test.labels.numpy(),
             mistake_index=worst, mistake_images=mistakes, mistake_heatmaps=heatmaps.astype(np.float16),
             correct_index=surest, correct_images=correct, correct_heatmaps=correct_heatmaps.astype(np.float16),
             sample_images=data.train.take(samples), sample_labels=labels[samples])
    write_bytes(RunFolder(run).evaluation_file, buf.getvalue())


# ----------------------------------------------------------------------------- published weights
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
