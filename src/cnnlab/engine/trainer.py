"""The training loop itself: ``Trainer`` steps, evaluates each epoch and calls the callbacks.

One trainer serves every model. It steps the parts ``cnnlab.engine.build`` made from the
config (model, optimizer, schedule, precision, weight average) step by step and epoch by
epoch; what varies between runs is a callback on its events (``cnnlab.core.events``:
progress, checkpoints, keep-best, time limit, early stop, TensorBoard, a frozen body, and
what the network offers, SpeedNet's whitening). Its state (``checkpoint.LoopState``) goes
into every checkpoint, so a run resumes exactly. ``cnnlab.engine.loop`` wraps it into ``fit``
and ``resume``, which own the run folder.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from cnnlab.core.errors import CnnlabError, TrainingInterrupted
from cnnlab.core.hardware import autocast
from cnnlab.core.run_folder import RunFolder
from cnnlab.core.tensors import few, non_finite
from cnnlab.data.batches import derive_seed
from cnnlab.engine import checkpoint as ckpt
from cnnlab.engine import distributed
from cnnlab.engine.build import TrainingParts
from cnnlab.engine.callbacks import Callback
from cnnlab.engine.evaluation import evaluate
from cnnlab.engine.optim import decay_weights, set_lr
from cnnlab.engine.signals import catch_stop_signals
from cnnlab.models.classifier import Classifier

LOG_EVERY = 10           # steps between progress-bar refreshes (each one syncs the device)
# float16: the loss scale halves on every overflowing step; this far down, gradients overflow
# at any scale and the weights no longer move (30 halvings from the initial 2**16).
MIN_LOSS_SCALE = 2.0 ** -14


class NonFiniteLoss(CnnlabError):
    pass


# ----------------------------------------------------------------------------- state
@dataclass
class EpochSums:
    """Running sums of the epoch in progress (on the device: no sync a step)."""
    loss: torch.Tensor          # sum of loss x batch size
    correct: torch.Tensor
    seen: int
    start: float                # perf_counter at the epoch's (virtual) start, resumed seconds included


class Trainer:
    """Steps a run's parts (``cnnlab.engine.build.TrainingParts``), evaluates each epoch and
    calls the callbacks; its state goes into every checkpoint, by name.

    Each step's learning rate and decoupled-decay multiplier come from the config's schedule
    (``lr``, ``decay_mult``); a callback may change them in ``on_step_begin`` (the time limit
    decays over seconds, lr-find ramps).
    """

    def __init__(self, parts: TrainingParts, run: Path, progress: bool = True):
        p = parts
        self.cfg, self.data, self.device, self.run, self.progress = p.cfg, p.data, p.device, run, progress
        self.precision, self.dtype, self.scaler = p.precision, p.precision.dtype, p.scaler
        self.weights, self.mean, self.std, self.init_report = p.weights, p.mean, p.std, p.init_report
        self.model, self.head, self.forward = p.model, p.head, p.forward
        self.batches, self.steps_per_epoch, self.total_steps = p.batches, len(p.batches), p.total_steps
        self.opt_cfg, self.schedule, self.optimizer = p.opt_cfg, p.schedule, p.optimizer
        self.ema, self.ema_start_step = p.ema, p.ema_start_step
        self.policies: list[Callback] = p.policies
        self.callbacks: list[Callback] = list(p.policies)
        self._ema_model: Classifier | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.state = ckpt.LoopState()
        self.lr, self.decay_mult = self.schedule.lr(0), 1.0
        self.last_loss = torch.zeros(())
        self.test = True   # evaluate the test split at the end (fit(test=False): never read it)
        self.sums: EpochSums | None = None
        self._stop: tuple[bool, str | None] = (False, None)   # (stopping, reason to print)
        self._end_epoch = False
        self._epoch_start = time.perf_counter()

    # -- checkpoint --------------------------------------------------------------------
    def checkpoint(self) -> None:
        """Write the resumable state; mid-epoch, with the epoch-so-far sums (every process
        calls this at the same step: the sums are gathered from all of them)."""
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        opt_t, opt_meta = ckpt.optimizer_to_flat(self.optimizer)
        tensors.update(opt_t)
        if self.ema is not None:
            tensors.update({f"ema.{k}": v for k, v in self.ema.state_tensors().items()})
        if self.best_state is not None:
            tensors.update({f"best.{k}": v for k, v in self.best_state.items()})
        self._check_finite(tensors)   # in every process: a checkpoint is always a state worth going back to
        if self.state.step_in_epoch and self.sums is not None:
            self.keep_partial_epoch()
        if not distributed.is_main():
            return   # every process holds the same state; rank 0 writes it
        rng_t, rng_meta = ckpt.rng_states()
        tensors.update(rng_t)
        s = self.state
        meta = {"loop": {**dataclasses.asdict(s), "best_val": s.best_val if math.isfinite(s.best_val) else None},
                "steps_per_epoch": self.steps_per_epoch, "test": self.test,
                "optimizer": opt_meta, "rng": rng_meta, "config": self.cfg.to_dict(),
                "mean": self.mean, "std": self.std, "world_size": distributed.world_size(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}
        ckpt.write_checkpoint(RunFolder(self.run).last_checkpoint, tensors, meta)

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        def part(prefix):
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        self.model.load_state_dict(part("model."))
        ckpt.optimizer_from_flat(self.optimizer, part("optim."), meta["optimizer"])
        if self.ema is not None:
            self.ema.load_state_tensors(part("ema."))
        best = part("best.")
        self.best_state = best or None
        ckpt.restore_rng(tensors, meta["rng"])
        self.test = meta.get("test", True)   # a resumed run tests as it started (a trial: never)
        if self.scaler is not None and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        self.state = ckpt.loop_state(meta)
        self.lr = self.schedule.lr(max(0, self.state.global_step - 1))   # the history's, until a step runs
        if not distributed.is_main():   # the saved sums are every process's: rank 0 carries them on
            self.state.epoch_loss, self.state.epoch_correct, self.state.epoch_seen = 0.0, 0, 0

    def _check_finite(self, tensors: dict[str, torch.Tensor]) -> None:
        """Stop where the weights or the optimizer's state left the numbers (checkpoints refuse them)."""
        bad = non_finite(tensors)
        if bad:
            s = self.state
            where = f"the end of epoch {s.epoch}" if s.step_in_epoch == 0 else f"epoch {s.epoch + 1}, step {s.step_in_epoch}"
            raise NonFiniteLoss(f"the weights became non-finite (nan or inf) by {where} ({few(bad)}): the "
                                f"learning rate ({self.cfg.lr}) is probably too high for {self.cfg.model}; "
                                f"try one ten times smaller")

    def keep_partial_epoch(self) -> None:   # a collective when data-parallel: every process calls it
        """Put the epoch-so-far sums in the state, for a mid-epoch checkpoint."""
        s, sums = self.state, self.sums
        assert sums is not None
        # Data-parallel: the sums over every process (called at steps they all reach together).
        loss, correct, seen_all = distributed.sum_over_ranks(sums.loss, sums.correct, sums.seen)
        s.epoch_loss, s.epoch_correct = loss, int(correct)
        s.epoch_seen, s.epoch_seconds = int(seen_all), time.perf_counter() - sums.start

    # -- what callbacks may ask ----------------------------------------------------------
    def request_stop(self, reason: str | None) -> None:
        """End training after this epoch; ``reason`` is printed (the first one asked wins)."""
        if not self._stop[0]:
            self._stop = (True, reason)

    def end_epoch_now(self) -> None:
        """End the epoch after the current step (it is then evaluated and saved as usual)."""
        self._end_epoch = True

    def _call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    # -- training ----------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, s = self.cfg, self.state
        mult = self.schedule.multiplier(s.global_step, None)
        self.lr, self.decay_mult = self.schedule.base_lr * mult, mult
        self._call("on_step_begin")
        set_lr(self.optimizer, self.lr)
        # Dropout and other in-model randomness, reproducible per step for exact resume.
        torch.manual_seed(derive_seed(cfg.seed, s.epoch, s.step_in_epoch, 0xD0, *distributed.rank_key()))
        with autocast(self.device, self.dtype):
            logits = self.forward(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        self._call("on_backward_end")
        if self.scaler is None:
            decay_weights(self.optimizer, self.opt_cfg, self.decay_mult)
            self.optimizer.step()
        else:
            self._scaled_step(self.decay_mult)
        if self.ema is not None and s.global_step >= self.ema_start_step:
            self.ema.update(s.global_step)
        truth = y.argmax(1) if y.ndim == 2 else y   # soft labels (MixUp, CutMix): the larger share
        correct = (logits.detach().argmax(1) == truth).sum()
        self.last_loss = loss.detach()
        return self.last_loss, correct

    def _scaled_step(self, mult: float) -> None:
        """float16: the scaler unscales the gradients and skips the step when one overflowed,
        then lowers the scale; the decoupled decay follows only a step that was taken."""
        scaler = self.scaler
        assert scaler is not None
        scale = scaler.get_scale()
        scaler.step(self.optimizer)
        scaler.update()
        if scaler.get_scale() >= scale:   # the scale drops on overflow only
            decay_weights(self.optimizer, self.opt_cfg, mult)

    def run_epoch(self, stop: list[int], epoch_steps: int) -> tuple[float, float, float, int]:
        """Train from the current position to the end of the epoch (or ``epoch_steps``): the
        epoch's mean loss, accuracy, seconds and images (over every process)."""
        s = self.state
        self.model.train()
        # Resumed mid-epoch: carry on from the sums and seconds of the steps done before.
        sums = self.sums = EpochSums(torch.full((), s.epoch_loss, device=self.device),
                                     torch.full((), s.epoch_correct, device=self.device, dtype=torch.long),
                                     s.epoch_seen, time.perf_counter() - s.epoch_seconds)
        self._epoch_start = sums.start
        self._end_epoch = False
        self._call("on_epoch_begin", epoch_steps)
        for x, y in self.batches.epoch(s.epoch, s.step_in_epoch):
            if s.step_in_epoch >= epoch_steps:
                break
            loss, correct = self.train_step(x, y)
            sums.loss += loss * len(y)
            sums.correct += correct
            sums.seen += len(y)
            s.step_in_epoch += 1
            s.global_step += 1
            if s.step_in_epoch % LOG_EVERY == 0 or s.step_in_epoch == epoch_steps:
                self._log()
            self._call("on_step_end")
            if self._end_epoch:
                break
            if distributed.any_rank(bool(stop)):   # every process stops after the same step
                self._call("on_interrupt")
                self.checkpoint()
                raise TrainingInterrupted(self.run, stop[0] if stop else signal.SIGTERM)
        elapsed = time.perf_counter() - sums.start
        s.train_seconds += elapsed
        s.epoch_loss, s.epoch_correct, s.epoch_seen, s.epoch_seconds = 0.0, 0, 0, 0.0
        if sums.seen == 0:
            return float("nan"), float("nan"), elapsed, 0
        loss_total, correct_total, seen = distributed.sum_over_ranks(sums.loss, sums.correct, sums.seen)
        return loss_total / seen, correct_total / seen, elapsed, int(seen)

    def _log(self) -> None:
        """Every LOG_EVERY steps (each syncs the device): refuse a diverged run, tell callbacks."""
        s, cfg, sums = self.state, self.cfg, self.sums
        assert sums is not None
        mean_loss = sums.loss.item() / sums.seen
        if not math.isfinite(mean_loss):
            raise NonFiniteLoss(f"training loss became {mean_loss} at epoch {s.epoch + 1}, step "
                                f"{s.step_in_epoch}: the learning rate ({cfg.lr}) is probably too "
                                f"high for {cfg.model}; try one ten times smaller")
        if self.scaler is not None and self.scaler.get_scale() < MIN_LOSS_SCALE:
            raise NonFiniteLoss(f"float16 gradients overflow at every loss scale (down to "
                                f"{self.scaler.get_scale():.2g}) by epoch {s.epoch + 1}, step "
                                f"{s.step_in_epoch}: the learning rate ({cfg.lr}) is probably too "
                                f"high for {cfg.model}, or use --precision bf16 or fp32")
        elapsed = time.perf_counter() - sums.start
        self._call("on_log", {"loss": mean_loss, "accuracy": sums.correct.item() / sums.seen,
                              "img_s": sums.seen / max(elapsed, 1e-9)})

    def elapsed(self) -> float:
        """Training seconds so far, this epoch included."""
        return self.state.train_seconds + time.perf_counter() - self._epoch_start

    def eval_model(self) -> Classifier:
        """The model to evaluate: the weight average when there is one."""
        if self.ema is None or self.state.global_step < self.ema_start_step:
            return self.model
        if self._ema_model is None:
            self._ema_model = copy.deepcopy(self.model)   # made once, refreshed from the average
        self.ema.copy_to(self._ema_model)
        return self._ema_model

    def fit(self, callbacks: Sequence[Callback] = ()) -> None:
        """Train to the end of the schedule, or until a callback stops it; ``callbacks`` come
        after the run's own policies (``policies``), in their order."""
        self.callbacks = [*self.policies, *callbacks]
        cfg, s = self.cfg, self.state
        total_epochs = math.ceil(cfg.epochs)
        with catch_stop_signals() as stop:
            while s.epoch < total_epochs:
                epoch_steps = min(self.steps_per_epoch, self.total_steps - s.epoch * self.steps_per_epoch)
                loss, acc, seconds, images = self.run_epoch(stop, epoch_steps)
                model = self.eval_model()
                val = (evaluate(model, self.data.val, self.device, dtype=self.dtype,
                                channels_last=cfg.channels_last)
                       if self.data.val is not None and len(self.data.val) else None)
                h = s.history
                h["loss"].append(loss)
                h["accuracy"].append(acc)
                h["val_loss"].append(val.loss if val else None)
                h["val_accuracy"].append(val.accuracy if val else None)
                h["lr"].append(self.lr)   # the last step's, as the schedule or a callback set it
                h["seconds"].append(seconds)
                s.epoch += 1
                s.step_in_epoch = 0
                improved = False
                if val is not None and val.accuracy > s.best_val:
                    improved, s.best_val, s.best_epoch = True, val.accuracy, s.epoch
                self._call("on_epoch_end", {"val": val, "improved": improved, "model": model, "images": images})
                stopping, reason = self._stop
                if stopping:
                    if reason and self.progress:
                        print(reason, flush=True)
                    break

    def end_training(self, metrics: dict[str, Any]) -> None:
        """Tell the callbacks the test split's scores (after ``fit``, once metrics.json is written)."""
        self._call("on_train_end", metrics)

    def final_model(self) -> Classifier:
        model = self.eval_model()
        if self.cfg.keep == "best" and self.best_state is not None:
            model.load_state_dict(self.best_state)
        return model
