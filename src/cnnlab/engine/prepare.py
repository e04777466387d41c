"""Before a run trains: its plan (every decision made before data loads), then its data.

``plan_run`` is where every entry point starts (fit, resume, lr-find, the estimate probe, the
tuner, evaluate): ``check_config`` runs every rule (the config's own values, then those that
need the model, weights and dataset registries), an image folder is walked once and its image
size chosen from a sample of headers (read once, for the loaders too), and device, threads and precision are decided.
``load_data(plan)`` then reads the splits the run trains, validates and tests on, an image
folder decoded at the planned size, a flat folder split as a run saved it. ``DATA_KEYS`` name
the config keys that decide the data: runs that agree on them train on the same images (the
tuner loads them once for all its trials).
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Collection

import numpy as np
import torch

from cnnlab.core.config import Config, ImageSize, unfreeze_depth, validate
from cnnlab.core.errors import CnnlabError
from cnnlab.core.hardware import Precision, choose_precision, pick_device
from cnnlab.data.check import FolderScan
from cnnlab.data.dataset import Dataset, prepare_splits
from cnnlab.data.sources import load_for_config
from cnnlab.data.stream import Header, open_streaming, sample_headers, scan_data_folder
from cnnlab.engine import distributed
from cnnlab.engine.runs import requested_weights
from cnnlab.models.pretrained import body_blocks, head_name
from cnnlab.models.registry import create_model, min_input_size
from cnnlab.models.weights import WeightsInfo

DATA_KEYS = ("data", "data_dir", "image_size", "bad_images", "loader", "workers", "crop", "center_crop",
             "val_split", "test_split", "train_size", "test_size", "seed", "nproc", "model")   # model: its size


def check_config(cfg: Config) -> Config:
    """Every rule a run's config must meet, checked before any data loads: its own values
    (``config.validate``), then the rules that need a registry: the model exists and takes the
    image size asked for, a switch only some models act on (``--whiten``) is on for one of them,
    the weights ``--pretrained``/``--weights`` name exist for it, and ``--loader stream`` names
    an image folder, not a dataset read from its archives, and ``--nproc`` fits the machine
    (the command line checks all this before it starts the processes)."""
    from cnnlab.data.registry import official
    from cnnlab.models.registry import check_input_size, list_models, model_info
    cfg = validate(cfg)
    if cfg.time_limit is not None and distributed.launched_world() > 1:   # torchrun's processes, not --nproc's
        raise CnnlabError(f"--time-limit is not supported with data-parallel training ({distributed.launched_world()} "
                          f"processes would disagree on when to stop); give --epochs instead")
    info = model_info(cfg.model)
    for key in sorted({k for name in list_models() for k in model_info(name).setup_keys}):
        if getattr(cfg, key) not in (False, None) and key not in info.setup_keys:
            takers = [name for name in list_models() if key in model_info(name).setup_keys]
            raise CnnlabError(f"--{key.replace('_', '-')} needs a model with a patch-whitening first layer; "
                              f"{cfg.model!r} has none (try --model {takers[0]})")
    requested_weights(cfg)   # a model without weights, or an unknown tag: the choices
    source = official(cfg.data)
    if source is not None and cfg.image_size is not None:
        h, w, _ = source.image_shape
        raise CnnlabError(f"--image-size applies to image folders; {cfg.data} is always {w}x{h}")
    if source is not None and cfg.loader == "stream":
        raise CnnlabError(f"--loader stream reads image folders; {cfg.data} is read from its archives "
                          f"into memory: use --loader memory (or auto)")
    if source is not None:
        check_input_size(cfg.model, source.image_shape[:2], hint="choose another --model")
    elif cfg.image_size is not None:
        check_input_size(cfg.model, cfg.image_size)
    _check_nproc(cfg)
    return cfg


def _check_nproc(cfg: Config) -> None:
    """One process per GPU, or at least a core each on a CPU: more could only fail or thrash,
    and would do so after every one of them had started."""
    from cnnlab.core.hardware import available_cores
    if cfg.nproc == 1:
        return
    cuda = pick_device(cfg.device).type == "cuda"
    limit, what = (torch.cuda.device_count(), "GPUs") if cuda else (available_cores(), "CPU cores")
    if cfg.nproc > limit:
        raise CnnlabError(f"--nproc {cfg.nproc} asks for more processes than this machine has {what} ({limit}): "
                          f"give at most --nproc {limit}")


def data_key(cfg: Config) -> tuple:
    return tuple(getattr(cfg, k) for k in DATA_KEYS)


def training_headers(scan: FolderScan | None) -> list[Header] | None:
    """(size, mode) of a sample of an image folder's training files: read once per run, for
    its image size here and its channels and memory footprint in the loaders. None without one."""
    return sample_headers([p for p, _ in scan[0].files.get("train", [])]) if scan is not None else None


# Pretrained weights see small images upscaled, but no further than this: past 4x, upscaling
# adds compute and no detail (EfficientNet-Lite0's frozen features on 32-px CIFAR-10: 69.9% at
# 128 px, 72.0% at 224 px for three times the cost; benchmarks/finetune.py's data).
MAX_UPSCALE = 4


def image_side(cfg: Config, headers: list[Header] | None) -> int | None:
    """The images' own shorter side: an official dataset's, else that of an image folder's most
    common size (from ``headers``, ``training_headers``); None when neither says."""
    from cnnlab.data.registry import official
    source = official(cfg.data)
    if source is not None:
        return min(source.image_shape[:2])
    sizes = Counter(size for size, _ in headers or [])
    return min(sizes.most_common(1)[0][0]) if sizes else None


def image_size_for(cfg: Config, side: int | None,
                   weights: WeightsInfo | None) -> tuple[ImageSize | None, str]:
    """The square side a run trains at, and why: ``--image-size``; else, from ``weights``, the
    size they were trained at, or ``MAX_UPSCALE`` times the images' shorter ``side`` when that
    is smaller; else an image folder's ``side`` capped at what the model's family trains at
    (``models.registry.default_image_size``). None for an official dataset trained from
    scratch: it comes at its own size."""
    from cnnlab.data.registry import official
    from cnnlab.models.registry import default_image_size
    if cfg.image_size is not None:
        return cfg.image_size, "--image-size"
    if weights is not None:
        trained = weights.preprocessing.size
        if side is not None and MAX_UPSCALE * side < trained:
            return MAX_UPSCALE * side, (f"{MAX_UPSCALE}x the images' {side} px ({weights.name} was trained at "
                                        f"{trained}; more upscaling costs time and adds no detail)")
        return trained, f"the size {weights.name} was trained at"
    if side is None or official(cfg.data) is not None:
        return None, ""            # an official dataset's own size; no readable header: the reader reports the files
    return default_image_size(cfg.model, side)


def augment_for(cfg: Config, weights: WeightsInfo | None, side: int | None = None) -> tuple[str, str]:
    """The ``--augment`` preset a run uses, and why: the one asked for, else (``auto``), when it
    starts from trained weights, standard for photos and light for small images that training
    upscales more than twice (``side``: their own shorter side; a random resized crop of a
    32-px image keeps too few of its pixels: 76.8% against light's 79.2% on 1,000 CIFAR-10
    images, benchmarks/finetune.py's setting); none for a dataset read from its archives (the
    lesson's data as the lesson reads it); light for an image folder trained from scratch."""
    from cnnlab.data.registry import official
    if cfg.augment != "auto":
        return cfg.augment, "as set"
    if weights is not None or cfg.init_from:
        size = cfg.image_size if isinstance(cfg.image_size, int) else min(cfg.image_size or (0,))
        if side is not None and size > 2 * side:
            return "light", f"auto: fine-tuning on {side}-px images upscaled to {size}"
        return "standard", "auto: fine-tuning trained weights"
    if official(cfg.data) is not None:
        return "none", f"auto: {cfg.data} by name, as the lesson trains on it"
    return "light", "auto: an image folder trained from scratch"


def _check_augment(cfg: Config, scan: FolderScan | None) -> None:
    """The preset and ``--translate`` against the planned image size, the preset against the
    folder's classes."""
    from cnnlab.data.augment import check_preset, check_translate
    from cnnlab.data.registry import official
    source = official(cfg.data)
    if source is not None:
        check_preset(cfg.augment, source.image_shape[:2], 10)   # every official dataset has 10 or more classes
        check_translate(cfg.translate, source.image_shape[:2])
    elif isinstance(cfg.image_size, int | tuple) and scan is not None:
        hw = (cfg.image_size, cfg.image_size) if isinstance(cfg.image_size, int) else cfg.image_size
        check_preset(cfg.augment, hw, len(scan[0].class_names))
        check_translate(cfg.translate, hw)


def _check_unfreeze(cfg: Config) -> None:
    """``--unfreeze last-N-blocks`` against the network's blocks (built without memory)."""
    if cfg.unfreeze == "all":
        return
    side = min_input_size(cfg.model)
    with torch.device("meta"):
        net = create_model(cfg.model, num_classes=2, in_channels=3, input_size=(side, side))
    blocks = body_blocks(net, head_name(net))
    depth = unfreeze_depth(cfg.unfreeze, len(blocks))
    if depth is not None and depth > len(blocks):
        raise CnnlabError(f"--unfreeze {cfg.unfreeze} is deeper than {cfg.model}, whose body has {len(blocks)} "
                          f"blocks ({blocks[0]} ... {blocks[-1]}): give at most last-{len(blocks)}-blocks, or all")


@dataclass(frozen=True)
class Plan:
    """Every decision about a run made before its data loads (``plan_run``)."""
    cfg: Config                  # every rule checked; an image folder's image size decided
    device: torch.device         # before data-parallel set-up picks this process's GPU
    threads: int
    precision: Precision
    weights: WeightsInfo | None  # the published weights it starts from (--pretrained)
    scan: FolderScan | None      # an image folder's one walk (and problems found); None otherwise
    headers: list[Header] | None  # a sample of its training files' headers (``training_headers``)
    size_reason: str             # why an image folder is decoded at its size, for the header
    augment_reason: str          # why the run augments as it does (``augment_for``), for the header


def plan_run(cfg: Config, *, saved_split: Path | None = None, read_folder: bool = True) -> Plan:
    """Check ``cfg`` against every rule (``check_config``), walk an image folder once and choose
    its image size from a sample of headers (``image_size_for``), choose the augmentation
    (``augment_for``) and check it against that size, and decide device, threads and precision: what ``fit``, ``resume``, lr-find, the estimate probe, the tuner and
    ``evaluate`` all start from. ``saved_split``: a run's splits.json, so an image folder
    splits as it did for that run; ``read_folder=False``: the caller brings its own images."""
    cfg = check_config(cfg)
    weights = requested_weights(cfg)
    scan = scan_data_folder(cfg, saved_split) if read_folder else None
    headers = training_headers(scan)
    side = image_side(cfg, headers)
    size, why = image_size_for(cfg, side, weights)
    if size != cfg.image_size:
        cfg = cfg.replace(image_size=size)
    augment, augment_why = augment_for(cfg, weights, side)
    if augment != cfg.augment:
        cfg = cfg.replace(augment=augment)
    _check_augment(cfg, scan)
    _check_unfreeze(cfg)
    device = pick_device(cfg.device)
    return Plan(cfg, device, cfg.threads or distributed.threads_per_process(),
                choose_precision(cfg.precision, device), weights, scan, headers, why, augment_why)


SPLITS = ("train", "val", "test")


def load_data(plan: Plan, splits: Collection[str] = SPLITS) -> Dataset:
    """The splits ``plan`` trains, validates and tests on (``DATA_KEYS`` decide them), or only
    those in ``splits``: without "train", no training image is decoded and none is held out
    for validation (``evaluate`` reads the test split alone); a split left out is empty or None."""
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}: choose from {SPLITS}")
    cfg, scan = plan.cfg, plan.scan
    if "train" not in splits:   # the readers' own reading of train_size 0 (no user may ask it): decode none
        cfg = dataclasses.replace(cfg, train_size=0, val_split=0.0)
    with distributed.main_first():   # rank 0 fills the decoded-image cache, the others read it
        data: Dataset | None = open_streaming(cfg, distributed.local_world_size(), scan, plan.headers)
        if data is None:
            data = prepare_splits(load_for_config(cfg, scan=scan, progress=distributed.is_main()),
                                  val_split=cfg.val_split, train_size=cfg.train_size,
                                  test_size=cfg.test_size, seed=cfg.seed)
    empty = np.zeros(0, np.int64)
    data = dataclasses.replace(data, train=data.train if "train" in splits else data.train.subset(empty),
                               val=data.val if "val" in splits else None,
                               test=data.test if "test" in splits else data.test.subset(empty))
    data.split_record = scan[0].split_record() if scan is not None else None
    data.size_reason = plan.size_reason
    return data
