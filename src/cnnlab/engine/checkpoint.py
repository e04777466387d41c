"""Resume state in one safetensors file: tensors as tensors, everything else as JSON metadata.

No pickle anywhere, so loading a checkpoint can never run code. The file is written
atomically, so an interrupted write leaves the previous checkpoint whole, and its tensors are
never NaN or infinite (the loop checks before writing, and reading refuses one that is), so it
is always a state to go back to.

Resuming keeps the config the run started with. The one change allowed is ``epochs``, and
only when nothing already trained depends on the run's length: a constant learning rate (a
linear or cosine schedule decays over the length, so stretching it would make the rate jump
back up), no EMA ramp or delayed EMA start (both timed by the length), and not shortening
below what was trained. Then "E epochs, resumed with --epochs F" equals an F-epoch run.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from cnnlab.core.config import FIELDS, Config, merge
from cnnlab.core.errors import CnnlabError
from cnnlab.core.files import write_bytes
from cnnlab.core.tensors import require_finite
from cnnlab.engine.optim import Optimizer
from cnnlab.engine.runs import empty_history

FORMAT = "cnnlab-checkpoint-1"


def optimizer_to_flat(opt: Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"groups": groups, "scalars": scalars}


def optimizer_from_flat(opt: Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Inverse of ``optimizer_to_flat``; tensor keys with or without their ``optim.`` prefix."""
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        idx, k = key.removeprefix("optim.").split(".", 1)
        state.setdefault(int(idx), {})[k] = t
    for key, v in meta["scalars"].items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["groups"]})
    # Safetensors stores tensors contiguous; give each state tensor its parameter's layout
    # back (channels_last convolutions): fused optimizer kernels assume the layouts match.
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            for k, v in st.items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    st[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def rng_states() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    py = random.getstate()
    np_state = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state(legacy=True))
    meta = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], np_state[2], np_state[3], np_state[4]]}
    tensors = {"rng.torch": torch.get_rng_state(), "rng.numpy": torch.from_numpy(np_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    v, state, gauss = meta["python"]
    random.setstate((v, tuple(state), gauss))
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    payload = save(flat, metadata={"format": FORMAT, "state": json.dumps(meta)})
    write_bytes(path, payload)


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata; anything that is not our safetensors format is refused unread."""
    if not path.is_file():
        raise CnnlabError(f"no checkpoint at {path}: the run has not finished an epoch yet, "
                          f"so there is nothing to resume; start it again")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CnnlabError(f"{path} is not a cnnlab checkpoint (a safetensors file) and was not "
                          f"loaded: {e}. cnnlab never unpickles resume state") from None
    try:
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}")
        state = json.loads(meta["state"])
    except (KeyError, ValueError) as e:
        raise CnnlabError(f"{path} is a safetensors file but not a {FORMAT} checkpoint ({e})") from None
    require_finite(tensors, str(path), "cnnlab never writes such a checkpoint, so it is damaged and cannot be "
                                       "resumed; start the run again, or resume an earlier copy of its folder")
    return tensors, state


def _show(value: Any) -> str:
    return repr(int(value)) if isinstance(value, float) and value.is_integer() else repr(value)


# ----------------------------------------------------------------------------- the loop's state
@dataclass
class LoopState:
    epoch: int = 0                 # epochs completed
    step_in_epoch: int = 0         # batches done in the current epoch
    global_step: int = 0
    history: dict[str, list] = field(default_factory=empty_history)
    best_val: float = -math.inf
    best_epoch: int = 0
    train_seconds: float = 0.0
    # Sums over the steps done of the epoch in progress, saved by mid-epoch checkpoints so a
    # resumed epoch reports the same loss, accuracy and seconds as an uninterrupted one.
    epoch_loss: float = 0.0
    epoch_correct: int = 0
    epoch_seen: int = 0
    epoch_seconds: float = 0.0


def loop_state(meta: dict[str, Any]) -> LoopState:
    """The loop's state from a checkpoint's metadata, by name. Checkpoints written before the
    state was saved as a named ``loop`` mapping (cnnlab 0.x, 2026-12) kept it as top-level keys
    and an ``epoch_partial`` list; they still resume."""
    if "loop" in meta:
        saved = dict(meta["loop"])
    else:
        saved = {k: meta[k] for k in ("epoch", "step_in_epoch", "global_step", "history", "best_val",
                                      "best_epoch", "train_seconds")}
        saved.update(zip(("epoch_loss", "epoch_correct", "epoch_seen", "epoch_seconds"), meta.get("epoch_partial", ())))
    if saved.get("best_val") is None:
        saved["best_val"] = -math.inf
    known = {f.name for f in dataclasses.fields(LoopState)}
    return LoopState(**{k: v for k, v in saved.items() if k in known})



def resumed_config(meta: dict[str, Any], changes: dict[str, Any], run: Path) -> Config:
    """The saved config with ``changes`` applied, or a CnnlabError listing what may not change.

    A value equal to the saved one is not a change. See the module docstring for ``epochs``.
    """
    # A run saved before --augment existed trained with none of its presets.
    saved = merge(Config(), {"augment": "none", **meta["config"]}, source=f"{run} checkpoint")
    wanted = merge(saved, changes, source="--resume")
    diff = {k: (getattr(saved, k), getattr(wanted, k)) for k in FIELDS if getattr(saved, k) != getattr(wanted, k)}
    listed = "; ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in diff.items())
    if set(diff) - {"epochs"}:
        raise CnnlabError(f"--resume continues {run} with the config it started with, but these differ: "
                          f"{listed}. Only --epochs may change; for other settings start a new run "
                          f"(e.g. --config {run}/config.json with your flags and a new --out)")
    if not diff:
        return saved
    old, new = diff["epochs"]
    reasons = []
    if saved.schedule != "constant":
        reasons.append(f"its {saved.schedule} schedule decays the learning rate over the length it "
                       f"started with ({_show(old)} epochs); stretching it now would make the rate jump back up")
    if saved.ema_ramp or saved.ema_start > 0:
        reasons.append("its EMA " + ("ramp" if saved.ema_ramp else "start") + " is timed by the run's length")
    state = loop_state(meta)
    if old % 1 and state.epoch > old:
        reasons.append(f"it has already trained the partial last epoch of its {_show(old)} epochs")
    spe = meta.get("steps_per_epoch")
    if spe and max(1, round(new * spe)) < state.global_step:
        reasons.append(f"it has already trained {state.global_step / spe:.3g} epochs")
    if reasons:
        raise CnnlabError(f"cannot resume {run} with {listed}: {' and '.join(reasons)}. Only a run with a "
                          f"constant learning rate can change length; start a new run with --epochs "
                          f"{_show(new)} instead (e.g. --config {run}/config.json --out NEW)")
    return wanted
