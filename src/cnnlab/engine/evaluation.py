"""Scoring a model on a split: logits (with test-time augmentation), loss and accuracy, the
same for validation each epoch, the test split once, and `cnnlab evaluate`."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cnnlab.core.hardware import autocast
from cnnlab.data.dataset import ImageSplit
from cnnlab.engine import distributed

EVAL_BATCH = 500
TTA_VIEWS = {"none": 1, "flip": 2, "flip_translate": 6}   # forward passes tta_logits averages


@dataclass
class Evaluation:
    loss: float
    accuracy: float
    logits: torch.Tensor          # float32 (N, classes), on the CPU
    labels: torch.Tensor

    @property
    def predictions(self) -> torch.Tensor:
        return self.logits.argmax(1)


def tta_logits(model: torch.nn.Module, x: torch.Tensor, tta: str, gate: float = 1.0) -> torch.Tensor:
    """Average logits over the image and its mirror (and 1-pixel shifts of both).

    ``gate`` < 1: only that fraction of the batch, the images the plain view is least sure of
    (smallest margin between the top two probabilities), gets the other views; a confident
    prediction rarely changes with them, and the views cost a forward pass each."""
    logits = model(x)
    if tta == "none" or logits.shape[1] < 2:
        return logits
    if gate >= 1:
        return _view_average(model, x, logits, tta)
    top2 = logits.float().softmax(1).topk(2, 1).values
    unsure = (top2[:, 0] - top2[:, 1]).argsort()[:math.ceil(gate * len(x))]
    logits = logits.clone()
    logits[unsure] = _view_average(model, x[unsure], logits[unsure], tta)
    return logits


def _view_average(model: torch.nn.Module, x: torch.Tensor, logits: torch.Tensor, tta: str) -> torch.Tensor:
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
def evaluate(model: torch.nn.Module, split: ImageSplit, device: torch.device, *, dtype: torch.dtype | None = None,
             tta: str = "none", tta_gate: float = 1.0, batch_size: int = EVAL_BATCH,
             channels_last: bool = False) -> Evaluation:
    was_training = model.training
    model.eval()
    outs = []
    for x, _ in split.eval_batches(batch_size, device, channels_last, shard=distributed.shard()):
        with autocast(device, dtype):
            outs.append(tta_logits(model, x, tta, tta_gate).float().cpu())
    model.train(was_training)
    logits = torch.cat(outs) if outs else torch.zeros(0, 1)
    logits = distributed.gather_shards(logits, len(split))   # each process evaluated rows rank::world
    labels = torch.as_tensor(split.labels)
    loss = F.cross_entropy(logits, labels).item() if len(labels) else float("nan")
    acc = (logits.argmax(1) == labels).float().mean().item() if len(labels) else float("nan")
    return Evaluation(loss, acc, logits, labels)
