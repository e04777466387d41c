"""The learning-rate range test (Smith 2015, "Cyclical Learning Rates for Training Neural
Networks", section 3.3): a quick first answer before a full search.

From a fresh model, train one batch per step with the learning rate rising exponentially
from ``start`` to ``end``; smooth the loss (an exponential moving average, bias-corrected)
and stop once it exceeds ``DIVERGE`` x its best. The suggestion is the rate where the
smoothed loss falls fastest per decade of learning rate (the steepest descent, before the
minimum); a tenth of the rate at the minimum loss is reported too.

It reuses the training loop's ``Trainer`` (model, optimizer, batches, augmentation,
precision, ``train_steps``), giving it the ramp as its per-step learning rate (``lr_at``).
Rates are in the config's units (per 1024 examples when ``lr_per_1024`` is on). Writes ``lr_find.json`` and ``lr_find.png`` in the output folder.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnnlab.core.config import Config
from cnnlab.core.errors import CnnlabError
from cnnlab.core.files import write_json
from cnnlab.engine.runs import default_run_name, run_path

DIVERGE = 4.0          # stop once the smoothed loss passes this multiple of its best
SMOOTHING = 0.98       # EMA factor for the loss (fastai's choice: about 50 steps of memory)
SKIP_START = 0.1       # ignore this fraction of the first steps when looking for the steepest slope
MIN_STEPS = 10


@dataclass
class LrFindResult:
    out: Path
    suggested_lr: float              # steepest descent of the smoothed loss
    min_loss_lr: float               # where the smoothed loss was lowest
    lrs: list[float] = field(repr=False)
    losses: list[float] = field(repr=False)
    smoothed: list[float] = field(repr=False)
    diverged: bool = False

    @property
    def min_loss_lr_div_10(self) -> float:
        return self.min_loss_lr / 10


def lr_find(cfg: Config, *, start: float = 1e-7, end: float = 10.0, steps: int = 100,
            out: str | Path | None = None, progress: bool = True) -> LrFindResult:
    """Run the range test for ``cfg`` (its model, data, optimizer, batch size)."""
    from tqdm import tqdm

    from cnnlab.core.hardware import pick_device, set_threads
    from cnnlab.engine.loop import Trainer
    from cnnlab.engine.prepare import check_config, load_data

    if not (0 < start < end and math.isfinite(end)):
        raise CnnlabError(f"--start and --end must satisfy 0 < start < end; got start {start:g}, end {end:g}")
    if steps < MIN_STEPS:
        raise CnnlabError(f"--steps must be at least {MIN_STEPS} to draw a curve; got {steps}")
    cfg = check_config(cfg)
    path = run_path(out=out, name=None, default_name=f"lr-find-{default_run_name(cfg)}")
    device = pick_device(cfg.device)
    set_threads(cfg.threads)
    data = load_data(cfg)
    ratio = (end / start) ** (1 / (steps - 1))

    def rate(step: int) -> float:   # in the config's units
        return start * ratio ** step

    # The optimizer receives effective rates; with lr_per_1024 the config's rate is per 1024 examples.
    scale = cfg.batch_size / 1024 if cfg.lr_per_1024 else 1.0
    trainer = Trainer(cfg, data, path, device, progress=False, lr_at=lambda step: rate(step) * scale)

    lrs, losses, smoothed = [], [], []
    avg, best, diverged = 0.0, math.inf, False
    bar = tqdm(total=steps, desc="lr-find", unit="step", disable=not progress, leave=False)
    for step, step_loss in enumerate(trainer.train_steps()):   # step == len(lrs) until it stops
        loss = float(step_loss)
        bar.update(1)
        if not math.isfinite(loss):
            diverged = True
            break
        avg = SMOOTHING * avg + (1 - SMOOTHING) * loss
        smooth = avg / (1 - SMOOTHING ** (step + 1))
        lrs.append(rate(step))
        losses.append(loss)
        smoothed.append(smooth)
        best = min(best, smooth)
        if smooth > DIVERGE * best:
            diverged = True
            break
        if len(lrs) >= steps:
            break
    bar.close()
    if len(lrs) < MIN_STEPS:
        raise CnnlabError(f"the loss diverged after {len(lrs)} step(s), at lr {start * ratio ** len(lrs):.3g}: "
                          f"lower --start (now {start:g}) or the batch size")
    steepest, lowest = suggest(np.asarray(lrs), np.asarray(smoothed))
    result = LrFindResult(path, steepest, lowest, lrs, losses, smoothed, diverged)
    _save(result, cfg, start, end, steps)
    if progress:
        print(f"lr-find: {cfg.model} on {data.name}, {cfg.optimizer}, batch {cfg.batch_size}: {len(lrs)} steps "
              f"from {start:g} to {lrs[-1]:.3g}{' (loss diverged)' if diverged else ''}", flush=True)
        print(f"suggested lr {steepest:.3g} (steepest descent of the smoothed loss); lowest loss at "
              f"{lowest:.3g}, a tenth of it {lowest / 10:.3g}", flush=True)
        print(f"wrote {path / 'lr_find.png'} and {path / 'lr_find.json'}; try: cnnlab train "
              f"--lr {steepest:.2g} ...", flush=True)
    return result


def suggest(lrs: np.ndarray, smoothed: np.ndarray) -> tuple[float, float]:
    """(steepest-descent rate, lowest-loss rate) of a smoothed loss curve."""
    lowest = int(np.argmin(smoothed))
    skip = int(len(lrs) * SKIP_START)
    # Slope per decade: d loss / d log10(lr), looked for between the start and the minimum.
    slope = np.gradient(smoothed, np.log10(lrs))
    stop = max(lowest, skip + 1)
    steepest = skip + int(np.argmin(slope[skip:stop])) if stop > skip else lowest
    return float(lrs[steepest]), float(lrs[lowest])


def _save(result: LrFindResult, cfg: Config, start: float, end: float, steps: int) -> None:
    import matplotlib.pyplot as plt

    from cnnlab.report.plots import save_figure  # also selects the Agg backend

    doc: dict[str, Any] = {
        "suggested_lr": result.suggested_lr, "min_loss_lr": result.min_loss_lr,
        "min_loss_lr_div_10": result.min_loss_lr_div_10, "start": start, "end": end,
        "steps_planned": steps, "steps_run": len(result.lrs), "diverged": result.diverged,
        "lr_units": "per 1024 examples (lr_per_1024)" if cfg.lr_per_1024 else "as the optimizer's lr",
        "lrs": result.lrs, "losses": result.losses, "smoothed": result.smoothed, "config": cfg.to_dict()}
    write_json(result.out / "lr_find.json", doc)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lrs, sm = np.asarray(result.lrs), np.asarray(result.smoothed)
    ax.plot(lrs, result.losses, color="0.75", linewidth=0.8, label="loss per step")
    ax.plot(lrs, sm, color="C0", linewidth=2, label="smoothed loss")
    i = int(np.searchsorted(lrs, result.suggested_lr))
    ax.plot([result.suggested_lr], [sm[min(i, len(sm) - 1)]], "o", color="C3", markersize=8,
            label=f"suggested {result.suggested_lr:.2g} (steepest)")
    ax.axvline(result.min_loss_lr_div_10, color="C2", linestyle="--", linewidth=1,
               label=f"min-loss lr / 10 = {result.min_loss_lr_div_10:.2g}")
    ax.set_xscale("log")
    # The divergence at the end would flatten the useful part: cap at the starting loss.
    low, high = float(sm.min()), float(max(sm[: int(np.argmin(sm)) + 1].max(), sm[0]))
    pad = 0.05 * max(high - low, 1e-6)
    ax.set_ylim(low - pad, high + 4 * pad)
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    ax.set_title(f"learning-rate range test: {cfg.model}, {cfg.optimizer}, batch {cfg.batch_size}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, result.out / "lr_find.png")
