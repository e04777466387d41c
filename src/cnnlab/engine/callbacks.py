"""What varies between runs, as callbacks the one loop calls (Keras's and Lightning's shape).

The loop (``Trainer.fit``) trains, evaluates and keeps the history; everything else hangs on
these hooks, each called with the trainer:

    on_epoch_begin(trainer, steps)    before an epoch's first step (or a resumed epoch's next)
    on_log(trainer, logs)             every LOG_EVERY steps: loss, accuracy, img_s so far
    on_step_end(trainer)              after each optimizer step
    on_epoch_end(trainer, logs)       after the epoch's evaluation and history row
    on_interrupt(trainer)             before a stop signal's checkpoint

A callback stops training by calling ``trainer.request_stop(reason)`` (after the epoch) or
``trainer.end_epoch_now()`` (after this step: the time limit). The order of
``default_callbacks`` matters: the best weights are kept before the checkpoint that saves
them, and the checkpoint is written before anything may stop the run.
"""
from __future__ import annotations

import math
import sys
from typing import Any, Callable, Protocol

import torch
from tqdm import tqdm

from cnnlab.core.config import Config


class Trainer(Protocol):
    """What callbacks see of ``cnnlab.engine.loop.Trainer`` (which imports this module)."""
    state: Any                  # LoopState: epoch, step_in_epoch, global_step, history, best_val, best_epoch
    best_state: dict[str, torch.Tensor] | None

    def checkpoint(self) -> None: ...
    def keep_partial_epoch(self) -> None: ...
    def elapsed(self) -> float: ...
    def request_stop(self, reason: str | None) -> None: ...
    def end_epoch_now(self) -> None: ...


class Callback:
    """Every hook, doing nothing: subclasses override what they need."""

    def on_epoch_begin(self, trainer: Trainer, steps: int) -> None: ...
    def on_log(self, trainer: Trainer, logs: dict[str, float]) -> None: ...
    def on_step_end(self, trainer: Trainer) -> None: ...
    def on_epoch_end(self, trainer: Trainer, logs: dict[str, Any]) -> None: ...
    def on_interrupt(self, trainer: Trainer) -> None: ...


class ProgressBar(Callback):
    """A tqdm bar per epoch (on stderr) and one line per finished epoch (on stdout)."""

    def __init__(self, total_epochs: int):
        self.total_epochs = total_epochs
        self.bar: tqdm | None = None

    def on_epoch_begin(self, trainer: Trainer, steps: int) -> None:
        s = trainer.state
        self.bar = tqdm(total=steps, initial=s.step_in_epoch, leave=False, desc=f"epoch {s.epoch + 1}/"
                        f"{self.total_epochs}", unit="batch", dynamic_ncols=True, file=sys.stderr)

    def on_log(self, trainer: Trainer, logs: dict[str, float]) -> None:
        assert self.bar is not None
        self.bar.set_postfix(loss=f"{logs['loss']:.3f}", acc=f"{logs['accuracy']:.3f}",
                             img_s=f"{logs['img_s']:.0f}", refresh=False)
        self.bar.update(trainer.state.step_in_epoch - self.bar.n)

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_interrupt(self, trainer: Trainer) -> None:
        self._close()

    def on_epoch_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        self._close()
        h, s = trainer.state.history, trainer.state
        seconds = h["seconds"][-1]
        line = f"epoch {s.epoch}/{self.total_epochs}  loss {h['loss'][-1]:.4f}  accuracy {h['accuracy'][-1]:.4f}"
        if h["val_loss"][-1] is not None:
            line += f"  val_loss {h['val_loss'][-1]:.4f}  val_accuracy {h['val_accuracy'][-1]:.4f}"
        images = logs["images"] if seconds else 0   # trained this epoch, this session
        line += f"  lr {h['lr'][-1]:.3g}  {seconds:.1f}s ({images / max(seconds, 1e-9):.0f} img/s)"
        print(line, flush=True)


class KeepBest(Callback):
    """``--keep best``: the evaluated weights of the best validation epoch, for the checkpoint
    and the final model."""

    def on_epoch_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        if logs["improved"]:
            trainer.best_state = {k: v.detach().clone() for k, v in logs["model"].state_dict().items()}


class Checkpointer(Callback):
    """A resumable checkpoint at each epoch's end, and every ``every`` steps when asked."""

    def __init__(self, every: int = 0):
        self.every = every

    def on_step_end(self, trainer: Trainer) -> None:
        if self.every and trainer.state.global_step % self.every == 0:
            trainer.keep_partial_epoch()
            trainer.checkpoint()

    def on_epoch_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        trainer.checkpoint()


class OnEpoch(Callback):
    """``fit(on_epoch=fn)``: ``fn(epoch, history)`` returning True stops (the tuner's pruner)."""

    def __init__(self, fn: Callable[[int, dict[str, list]], bool]):
        self.fn = fn

    def on_epoch_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        if self.fn(trainer.state.epoch, trainer.state.history):
            trainer.request_stop(None)


class TimeLimit(Callback):
    """``--time-limit S``: stop after the step that passes S seconds of training (the schedule
    decays over the time: ``Trainer.progress``)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.elapsed() >= self.seconds:
            trainer.end_epoch_now()
            trainer.request_stop(f"time limit: stopped after {trainer.elapsed():.0f} s of training "
                                 f"(--time-limit {self.seconds:g})")


class EarlyStopping(Callback):
    """``--early-stop N``: stop when validation accuracy has not improved for N epochs."""

    def __init__(self, patience: int):
        self.patience = patience

    def on_epoch_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        s = trainer.state
        if logs["val"] is not None and s.epoch - s.best_epoch >= self.patience:
            trainer.request_stop(f"early stop: validation accuracy has not improved for {self.patience} "
                                 f"epochs (best {s.best_val:.4f} at epoch {s.best_epoch})")


def default_callbacks(cfg: Config, *, progress: bool,
                      on_epoch: Callable[[int, dict[str, list]], bool] | None = None) -> list[Callback]:
    """The callbacks ``cfg`` asks for, in the order they must run (see the module docstring)."""
    callbacks: list[Callback] = []
    if cfg.keep == "best":
        callbacks.append(KeepBest())
    if progress:
        callbacks.append(ProgressBar(math.ceil(cfg.epochs)))
    callbacks.append(Checkpointer(cfg.checkpoint_every))
    if on_epoch is not None:
        callbacks.append(OnEpoch(on_epoch))
    if cfg.time_limit:
        callbacks.append(TimeLimit(cfg.time_limit))
    if cfg.early_stop:
        callbacks.append(EarlyStopping(cfg.early_stop))
    return callbacks
