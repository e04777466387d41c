"""The training loop's one event system: everything that varies between runs is a ``Callback``.

A run's parts are built once (``cnnlab.engine.build``); the loop (``cnnlab.engine.trainer.Trainer``)
steps them and calls every callback, in list order, at each event below, passing itself:

    on_setup(setup)                   once, while the parts are built, with the network (a
                                      ``Setup``): before the optimizer and the weight average
                                      see its weights and before a checkpoint is restored
                                      (SpeedNet's whitening is set from the training images here)
    on_epoch_begin(trainer, steps)    before an epoch's first step (or a resumed epoch's next)
    on_step_begin(trainer)            before each step's forward pass; ``trainer.lr`` and
                                      ``trainer.decay_mult`` hold the schedule's values for the
                                      step and may be changed (the time limit, lr-find's ramp)
    on_backward_end(trainer)          after the backward pass, before the optimizer steps
    on_log(trainer, logs)             every few steps: loss, accuracy, img_s so far
    on_step_end(trainer)              after each optimizer step; ``trainer.last_loss`` is its loss
    on_epoch_end(trainer, logs)       after the epoch's evaluation and history row
    on_interrupt(trainer)             before a stop signal's checkpoint
    on_train_end(trainer, metrics)    after the test split's evaluation (metrics.json's contents)

A callback stops training with ``trainer.request_stop(reason)`` (after the epoch) or
``trainer.end_epoch_now()`` (after this step). It lives here, in the bottom layer, so that a
network (``cnnlab.models``) can offer callbacks of its own (``training_callbacks``) without
the models knowing the engine; the engine's own are in ``cnnlab.engine.callbacks``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

EVENTS = ("on_setup", "on_epoch_begin", "on_step_begin", "on_backward_end", "on_log", "on_step_end",
          "on_epoch_end", "on_interrupt", "on_train_end")


@dataclass(frozen=True)
class Setup:
    """What ``on_setup`` sees: the network, built and holding its starting weights."""
    model: Any                           # the Classifier; its network is model.net
    head: str                            # the network's classifier head (a module name)
    sample: Callable[[int], Any]         # n training images, normalised as the network sees
                                         # them: float (N, C, H, W) on the device
    images: Callable[[], Any]            # every training image of this process's shard, in
                                         # index order, unaugmented: (float (B, C, H, W) in
                                         # [0, 1], labels) batches on the device


class Callback:
    """Every event, doing nothing: subclasses override what they need."""
    # Some parameters stop taking gradients part-way (a frozen body): data-parallel training
    # must not wait for their gradients (DDP's find_unused_parameters).
    unused_parameters = False

    def on_setup(self, setup: Setup) -> None: ...
    def on_epoch_begin(self, trainer: Any, steps: int) -> None: ...
    def on_step_begin(self, trainer: Any) -> None: ...
    def on_backward_end(self, trainer: Any) -> None: ...
    def on_log(self, trainer: Any, logs: dict[str, float]) -> None: ...
    def on_step_end(self, trainer: Any) -> None: ...
    def on_epoch_end(self, trainer: Any, logs: dict[str, Any]) -> None: ...
    def on_interrupt(self, trainer: Any) -> None: ...
    def on_train_end(self, trainer: Any, metrics: dict[str, Any]) -> None: ...
