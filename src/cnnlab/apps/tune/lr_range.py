"""The learning-rate range test (Smith 2015, "Cyclical Learning Rates for Training Neural
Networks", section 3.3): a quick first answer before a full search.

From a fresh model, train one batch per step with the learning rate rising exponentially
from ``start`` to ``end``; smooth the loss (an exponential moving average, bias-corrected)
and stop once it exceeds ``DIVERGE`` x its best. Three readings of the smoothed curve, each
taken (as fastai does) without its first tenth, where the bias-corrected average rests on a
few losses, and its last ``SKIP_END`` steps, where it diverges:

- **valley**, the suggestion (fastai's rule, ``fastai.callback.schedule.valley``): the
  longest run of ever-lower losses (the longest decreasing subsequence, so noise does not
  break it), counted back from its lowest point; the suggestion is 2/3 of the way down it,
  a third of its length before the bottom. It needs no slope (which noise swamps) and no
  minimum (which lags, then sits just before the divergence).
- **steepest**: where the smoothed loss falls fastest per decade of learning rate, before
  the minimum. On a noisy or flat curve it lands anywhere: ``--steps 30`` for Adam gave
  2.4e-06, where nothing trains.
- **min/10**: a tenth of the rate at the lowest smoothed loss (Smith's and fastai's first
  rule): one decade below where the loss stops falling.

tests/test_tune.py trains the valley's rate and a grid of rates on real images and checks
that it is within a few points of the grid's best.

It runs on the one training loop (model, optimizer, batches, augmentation, precision) as a
callback, ``RangeTest``, that sets each step's rate from the ramp and stops the run.
Rates are in the config's units (per 1024 examples when ``lr_per_1024`` is on). Writes
``lr_find.json`` and ``lr_find.png`` in the output folder.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from cnnlab.core.config import Config
from cnnlab.core.errors import CnnlabError
from cnnlab.core.events import Callback
from cnnlab.core.files import write_json
from cnnlab.core.hardware import borrowed_process
from cnnlab.engine.runs import default_run_name, run_path

DIVERGE = 4.0          # stop once the smoothed loss passes this multiple of its best
SMOOTHING = 0.98       # EMA factor for the loss (fastai's choice: about 50 steps of memory)
SKIP_START = 0.1       # fraction of the first steps no rule reads (fastai: num_it // 10)
SKIP_END = 5           # last steps no rule reads (fastai's skip_end), at most a fifth of them
VALLEY_FRACTION = 2 / 3   # how far down the valley the suggestion sits
MIN_STEPS = 10
SHORT_VALLEY = 3       # a valley of fewer steps: the loss barely fell; say so


@dataclass
class Suggestions:
    """Learning rates read off a smoothed loss curve (indices into it)."""
    valley: int                      # the suggestion
    valley_start: int                # the valley's top ...
    valley_end: int                  # ... and bottom
    steepest: int
    lowest: int


@dataclass
class LrFindResult:
    out: Path
    suggested_lr: float              # the valley rule's
    steepest_lr: float               # steepest descent of the smoothed loss
    min_loss_lr: float               # where the smoothed loss was lowest
    valley_lrs: tuple[float, float]  # the valley's top and bottom
    lrs: list[float] = field(repr=False)
    losses: list[float] = field(repr=False)
    smoothed: list[float] = field(repr=False)
    diverged: bool = False

    @property
    def min_loss_lr_div_10(self) -> float:
        return self.min_loss_lr / 10


class RangeTest(Callback):
    """The range test on the one training loop: each step's rate set from an exponential ramp
    from ``start`` to ``end`` over ``steps`` (SGD's decoupled decay at full strength, as under a
    constant schedule), each step's loss recorded and smoothed, and training stopped when the
    smoothed loss diverges or the ramp ends."""

    def __init__(self, start: float, end: float, steps: int, *, scale: float, progress: bool):
        self.start, self.steps, self.scale = start, steps, scale
        self.ratio = (end / start) ** (1 / (steps - 1))
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.smoothed: list[float] = []
        self.avg, self.best, self.diverged = 0.0, math.inf, False
        self.bar = tqdm(total=steps, desc="lr-find", unit="step", disable=not progress, leave=False)

    def rate(self, step: int) -> float:   # in the config's units
        return self.start * self.ratio ** step

    def on_step_begin(self, trainer: Any) -> None:
        # The optimizer receives effective rates; with lr_per_1024 the config's rate is per 1024 examples.
        trainer.lr, trainer.decay_mult = self.rate(trainer.state.global_step) * self.scale, 1.0

    def on_step_end(self, trainer: Any) -> None:
        step, loss = len(self.lrs), float(trainer.last_loss)
        self.bar.update(1)
        if not math.isfinite(loss):
            self._stop(trainer, diverged=True)
            return
        self.avg = SMOOTHING * self.avg + (1 - SMOOTHING) * loss
        smooth = self.avg / (1 - SMOOTHING ** (step + 1))
        self.lrs.append(self.rate(step))
        self.losses.append(loss)
        self.smoothed.append(smooth)
        self.best = min(self.best, smooth)
        if smooth > DIVERGE * self.best:
            self._stop(trainer, diverged=True)
        elif len(self.lrs) >= self.steps:
            self._stop(trainer, diverged=False)

    def _stop(self, trainer: Any, diverged: bool) -> None:
        self.diverged = diverged
        trainer.end_epoch_now()
        trainer.request_stop(None)


@borrowed_process()
def lr_find(cfg: Config, *, start: float = 1e-7, end: float = 10.0, steps: int = 100,
            out: str | Path | None = None, progress: bool = True) -> LrFindResult:
    """Run the range test for ``cfg`` (its model, data, optimizer, batch size)."""
    from cnnlab.core.hardware import set_threads
    from cnnlab.engine.build import build_training, starting_weights
    from cnnlab.engine.prepare import load_data, plan_run
    from cnnlab.engine.trainer import NonFiniteLoss, Trainer

    if not (0 < start < end and math.isfinite(end)):
        raise CnnlabError(f"--start and --end must satisfy 0 < start < end; got start {start:g}, end {end:g}")
    if steps < MIN_STEPS:
        raise CnnlabError(f"--steps must be at least {MIN_STEPS} to draw a curve; got {steps}")
    plan = plan_run(cfg)
    cfg = plan.cfg
    path = run_path(out=out, name=None, default_name=f"lr-find-{default_run_name(cfg)}")
    set_threads(plan.threads)
    # Training batches only (no validation at an epoch's end); enough epochs for every step.
    data = dataclasses.replace(load_data(plan), val=None)
    ramp = RangeTest(start, end, steps, scale=cfg.batch_size / 1024 if cfg.lr_per_1024 else 1.0, progress=progress)
    ramped = cfg.replace(epochs=float(steps))
    if cfg.freeze_epochs:   # every step of the ramp in the head-only phase the run starts with
        ramped = ramped.replace(freeze_epochs=float(steps))
    parts = build_training(ramped, data, plan.device, start=starting_weights(cfg, plan.weights))
    trainer = Trainer(parts, path, progress=False)
    try:
        trainer.fit([ramp])
    except NonFiniteLoss:   # the loop's own check saw the loss leave the numbers: diverged
        ramp.diverged = True
    finally:
        ramp.bar.close()
    lrs, losses, smoothed, diverged = ramp.lrs, ramp.losses, ramp.smoothed, ramp.diverged
    ratio = ramp.ratio
    if len(lrs) < MIN_STEPS:
        raise CnnlabError(f"the loss diverged after {len(lrs)} step(s), at lr {start * ratio ** len(lrs):.3g}: "
                          f"lower --start (now {start:g}) or the batch size")
    found = suggest(np.asarray(smoothed))
    result = LrFindResult(path, lrs[found.valley], lrs[found.steepest], lrs[found.lowest],
                          (lrs[found.valley_start], lrs[found.valley_end]), lrs, losses, smoothed, diverged)
    _save(result, found, cfg, start, end, steps)
    if progress:
        lo, hi = result.valley_lrs
        print(f"lr-find: {cfg.model} on {data.name}, {cfg.optimizer}, batch {cfg.batch_size}: {len(lrs)} steps "
              f"from {start:g} to {lrs[-1]:.3g}{' (loss diverged)' if diverged else ''}", flush=True)
        if cfg.freeze_epochs:
            print(f"the ramp trained the head alone, as the run's first {cfg.freeze_epochs:g} epoch(s) do "
                  f"(--freeze-epochs); with --freeze-epochs 0 it ramps everything that trains, the body at "
                  f"{cfg.body_lr_scale:g} x lr", flush=True)
        print(f"suggested lr {result.suggested_lr:.3g} (valley: 2/3 of the way down the longest descent of the "
              f"smoothed loss, {lo:.3g} to {hi:.3g}); steepest descent at {result.steepest_lr:.3g}; lowest loss "
              f"at {result.min_loss_lr:.3g}, a tenth of it {result.min_loss_lr_div_10:.3g}", flush=True)
        if found.valley_end - found.valley_start < SHORT_VALLEY:
            print(f"warning: the loss hardly fell before it diverged, so no rule has much to go on: run more "
                  f"--steps (now {steps}) or a narrower --start/--end", flush=True)
        print(f"wrote {path / 'lr_find.png'} and {path / 'lr_find.json'}; try: cnnlab train "
              f"--lr {result.suggested_lr:.2g} ...", flush=True)
    return result


def window(n: int) -> tuple[int, int]:
    """The steps the rules read, [first, stop): without the first tenth and the last few."""
    first = int(n * SKIP_START)
    stop = n - min(SKIP_END, n // 5)
    return first, max(stop, first + 1)


def longest_valley(losses: np.ndarray) -> tuple[int, int]:
    """fastai's valley: (top, bottom) indices, where bottom ends the longest strictly
    decreasing subsequence and top is that many steps before it."""
    n = len(losses)
    length = np.ones(n, dtype=np.int64)     # length[i]: longest decreasing subsequence ending at i
    for i in range(1, n):
        higher = losses[:i] > losses[i]
        if higher.any():
            length[i] = length[:i][higher].max() + 1
    bottom = int(np.argmax(length))         # the first of the longest
    return max(0, bottom - int(length[bottom])), bottom


def suggest(smoothed: np.ndarray) -> Suggestions:
    """The valley, steepest-descent and lowest-loss points of a smoothed loss curve over
    exponentially spaced rates (equal steps in log lr, so slopes per step are per decade)."""
    first, stop = window(len(smoothed))
    part = smoothed[first:stop]
    top, bottom = longest_valley(part)
    valley = top + int(VALLEY_FRACTION * (bottom - top))
    lowest = int(np.argmin(part))
    slope = np.gradient(part) if len(part) > 1 else np.zeros(1)
    steepest = int(np.argmin(slope[:lowest + 1]))       # before the minimum
    return Suggestions(*(first + i for i in (valley, top, bottom, steepest, lowest)))


def _save(result: LrFindResult, found: Suggestions, cfg: Config, start: float, end: float, steps: int) -> None:
    import matplotlib.pyplot as plt

    from cnnlab.report.plots import save_figure  # also selects the Agg backend

    first, stop = window(len(result.lrs))
    doc: dict[str, Any] = {
        "suggested_lr": result.suggested_lr, "rule": "valley",
        "valley_lrs": list(result.valley_lrs), "steepest_lr": result.steepest_lr,
        "min_loss_lr": result.min_loss_lr, "min_loss_lr_div_10": result.min_loss_lr_div_10,
        "rules_read_steps": [first, stop], "start": start, "end": end,
        "steps_planned": steps, "steps_run": len(result.lrs), "diverged": result.diverged,
        "lr_units": "per 1024 examples (lr_per_1024)" if cfg.lr_per_1024 else "as the optimizer's lr",
        "lrs": result.lrs, "losses": result.losses, "smoothed": result.smoothed, "config": cfg.to_dict()}
    write_json(result.out / "lr_find.json", doc)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lrs, sm = np.asarray(result.lrs), np.asarray(result.smoothed)
    ax.plot(lrs, result.losses, color="0.75", linewidth=0.8, label="loss per step")
    ax.plot(lrs, sm, color="C0", linewidth=2, label="smoothed loss")
    ax.axvspan(*result.valley_lrs, color="C3", alpha=0.08, label="longest valley")
    ax.plot([result.suggested_lr], [sm[found.valley]], "o", color="C3", markersize=9,
            label=f"suggested {result.suggested_lr:.2g} (valley)")
    ax.plot([result.steepest_lr], [sm[found.steepest]], "v", color="C1", markersize=8,
            label=f"steepest descent {result.steepest_lr:.2g}")
    ax.axvline(result.min_loss_lr_div_10, color="C2", linestyle="--", linewidth=1,
               label=f"min-loss lr / 10 = {result.min_loss_lr_div_10:.2g}")
    ax.set_xscale("log")
    # The divergence at the end would flatten the useful part: show the curve up to the valley's bottom.
    shown = sm[: max(found.valley_end, found.lowest) + 1]
    low, high = float(shown.min()), float(shown.max())
    pad = 0.05 * max(high - low, 1e-6)
    ax.set_ylim(low - pad, high + 4 * pad)
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    ax.set_title(f"learning-rate range test: {cfg.model}, {cfg.optimizer}, batch {cfg.batch_size}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, result.out / "lr_find.png")
