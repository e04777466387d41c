"""How long a recipe takes on *this* machine, from a few timed training steps of its network.

Recipe times are measured on one machine, and machines differ by 5x or more (an AMX Xeon in
bfloat16 against an AVX2 laptop in float32). ``estimate`` runs the recipe's own training step
(its model, optimizer, augmentation, precision and memory layout, through ``Trainer``) on a
few synthetic batches, times evaluation the same way, and scales both to the recipe's data.
Probes are cached per machine, torch and cnnlab version, so `cnnlab recipes` pays once.
"""
from __future__ import annotations

import hashlib
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from cnnlab.core import hardware
from cnnlab.core.config import Config
from cnnlab.core.files import read_json, write_json
from cnnlab.core.version import __version__
from cnnlab.data.dataset import Dataset, Split
from cnnlab.engine.evaluation import TTA_VIEWS

PROBE_BATCH = 64      # images a probe step; CPU throughput is about flat from here up
PROBE_STEPS = 3       # timed one by one after an untimed warm-up step (oneDNN builds its kernels
                      # then); the median step, so a neighbour's burst on a shared machine is ignored
# The recipes' data: CIFAR-10, 50,000 training and 10,000 test images of 32x32x3.
TRAIN_IMAGES, TEST_IMAGES, IMAGE_SHAPE, CLASSES = 50_000, 10_000, (32, 32, 3), 10
# Start-up (imports, the decoded-data cache), whitening, writing the run folder and the report:
# speed70's whole process less its training and evaluation, measured at about 6 s.
START_UP_SECONDS = 6.0
# Part of each cached probe's key: changed with any engine change that moves a step's cost (here:
# freed memory reused, the conv products per CPU), so probes cached before it are taken again.
ENGINE_REVISION = "2026-12-06"


@dataclass
class Probe:
    train_images_per_s: float
    eval_images_per_s: float      # one view (no test-time augmentation)
    machine: str                  # what was probed: "AMD EPYC (ISA AVX2, 2 threads, float32)"


@dataclass
class Estimate:
    seconds: float
    probe: Probe


def machine_description(device: torch.device, precision: hardware.Precision) -> str:
    return (f"{hardware.device_name(device)} (ISA {hardware.cpu_isa()}, {torch.get_num_threads()} threads, "
            f"{precision.name})" if device.type == "cpu" else f"{hardware.device_name(device)} ({precision.name})")


def _synthetic(n: int, rng: np.random.Generator) -> Split:
    return Split(rng.integers(0, 256, (n, *IMAGE_SHAPE), dtype=np.uint8), rng.integers(0, CLASSES, n))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@hardware.borrowed_process()
def probe(cfg: Config, *, batch: int = PROBE_BATCH, steps: int = PROBE_STEPS) -> Probe:
    """Time the recipe's training step and evaluation on synthetic CIFAR-sized batches."""
    from cnnlab.engine.build import build_training  # the loop is heavy: imported when a probe runs
    from cnnlab.engine.evaluation import evaluate
    from cnnlab.engine.prepare import plan_run
    from cnnlab.engine.trainer import Trainer
    rng = np.random.default_rng(0)
    n = batch * (steps + 1)
    data = Dataset("probe", [f"c{i}" for i in range(CLASSES)], _synthetic(n, rng), _synthetic(n, rng))
    # A tiny rate: random images must not send the weights anywhere odd (denormals are slow).
    plan = plan_run(cfg.replace(batch_size=batch, epochs=1, lr=1e-6, lr_per_1024=False, warmup=0.0, val_split=0.0,
                                time_limit=None, nproc=1, checkpoint_every=0, tensorboard=False), read_folder=False)
    cfg, device = plan.cfg, plan.device
    hardware.set_threads(cfg.threads)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(build_training(cfg, data, device, start=None), Path(tmp) / "probe", progress=False)
        batches = iter(trainer.batches.epoch(0))
        trainer.train_step(*next(batches))
        step_seconds = []
        for _ in range(steps):
            _sync(device)
            start = time.perf_counter()
            trainer.train_step(*next(batches))
            _sync(device)
            step_seconds.append(time.perf_counter() - start)
        train_rate = batch / statistics.median(step_seconds)
        eval_seconds = []
        for _ in range(2):   # the first builds the inference kernels
            start = time.perf_counter()
            evaluate(trainer.model, data.test, device, dtype=trainer.dtype, channels_last=cfg.channels_last)
            eval_seconds.append(time.perf_counter() - start)
        eval_rate = n / eval_seconds[-1]
        machine = machine_description(device, trainer.precision)
    return Probe(train_rate, eval_rate, machine)


def cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "cnnlab" / "speed-probes.json"


def _key(cfg: Config) -> str:
    """The probe depends on the machine, the versions and the settings that set the step's cost."""
    device = hardware.pick_device(cfg.device)
    precision = hardware.choose_precision(cfg.precision, device, strict=False)
    parts = [hardware.device_name(device), hardware.cpu_isa(), str(cfg.threads or hardware.available_cores()),
             os.environ.get("ONEDNN_MAX_CPU_ISA", ""), precision.name, torch.__version__, __version__, ENGINE_REVISION,
             *(f"{k}={getattr(cfg, k)}" for k in ("model", "optimizer", "flip", "translate", "cutout", "whiten",
                                                   "ema", "ema_every", "channels_last", "compile"))]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def cached_probe(cfg: Config, *, refresh: bool = False) -> Probe:
    path = cache_path()
    try:
        cache = read_json(path) if path.exists() else {}
    except (OSError, ValueError):
        cache = {}   # a damaged cache is only a cache: probe again
    key = _key(cfg)
    if key in cache and not refresh:
        return Probe(**cache[key])
    with hardware.reuse_freed_memory():   # as training runs
        result = probe(cfg)
    cache[key] = asdict(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, cache)
    return result


def estimate(cfg: Config, *, refresh: bool = False) -> Estimate:
    """Wall seconds for ``cfg`` on CIFAR-10 here: start-up, training, then evaluation (the
    validation split each epoch, the test split once with the recipe's test-time views)."""
    p = cached_probe(cfg, refresh=refresh)
    train_images = TRAIN_IMAGES * (1 - cfg.val_split)
    val_images = TRAIN_IMAGES * cfg.val_split
    eval_images = val_images * np.ceil(cfg.epochs) + TEST_IMAGES * (1 + (TTA_VIEWS[cfg.tta] - 1) * cfg.tta_gate)
    seconds = (START_UP_SECONDS + cfg.epochs * train_images / p.train_images_per_s
               + eval_images / p.eval_images_per_s)
    return Estimate(float(seconds), p)


def format_seconds(seconds: float) -> str:
    """``45 s``, ``13 min``, ``2.1 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def describe(estimate_: Estimate) -> str:
    return (f"about {format_seconds(estimate_.seconds)} here ({estimate_.probe.machine}; probe: "
            f"{estimate_.probe.train_images_per_s:.0f} img/s training)")


__all__ = ["Estimate", "Probe", "cached_probe", "describe", "estimate", "format_seconds", "probe"]
