"""The typed training config: the single source of truth, saved with every run.

Resolution order: dataclass defaults, then, for a run from published weights (``--pretrained``),
``FINE_TUNING``'s, then a recipe (``--recipe NAME``, a YAML file shipped in ``cnnlab/recipes/``),
then a config file (``--config FILE``), then command-line flags.
Unknown keys and bad values are refused with a message naming the key, the value received
and what is allowed.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from cnnlab.core.errors import CnnlabError

ImageSize = int | tuple[int, int]   # one side for a square, or (height, width)
# Image sides a run may ask for. Classifiers take 32-600 px; at 4096 px an RGB image is 48 MiB
# decoded, and a folder's decoded copy would ask for more memory than a machine has.
MIN_IMAGE_SIDE, MAX_IMAGE_SIDE = 8, 4096
MAX_SEED = 2**32 - 1   # seeds are mixed as 32-bit keys (data.batches.derive_seed): larger ones repeat smaller ones


def option(default: Any, help: str, *, group: str) -> Any:
    """A config field with its help text and ``--help`` section: argparse, the tuner's space
    checks and the docs all read them from here (``FIELDS[name].metadata``)."""
    return field(default=default, metadata={"help": help, "group": group})


DATA, MODEL, OPTIM, AUGMENT, AVERAGE, SPEED, RUN = ("data", "model", "optimisation", "augmentation",
                                                    "weight averaging, whitening, test-time augmentation",
                                                    "speed", "run control")


@dataclass
class Config:
    # --- data -------------------------------------------------------------------------
    data: str = option("cifar10", "a dataset name (`cnnlab data list` shows them) or a folder with "
                                  "train/<class>/<image> and test/... (optional val/)", group=DATA)
    data_dir: str | None = option(None, "where official archives are kept (default: $CNNLAB_DATA, else "
                                        "~/.cache/cnnlab/data)", group=DATA)
    val_split: float = option(0.1, "fraction of train held out for validation when the data has no val/", group=DATA)
    test_split: float = option(0.2, "a flat folder (<class>/<image> only): fraction of each class held out for "
                                    "test, chosen by the seed; the split is saved in the run folder", group=DATA)
    train_size: int | None = option(None, "a stratified subset of train, in images, before the hold-out (default: all of it)", group=DATA)
    test_size: int | None = option(None, "a stratified subset of test, in images (default: all of it)", group=DATA)
    image_size: ImageSize | None = option(
        None, "image folders: train at N x N pixels, or H,W (height, width; decoded in memory) (default: the "
              "images' shorter side, capped at what the model's family trains at)", group=DATA)
    bad_images: Literal["error", "skip"] = option(
        "error", "image folders are checked first (as `cnnlab data check` does): error stops with the list of "
                 "problems; skip leaves out unusable files and says how many", group=DATA)
    normalize: Literal["dataset", "none"] = option(
        "dataset", "dataset: standardise each channel by the training set's mean and std; none: the lesson's "
                   "/255 only", group=DATA)
    # Streaming (cnnlab.data.stream): decode image folders from disk in worker processes when
    # they would not fit in memory decoded.
    loader: Literal["auto", "memory", "stream"] = option(
        "auto", "memory decodes the folder once into RAM; stream decodes from disk in worker processes "
                "(ImageNet-size data); auto picks memory when the decoded images fit in ~2 GiB", group=DATA)
    workers: int | None = option(None, "streaming: decode processes per training process (default: its cores "
                                       "- 1)", group=DATA)
    crop: Literal["auto", "random_resized", "center"] = option(
        "auto", "streaming training crop: random_resized (8-100% of the area, aspect 3/4-4/3) or center; "
                "auto: random_resized", group=DATA)
    center_crop: float = option(0.875, "streaming evaluation: resize the shorter side to image_size / this, "
                                       "crop the centre (0.875: 256 -> 224)", group=DATA)
    # --- model ------------------------------------------------------------------------
    model: str = option("tutorial", "a zoo model (`cnnlab models` lists them)", group=MODEL)
    init_from: str | None = option(None, "fine-tune: start from a cnnlab run folder or a .safetensors file "
                                         "(cnnlab's names, or torchvision's/timm's for resnet18/34/50); "
                                         "tensors that match load, a head for other classes starts afresh",
                                   group=MODEL)
    pretrained: bool = option(False, "start from the model's published ImageNet weights (`cnnlab weights "
                                     "list`), with their normalisation and input size; a head for your "
                                     "classes starts afresh", group=MODEL)
    weights: str | None = option(None, "start from these of the model's published weights (a tag from `cnnlab "
                                       "weights list`, e.g. imagenet1k_v1; implies --pretrained)", group=MODEL)
    freeze_epochs: float = option(0.0, "with --init-from or --pretrained: the first epochs, in which only the head "
                                       "trains (on the frozen body's features, computed once), then everything",
                                  group=MODEL)
    cache_features: bool = option(True, "head-only epochs train on the frozen body's features of each training "
                                        "image, computed once without augmentation; off: the body runs on every "
                                        "augmented batch", group=MODEL)
    unfreeze: str = option("all", "with --init-from or --pretrained: what trains after the head-only epochs: "
                                  "all, last-N-blocks (the N blocks nearest the head) or last-P% of the body's "
                                  "blocks; the rest stay frozen and the backward pass stops at them", group=MODEL)
    frozen_bn: bool = option(False, "with --init-from or --pretrained: the body's BatchNorm layers keep the "
                                    "trained running statistics all run (inference mode; their scale and shift "
                                    "still train), so a head fitted on the frozen body's features sees the same "
                                    "features once it thaws; Keras's advice for fine-tuning", group=MODEL)
    body_lr_scale: float = option(1.0, "everything but the head learns at this fraction of the rate "
                                       "(discriminative rates for fine-tuning, e.g. 0.1)", group=MODEL)
    # --- optimisation -----------------------------------------------------------------
    epochs: float = option(10, "passes over the training set; fractional allowed (a recipe's schedule length)",
                           group=OPTIM)
    batch_size: int = option(32, "images a step (per process when data-parallel)", group=OPTIM)
    optimizer: Literal["adam", "adamw", "sgd", "nesterov", "muon"] = option(
        "adam", "the update rule; muon: orthogonalised (Newton-Schulz) momentum for conv and linear weights at "
                "--muon-lr-scale x lr, Nesterov for biases, norms and the head; momentum, weight decay and "
                "--lr-per-1024 as for nesterov", group=OPTIM)
    lr: float = option(1e-3, "learning rate (per 1024 examples with --lr-per-1024)", group=OPTIM)
    momentum: float = option(0.9, "SGD/Nesterov/Muon momentum", group=OPTIM)
    # A coupled L2 term lambda shrinks weights by lr * lambda / (1 - momentum) per step once
    # momentum builds up: that product is what this decoupled decay states directly.
    weight_decay: float = option(0.0, "SGD/Nesterov/Muon: the fraction each weight shrinks per step, decoupled from "
                                      "the gradient (per 1024 examples with --lr-per-1024); Adam/AdamW: torch's "
                                      "own weight_decay", group=OPTIM)
    lr_per_1024: bool = option(False, "state lr and weight decay per 1024 examples and divide by the batch size "
                                      "(airbench's convention): a new batch size keeps the per-example step",
                               group=OPTIM)
    schedule: Literal["constant", "linear", "cosine"] = option("constant", "learning-rate decay after the warm-up",
                                                               group=OPTIM)
    warmup: float = option(0.0, "epochs of linear warm-up from zero", group=OPTIM)
    final_lr_fraction: float = option(0.0, "where linear/cosine decay ends, as a fraction of lr", group=OPTIM)
    label_smoothing: float = option(0.0, "weight of the uniform distribution mixed into the targets", group=OPTIM)
    bias_lr_scale: float = option(1.0, "BatchNorm and bias parameters learn this many times faster", group=OPTIM)
    # An orthogonalised update has spectral norm about 1 whatever the gradient's size, so it
    # cannot share SGD's rate. 0.05: airbench94_muon steps its filters by 0.24 at batch 2000
    # (0.123 per 1024 examples), where the speed recipes run Nesterov at 2.2-3.0 per 1024.
    muon_lr_scale: float = option(0.05, "muon: the orthogonalised weights learn at this fraction of lr (the "
                                        "head and biases at lr, as nesterov)", group=OPTIM)
    muon_momentum: float | None = option(None, "muon: the orthogonalised weights' momentum (default: --momentum; "
                                                "airbench94_muon: 0.6 beside 0.85 for the rest)", group=OPTIM)
    muon_decay_scale: float = option(1.0, "muon: the orthogonalised weights' decay as a fraction of --weight-decay "
                                          "(airbench94_muon: 0, its filters undecayed)", group=OPTIM)
    # --- augmentation (on whole batches, on the training device) --------------------
    augment: Literal["auto", "none", "light", "standard", "strong"] = option(
        "auto", "a preset: light mirrors and shifts; standard adds random resized "
                "crops, TrivialAugmentWide and random erasing; strong RandAugment and MixUp/CutMix. auto: "
                "standard with --pretrained/--init-from, light for an image folder, none for a dataset by name",
        group=AUGMENT)
    flip: Literal["none", "random", "alternating"] = option(
        "none", "horizontal mirroring: random per image, or alternating (each image mirrored every other epoch)",
        group=AUGMENT)
    translate: int = option(0, "random shift of up to this many pixels (reflect-padded)", group=AUGMENT)
    cutout: int = option(0, "side in pixels of a zeroed square at a random place; 0 for none", group=AUGMENT)
    # --- weight averaging, whitening, test-time augmentation --------------------------
    ema: float = option(0.0, "decay of an exponential moving average of the weights, which is evaluated "
                             "(0: off)", group=AVERAGE)
    ema_every: int = option(5, "steps between EMA updates", group=AVERAGE)
    ema_start: float = option(0.0, "fraction of training before the EMA starts", group=AVERAGE)
    ema_ramp: bool = option(False, "the decay grows as ema * progress**3: averages only late in training",
                            group=AVERAGE)
    lookahead: bool = option(False, "reset the live weights to the average at each EMA update", group=AVERAGE)
    whiten: bool = option(False, "initialise the first conv from the training images' patch whitening (models "
                                 "that have one, e.g. speednet)", group=AVERAGE)
    whiten_bias_epochs: float | None = option(None, "epochs the whitening layer's bias trains before it freezes "
                                                    "(airbench: 3); default: it trains throughout", group=AVERAGE)
    tta: Literal["none", "flip", "flip_translate"] = option(
        "none", "test-time augmentation: average the logits over mirrored (and 1-pixel shifted) views",
        group=AVERAGE)
    tta_gate: float = option(1.0, "test-time augmentation only for this fraction of each evaluation batch: the "
                                  "images the plain view is least sure of (1: every image)", group=AVERAGE)
    # --- speed ------------------------------------------------------------------------
    precision: Literal["fp32", "bf16", "fp16", "auto"] = option(
        "fp32", "auto: bf16 where the hardware has it, fp16 with loss scaling on GPUs without it, else fp32",
        group=SPEED)
    channels_last: bool = option(True, "NHWC tensors (25% faster for the lesson's net on a CPU)", group=SPEED)
    compile: bool = option(False, "torch.compile the model", group=SPEED)
    threads: int | None = option(None, "torch intra-op threads (default: cores available / processes)",
                                 group=SPEED)
    nproc: int = option(1, "data-parallel processes on this machine (one per GPU, or cores shared on a CPU); "
                           "--batch-size is per process. Several machines: torchrun, see docs/distributed.md",
                        group=SPEED)
    sync_bn: bool = option(False, "BatchNorm statistics over every process's batch (CUDA only); default: per "
                                  "process", group=SPEED)
    # --- run control ------------------------------------------------------------------
    time_limit: float | None = option(None, "seconds of training; stops mid-epoch, and the lr decays over the "
                                            "time (default: no limit)", group=RUN)
    early_stop: int | None = option(None, "stop after this many epochs without a better validation accuracy (default: never)",
                                    group=RUN)
    keep: Literal["last", "best"] = option("last", "the weights saved: the last epoch's, or the best on "
                                                   "validation", group=RUN)
    seed: int = option(0, "seeds initialisation, shuffling, augmentation and dropout", group=RUN)
    device: Literal["auto", "cpu", "cuda", "mps"] = option("auto", "auto picks a CUDA GPU, else an Apple GPU "
                                                                   "(mps), else the CPU", group=RUN)
    checkpoint_every: int = option(0, "also checkpoint every N steps (0: at each epoch's end only)", group=RUN)
    recipe: str | None = option(None, "start from a named recipe (see `cnnlab recipes`; default: none)", group=RUN)
    tensorboard: bool = option(False, "also write TensorBoard event files into the run folder", group=RUN)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML values (an (H, W) size as a list)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes) -> "Config":
        return merge(self, changes, source="arguments")


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_HINTS = typing.get_type_hints(Config)
DEVICES: tuple[str, ...] = typing.get_args(_HINTS["device"])   # the one list of device names


@dataclass(frozen=True)
class FieldType:
    """A config field's type, unwrapped once: ``int | None`` is (int, optional); a Literal is
    its choices (base: str)."""
    base: type
    choices: tuple[str, ...] = ()
    optional: bool = False

    @property
    def kind(self) -> str:
        """'choice' | 'bool' | 'int' | 'float' | 'str'"""
        return "choice" if self.choices else {bool: "bool", int: "int", float: "float"}.get(self.base, "str")


def field_type(key: str) -> FieldType:
    hint, optional = _HINTS[key], False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        if any(typing.get_origin(a) is tuple for a in args):
            return FieldType(tuple, (), optional)     # an image size: N, or (height, width)
        hint = args[0]
    if typing.get_origin(hint) is Literal:
        return FieldType(str, typing.get_args(hint), optional)
    return FieldType(hint, (), optional)


def field_help(key: str) -> str:
    """The field's help text with its default, as ``--help`` and the docs show it."""
    text, default = FIELDS[key].metadata["help"], FIELDS[key].default
    if "default" in text:   # the text says what an unset value means
        return text
    return f"{text} (default: {'unset' if default is None else default})"


def _check_value(key: str, value: Any, source: str) -> Any:
    """Coerce ``value`` to the field's type or raise a CnnlabError naming what is allowed."""
    kind = field_type(key)
    hint, optional = kind.base, kind.optional
    if value is None:
        if optional:
            return None
        raise CnnlabError(f"{source}: {key} cannot be empty")
    if kind.choices:
        allowed = kind.choices
        if value not in allowed:
            raise CnnlabError(f"{source}: {key} must be one of {', '.join(map(str, allowed))}; got {value!r}")
        return value
    try:
        if hint is bool:
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
                return value.lower() in ("true", "yes", "1", "on")
            if not isinstance(value, bool):
                raise ValueError
            return value
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if hint is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
        if hint is tuple:
            return _image_size(value)
    except (TypeError, ValueError):
        pass
    wanted = {int: "an integer", float: "a number", bool: "true or false", tuple: "N or H,W (pixels)"}.get(hint, "a string")
    raise CnnlabError(f"{source}: {key} must be {wanted}; got {value!r}")


_UNFREEZE = re.compile(r"last-(?:([1-9][0-9]*)-blocks?|([1-9][0-9]?|100)%)")


def unfreeze_depth(value: str, blocks: int) -> int | None:
    """How many of a body's ``blocks``, nearest the head, train under ``--unfreeze value``
    (``all``, ``last-N-blocks`` or ``last-P%``, rounded up); None when ``value`` is none of them."""
    if value == "all":
        return blocks
    match = _UNFREEZE.fullmatch(value)
    if match is None:
        return None
    return int(match.group(1)) if match.group(1) else math.ceil(blocks * int(match.group(2)) / 100)


def _image_size(value: Any) -> ImageSize:
    """``32``, ``"32"``, ``"96,128"`` or ``[96, 128]``: one side for a square, else (height, width)."""
    parts = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    if not 1 <= len(parts) <= 2 or any(isinstance(p, bool) or (isinstance(p, float) and not p.is_integer())
                                       for p in parts):
        raise ValueError
    sides = [int(p) for p in parts]
    return sides[0] if len(set(sides)) == 1 else (sides[0], sides[1])


def validate(cfg: Config, origins: dict[str, str] | None = None) -> Config:
    """Every rule on the config's own values that types alone cannot express (ranges, and fields
    that exclude each other), checked before anything loads. Rules that need a registry (the
    model's, the datasets') are ``cnnlab.engine.prepare.check_config``'s, which runs this first.
    ``origins``: the layer each key was set by (``resolve``'s), named in the error."""
    def bad(key, rule):
        where = f" (from the {origins[key]})" if origins and key in origins else ""
        raise CnnlabError(f"{key} must be {rule}; got {getattr(cfg, key)!r}{where}")
    # First: nan passes every `x < 0` rule below, and int(inf) raises.
    for key in FIELDS:
        if field_type(key).kind == "float" and getattr(cfg, key) is not None and not math.isfinite(getattr(cfg, key)):
            bad(key, "a finite number (not nan or inf)")
    if not cfg.epochs > 0:
        bad("epochs", "a positive number, e.g. --epochs 10")
    if cfg.batch_size < 1:
        bad("batch_size", "a positive integer, e.g. --batch-size 32")
    if not cfg.lr > 0:
        bad("lr", "a positive number, e.g. --lr 1e-3")
    for key in ("momentum", "label_smoothing", "final_lr_fraction", "ema_start"):
        if not 0 <= getattr(cfg, key) <= 1:
            bad(key, "between 0 and 1")
    if not 0 <= cfg.ema < 1:
        bad("ema", "in [0, 1): a decay such as 0.99, or 0 for none")
    for key in ("weight_decay", "warmup", "translate", "cutout", "checkpoint_every"):
        if getattr(cfg, key) < 0:
            bad(key, "zero or more")
    if cfg.ema_every < 1:
        bad("ema_every", "a positive integer")
    if cfg.whiten_bias_epochs is not None:
        if not cfg.whiten:
            raise CnnlabError(f"whiten_bias_epochs ({cfg.whiten_bias_epochs!r}) only applies with --whiten; "
                              f"turn whitening on or drop whiten_bias_epochs")
        if cfg.whiten_bias_epochs < 0:
            bad("whiten_bias_epochs", "zero or more epochs")
    if cfg.time_limit is not None and not cfg.time_limit > 0:
        bad("time_limit", "a positive number of seconds")
    if cfg.time_limit is not None and cfg.nproc > 1:
        # Each process would read its own clock for the stop and the lr schedule: replicas
        # would take different steps and drift apart.
        raise CnnlabError(f"--time-limit is not supported with data-parallel training (--nproc {cfg.nproc}: "
                          f"processes would disagree on when to stop); give --epochs instead")
    if cfg.early_stop is not None and cfg.early_stop < 1:
        bad("early_stop", "a positive number of epochs")
    if cfg.threads is not None and cfg.threads < 1:
        bad("threads", "a positive integer")
    if cfg.workers is not None and cfg.workers < 0:
        bad("workers", "zero (decode in the training process) or more")
    if cfg.nproc < 1:
        bad("nproc", "a positive number of processes, e.g. --nproc 2")
    if not 0 <= cfg.seed <= MAX_SEED:
        bad("seed", f"a whole number from 0 to {MAX_SEED}")
    if not 0 < cfg.center_crop <= 1:
        bad("center_crop", "in (0, 1]: 0.875 is the ImageNet convention (256 -> 224), 1 keeps the whole shorter side")
    if cfg.image_size is not None and not all(MIN_IMAGE_SIDE <= n <= MAX_IMAGE_SIDE for n in _sides(cfg.image_size)):
        bad("image_size", f"{MIN_IMAGE_SIDE} to {MAX_IMAGE_SIDE} pixels a side, e.g. --image-size 224")
    if cfg.freeze_epochs < 0 or cfg.freeze_epochs != int(cfg.freeze_epochs):
        bad("freeze_epochs", "a whole number of epochs, zero or more")
    if cfg.freeze_epochs > 0 and not (cfg.init_from or cfg.pretrained or cfg.weights):
        raise CnnlabError(f"--freeze-epochs {cfg.freeze_epochs:g} freezes a body started from trained "
                          f"weights: give --pretrained or --init-from RUN_OR_FILE, or drop --freeze-epochs")
    if cfg.unfreeze != "all":
        if unfreeze_depth(cfg.unfreeze, 1) is None:
            bad("unfreeze", "all, last-N-blocks with N a positive whole number, or last-P% of the body's blocks, "
                            "e.g. --unfreeze last-3-blocks or last-50%")
        if not (cfg.init_from or cfg.pretrained or cfg.weights):
            raise CnnlabError(f"--unfreeze {cfg.unfreeze} keeps part of a body started from trained weights "
                              f"frozen: give --pretrained or --init-from RUN_OR_FILE, or drop --unfreeze")
    if cfg.frozen_bn and not (cfg.init_from or cfg.pretrained or cfg.weights):
        raise CnnlabError("--frozen-bn keeps the running statistics of trained weights: give --pretrained or "
                          "--init-from RUN_OR_FILE, or drop --frozen-bn")
    if cfg.init_from and (cfg.pretrained or cfg.weights):
        raise CnnlabError(f"--init-from {cfg.init_from} and --{'weights' if cfg.weights else 'pretrained'} both "
                          f"name the starting weights: give one")
    if not cfg.body_lr_scale > 0:
        bad("body_lr_scale", "a positive fraction of the learning rate, e.g. 0.1")
    if not cfg.bias_lr_scale > 0:
        bad("bias_lr_scale", "a positive multiple of the learning rate, e.g. 64 (the speed recipes') or 1")
    if not 0 < cfg.tta_gate <= 1:
        bad("tta_gate", "in (0, 1]: the fraction of each evaluation batch that gets the extra views, e.g. 0.3")
    if not cfg.muon_lr_scale > 0:
        bad("muon_lr_scale", "a positive fraction of the learning rate, e.g. 0.05")
    if cfg.muon_momentum is not None and not 0 <= cfg.muon_momentum < 1:
        bad("muon_momentum", "in [0, 1), e.g. 0.6; leave it out to use --momentum")
    if not 0 <= cfg.muon_decay_scale <= 1:
        bad("muon_decay_scale", "in [0, 1]: 1 decays the orthogonalised weights as the others, 0 not at all")
    if not 0 < cfg.test_split < 1:
        bad("test_split", "in (0, 1): the fraction of each class of a flat folder held out for test, e.g. 0.2")
    if not 0 <= cfg.val_split < 1:
        bad("val_split", "in [0, 1): the fraction of train held out, e.g. --val-split 0.1")
    for key in ("train_size", "test_size"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 1:
            bad(key, "a positive number of images")
    if cfg.loader == "memory" and cfg.crop == "random_resized":
        raise CnnlabError("--crop random_resized needs the original images, which only the streaming "
                          "loader keeps: use --loader stream (or auto), or --crop center")
    return cfg


def _sides(size: ImageSize) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else size


def closest_key(name: str) -> str | None:
    """The config key most like an unknown ``name``, for "did you mean" hints."""
    close = difflib.get_close_matches(name, FIELDS, n=1)
    return close[0] if close else None


def config_key(raw: Any, source: str, what: str = "config key") -> str:
    """``raw`` (``lr``, ``batch-size``) as a config key, or a CnnlabError naming the closest one."""
    key = str(raw).replace("-", "_")
    if key not in FIELDS:
        close = closest_key(key)
        hint = f"; did you mean {close!r}?" if close else ""
        raise CnnlabError(f"{source}: unknown {what} {raw!r}{hint} (run `cnnlab train --help` for all keys)")
    return key


def merge(cfg: Config, changes: dict[str, Any], *, source: str, check: bool = True) -> Config:
    """A new Config with ``changes`` applied; unknown keys name the closest known one, and each
    value is checked for its type. ``check``: also the rules between values (``validate``);
    ``resolve`` leaves those to the merged result of all its layers."""
    if not isinstance(changes, dict):
        raise CnnlabError(f"{source}: expected a mapping of config keys to values, got {type(changes).__name__}")
    values = {key: getattr(cfg, key) for key in FIELDS}   # typed as they are (to_dict makes a size a list)
    for raw, value in changes.items():
        key = config_key(raw, source)
        values[key] = _check_value(key, value, source)
    return validate(Config(**values)) if check else Config(**values)


class _AliasRefused(yaml.YAMLError):
    pass


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without aliases (``*name``): no config or space file needs one, and a few hundred
    bytes of nested aliases stand for gigabytes once anything walks the result (a "billion
    laughs" file), so the first one is refused before it is resolved."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _AliasRefused(f"line {event.start_mark.line + 1} uses the alias *{event.anchor}: cnnlab files "
                                f"take no aliases (nested ones can stand for gigabytes); write the value out")
        return super().compose_node(parent, index)


def load_yaml_file(path: str | Path, what: str = "config file") -> Any:
    """A YAML document, with one-line errors naming ``what`` and the file; aliases refused."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CnnlabError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise CnnlabError(f"cannot read {what} {path}: {e.strerror}") from None
    try:
        return yaml.load(text, Loader=_NoAliasLoader)
    except _AliasRefused as e:
        raise CnnlabError(f"{what} {path}, {e}") from None
    except yaml.YAMLError as e:
        raise CnnlabError(f"{what} {path} is not valid YAML: {str(e).splitlines()[0]}") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    data = load_yaml_file(path) or {}
    if not isinstance(data, dict):
        raise CnnlabError(f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}")
    if set(data) == {"config", "environment"} and isinstance(data["config"], dict):
        return data["config"]   # a run's config.json: train again exactly as that run did
    return data


def list_recipes() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("cnnlab.recipes").iterdir() if p.name.endswith(".yaml"))


RENAMED_RECIPES = {"tutorial": "lesson"}


def recipe_values(name: str) -> dict[str, Any]:
    """A recipe's keys, without its ``measured`` block (documentation, not config)."""
    known = list_recipes()
    if name not in known:
        close = [RENAMED_RECIPES[name]] if name in RENAMED_RECIPES else difflib.get_close_matches(name, known, n=2, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise CnnlabError(f"unknown recipe {name!r}: {hint}known recipes: {', '.join(known)}")
    data = yaml.safe_load(resources.files("cnnlab.recipes").joinpath(f"{name}.yaml").read_text()) or {}
    data.pop("measured", None)
    data.pop("description", None)
    return {**data, "recipe": name}


def recipe_document(name: str) -> dict[str, Any]:
    recipe_values(name)  # validates the name
    return yaml.safe_load(resources.files("cnnlab.recipes").joinpath(f"{name}.yaml").read_text()) or {}


# What a run started from published ImageNet weights gets unless a recipe, file or flag says
# otherwise: the fine-tuning fastai, timm and Keras's guides converge on (a new head trained
# alone first, then everything with the body at a lower rate; BatchNorm kept in inference
# mode; AdamW, warm-up and cosine decay; label smoothing; ``augment: auto``'s choice with
# weights). Measured on 1,000 CIFAR-10 images (benchmarks/finetune.py): the head's epochs take
# seconds on cached features, so 4 of them fit it well before the body moves; the body at 0.3
# of the rate beat 0.1 (79.2% against 76.9%, with 2 fewer epochs) and 0.5 (78.0%); at 1.0 it
# diverged. The last 60% of the body's blocks train (EfficientNet-Lite0's last 12 of 20): its
# steps took 0.72 of the whole body's, so 14 epochs (4 head-only, 10 of the body) cost less
# than 12 did and scored as well (79.8% against 79.2%).
FINE_TUNING: dict[str, Any] = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "schedule": "cosine",
                               "warmup": 0.5, "label_smoothing": 0.1, "epochs": 14, "freeze_epochs": 4.0,
                               "frozen_bn": True, "body_lr_scale": 0.3, "unfreeze": "last-60%",
                               "precision": "auto"}
FINE_TUNING_SOURCE = "fine-tuning defaults (--pretrained)"


def resolve(*, recipe: str | None = None, config_file: str | Path | None = None,
            overrides: dict[str, Any] | None = None, overrides_source: str = "command line") -> Config:
    """Defaults, then recipe, then file, then flags (``overrides`` with None meaning unset).

    Each layer's keys and value types are checked as it is applied, its errors naming it; the
    rules between values once, on the merged result (a file's ``freeze_epochs`` completed by a
    flag's ``--init-from`` is a config, not an error), naming the layer a bad value came from."""
    cfg, origins = Config(), {}
    file_values = read_yaml(config_file) if config_file else {}
    recipe = (overrides or {}).get("recipe") or recipe or file_values.get("recipe")
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    layers = [(recipe_values(recipe) if recipe else {}, f"recipe {recipe}"),
              (file_values, f"config file {config_file}"),
              (flags, overrides_source)]
    asked = {k: v for values, _ in layers for k, v in values.items()}
    if asked.get("pretrained") or asked.get("weights"):   # under every layer: any of them overrides a value
        layers.insert(0, (FINE_TUNING, FINE_TUNING_SOURCE))
    for values, source in layers:
        if values:
            cfg = merge(cfg, values, source=source, check=False)
            origins.update({config_key(k, source): source for k in values})
    return validate(cfg, origins)

