"""Search spaces: which config keys a study varies, over what ranges.

A space file is YAML: one entry per config key (the names ``cnnlab train --help`` lists,
``-`` or ``_`` alike). Each entry is one of

    lr: {low: 1.0e-4, high: 1.0e-1, log: true}     # a range: float or int by the key's type
    epochs: {low: 3, high: 15, type: int}          # whole numbers for a float key
    translate: {low: 0, high: 4, step: 2}          # a stepped range: 0, 2, 4
    weight_decay: {low: 1.0e-6, high: 1.0e-2, log: true, zero: true}   # ... or exactly 0
    batch_size: [32, 64, 128]                      # a list: one of these values
    optimizer: {choices: [adam, nesterov]}         # the same, spelt out
    momentum: 0.95                                 # a single value: fixed for every trial

Range keys: ``low``, ``high`` (required, ``low < high``), ``log`` (sample the logarithm
evenly; needs ``low > 0``), ``step`` (not with ``log``), ``type`` (``int`` or ``float``;
default: the key's own type), ``zero`` (also try exactly 0: a yes/no parameter named
``use_<key>`` decides, then the range is sampled only when it says yes; for decay-like keys
whose natural scale is logarithmic but whose "off" value is 0).

Every value is checked as the config would check it (``label_smoothing`` within [0, 1],
``optimizer`` one of its names...), so a bad space fails before the first trial. Keys that
define the data or the scoring split (``data``, ``val_split``, ``train_size``, ``seed``...)
cannot be searched: trials must be scored on the same validation images.

The grid sampler needs a finite set: lists, int ranges, or float ranges with a ``step``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from cnnlab.core.config import Config, config_key, field_type, load_yaml_file, merge
from cnnlab.core.errors import CnnlabError

# The data, the hold-out and the seed define what a trial is scored on; searching them would
# compare trials on different validation images (or pick the luckiest seed).
NOT_SEARCHABLE = ("data", "data_dir", "val_split", "train_size", "test_size", "bad_images",
                  "seed", "device", "recipe")
RANGE_KEYS = ("low", "high", "log", "step", "type", "zero")
GRID_MAX_POINTS = 1000          # per parameter: a longer list is almost surely a missing step

Kind = Literal["float", "int", "choice", "fixed"]


@dataclass(frozen=True)
class Param:
    name: str
    kind: Kind
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    zero: bool = False
    choices: tuple = ()
    value: Any = None

    @property
    def bounds(self) -> tuple[float, float]:
        """(low, high) of a float or int range."""
        if self.low is None or self.high is None:
            raise ValueError(f"{self.name}: a {self.kind} range needs low and high")
        return self.low, self.high

    @property
    def switch(self) -> str:
        """Name of the yes/no parameter of a ``zero: true`` range."""
        return f"use_{self.name}"

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"{self.name}={self.value}"
        if self.kind == "choice":
            return f"{self.name} in {list(self.choices)}"
        text = f"{self.name} {self.kind} [{self.low:g}, {self.high:g}]"
        text += " log" if self.log else f" step {self.step:g}" if self.step else ""
        return text + (" or 0" if self.zero else "")

    def grid_values(self) -> list:
        if self.kind == "choice":
            return list(self.choices)
        if self.step is None and self.kind == "float":
            how = ("a list of values, e.g. [0, 1.0e-4, 1.0e-3]" if self.log else
                   f"a step ({{low: {self.low:g}, high: {self.high:g}, step: ...}}) or a list")
            raise CnnlabError(f"the grid sampler needs a finite set of values for {self.name}: give {how}")
        step = self.step or 1
        low, high = self.bounds
        count = int(math.floor((high - low) / step + 1e-9)) + 1
        if count > GRID_MAX_POINTS:
            raise CnnlabError(f"the grid for {self.name} would have {count} points; give a larger step or a list")
        values = [low + i * step for i in range(count)]
        values = [int(round(v)) for v in values] if self.kind == "int" else [round(v, 12) for v in values]
        return ([0] if self.zero else []) + values

    def suggest(self, trial, grid: bool) -> Any:
        """The value for one trial (None for a ``zero`` range that the switch turned off)."""
        if self.kind == "fixed":
            return self.value
        if grid or self.kind == "choice":
            return trial.suggest_categorical(self.name, self.grid_values() if grid else list(self.choices))
        if self.zero and not trial.suggest_categorical(self.switch, [True, False]):
            return 0
        if self.kind == "int":
            low, high = self.bounds
            return trial.suggest_int(self.name, int(low), int(high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, *self.bounds, step=self.step, log=self.log)


@dataclass
class SearchSpace:
    params: dict[str, Param]
    source: str = "default space"
    removed: dict[str, Any] = field(default_factory=dict)   # searched keys fixed by a flag instead

    @property
    def searched(self) -> list[str]:
        return [n for n, p in self.params.items() if p.kind != "fixed"]

    def fixing(self, values: dict[str, Any]) -> "SearchSpace":
        """This space with ``values`` (command-line flags) fixed instead of searched."""
        params = {n: p for n, p in self.params.items() if n not in values}
        removed = {n: values[n] for n in self.params if n in values}
        return replace(self, params=params, removed={**self.removed, **removed})

    def suggest(self, trial, *, grid: bool = False) -> dict[str, Any]:
        """Config values for one trial: every fixed and searched key of the space."""
        return {name: p.suggest(trial, grid) for name, p in self.params.items()}

    def grid(self) -> dict[str, list]:
        return {name: p.grid_values() for name, p in self.params.items() if p.kind != "fixed"}

    def max_value(self, name: str, default: float) -> float:
        """The largest value ``name`` can take (e.g. epochs, for Hyperband's budget)."""
        p = self.params.get(name)
        if p is None:
            return default
        if p.kind == "fixed":
            return p.value
        if p.kind == "choice":
            return max(p.choices)
        return p.bounds[1]

    def describe(self) -> list[str]:
        return [p.describe() for p in self.params.values()]


# ----------------------------------------------------------------------------- the default
DEFAULT_SPACE: dict[str, Any] = {
    # Adam's usual 1e-3 sits in the middle; SGD-family optimizers like the upper decade.
    "lr": {"low": 1e-4, "high": 1e-1, "log": True},
    "batch_size": [32, 64, 128],
    "epochs": {"low": 3, "high": 15, "type": "int"},
    "weight_decay": {"low": 1e-6, "high": 1e-2, "log": True, "zero": True},
    "optimizer": ["adam", "adamw", "nesterov"],
    "label_smoothing": {"low": 0.0, "high": 0.2},
}


def default_space(base: Config | None = None) -> SearchSpace:
    return parse_space(DEFAULT_SPACE, base=base, source="default space")


def load_space(path: str | Path, base: Config | None = None) -> SearchSpace:
    doc = load_yaml_file(path, "space file")
    return parse_space(doc, base=base, source=f"space file {path}")


# ----------------------------------------------------------------------------- parsing
def _field_type(name: str) -> tuple[str, tuple]:
    """('int' | 'float' | 'bool' | 'str' | 'choice', allowed choices) of a Config key."""
    kind = field_type(name)
    return kind.kind, kind.choices


def _coerce(base: Config, name: str, value: Any, what: str, source: str) -> Any:
    """``value`` as the config stores it, or an error naming the entry and the rule."""
    try:
        return getattr(merge(base, {name: value}, source=source), name)
    except CnnlabError as e:
        rule = str(e).removeprefix(f"{source}: ")
        raise CnnlabError(f"{source}: {name}: {what} {value!r} is not allowed ({rule})") from None


def _number(name: str, key: str, value: Any, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CnnlabError(f"{source}: {name}: {key} must be a number, got {value!r}")
    return value


def parse_space(doc: Any, *, base: Config | None = None, source: str = "space") -> SearchSpace:
    """Validate a space document (the YAML's mapping) against the config."""
    base = base or Config()
    if not isinstance(doc, dict) or not doc:
        raise CnnlabError(f"{source} must be a mapping of config keys to ranges or lists, e.g. "
                          f"`lr: {{low: 1.0e-4, high: 1.0e-1, log: true}}`; got {type(doc).__name__}"
                          f"{' (empty)' if doc in ({}, None) else ''}")
    params: dict[str, Param] = {}
    for raw_name, spec in doc.items():
        name = config_key(raw_name, source, what="parameter")
        if name in NOT_SEARCHABLE:
            raise CnnlabError(f"{source}: {name} cannot be searched: it decides which images a trial is "
                              f"scored on; set it once with --{name.replace('_', '-')}")
        if name in params:
            raise CnnlabError(f"{source}: {name} is given twice")
        params[name] = _parse_param(name, spec, base, source)
    return SearchSpace(params, source)


def _parse_param(name: str, spec: Any, base: Config, source: str) -> Param:
    ftype, _ = _field_type(name)
    if isinstance(spec, dict) and "choices" in spec:
        if set(spec) != {"choices"}:
            raise CnnlabError(f"{source}: {name}: `choices` cannot be combined with {sorted(set(spec) - {'choices'})}")
        spec = spec["choices"]
    if isinstance(spec, list):
        if not spec:
            raise CnnlabError(f"{source}: {name}: the list of choices is empty")
        choices = tuple(_coerce(base, name, v, "choice", source) for v in spec)
        if len(set(choices)) != len(choices):
            raise CnnlabError(f"{source}: {name}: the choices {list(spec)} repeat a value")
        return Param(name, "choice", choices=choices)
    if not isinstance(spec, dict):
        return Param(name, "fixed", value=_coerce(base, name, spec, "value", source))

    unknown = sorted(set(spec) - set(RANGE_KEYS))
    if unknown:
        raise CnnlabError(f"{source}: {name}: unknown range key(s) {', '.join(map(repr, unknown))}; a range "
                          f"takes {', '.join(RANGE_KEYS)}, or give a list of choices")
    if ftype not in ("int", "float"):
        raise CnnlabError(f"{source}: {name} is not a number, so it cannot have a range: give a list of "
                          f"choices, e.g. `{name}: [{', '.join(map(str, _field_type(name)[1] or ('a', 'b')))}]`")
    for key in ("low", "high"):
        if key not in spec:
            raise CnnlabError(f"{source}: {name}: a range needs both low and high; got {spec}")
    low, high = (_number(name, k, spec[k], source) for k in ("low", "high"))
    kind = spec.get("type", ftype)
    if kind not in ("int", "float"):
        raise CnnlabError(f"{source}: {name}: type must be int or float, got {kind!r}")
    if ftype == "int" and kind == "float":
        raise CnnlabError(f"{source}: {name} is a whole number: type float is not allowed")
    log, zero = spec.get("log", False), spec.get("zero", False)
    for key, flag in (("log", log), ("zero", zero)):
        if not isinstance(flag, bool):
            raise CnnlabError(f"{source}: {name}: {key} must be true or false, got {flag!r}")
    step = spec.get("step")
    if step is not None:
        step = _number(name, "step", step, source)
        if step <= 0:
            raise CnnlabError(f"{source}: {name}: step must be positive, got {step!r}")
        if log:
            raise CnnlabError(f"{source}: {name}: give either log or step, not both")
    if kind == "int":
        for key, v in (("low", low), ("high", high), ("step", step)):
            if v is not None and float(v) != int(v):
                raise CnnlabError(f"{source}: {name}: {key} must be a whole number for an int range, got {v!r}")
    if not low < high:
        raise CnnlabError(f"{source}: {name}: low must be below high, got low {low!r}, high {high!r} "
                          f"(to fix a value, write `{name}: {low}`)")
    if log and low <= 0:
        raise CnnlabError(f"{source}: {name}: a log range needs low > 0, got {low!r} (to include 0, "
                          f"add `zero: true`)")
    if step is not None and (high - low) / step < 1 - 1e-9:
        raise CnnlabError(f"{source}: {name}: step {step!r} is wider than the range [{low}, {high}]")
    low = _coerce(base, name, low, "low", source)
    high = _coerce(base, name, high, "high", source)
    if zero:
        _coerce(base, name, 0, "zero (the value 0)", source)
    return Param(name, kind, low=low, high=high, log=log, step=step, zero=zero)

