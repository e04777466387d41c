"""What varies between runs, as callbacks on the one loop's events (``cnnlab.core.events``
lists them and their order; Keras's and fastai's shape).

The loop (``Trainer.fit``) trains, evaluates and keeps the history; everything else is a
callback: progress, keep-best, checkpoints, TensorBoard, the time limit, early stopping,
freezing the body while a new head fits (``FreezeBody``), a network's own set-up (SpeedNet's
whitening, offered by the network), lr-find's ramp and the tuner's pruning (in ``cnnlab.apps``).

The order of ``default_callbacks`` matters: the best weights are kept before the checkpoint
that saves them, the checkpoint is written before anything may stop the run, and TensorBoard
shows only epochs a checkpoint holds (a run that turns non-finite keeps the last checkpoint's
history).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm as auto_tqdm
from tqdm.std import tqdm as terminal_tqdm

from cnnlab.core.config import Config, unfreeze_depth
from cnnlab.core.errors import CnnlabError
from cnnlab.core.events import Callback, Setup
from cnnlab.core.hardware import autocast
from cnnlab.core.run_folder import RunFolder
from cnnlab.data.batches import FeatureBatches
from cnnlab.engine import distributed
from cnnlab.models.pretrained import body_blocks

# tqdm.auto is tqdm.notebook's widget under a Jupyter kernel that has ipywidgets, else the text
# bar (named by module: importing tqdm.notebook would import ipywidgets into the command line).
NOTEBOOK = any(c.__module__ == "tqdm.notebook" for c in auto_tqdm.__mro__)


class Trainer(Protocol):
    """What callbacks see of ``cnnlab.engine.trainer.Trainer`` (which imports this module)."""
    cfg: Config
    run: Path                   # the run folder
    state: Any                  # checkpoint.LoopState: epoch, step_in_epoch, global_step, history, best_val, best_epoch
    best_state: dict[str, torch.Tensor] | None
    model: Any                  # the Classifier; its network is model.net
    head: str                   # the network's classifier head (a module name)
    schedule: Any               # optim's schedule: base_lr, multiplier(step, progress)
    steps_per_epoch: int
    lr: float                   # this step's learning rate and decoupled-decay multiplier
    decay_mult: float           # (on_step_begin may change them)
    last_loss: torch.Tensor     # the last step's loss (detached)

    def checkpoint(self) -> None: ...
    def elapsed(self) -> float: ...
    def request_stop(self, reason: str | None) -> None: ...
    def end_epoch_now(self) -> None: ...


class _Holding(Callback):
    """A callback that holds one thing to close (a progress bar, an event writer) while training
    runs: closed on a stop signal, and by the subclass at the end."""

    held: Any = None

    def _close(self) -> None:
        if self.held is not None:
            self.held.close()
            self.held = None

    def on_interrupt(self, trainer: Trainer) -> None:
        self._close()


class ProgressBar(_Holding):
    """Each epoch's steps live, and one line per finished epoch (on stdout).

    ``tqdm.auto``: in a Jupyter notebook (with ipywidgets) one widget for the whole run, reset
    at each epoch, so a cell holds one bar above the epoch lines however long training runs; in
    a terminal a text bar per epoch on stderr, cleared for the epoch's line; none when stderr
    is not a terminal (a log would get a line per refresh). ``fit(progress=False)`` (the API's
    ``quiet``) leaves out this callback: no bar and no lines."""

    def __init__(self, total_epochs: int, *, notebook: bool | None = None):
        self.total_epochs = total_epochs
        self.notebook = NOTEBOOK if notebook is None else notebook

    def on_epoch_begin(self, trainer: Trainer, steps: int) -> None:
        s = trainer.state
        desc = f"epoch {s.epoch + 1}/{self.total_epochs}"
        if not self.notebook:
            self.held = terminal_tqdm(total=steps, initial=s.step_in_epoch, leave=False, desc=desc, unit="batch",
                                      dynamic_ncols=True, file=sys.stderr, disable=None)
            return
        if self.held is None:
            self.held = auto_tqdm(total=steps, desc=desc, unit="batch")
        else:
            self.held.reset(total=steps)
            self.held.set_description(desc, refresh=False)
        if s.step_in_epoch:   # a resumed epoch
            self.held.update(s.step_in_epoch)

    def on_log(self, trainer: Trainer, logs: dict[str, float]) -> None:
        assert self.held is not None
        self.held.set_postfix(loss=f"{logs['loss']:.3f}", acc=f"{logs['accuracy']:.3f}",
                              img_s=f"{logs['img_s']:.0f}", refresh=False)
        self.held.update(trainer.state.step_in_epoch - self.held.n)

    def on_train_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self._close()

    def on_epoch_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        if self.notebook and self.held is not None:
            self.held.update(self.held.total - self.held.n)   # the epoch's last steps, since the last log
        else:
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
            trainer.checkpoint()

    def on_epoch_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        trainer.checkpoint()


class FreezeBody(Callback):
    """``--freeze-epochs N``: in the first N epochs only the head trains, so a new head fits
    the started-from body before the body moves (fastai's ``fine_tune``, linear probing then
    fine-tuning). The frozen body is a fixed function, run in evaluation mode (BatchNorm's
    running statistics, no dropout; Keras's advice for a frozen base). With ``cached`` its
    output for each training image is computed once, unaugmented, and the head-only epochs
    train the head on those features: one forward pass of the body in all, however many
    epochs. Parameters frozen for their own reasons stay frozen."""
    unused_parameters = True

    def __init__(self, epochs: int, cached: bool = True):
        self.epochs, self.cached = epochs, cached
        self._frozen: bool | None = None
        self._swapped: tuple[Any, Any] | None = None   # the trainer's (batches, forward) while on features

    def on_setup(self, setup: Setup) -> None:
        self.head = setup.model.net.get_submodule(setup.head)
        self.head_params = list(self.head.parameters())
        self.body = [p for name, p in setup.model.net.named_parameters()
                     if p.requires_grad and not name.startswith(setup.head + ".")]
        self.images = setup.images

    def on_epoch_begin(self, trainer: Any, steps: int) -> None:
        frozen = trainer.state.epoch < self.epochs
        if frozen != self._frozen:   # only at the start and at the thaw
            for p in self.body:
                p.requires_grad_(not frozen)
            self._frozen = frozen
        if frozen:
            trainer.model.eval()
            if self.cached and self._swapped is None:
                self._swapped = (trainer.batches, trainer.forward)
                features = self._features(trainer)
                trainer.batches, trainer.forward = FeatureBatches(trainer.batches, features), self.head
        elif self._swapped is not None:   # the thaw: images again, the features freed
            trainer.batches, trainer.forward = self._swapped
            self._swapped = None

    def _features(self, trainer: Any) -> torch.Tensor:
        """The head's input for every training image, in index order, on the device."""
        rows: list[torch.Tensor] = []
        hook = self.head.register_forward_pre_hook(lambda module, args: rows.append(args[0].float()))
        try:
            with torch.no_grad(), autocast(trainer.device, trainer.dtype):
                for x, _ in self.images():
                    trainer.model(x)
        finally:
            hook.remove()
        local = torch.cat(rows).flatten(1)
        return distributed.gather_shards(local, len(trainer.batches.labels)).to(trainer.device)

    def on_backward_end(self, trainer: Any) -> None:
        if trainer.state.epoch < self.epochs:
            if self._swapped is not None:   # the head alone ran: DDP did not average its gradients
                distributed.average_gradients(self.head_params)
            for p in self.body:   # DDP hands unused parameters a zero gradient; None skips them
                p.grad = None


class PartialUnfreeze(Callback):
    """``--unfreeze last-N-blocks`` (or ``last-P%``): only the body blocks nearest the head (and
    the head) ever train; the blocks before them stay frozen for the whole run, in evaluation
    mode, so the backward pass stops at the first block that trains."""

    def __init__(self, unfreeze: str):
        self.unfreeze = unfreeze

    def on_setup(self, setup: Setup) -> None:
        net = setup.model.net
        self.blocks = body_blocks(net, setup.head)
        depth = unfreeze_depth(self.unfreeze, len(self.blocks))
        if depth is None or depth > len(self.blocks):   # plan_run's check: not met by a caller that skipped it
            raise CnnlabError(f"--unfreeze {self.unfreeze}: the body has {len(self.blocks)} blocks")
        self.last = depth
        self.frozen = [net.get_submodule(name) for name in self.blocks[:len(self.blocks) - depth]]
        for module in self.frozen:
            module.requires_grad_(False)

    def on_epoch_begin(self, trainer: Any, steps: int) -> None:
        for module in self.frozen:
            module.eval()


class FrozenBatchNorm(Callback):
    """``--frozen-bn``: the body's BatchNorm layers normalise with the trained running
    statistics all run, never a batch's own (their scale and shift still train)."""

    def on_setup(self, setup: Setup) -> None:
        self.norms = [m for name, m in setup.model.net.named_modules()
                      if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not name.startswith(setup.head)]

    def on_epoch_begin(self, trainer: Any, steps: int) -> None:
        for m in self.norms:
            m.eval()


class TimeLimit(Callback):
    """``--time-limit S``: the schedule decays over the S seconds instead of the steps, and
    training stops after the step that passes them."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_step_begin(self, trainer: Trainer) -> None:
        mult = trainer.schedule.multiplier(trainer.state.global_step, trainer.elapsed() / self.seconds)
        trainer.lr, trainer.decay_mult = trainer.schedule.base_lr * mult, mult

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


# ----------------------------------------------------------------------------- TensorBoard
TAGS = {  # history key -> TensorBoard tag (train and validation of one quantity share a section)
    "loss": "loss/train", "val_loss": "loss/validation",
    "accuracy": "accuracy/train", "val_accuracy": "accuracy/validation",
    "lr": "learning_rate", "seconds": "seconds_per_epoch",
}


def _writer_class() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise CnnlabError(f"--tensorboard needs the tensorboard package ({e}): pip install tensorboard") from None
    return SummaryWriter


def summary_writer(folder: Path, purge_step: int | None = None) -> Any:
    """A ``torch.utils.tensorboard.SummaryWriter`` on ``folder``; ``purge_step``: TensorBoard
    drops what earlier event files hold from that step on (a resumed run redoes those epochs)."""
    return _writer_class()(log_dir=str(folder), purge_step=purge_step)


def add_epoch_scalars(writer: Any, history: dict[str, list], epoch: int) -> None:
    """History row ``epoch`` (counted from 1) as scalars at step ``epoch``."""
    for key, tag in TAGS.items():
        values = history.get(key) or []
        if len(values) >= epoch and values[epoch - 1] is not None:
            writer.add_scalar(tag, float(values[epoch - 1]), epoch)


def add_test_scalars(writer: Any, metrics: dict[str, Any], step: int) -> None:
    for key in ("test_accuracy", "test_loss"):
        value = metrics.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            writer.add_scalar(f"test/{key[5:]}", float(value), step)


def add_config_text(writer: Any, config: dict[str, Any]) -> None:
    text = "  \n".join(f"**{k}**: {v}" for k, v in config.items())
    if text:
        writer.add_text("config", text, 0)


class TensorBoard(_Holding):
    """``--tensorboard``: each epoch's history row as scalars in RUN/tensorboard, on disk as the
    epoch ends (one step per epoch), and the test accuracy and loss at the end."""

    def __init__(self) -> None:
        _writer_class()   # a missing package fails before training, not after it

    def _open(self, trainer: Trainer) -> Any:
        if self.held is None:
            done = trainer.state.epoch
            self.held = summary_writer(RunFolder(trainer.run).tensorboard_dir,   # `tensorboard --logdir runs/`
                                       purge_step=done + 1 if done else None)
            if not done:
                add_config_text(self.held, trainer.cfg.to_dict())
        return self.held

    def on_epoch_begin(self, trainer: Trainer, steps: int) -> None:
        self._open(trainer)

    def on_epoch_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        writer = self._open(trainer)
        add_epoch_scalars(writer, trainer.state.history, trainer.state.epoch)
        writer.flush()   # live: TensorBoard (and a reader) sees the epoch now

    def on_train_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        add_test_scalars(self._open(trainer), metrics, max(trainer.state.epoch, 1))
        self._close()


def default_callbacks(cfg: Config, *, progress: bool) -> list[Callback]:
    """The callbacks ``cfg`` asks for, in the order they must run (see the module docstring)."""
    callbacks: list[Callback] = []
    if cfg.keep == "best":
        callbacks.append(KeepBest())
    if progress:
        callbacks.append(ProgressBar(math.ceil(cfg.epochs)))
    callbacks.append(Checkpointer(cfg.checkpoint_every))
    if cfg.tensorboard and distributed.is_main():
        callbacks.append(TensorBoard())
    if cfg.time_limit:
        callbacks.append(TimeLimit(cfg.time_limit))
    if cfg.early_stop:
        callbacks.append(EarlyStopping(cfg.early_stop))
    return callbacks
