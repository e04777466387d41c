"""The typed training config: the single source of truth, saved with every run.

Resolution order: dataclass defaults, then a recipe (``--recipe NAME``, a YAML file shipped in
``cnnlab/recipes/``), then a config file (``--config FILE``), then command-line flags.
Unknown keys and bad values are refused with a message naming the key, the value received
and what is allowed.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from cnnlab.core.errors import CnnlabError


@dataclass
class Config:
    # --- data -------------------------------------------------------------------------
    data: str = "cifar10"                 # cifar10 | cifar100 | mnist | fashion-mnist | path to an image folder
    data_dir: str | None = None           # where official archives live (else $CNNLAB_DATA, else user cache)
    val_split: float = 0.1                # hold-out fraction of train when the data has no val/
    train_size: int | None = None         # stratified subset of train (before the hold-out)
    test_size: int | None = None          # stratified subset of test
    image_size: int | None = None         # image folders: resize to this (default: most common size; 224 streaming)
    bad_images: Literal["error", "skip"] = "error"
    normalize: Literal["dataset", "none"] = "dataset"   # per-channel standardisation, or the lesson's /255 only
    # Streaming (cnnlab.data.stream): decode image folders from disk in worker processes when
    # they would not fit in memory decoded; auto picks by size, memory/stream force one path.
    loader: Literal["auto", "memory", "stream"] = "auto"
    workers: int | None = None            # decode processes per training process (default: its cores - 1)
    crop: Literal["auto", "random_resized", "center"] = "auto"   # streamed training crop (auto: random_resized)
    center_crop: float = 0.875            # evaluation: centre square of this fraction of the shorter side
    # --- model ------------------------------------------------------------------------
    model: str = "tutorial"
    # --- optimisation -----------------------------------------------------------------
    epochs: float = 10                    # fractional epochs allowed (a recipe's schedule length)
    batch_size: int = 32
    optimizer: Literal["adam", "adamw", "sgd", "nesterov"] = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    # SGD/Nesterov: the fraction each weight shrinks per step, decoupled from the gradient (a
    # coupled L2 term lambda shrinks by lr * lambda / (1 - momentum) once momentum builds up).
    # Adam/AdamW: torch's own weight_decay.
    weight_decay: float = 0.0
    # Express lr and weight decay per 1024 examples and divide by the batch size (airbench's
    # convention), so a change of batch size keeps the same per-example step.
    lr_per_1024: bool = False
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup: float = 0.0                   # epochs of linear warm-up from zero
    final_lr_fraction: float = 0.0        # where linear/cosine decay ends, as a fraction of lr
    label_smoothing: float = 0.0
    bias_lr_scale: float = 1.0            # BatchNorm/bias parameters learn this many times faster
    # --- augmentation (on whole batches, on the training device) --------------------
    flip: Literal["none", "random", "alternating"] = "none"
    translate: int = 0                    # random shift of up to this many pixels (reflect-padded)
    cutout: int = 0                       # side of a zeroed square, 0 for none
    # --- weight averaging, whitening, test-time augmentation --------------------------
    ema: float = 0.0                      # decay of an exponential moving average of weights (0: off)
    ema_every: int = 5                    # steps between EMA updates
    ema_start: float = 0.0                # fraction of training before EMA starts
    ema_ramp: bool = False                # decay grows as ema * progress**3: averages only late in training
    lookahead: bool = False               # reset the live weights to the average at each EMA update
    whiten: bool = False                  # initialise the first conv from patch whitening (models that have it)
    whiten_bias_epochs: float | None = None   # train the whitening layer's bias this long, then freeze it (None: always)
    tta: Literal["none", "flip", "flip_translate"] = "none"
    # --- speed ------------------------------------------------------------------------
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    channels_last: bool = True           # NHWC tensors: 25% faster for the lesson's net on this CPU
    compile: bool = False
    threads: int | None = None            # torch intra-op threads (default: cores available / processes)
    nproc: int = 1                        # `cnnlab train --nproc N`: data-parallel processes on this machine
    sync_bn: bool = False                 # BatchNorm statistics over all processes (CUDA only; default per process)
    # --- run control ------------------------------------------------------------------
    time_limit: float | None = None       # seconds of training; stops mid-epoch, lr decays over the time
    early_stop: int | None = None         # stop after this many epochs without val improvement
    keep: Literal["last", "best"] = "last"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"   # auto: cuda, then mps, then cpu
    checkpoint_every: int = 0             # also checkpoint every N steps (0: only each epoch)
    recipe: str | None = None             # the recipe this config started from, for the record
    tensorboard: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "Config":
        return merge(self, changes, source="arguments")


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_HINTS = typing.get_type_hints(Config)
DEVICES: tuple[str, ...] = typing.get_args(_HINTS["device"])


def _check_value(key: str, value: Any, source: str) -> Any:
    """Coerce ``value`` to the field's type or raise a CnnlabError naming what is allowed."""
    hint = _HINTS[key]
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = True, args[0]
    if value is None:
        if optional:
            return None
        raise CnnlabError(f"{source}: {key} cannot be empty")
    if typing.get_origin(hint) is Literal:
        allowed = typing.get_args(hint)
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
    except (TypeError, ValueError):
        pass
    raise CnnlabError(f"{source}: {key} must be {'an integer' if hint is int else 'a number' if hint is float else 'true or false' if hint is bool else 'a string'}; got {value!r}")


def validate(cfg: Config) -> Config:
    """Range checks that types alone cannot express."""
    def bad(key, rule):
        raise CnnlabError(f"{key} must be {rule}; got {getattr(cfg, key)!r}")
    if not (cfg.epochs > 0 and math.isfinite(cfg.epochs)):
        bad("epochs", "a positive number, e.g. --epochs 10")
    if cfg.batch_size < 1:
        bad("batch_size", "a positive integer, e.g. --batch-size 32")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
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
    if cfg.early_stop is not None and cfg.early_stop < 1:
        bad("early_stop", "a positive number of epochs")
    if cfg.threads is not None and cfg.threads < 1:
        bad("threads", "a positive integer")
    if cfg.workers is not None and cfg.workers < 0:
        bad("workers", "zero (decode in the training process) or more")
    if cfg.nproc < 1:
        bad("nproc", "a positive number of processes, e.g. --nproc 2")
    if not 0 < cfg.center_crop <= 1:
        bad("center_crop", "in (0, 1]: 0.875 is the ImageNet convention (256 -> 224), 1 keeps the whole shorter side")
    if cfg.image_size is not None and cfg.image_size < 8:
        bad("image_size", "at least 8 pixels")
    return cfg


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


def merge(cfg: Config, changes: dict[str, Any], *, source: str) -> Config:
    """A new Config with ``changes`` applied; unknown keys name the closest known one."""
    if not isinstance(changes, dict):
        raise CnnlabError(f"{source}: expected a mapping of config keys to values, got {type(changes).__name__}")
    values = cfg.to_dict()
    for raw, value in changes.items():
        key = config_key(raw, source)
        values[key] = _check_value(key, value, source)
    return validate(Config(**values))


def load_yaml_file(path: str | Path, what: str = "config file") -> Any:
    """A YAML document, with one-line errors naming ``what`` and the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CnnlabError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise CnnlabError(f"cannot read {what} {path}: {e.strerror}") from None
    try:
        return yaml.safe_load(text)
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


def recipe_values(name: str) -> dict[str, Any]:
    """A recipe's keys, without its ``measured`` block (documentation, not config)."""
    known = list_recipes()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=2, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise CnnlabError(f"unknown recipe {name!r}: {hint}known recipes: {', '.join(known)}")
    data = yaml.safe_load(resources.files("cnnlab.recipes").joinpath(f"{name}.yaml").read_text()) or {}
    data.pop("measured", None)
    data.pop("description", None)
    return {**data, "recipe": name}


def recipe_document(name: str) -> dict[str, Any]:
    recipe_values(name)  # validates the name
    return yaml.safe_load(resources.files("cnnlab.recipes").joinpath(f"{name}.yaml").read_text()) or {}


def resolve(*, recipe: str | None = None, config_file: str | Path | None = None,
            overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then recipe, then file, then flags (``overrides`` with None meaning unset)."""
    cfg = Config()
    file_values = read_yaml(config_file) if config_file else {}
    recipe = (overrides or {}).get("recipe") or recipe or file_values.get("recipe")
    if recipe:
        cfg = merge(cfg, recipe_values(recipe), source=f"recipe {recipe}")
    if file_values:
        cfg = merge(cfg, file_values, source=f"config file {config_file}")
    if overrides:
        cfg = merge(cfg, {k: v for k, v in overrides.items() if v is not None}, source="command line")
    return cfg


def to_json(cfg: Config) -> str:
    return json.dumps(cfg.to_dict(), indent=2)
