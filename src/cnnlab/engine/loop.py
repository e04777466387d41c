"""One way to train every model: ``fit(config) -> Run`` and ``resume(run) -> Run``.

The CLI, the tuner, the benchmarks and the tests all call ``fit``. It checks the config, loads
the data, trains with the one loop (``cnnlab.engine.trainer.Trainer``: the pieces the config
names, checkpoints every epoch so a run can be resumed exactly), evaluates the test split once at the end (or not at all: ``fit(test=False)``,
the tuner's trials; ``score_test_split`` tests such a run later), and writes the run folder
(everything but the report, which ``cnnlab.report`` draws from it), one process at a time
(``cnnlab.engine.runs.writing_run``). What varies between runs is a callback on the loop's
events (``cnnlab.core.events``; the engine's own in ``cnnlab.engine.callbacks``).
"""
from __future__ import annotations

import math
import os
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import torch

from cnnlab.core import config as config_mod
from cnnlab.core import hardware
from cnnlab.core.config import FINE_TUNING, FINE_TUNING_SOURCE, Config
from cnnlab.core.files import discard_temps, write_json
from cnnlab.core.hardware import choose_precision, pick_device, set_threads
from cnnlab.core.metrics import per_class_accuracy
from cnnlab.core.run_folder import RunFolder, finite
from cnnlab.data.augment import PRESETS
from cnnlab.data.dataset import Dataset
from cnnlab.data.stream import describe as describe_streaming
from cnnlab.engine import checkpoint as ckpt
from cnnlab.engine import distributed, prepare
from cnnlab.engine.build import build_training, starting_weights
from cnnlab.engine.callbacks import Callback, PartialUnfreeze, default_callbacks
from cnnlab.engine.evaluation import Evaluation, evaluate
from cnnlab.engine.runs import (
    Run,
    check_new_run_folder,
    default_run_name,
    environment,
    is_empty_run_folder,
    load_run,
    model_card,
    run_path,
    save_config,
    save_evaluation,
    save_history,
    save_model,
    split_identity,
    writing_run,
)
from cnnlab.engine.trainer import NonFiniteLoss, Trainer
from cnnlab.models.classifier import Classifier


@hardware.borrowed_process()   # threads and the global RNG: put back when fit returns or raises
def fit(config: Config | None = None, data: Dataset | None = None, *, out: str | Path | None = None,
        name: str | None = None, progress: bool = True, callbacks: Sequence[Callback] = (), test: bool = True,
        **overrides: Any) -> Run:
    """Train a model as ``config`` (plus keyword overrides) says and return the finished run.

    - ``data``: what ``load_data(plan_run(config))`` returns, for a caller that trains several
      times on the same images (the tuner).
    - ``callbacks`` run after the config's own (progress, checkpoints, keep-best, TensorBoard,
      time limit, early stop: ``cnnlab.engine.callbacks``); the tuner's pruning is one.
    - ``test=False``: the test split is not read at all (a tuning trial, scored on validation);
      metrics.json says ``"tested": false`` and there is no evaluation.npz. ``score_test_split``
      tests the run later, once.

    The folder is locked while the run writes it (``writing_run``): a second process training
    into it, or resuming it, is refused with this one's pid.

    The run folder holds everything the report draws; ``cnnlab.report.write_report``, a layer
    above, draws it (the command line after training, the tuner for its best trial only).
    """
    cfg = config_mod.merge(config or Config(), overrides, source="fit()") if overrides else (config or Config())
    plan = prepare.plan_run(cfg, read_folder=data is None)   # bad input leaves no folder behind
    cfg = plan.cfg
    device = distributed.setup(plan.device)   # joins torchrun's process group, if any
    with distributed.main_first():   # published weights fetched and checked once, before any data loads
        start = starting_weights(cfg, plan.weights)
    set_threads(plan.threads)
    progress = progress and distributed.is_main()
    path = distributed.from_main(run_path(out=out, name=name, default_name=default_run_name(cfg)))
    check_new_run_folder(path)
    if data is None:
        data = prepare.load_data(plan)
    elif cfg.image_size is None and data.split_record is not None:
        h, w, _ = data.image_shape   # the size the caller's folder was decoded at, saved with the run
        cfg = cfg.replace(image_size=h if h == w else (h, w))
    if data.skipped and progress:
        print(f"skipped {data.skipped} unreadable image(s) (--bad-images skip)", flush=True)
    trainer = Trainer(build_training(cfg, data, device, start=start), path, progress)
    main = distributed.is_main()   # data-parallel: rank 0 writes the folder, and locks it
    # What this run may clean up: a folder it makes, or the contents of an empty one it was given.
    fresh = main and is_empty_run_folder(path)
    created = fresh and not path.exists()
    if main:
        path.mkdir(parents=True, exist_ok=True)
    with writing_run(path) if main else nullcontext():   # RunBusy: another process writes it
        if main:
            check_new_run_folder(path)   # ... or wrote a whole run there since the check above
        try:
            if main:
                save_config(path, cfg, environment(device, trainer.precision))
                if data.split_record is not None:
                    write_json(RunFolder(path).splits_file, data.split_record)
            if progress:
                _print_header(cfg, data, trainer, path, device, plan.augment_reason)
            trainer.test = test
            return _train_and_save(trainer, callbacks)
        except BaseException:
            # A run that ends before its first checkpoint has nothing to resume: no folder is left
            # for the next `--out` to trip over.
            folder = RunFolder(path)
            if fresh and not folder.last_checkpoint.exists() and not folder.weights_file.exists():
                shutil.rmtree(path, ignore_errors=True)
                if not created:
                    path.mkdir()
            raise


@hardware.borrowed_process()
def resume(run: str | Path, *, progress: bool = True, changes: dict[str, Any] | None = None,
           callbacks: Sequence[Callback] = ()) -> Run:
    """Continue ``run`` from its last checkpoint with its saved config. ``changes`` may repeat
    saved values or change ``epochs`` (see ``checkpoint.resumed_config``); others are refused.

    A run that already finished (its model and metrics.json written after its last checkpoint)
    and is not asked for more epochs is complete: it comes back as it is, untrained, and a line
    says so. The run's lock is held throughout (rank 0's, data-parallel): a second process
    training or resuming it is refused with the holder's pid.
    """
    path = Path(run)
    folder = RunFolder(path)
    if not folder.last_checkpoint.is_file():
        ckpt.read_checkpoint(folder.last_checkpoint)   # says why there is nothing to resume
    main = _launched_as_rank_zero()
    with writing_run(path) if main else nullcontext():
        return _resume(path, main, progress=progress, changes=changes or {}, callbacks=callbacks)


def _launched_as_rank_zero() -> bool:
    """Rank 0, known before the process group is joined: from the launcher's environment."""
    return not distributed.launched() or os.environ.get("RANK") == "0"


def _complete_message(folder: RunFolder, meta: dict[str, Any], cfg: Config) -> str | None:
    """Why resuming ``folder`` has nothing to do, or None: its last checkpoint (``meta``) is the
    state its saved model and metrics came from, and ``cfg`` asks for no more epochs."""
    metrics = folder.metrics
    if (not folder.weights_file.is_file() or metrics.get("steps") != ckpt.loop_state(meta).global_step
            or cfg.epochs > float(meta["config"].get("epochs", cfg.epochs))):
        return None
    test = metrics.get("test_accuracy")
    tested = f"test accuracy {test:.4f}" if finite(test) else "not tested"
    return (f"{folder.path} is complete: it trained {metrics.get('epochs')} epoch(s), {metrics.get('steps')} "
            f"steps, and saved its model ({tested}); nothing to resume. To train it longer: "
            f"cnnlab train --resume {folder.path} --epochs N (constant learning-rate schedules only)")


def _resume(path: Path, main: bool, *, progress: bool, changes: dict[str, Any],
            callbacks: Sequence[Callback]) -> Run:
    folder = RunFolder(path)
    tensors, meta = ckpt.read_checkpoint(folder.last_checkpoint)
    cfg = ckpt.resumed_config(meta, changes, path)
    done = _complete_message(folder, meta, cfg)
    if done is not None:
        run = load_run(path)
        run.model()   # a damaged model.safetensors is refused, not reported complete
        if progress and main:
            print(done, flush=True)
        return run
    if main:
        discard_temps(folder.checkpoints_dir, folder.last_checkpoint.name)   # from a process killed mid-write
    splits = RunFolder(path).splits_file
    plan = prepare.plan_run(cfg, saved_split=splits if splits.is_file() else None)
    device = distributed.setup(plan.device)
    distributed.check_resume_world(meta.get("world_size", 1), path)
    set_threads(plan.threads)
    progress = progress and distributed.is_main()
    data = prepare.load_data(plan)
    trainer = Trainer(build_training(cfg, data, device, start=None), path, progress)   # weights: the checkpoint's
    trainer.restore(tensors, meta)
    if progress:
        print(f"resuming {path} at epoch {trainer.state.epoch + 1}, step {trainer.state.step_in_epoch}",
              flush=True)
    if distributed.is_main():
        save_config(path, cfg, environment(device, trainer.precision))
    return _train_and_save(trainer, callbacks)


def _print_header(cfg: Config, data: Dataset, trainer: Trainer, path: Path, device: torch.device,
                  augment_reason: str) -> None:
    params = sum(p.numel() for p in trainer.model.net.parameters())
    h, w, c = data.image_shape
    val = len(data.val) if data.val is not None else 0
    print(f"cnnlab: {cfg.model} ({params:,} parameters) on {data.name}: {len(data.train):,} train / "
          f"{val:,} val / {len(data.test):,} test images, {w}x{h}x{c}, {data.num_classes} classes", flush=True)
    if data.size_reason and data.size_reason != "--image-size":
        print(f"  images decoded at {w}x{h}: {data.size_reason} (--image-size N to choose)", flush=True)
    print(f"  {cfg.epochs:g} epochs x {trainer.steps_per_epoch} batches of {cfg.batch_size}, "
          f"{cfg.optimizer} lr {cfg.lr:g} -> {path}", flush=True)
    print(f"  {hardware_line(device, trainer.precision)}", flush=True)
    print(f"  augment {cfg.augment}: {PRESETS[cfg.augment].description} ({augment_reason})", flush=True)
    in_effect = {k: v for k, v in FINE_TUNING.items() if getattr(cfg, k) == v}
    if (cfg.pretrained or cfg.weights) and in_effect:
        print(f"  {FINE_TUNING_SOURCE} in effect (no flag, file or recipe set them): "
              + ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in in_effect.items()),
              flush=True)
    for line in (distributed.describe(cfg), describe_streaming(data), *_fine_tuning_lines(trainer)):
        if line:
            print(line, flush=True)


def _fine_tuning_lines(trainer: Trainer) -> list[str]:
    cfg, lines = trainer.cfg, trainer.init_report.lines() if trainer.init_report else []
    weights = trainer.weights
    if weights is not None:
        top1 = f", ImageNet-1k top-1 {weights.top1:g}%" if weights.top1 else ""
        lines.insert(0, f"  pretrained: {weights.name} ({weights.license}{top1}), normalised with its mean and std")
        if trainer.data.image_shape[2] == 1:
            lines.append("  greyscale images are repeated into the 3 channels the weights were trained on")
    if cfg.freeze_epochs:
        on = ("on the frozen body's features of each image (computed once, unaugmented)" if cfg.cache_features
              else "on augmented images through the frozen body")
        lines.append(f"  only the head ({trainer.head}) trains for {cfg.freeze_epochs:g} epochs, {on}, then "
                     f"everything" + (f", the body at {cfg.body_lr_scale:g} x lr" if cfg.body_lr_scale != 1 else ""))
    elif cfg.body_lr_scale != 1:
        lines.append(f"  the body learns at {cfg.body_lr_scale:g} x lr, the head ({trainer.head}) at lr")
    if cfg.frozen_bn:
        lines.append("  BatchNorm keeps the trained running statistics all run (--frozen-bn)")
    partial = next((p for p in trainer.policies if isinstance(p, PartialUnfreeze)), None)
    if partial is not None:
        first = partial.blocks[-partial.last]
        lines.append(f"  --unfreeze {cfg.unfreeze}: the body trains from {first} on; its first "
                     f"{len(partial.frozen)} of {len(partial.blocks)} blocks stay frozen all run")
    return lines


def hardware_line(device: torch.device, precision: hardware.Precision) -> str:
    """``device cpu: AMD EPYC 7B13 (ISA AVX2, 2 threads), precision float32 (auto: no native
    bf16 on this CPU)``"""
    where = (f"ISA {hardware.cpu_isa()}, {torch.get_num_threads()} threads" if device.type == "cpu"
             else f"{torch.get_num_threads()} CPU threads")
    return f"device {device}: {hardware.device_name(device)} ({where}), precision {precision}"


@hardware.reuse_freed_memory()
def _train_and_save(trainer: Trainer, callbacks: Sequence[Callback] = ()) -> Run:
    cfg, path, s = trainer.cfg, trainer.run, trainer.state
    try:
        trainer.fit([*default_callbacks(cfg, progress=trainer.progress), *callbacks])
    except NonFiniteLoss as e:
        # No checkpoint holds a NaN (Trainer.checkpoint checks): the last one's weights (averaged
        # or best, as the config asks) become the model, and its history the history.
        last = RunFolder(path).last_checkpoint
        if not distributed.is_main():
            raise
        if not last.exists():
            raise NonFiniteLoss(f"{e}; no epoch finished, so no model was saved") from None
        trainer.restore(*ckpt.read_checkpoint(last))
        _write_model(trainer, trainer.final_model())
        s = trainer.state
        where = f"the end of epoch {s.epoch}" if s.step_in_epoch == 0 else f"epoch {s.epoch + 1}, step {s.step_in_epoch}"
        raise NonFiniteLoss(f"{e}; model.safetensors holds the last finite weights, those of the "
                            f"checkpoint at {where}") from None
    model = trainer.final_model()
    main = distributed.is_main()   # every process evaluates its shard; rank 0 writes
    if main:
        _write_model(trainer, model)
    metrics = _metrics(trainer)
    if trainer.test:
        test = evaluate(model, trainer.data.test, trainer.device, dtype=trainer.dtype, tta=cfg.tta,
                        tta_gate=cfg.tta_gate, channels_last=cfg.channels_last)
        metrics.update(_test_figures(test, trainer.data))
    if main:
        write_json(RunFolder(path).metrics_file, metrics)
        if trainer.test:
            save_evaluation(path, trainer.data, test, model)
    trainer.end_training(metrics)
    if trainer.progress:
        tested = (f"test accuracy {metrics['test_accuracy']:.4f}  test loss {metrics['test_loss']:.4f}"
                  if trainer.test else "not tested (the test split was not read)")
        print(f"{tested}  trained {s.train_seconds:.1f}s over {s.epoch} epochs  -> {path}", flush=True)
    distributed.barrier()   # the run folder is complete before any process reads it
    return load_run(path)


def _write_model(trainer: Trainer, model: Classifier) -> None:
    card = model_card(trainer.cfg, trainer.data.class_names, trainer.data.image_shape, trainer.mean, trainer.std)
    save_model(trainer.run, model, card)
    save_history(trainer.run, trainer.state.history)


def _metrics(trainer: Trainer) -> dict[str, Any]:
    """metrics.json before the test: the training figures and the validation split's size (for
    the standard error of its accuracies); ``"tested": false`` until ``_test_figures`` join."""
    s = trainer.state
    h = s.history
    val = trainer.data.val
    return {"tested": False,
            "train_seconds": s.train_seconds, "epochs": s.epoch, "steps": s.global_step,
            "best_val_accuracy": None if not math.isfinite(s.best_val) else s.best_val,
            "best_epoch": s.best_epoch or None, "final_val_accuracy": h["val_accuracy"][-1] if h["val_accuracy"] else None,
            "val_images": len(val) if val is not None else 0, "tta": trainer.cfg.tta, "keep": trainer.cfg.keep,
            "parameters": sum(p.numel() for p in trainer.model.net.parameters())}


def _test_figures(test: Evaluation, data: Dataset) -> dict[str, Any]:
    """What the test evaluation adds to metrics.json: scores, per-class accuracy, and which
    images they were measured on (``split_identity``: count, labels, an image folder's files)."""
    per_class = per_class_accuracy(test.labels.numpy(), test.predictions.numpy(), data.class_names)
    return {"tested": True, "test_accuracy": test.accuracy, "test_loss": test.loss,
            "per_class_accuracy": per_class, "test_images": len(test.labels),
            "test_set": split_identity(data.test, _test_files(data))}


def _test_files(data: Dataset) -> list[str] | None:
    """An image folder's test files (relative paths, as splits.json lists them) when that list
    is exactly the test split, in its order; None otherwise (an official dataset, a subset)."""
    listed = ((data.split_record or {}).get("files") or {}).get("test")
    labels = data.test.labels
    if not listed or len(listed) != len(labels) or any(int(f[1]) != int(y) for f, y in zip(listed, labels)):
        return None
    return [str(f[0]) for f in listed]


def score_test_split(run: str | Path, data: Dataset | None = None, *, device: str | None = None) -> dict[str, Any]:
    """Test a finished run's model once, on its test split, and write the figures into its
    folder (metrics.json, evaluation.npz) as a run trained with testing would have them: for
    a run trained with ``fit(test=False)``, the tuner's best trial. ``data``: the images the
    run was trained on (``load_data(plan_run(config))``), else they are loaded again. Returns metrics.json."""
    path = Path(run)
    with writing_run(path):
        done = load_run(path)
        cfg = done.config
        if data is None:
            splits = done.splits_file
            data = prepare.load_data(prepare.plan_run(cfg, saved_split=splits if splits.is_file() else None))
        dev = pick_device(device or cfg.device)
        model = done.model(dev)
        result = evaluate(model, data.test, dev, dtype=choose_precision(cfg.precision, dev, strict=False).dtype,
                          tta=cfg.tta, tta_gate=cfg.tta_gate)
        metrics = {**done.metrics, **_test_figures(result, data)}
        write_json(done.metrics_file, metrics)
        save_evaluation(path, data, result, model)
    return metrics
