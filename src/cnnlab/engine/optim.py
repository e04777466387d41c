"""Optimizers and learning-rate schedules, chosen by the config.

The learning rate is a pure function of the step (``Schedule.lr(step)``), set on the
optimizer before every step: nothing to save for resume but the step counter (and the
optimizer's own state, which the checkpoint carries).

``--optimizer muon`` (``Muon``) orthogonalises the updates of convolution and linear weights
and takes Nesterov SGD steps for the rest, on the SGD family's conventions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cnnlab.core.config import Config
from cnnlab.core.hardware import choose_precision
from cnnlab.models.pretrained import head_name


@dataclass
class Schedule:
    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    kind: str = "constant"          # constant | linear | cosine
    final_fraction: float = 0.0

    def multiplier(self, step: int, progress: float | None = None) -> float:
        """Warm-up from 0 to 1 over ``warmup_steps``, then decay to ``final_fraction``.

        ``progress`` (0..1) overrides ``step / total_steps`` for the decay: a run with a
        time limit decays over its time budget instead of its step count.
        """
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        if progress is None:
            progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, max(0.0, progress))
        f = self.final_fraction
        if self.kind == "linear":
            return 1.0 - (1.0 - f) * t
        return f + (1.0 - f) * 0.5 * (1.0 + math.cos(math.pi * t))

    def lr(self, step: int) -> float:
        return self.base_lr * self.multiplier(step)


def effective_lr(cfg: Config) -> float:
    """``lr_per_1024`` states the rate per 1024 examples (linear scaling with batch size)."""
    return cfg.lr * cfg.batch_size / 1024 if cfg.lr_per_1024 else cfg.lr


def build_schedule(cfg: Config, steps_per_epoch: int) -> Schedule:
    total = max(1, round(cfg.epochs * steps_per_epoch))
    return Schedule(effective_lr(cfg), total, round(cfg.warmup * steps_per_epoch),
                    cfg.schedule, cfg.final_lr_fraction)


def _is_bias_like(name: str, p: nn.Parameter) -> bool:
    return p.ndim <= 1  # biases and normalisation scales/shifts


# Newton-Schulz iterations an update: airbench94_muon's 3 for CIFAR convolutions (torch's
# default, 5, is for transformer matrices). Each costs 4*A^2*B + 2*A^3 flops for an A x B
# (A <= B) matrix: 6 GFLOP a step for SpeedNet's filters (three of them 256 x 2304), against
# about 180 for a batch-256 training step of it (0.72 GFLOP an image): 3%.
NS_STEPS = 3
# The quintic's coefficients (Keller Jordan's Muon, as torch.optim.Muon): chosen for the
# steepest slope at zero, so that few iterations push every singular value near 1.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7   # the normalisation's floor, as torch.optim.Muon's: a zero update stays zero


def _matrix_weights(model: nn.Module, head: str | None) -> set[int]:
    """Ids of the weights Muon orthogonalises: every convolution's and linear layer's, but the
    head's (``head``: its qualified name; None: the model's last ``nn.Linear``)."""
    mods = dict(model.named_modules())
    if head is None and any(isinstance(m, nn.Linear) for m in mods.values()):
        head = head_name(model)
    return {id(m.weight) for name, m in mods.items()
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and name != head
            and not (head is not None and name.startswith(head + "."))}


def _ns_dtype(model: nn.Module, cfg: Config) -> torch.dtype:
    """float32, unless the run's autocast is bfloat16. Its gradients then come from bfloat16
    products (relative precision 2^-8), so Newton-Schulz in bfloat16 loses nothing they hold,
    and runs at the bfloat16 matmul rate the CPU was chosen for; elsewhere (float32, float16
    on a GPU, or a CPU where bfloat16 would be emulated at an eighth of float32's speed) the
    iteration keeps float32."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return torch.float32 if choose_precision(cfg.precision, device, strict=False).dtype != torch.bfloat16 \
        else torch.bfloat16


def build_optimizer(model: nn.Module, cfg: Config, head: str | None = None) -> Optimizer:
    """Two groups: weights, and bias-like parameters that learn ``bias_lr_scale`` times faster.
    With ``body_lr_scale`` != 1, each splits again: the parameters under ``head`` (the
    classifier head's qualified name) at the full rate, the rest at ``body_lr_scale`` of it.
    With ``muon``, the convolution and linear weights outside the head form a third group,
    orthogonalised at ``muon_lr_scale`` of the rate (``Muon``); the head and biases keep
    the rate (and ``bias_lr_scale``) a Nesterov run of the same recipe gives them.

    For the SGD family (and Muon), weight decay is decoupled from the gradient (applied by
    ``decay_weights`` as a shrink that follows the schedule, not the learning rate), so the
    learning rate can change without changing the regularisation.
    """
    matrices = _matrix_weights(model, head) if cfg.optimizer == "muon" else set()
    weights: list[torch.Tensor] = []
    biases: list[torch.Tensor] = []
    orthogonal: list[torch.Tensor] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (orthogonal if id(p) in matrices else biases if _is_bias_like(name, p) else weights).append(p)
    groups: list[dict[str, Any]] = [{"params": weights, "lr_scale": 1.0, "decay_scale": 1.0},
                                    {"params": biases, "lr_scale": cfg.bias_lr_scale, "decay_scale": 1.0}]
    if cfg.optimizer == "muon":
        groups.append({"params": orthogonal, "lr_scale": cfg.muon_lr_scale, "decay_scale": cfg.muon_decay_scale,
                       "orthogonalise": True,
                       "momentum": cfg.momentum if cfg.muon_momentum is None else cfg.muon_momentum})
    if cfg.body_lr_scale != 1.0 and head is not None:
        in_head = {id(p) for name, p in model.named_parameters() if name.startswith(head + ".")}
        groups = [dict(g, params=[p for p in g["params"] if (id(p) in in_head) == is_head],
                       lr_scale=g["lr_scale"] * (1.0 if is_head else cfg.body_lr_scale))
                  for g in groups for is_head in (False, True)]
    groups = [g for g in groups if g["params"]]
    lr = effective_lr(cfg)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    # Fused kernels: one pass over all parameters (3x faster than foreach for Adam on CPU).
    if cfg.optimizer == "adam":
        # eps as Keras's Adam, so the lesson's settings mean the same thing here.
        return torch.optim.Adam(groups, lr=lr, eps=1e-7, weight_decay=cfg.weight_decay, fused=True)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, eps=1e-7, weight_decay=cfg.weight_decay, fused=True)
    if cfg.optimizer == "muon":
        return Muon(groups, momentum=cfg.momentum, ns_dtype=_ns_dtype(model, cfg))
    return MomentumSGD(groups, momentum=cfg.momentum, nesterov=cfg.optimizer == "nesterov")


class MomentumSGD:
    """``torch.optim.SGD``'s update (momentum, optional Nesterov, no weight decay: that is
    ``decay_weights``) without its base class, whose first use imports torch._dynamo: 1.3 s,
    where the whole speed70 run takes 17. Same ``param_groups``/``state``/``state_dict`` layout, so the
    loop and checkpoints treat it like any torch optimizer."""

    def __init__(self, groups: list[dict], momentum: float, nesterov: bool):
        # A group may bring its own momentum (Muon's orthogonalised weights: ``muon_momentum``).
        self.param_groups = [dict(g, momentum=g.get("momentum", momentum), nesterov=nesterov) for g in groups]
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    @torch.no_grad()
    def step(self) -> None:
        for g in self.param_groups:
            self._step_group(g)

    def _step_group(self, g: dict[str, Any]) -> None:
        params = [p for p in g["params"] if p.grad is not None]
        if not params:
            return
        grads: list[torch.Tensor] = [p.grad for p in params if p.grad is not None]
        if g["momentum"]:
            bufs = []
            for p, grad in zip(params, grads):
                if p not in self.state:   # zeros: the first step's buffer is the gradient itself
                    self.state[p] = {"momentum_buffer": torch.zeros_like(grad)}
                bufs.append(self.state[p]["momentum_buffer"])
            torch._foreach_mul_(bufs, g["momentum"])
            torch._foreach_add_(bufs, grads)
            grads = list(torch._foreach_add(grads, bufs, alpha=g["momentum"])) if g["nesterov"] else bufs
        torch._foreach_add_(params, grads, alpha=-g["lr"])

    def zero_grad(self, set_to_none: bool = True) -> None:
        for g in self.param_groups:
            for p in g["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        """As torch.optim's: parameters by their index over all groups."""
        index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        return {"state": {index[p]: dict(s) for p, s in self.state.items()},
                "param_groups": [dict(g, params=[index[p] for p in g["params"]]) for g in self.param_groups]}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        params = [p for g in self.param_groups for p in g["params"]]
        saved = sd["param_groups"]
        if [len(g["params"]) for g in saved] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("the saved optimizer state has different parameter groups than this model")
        for g, s in zip(self.param_groups, saved):
            g.update({k: v for k, v in s.items() if k != "params"})
        self.state = {params[int(i)]: {k: v.to(params[int(i)].device) for k, v in st.items()}
                      for i, st in sd["state"].items()}


class Muon(MomentumSGD):
    """Muon (Keller Jordan's MomentUm Orthogonalized by Newton-Schulz) for the groups marked
    ``orthogonalise``, Nesterov SGD (``MomentumSGD``) for the others.

    For each orthogonalised weight, viewed as a matrix (a convolution's filters as
    out x (in * kh * kw), grouped convolutions' groups side by side):

    - momentum as an average, ``buf <- m * buf + (1 - m) * grad``, and the Nesterov
      look-ahead ``u = (1 - m) * grad + m * buf`` (``torch.optim.Muon``'s form; the sum form
      of the SGD groups differs only by the factor 1 - m, which the next line removes);
    - ``u`` scaled to Frobenius norm 1 (so every singular value is at most 1), then
      ``NS_STEPS`` iterations of the quintic ``X <- a X + (b A + c A^2) X``, ``A = X X^T``,
      which push its singular values towards 1 (into about 0.7-1.2: an orthogonalised ``u``
      with ``u``'s singular vectors), on the wide orientation so ``A`` is the smaller Gram;
    - the step ``lr * sqrt(max(1, rows / cols)) * X``, the scaling that gives tall and wide
      matrices alike the same update RMS per element (torch's ``adjust_lr_fn="original"``).

    The iteration runs in ``ns_dtype`` (``build_optimizer``'s reason: bfloat16 under bfloat16
    autocast, otherwise float32). The rate and the decoupled decay are the SGD family's:
    ``set_lr`` and ``decay_weights`` apply to these groups as to the others, so ``--lr`` is
    per 1024 examples with ``--lr-per-1024`` and the decay is a per-step shrink.

    Data-parallel: DDP averages the gradients over the processes before ``step``, so every
    process holds the same buffers and computes the same orthogonalised update; nothing
    is exchanged here. The state (one ``momentum_buffer`` a parameter, the groups' settings
    as JSON-able values) is ``MomentumSGD``'s, so checkpoints carry it unchanged.
    """

    def __init__(self, groups: list[dict], momentum: float, ns_dtype: torch.dtype = torch.float32,
                 ns_steps: int = NS_STEPS):
        dtype = str(ns_dtype).removeprefix("torch.")   # a name, so the group saves as JSON
        super().__init__([dict(g, orthogonalise=bool(g.get("orthogonalise")), ns_steps=ns_steps, ns_dtype=dtype)
                          for g in groups], momentum, nesterov=True)

    def _step_group(self, g: dict[str, Any]) -> None:
        if not g["orthogonalise"]:
            super()._step_group(g)
            return
        m, dtype = g["momentum"], getattr(torch, g["ns_dtype"])
        for p in g["params"]:
            if p.grad is None:
                continue
            grad = p.grad
            if p not in self.state:
                self.state[p] = {"momentum_buffer": torch.zeros_like(grad)}
            buf = self.state[p]["momentum_buffer"]
            buf.lerp_(grad, 1 - m)
            u = grad.lerp(buf, m) if g["nesterov"] else buf
            rows = u.shape[0]
            x = orthogonalise(u.reshape(rows, -1), g["ns_steps"], dtype)   # (out, in * kh * kw)
            scale = math.sqrt(max(1.0, rows / x.shape[1]))
            p.add_(x.reshape(p.shape), alpha=-g["lr"] * scale)


def orthogonalise(matrix: torch.Tensor, steps: int = NS_STEPS, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """About ``U V^T`` of ``matrix = U S V^T`` (singular values in about 0.7-1.2, not all 1:
    the quintic trades exactness for few steps), in ``dtype``, by Newton-Schulz iteration."""
    a, b, c = NS_COEFFICIENTS
    x = matrix.to(dtype, copy=True)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T                                   # wide: x @ x.T is the smaller Gram matrix
    x.div_(x.norm().clamp(min=NS_EPS))            # Frobenius norm 1 bounds the spectral norm by 1
    for _ in range(steps):
        gram = x @ x.T                            # (rows, rows)
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)   # b A + c A^2
        x = torch.addmm(x, poly, x, beta=a)       # a X + (b A + c A^2) X
    return x.T if tall else x


Optimizer = torch.optim.Optimizer | MomentumSGD


def set_lr(optimizer: Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g["lr_scale"]


@torch.no_grad()
def decay_weights(optimizer: Optimizer, cfg: Config, multiplier: float) -> None:
    """Decoupled weight decay for SGD/Nesterov/Muon: p <- p * (1 - wd * schedule multiplier)."""
    if cfg.weight_decay == 0 or cfg.optimizer not in ("sgd", "nesterov", "muon"):
        return
    wd = cfg.weight_decay * (cfg.batch_size / 1024 if cfg.lr_per_1024 else 1.0)
    for g in optimizer.param_groups:
        params = [p for p in g["params"] if p.requires_grad]   # frozen for now: left alone
        if params:
            torch._foreach_mul_(params, 1.0 - wd * multiplier * g["decay_scale"])
