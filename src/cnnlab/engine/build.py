"""A run's training parts, built from its config and data: ``build_training``.

The network (from the registry, with the normalisation and starting weights the config names),
its batches, the policies of this config and network (a frozen body, SpeedNet's whitening),
the schedule, the optimizer, the float16 loss scaler and the weight average: plain objects,
gathered in ``TrainingParts``, that ``cnnlab.engine.trainer.Trainer`` steps and checkpoints.
The order matters: the policies set the network up from the data (``on_setup``) before the
optimizer and the weight average see its weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from cnnlab.core.config import Config
from cnnlab.core.events import Callback, Setup
from cnnlab.core.hardware import Precision, choose_precision, grad_scaler
from cnnlab.data.augment import check_translate
from cnnlab.data.batches import derive_seed, model_input
from cnnlab.data.dataset import Dataset, channel_stats
from cnnlab.engine import distributed
from cnnlab.engine.callbacks import FreezeBody, FrozenBatchNorm, PartialUnfreeze
from cnnlab.engine.ema import WeightAverage
from cnnlab.engine.evaluation import EVAL_BATCH
from cnnlab.engine.optim import Schedule, build_optimizer, build_schedule
from cnnlab.engine.runs import pretrained_folder, requested_weights
from cnnlab.models.classifier import Classifier, build_classifier
from cnnlab.models.pretrained import InitReport, head_name, init_from
from cnnlab.models.weights import WeightsInfo


@dataclass
class TrainingParts:
    """Everything a run trains with (``build_training``)."""
    cfg: Config
    data: Dataset
    device: torch.device
    precision: Precision
    scaler: torch.amp.GradScaler | None   # float16 only
    weights: WeightsInfo | None           # the published weights it starts from (--pretrained)
    mean: list[float]                     # the normalisation the model carries
    std: list[float]
    model: Classifier
    head: str                             # the classifier head's module name in model.net
    init_report: InitReport | None        # what the starting weights filled; None when it starts fresh
    batches: Any                          # training batches (this process's shard when data-parallel)
    policies: list[Callback]              # the config's and the network's, called before fit's callbacks
    opt_cfg: Config                       # the config with lr and decay seen at the global batch
    schedule: Schedule
    optimizer: Any
    ema: WeightAverage | None
    ema_start_step: int
    total_steps: int
    forward: Callable[[torch.Tensor], torch.Tensor]   # the model, data-parallel and compiled as asked


def starting_weights(cfg: Config, weights: WeightsInfo | None) -> str | Path | None:
    """The run folder a new run's weights start from: ``--init-from``, else the published
    ``weights`` as a run folder (fetched and checked once, ``runs.pretrained_folder``)."""
    if cfg.init_from:
        return cfg.init_from
    return pretrained_folder(weights) if weights is not None else None


def build_training(cfg: Config, data: Dataset, device: torch.device, *, start: str | Path | None) -> TrainingParts:
    """The parts ``cfg`` names, for ``data`` on ``device``. ``start``: the run folder whose
    weights go over the fresh ones (``starting_weights``); None for fresh weights, or for a
    resumed run, whose come from its checkpoint."""
    precision = choose_precision(cfg.precision, device)
    h, w, _ = data.image_shape
    check_translate(cfg.translate, (h, w))   # a caller's own images (the tuner's) meet --translate here
    torch.manual_seed(derive_seed(cfg.seed, 0x1717))   # weight initialisation
    weights = requested_weights(cfg)
    if weights is not None:   # the normalisation the weights were trained with (3 channels)
        mean, std = list(weights.preprocessing.mean), list(weights.preprocessing.std)
    else:
        mean, std = channel_stats(data.train.stats_sample(), cfg.normalize)
    model = build_classifier(cfg.model, data.num_classes, (h, w), mean, std).to(device)
    head = head_name(model.net)
    init_report = init_from(model.net, start, cfg.model) if start is not None else None
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    batches = distributed.training_batches(cfg, data, device)
    steps_per_epoch = len(batches)
    # Freezing the body first, so the network's own policies have the last word on its
    # parameters; then what the network asks (its switches are check_config's).
    offered = getattr(model.net, "training_callbacks", None)
    # The blocks frozen for the whole run first: a frozen body's thaw leaves them frozen.
    policies: list[Callback] = [PartialUnfreeze(cfg.unfreeze)] if cfg.unfreeze != "all" else []
    policies += [FreezeBody(int(cfg.freeze_epochs), cfg.cache_features)] if cfg.freeze_epochs else []
    policies += [FrozenBatchNorm()] if cfg.frozen_bn else []
    policies += offered(cfg, steps_per_epoch) if offered else []
    setup = Setup(model, head, lambda n: _training_sample(data, model, device, n),
                  lambda: data.train.eval_batches(EVAL_BATCH, device, cfg.channels_last, shard=distributed.shard()))
    for policy in policies:
        policy.on_setup(setup)
    total_steps = max(1, round(cfg.epochs * steps_per_epoch))
    opt_cfg = distributed.global_batch_config(cfg)
    schedule = build_schedule(opt_cfg, steps_per_epoch)
    optimizer = build_optimizer(model, opt_cfg, head=f"net.{head}")
    ema = (WeightAverage(model, cfg.ema, cfg.ema_every, cfg.lookahead, ramp_steps=total_steps if cfg.ema_ramp else 0)
           if cfg.ema > 0 else None)
    replica = distributed.wrap_model(model, device, sync_bn=cfg.sync_bn,   # DDP when data-parallel
                                     unused_parameters=any(p.unused_parameters for p in policies))
    return TrainingParts(
        cfg=cfg, data=data, device=device, precision=precision, scaler=grad_scaler(device, precision),
        weights=weights, mean=mean, std=std, model=model, head=head, init_report=init_report,
        batches=batches, policies=policies, opt_cfg=opt_cfg, schedule=schedule, optimizer=optimizer, ema=ema,
        ema_start_step=round(cfg.ema_start * total_steps), total_steps=total_steps,
        forward=torch.compile(replica) if cfg.compile else replica)

def _training_sample(data: Dataset, model: Classifier, device: torch.device, n: int) -> torch.Tensor:
    """Up to ``n`` training images, evenly spaced (image folders list the training set class
    by class), normalised as the network sees them: float (N, C, H, W) on the device."""
    train = data.train
    spread = np.arange(0, len(train), max(1, len(train) // n))[:n]
    sample = model_input(torch.as_tensor(train.take(spread)).permute(0, 3, 1, 2))
    return ((sample - model.mean.cpu()) / model.std.cpu()).to(device)
