"""One training loop for every model: ``fit(config) -> Run``.

The CLI, the tuner, the benchmarks and the tests all call ``fit``. It loads the data,
builds the model from the registry, trains with the pieces the config names (optimizer,
schedule, augmentation, precision, weight averaging), checkpoints every epoch so a run can
be resumed exactly, evaluates the test split once at the end, and writes the run folder.
"""
from __future__ import annotations

import io
import math
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cnnlab import config as config_mod
from cnnlab.config import Config
from cnnlab.data.dataset import Dataset, Split, prepare_splits
from cnnlab.data.sources import load_dataset
from cnnlab.errors import CnnlabError, TrainingInterrupted
from cnnlab.fileio import write_bytes, write_json
from cnnlab.models.classifier import Classifier, build_classifier
from cnnlab.run import (Run, check_new_run_folder, default_run_name, empty_history, environment,
                        load_run, model_card, run_path, save_config, save_history, save_model)
from cnnlab.train import checkpoint as ckpt
from cnnlab.train.batches import Augmentation, BatchStream, derive_seed, eval_batches
from cnnlab.train.ema import WeightAverage
from cnnlab.train.hardware import autocast, pick_device, resolve_precision, set_threads
from cnnlab.train.optim import build_optimizer, build_schedule, decay_weights, set_lr

EVAL_BATCH = 500
LOG_EVERY = 10           # steps between progress-bar refreshes (each one syncs the device)


class NonFiniteLoss(CnnlabError):
    pass


# ----------------------------------------------------------------------------- evaluation
@dataclass
class Evaluation:
    loss: float
    accuracy: float
    logits: torch.Tensor          # float32 (N, classes), on the CPU
    labels: torch.Tensor

    @property
    def predictions(self) -> torch.Tensor:
        return self.logits.argmax(1)


def tta_logits(model: torch.nn.Module, x: torch.Tensor, tta: str) -> torch.Tensor:
    """Average logits over the image and its mirror (and 1-pixel shifts of both)."""
    logits = model(x)
    if tta == "none":
        return logits
    views = [x.flip(-1)]
    if tta == "flip_translate":
        pad = F.pad(x, (1, 1, 1, 1), mode="reflect")
        h, w = x.shape[-2:]
        shifted = [pad[..., 0:h, 0:w], pad[..., 2:h + 2, 2:w + 2]]
        views += shifted + [v.flip(-1) for v in shifted]
    for v in views:
        logits = logits + model(v)
    return logits / (1 + len(views))


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: Split, device: torch.device, *, dtype: torch.dtype | None = None,
             tta: str = "none", batch_size: int = EVAL_BATCH, channels_last: bool = False) -> Evaluation:
    was_training = model.training
    model.eval()
    outs = []
    for x, _ in eval_batches(split, batch_size, device, channels_last):
        with autocast(device, dtype):
            outs.append(tta_logits(model, x, tta).float().cpu())
    model.train(was_training)
    logits = torch.cat(outs) if outs else torch.zeros(0, 1)
    labels = torch.as_tensor(split.labels)
    loss = F.cross_entropy(logits, labels).item() if len(labels) else float("nan")
    acc = (logits.argmax(1) == labels).float().mean().item() if len(labels) else float("nan")
    return Evaluation(loss, acc, logits, labels)


# ----------------------------------------------------------------------------- signals
@contextmanager
def _catch_stop_signals():
    """Turn SIGINT/SIGTERM into a flag the loop checks after each step."""
    caught: list[int] = []
    handlers = {}

    def handler(signum, frame):
        caught.append(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            handlers[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. inside a tuner worker thread)
            pass
    try:
        yield caught
    finally:
        for sig, old in handlers.items():
            signal.signal(sig, old)


# ----------------------------------------------------------------------------- state
@dataclass
class LoopState:
    epoch: int = 0                 # epochs completed
    step_in_epoch: int = 0         # batches done in the current epoch
    global_step: int = 0
    history: dict[str, list] = field(default_factory=empty_history)
    best_val: float = -math.inf
    best_epoch: int = 0
    train_seconds: float = 0.0


def _dataset_stats(train: Split, normalize: str) -> tuple[list[float], list[float]]:
    c = train.images.shape[-1]
    if normalize == "none":
        return [0.0] * c, [1.0] * c
    flat = train.images.reshape(-1, c).astype(np.float64) / 255.0
    mean, std = flat.mean(0), flat.std(0)
    return [float(m) for m in mean], [float(max(s, 1e-3)) for s in std]


class Trainer:
    """The loop's moving parts, gathered so checkpointing can see them all."""

    def __init__(self, cfg: Config, data: Dataset, run: Path, device: torch.device,
                 progress: bool = True):
        self.cfg, self.data, self.run, self.device, self.progress = cfg, data, run, device, progress
        self.dtype = resolve_precision(cfg.precision, device)
        h, w, c = data.image_shape
        torch.manual_seed(derive_seed(cfg.seed, 0x1717))   # weight initialisation
        self.mean, self.std = _dataset_stats(data.train, cfg.normalize)
        self.model: Classifier = build_classifier(cfg.model, data.num_classes, c, h, self.mean, self.std).to(device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if cfg.whiten:
            init = getattr(self.model.net, "init_whitening", None)
            if init is None:
                raise CnnlabError(f"--whiten needs a model with a patch-whitening first layer; "
                                  f"{cfg.model!r} has none (try --model airbench)")
            sample = torch.as_tensor(data.train.images[:5000]).permute(0, 3, 1, 2).float().div(255)
            init(((sample - self.model.mean.cpu()) / self.model.std.cpu()).to(device))
        aug = Augmentation(cfg.flip, cfg.translate, cfg.cutout)
        self.batches = BatchStream(data.train, cfg.batch_size, device, seed=cfg.seed, aug=aug,
                                   channels_last=cfg.channels_last)
        self.steps_per_epoch = len(self.batches)
        self.total_steps = max(1, round(cfg.epochs * self.steps_per_epoch))
        self.schedule = build_schedule(cfg, self.steps_per_epoch)
        self.optimizer = build_optimizer(self.model, cfg)
        self.ema = WeightAverage(self.model, cfg.ema, cfg.ema_every, cfg.lookahead) if cfg.ema > 0 else None
        self.ema_start_step = round(cfg.ema_start * self.total_steps)
        self.best_state: dict[str, torch.Tensor] | None = None
        self.state = LoopState()
        self.forward = torch.compile(self.model) if cfg.compile else self.model

    # -- checkpoint --------------------------------------------------------------------
    def checkpoint(self) -> None:
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        opt_t, opt_meta = ckpt.optimizer_to_flat(self.optimizer)
        tensors.update(opt_t)
        if self.ema is not None:
            tensors.update({f"ema.{k}": v for k, v in self.ema.state_tensors().items()})
        if self.best_state is not None:
            tensors.update({f"best.{k}": v for k, v in self.best_state.items()})
        rng_t, rng_meta = ckpt.rng_states()
        tensors.update(rng_t)
        s = self.state
        meta = {"epoch": s.epoch, "step_in_epoch": s.step_in_epoch, "global_step": s.global_step,
                "history": s.history, "best_val": s.best_val if math.isfinite(s.best_val) else None,
                "best_epoch": s.best_epoch, "train_seconds": s.train_seconds,
                "optimizer": opt_meta, "rng": rng_meta, "config": self.cfg.to_dict(),
                "mean": self.mean, "std": self.std}
        ckpt.write_checkpoint(self.run / "checkpoints" / "last.safetensors", tensors, meta)

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
        self.state = LoopState(meta["epoch"], meta["step_in_epoch"], meta["global_step"], meta["history"],
                               -math.inf if meta["best_val"] is None else meta["best_val"],
                               meta["best_epoch"], meta["train_seconds"])

    # -- training ----------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, s = self.cfg, self.state
        mult = self.schedule.multiplier(s.global_step)
        set_lr(self.optimizer, self.schedule.base_lr * mult)
        # Dropout and other in-model randomness, reproducible per step for exact resume.
        torch.manual_seed(derive_seed(cfg.seed, s.epoch, s.step_in_epoch, 0xD0))
        with autocast(self.device, self.dtype):
            logits = self.forward(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        decay_weights(self.optimizer, cfg, mult)
        self.optimizer.step()
        if self.ema is not None and s.global_step >= self.ema_start_step:
            self.ema.update(s.global_step)
        correct = (logits.detach().argmax(1) == y).sum()
        return loss.detach(), correct

    def run_epoch(self, stop: list[int], epoch_steps: int) -> tuple[float, float, float]:
        """Train from the current position to the end of the epoch (or ``epoch_steps``)."""
        s, cfg = self.state, self.cfg
        self.model.train()
        self._unfreeze_whitening()
        loss_sum = torch.zeros((), device=self.device)
        correct_sum = torch.zeros((), device=self.device, dtype=torch.long)
        seen, start = 0, time.perf_counter()
        bar = tqdm(total=epoch_steps, initial=s.step_in_epoch, disable=not self.progress, leave=False,
                   desc=f"epoch {s.epoch + 1}/{math.ceil(cfg.epochs)}", unit="batch",
                   dynamic_ncols=True, file=sys.stderr)
        for x, y in self.batches.epoch(s.epoch, s.step_in_epoch):
            if s.step_in_epoch >= epoch_steps:
                break
            loss, correct = self.train_step(x, y)
            loss_sum += loss * len(y)
            correct_sum += correct
            seen += len(y)
            s.step_in_epoch += 1
            s.global_step += 1
            if s.step_in_epoch % LOG_EVERY == 0 or s.step_in_epoch == epoch_steps:
                mean_loss = loss_sum.item() / seen
                if not math.isfinite(mean_loss):
                    raise NonFiniteLoss(f"training loss became {mean_loss} at epoch {s.epoch + 1}, step "
                                        f"{s.step_in_epoch}: the learning rate ({cfg.lr}) is probably too "
                                        f"high for {cfg.model}; try one ten times smaller")
                elapsed = time.perf_counter() - start
                bar.set_postfix(loss=f"{mean_loss:.3f}", acc=f"{correct_sum.item() / seen:.3f}",
                                img_s=f"{seen / max(elapsed, 1e-9):.0f}", refresh=False)
                bar.update(s.step_in_epoch - bar.n)
            if cfg.checkpoint_every and s.global_step % cfg.checkpoint_every == 0:
                self.checkpoint()
            if stop:
                bar.close()
                s.train_seconds += time.perf_counter() - start
                self.checkpoint()
                raise TrainingInterrupted(self.run, stop[0])
        bar.close()
        elapsed = time.perf_counter() - start
        s.train_seconds += elapsed
        if seen == 0:
            return float("nan"), float("nan"), elapsed
        return loss_sum.item() / seen, correct_sum.item() / seen, elapsed

    def _unfreeze_whitening(self) -> None:
        layer = getattr(self.model.net, "whiten", None)
        if self.cfg.whiten and layer is not None:
            layer.weight.requires_grad_(self.state.epoch >= self.cfg.whiten_freeze)

    def eval_model(self) -> torch.nn.Module:
        """The model to evaluate: the weight average when there is one."""
        if self.ema is None or self.state.global_step < self.ema_start_step:
            return self.model
        if not hasattr(self, "_ema_model"):
            import copy
            self._ema_model = copy.deepcopy(self.model)
        self.ema.copy_to(self._ema_model)
        return self._ema_model

    def fit(self, on_epoch: Callable[[int, dict[str, list]], bool] | None = None) -> None:
        cfg, s = self.cfg, self.state
        total_epochs = math.ceil(cfg.epochs)
        with _catch_stop_signals() as stop:
            while s.epoch < total_epochs:
                epoch_steps = min(self.steps_per_epoch, self.total_steps - s.epoch * self.steps_per_epoch)
                loss, acc, seconds = self.run_epoch(stop, epoch_steps)
                model = self.eval_model()
                val = (evaluate(model, self.data.val, self.device, dtype=self.dtype,
                                channels_last=cfg.channels_last)
                       if self.data.val is not None and len(self.data.val) else None)
                h = s.history
                h["loss"].append(loss)
                h["accuracy"].append(acc)
                h["val_loss"].append(val.loss if val else None)
                h["val_accuracy"].append(val.accuracy if val else None)
                h["lr"].append(self.schedule.lr(max(0, s.global_step - 1)))
                h["seconds"].append(seconds)
                s.epoch += 1
                s.step_in_epoch = 0
                improved = val is not None and val.accuracy > s.best_val
                if improved:
                    s.best_val, s.best_epoch = val.accuracy, s.epoch
                    if cfg.keep == "best":
                        self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                self._print_epoch(total_epochs)
                self.checkpoint()
                if on_epoch is not None and on_epoch(s.epoch, h):
                    break
                if (cfg.early_stop and val is not None and s.epoch - s.best_epoch >= cfg.early_stop):
                    if self.progress:
                        print(f"early stop: validation accuracy has not improved for {cfg.early_stop} "
                              f"epochs (best {s.best_val:.4f} at epoch {s.best_epoch})", flush=True)
                    break

    def _print_epoch(self, total: int) -> None:
        if not self.progress:
            return
        h, s = self.state.history, self.state
        imgs = len(self.data.train) if h["seconds"][-1] else 0
        line = (f"epoch {s.epoch}/{total}  loss {h['loss'][-1]:.4f}  accuracy {h['accuracy'][-1]:.4f}")
        if h["val_loss"][-1] is not None:
            line += f"  val_loss {h['val_loss'][-1]:.4f}  val_accuracy {h['val_accuracy'][-1]:.4f}"
        line += f"  lr {h['lr'][-1]:.3g}  {h['seconds'][-1]:.1f}s ({imgs / max(h['seconds'][-1], 1e-9):.0f} img/s)"
        print(line, flush=True)

    def final_model(self) -> torch.nn.Module:
        model = self.eval_model()
        if self.cfg.keep == "best" and self.best_state is not None:
            model.load_state_dict(self.best_state)
        return model


# ----------------------------------------------------------------------------- fit
def load_data(cfg: Config) -> Dataset:
    ds = load_dataset(cfg.data, data_dir=cfg.data_dir, image_size=cfg.image_size, bad_images=cfg.bad_images)
    return prepare_splits(ds, val_split=cfg.val_split, train_size=cfg.train_size,
                          test_size=cfg.test_size, seed=cfg.seed)


def fit(config: Config | None = None, *, out: str | Path | None = None, name: str | None = None,
        progress: bool = True, on_epoch: Callable[[int, dict[str, list]], bool] | None = None,
        **overrides: Any) -> Run:
    """Train a model as ``config`` (plus keyword overrides) says and return the finished run.

    ``on_epoch(epoch, history)`` is called after each epoch; returning True stops training
    (the tuner's pruner uses it).
    """
    cfg = config_mod.merge(config or Config(), overrides, source="fit()") if overrides else (config or Config())
    cfg = config_mod.validate(cfg)
    device = pick_device(cfg.device)
    set_threads(cfg.threads)
    data = load_data(cfg)
    if data.skipped and progress:
        print(f"skipped {data.skipped} unreadable image(s) (--bad-images skip)", flush=True)
    # Validate the model before creating the folder: bad input leaves nothing behind.
    from cnnlab.models.registry import model_info
    model_info(cfg.model)
    path = run_path(out=out, name=name, default_name=default_run_name(cfg))
    check_new_run_folder(path)
    trainer = Trainer(cfg, data, path, device, progress)
    path.mkdir(parents=True, exist_ok=True)
    save_config(path, cfg, environment(device))
    if progress:
        _print_header(cfg, data, trainer, path, device)
    return _train_and_save(trainer, on_epoch)


def resume(run: str | Path, *, progress: bool = True, allow: dict[str, Any] | None = None,
           on_epoch: Callable[[int, dict[str, list]], bool] | None = None) -> Run:
    """Continue ``run`` from its last checkpoint; ``allow`` holds safe changes (e.g. epochs)."""
    path = Path(run)
    tensors, meta = ckpt.read_checkpoint(path / "checkpoints" / "last.safetensors")
    cfg = config_mod.merge(Config(), meta["config"], source=f"{path} checkpoint")
    if allow:
        cfg = config_mod.merge(cfg, allow, source="resume")
    device = pick_device(cfg.device)
    set_threads(cfg.threads)
    data = load_data(cfg)
    trainer = Trainer(cfg, data, path, device, progress)
    trainer.restore(tensors, meta)
    if progress:
        print(f"resuming {path} at epoch {trainer.state.epoch + 1}, step {trainer.state.step_in_epoch}",
              flush=True)
    save_config(path, cfg, environment(device))
    return _train_and_save(trainer, on_epoch)


def _print_header(cfg: Config, data: Dataset, trainer: Trainer, path: Path, device: torch.device) -> None:
    params = sum(p.numel() for p in trainer.model.net.parameters())
    h, w, c = data.image_shape
    val = len(data.val) if data.val is not None else 0
    print(f"cnnlab: {cfg.model} ({params:,} parameters) on {data.name}: {len(data.train):,} train / "
          f"{val:,} val / {len(data.test):,} test images, {w}x{h}x{c}, {data.num_classes} classes", flush=True)
    print(f"  {cfg.epochs:g} epochs x {trainer.steps_per_epoch} batches of {cfg.batch_size}, "
          f"{cfg.optimizer} lr {cfg.lr:g}, device {device}"
          f"{', ' + str(trainer.dtype).replace('torch.', '') if trainer.dtype else ''}, "
          f"{torch.get_num_threads()} threads -> {path}", flush=True)


def _train_and_save(trainer: Trainer, on_epoch) -> Run:
    cfg, path, s = trainer.cfg, trainer.run, trainer.state
    try:
        trainer.fit(on_epoch)
    except NonFiniteLoss:
        # The last finished epoch's checkpoint holds the last finite weights: keep them.
        last = path / "checkpoints" / "last.safetensors"
        if last.exists():
            tensors, _ = ckpt.read_checkpoint(last)
            trainer.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
            _write_model(trainer, trainer.model)
        raise
    model = trainer.final_model()
    _write_model(trainer, model)
    test = evaluate(model, trainer.data.test, trainer.device, dtype=trainer.dtype, tta=cfg.tta,
                    channels_last=cfg.channels_last)
    metrics = _metrics(trainer, test)
    write_json(path / "metrics.json", metrics)
    save_evaluation(path, trainer.data, test)
    from cnnlab.report import write_report
    write_report(path)
    if trainer.progress:
        print(f"test accuracy {metrics['test_accuracy']:.4f}  test loss {metrics['test_loss']:.4f}  "
              f"trained {s.train_seconds:.1f}s over {s.epoch} epochs  -> {path}", flush=True)
    return load_run(path)


def _write_model(trainer: Trainer, model: torch.nn.Module) -> None:
    card = model_card(trainer.cfg, trainer.data.class_names, trainer.data.image_shape, trainer.mean, trainer.std)
    save_model(trainer.run, model, card)
    save_history(trainer.run, trainer.state.history)


SAMPLES_PER_CLASS = 8
MISTAKES_KEPT = 36


def save_evaluation(run: Path, data: Dataset, test: Evaluation) -> None:
    """``evaluation.npz``: test logits and labels, plus the few images the plots show.

    Plots and reports read only the run folder, so they can be rebuilt after the data moved.
    """
    probs = torch.softmax(test.logits, 1)
    conf, pred = probs.max(1)
    wrong = torch.nonzero(pred != test.labels).squeeze(1)
    worst = wrong[conf[wrong].argsort(descending=True)][:MISTAKES_KEPT].numpy()
    labels = data.train.labels
    samples = np.concatenate([np.flatnonzero(labels == c)[:SAMPLES_PER_CLASS] for c in range(data.num_classes)])
    buf = io.BytesIO()
    np.savez(buf, logits=test.logits.numpy().astype(np.float32), labels=test.labels.numpy(),
             mistake_index=worst, mistake_images=data.test.images[worst],
             sample_images=data.train.images[samples], sample_labels=labels[samples])
    write_bytes(run / "evaluation.npz", buf.getvalue())


def _metrics(trainer: Trainer, test: Evaluation) -> dict[str, Any]:
    names = trainer.data.class_names
    preds, labels = test.predictions, test.labels
    per_class = {}
    for i, n in enumerate(names):
        mask = labels == i
        per_class[n] = float((preds[mask] == i).float().mean()) if mask.any() else None
    s = trainer.state
    h = s.history
    return {"test_accuracy": test.accuracy, "test_loss": test.loss, "per_class_accuracy": per_class,
            "train_seconds": s.train_seconds, "epochs": s.epoch, "steps": s.global_step,
            "best_val_accuracy": None if not math.isfinite(s.best_val) else s.best_val,
            "best_epoch": s.best_epoch or None, "final_val_accuracy": h["val_accuracy"][-1] if h["val_accuracy"] else None,
            "test_images": len(labels), "tta": trainer.cfg.tta, "keep": trainer.cfg.keep,
            "parameters": sum(p.numel() for p in trainer.model.net.parameters())}
