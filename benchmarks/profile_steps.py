"""Where a recipe's training time goes, by kind of work, from real training steps.

    python benchmarks/profile_steps.py [--recipe speed90] [--steps 12] [--warmup 3]

Trains the recipe (its model, optimizer, augmentation, precision, layout) on the shared
CIFAR-10 for ``warmup + steps`` steps, profiles the last ``steps`` under ``torch.profiler``
and times the test evaluation (with the recipe's test-time augmentation); sums each
operator's own time into: convolution forward, input gradient and weight gradient, BatchNorm,
activations, pooling, optimizer (decay and step), weight averaging (EMA, lookahead),
augmentation and batching, other operators (loss, head, copies) and what ran between
operators (Python). Milliseconds a step, and seconds for the recipe's whole schedule.

The measurement wraps, in this process only, each plain convolution in an autograd function
that asks oneDNN for the input and the weight gradient one at a time (the same two kernels
``convolution_backward`` runs for both), so the two show apart; SpeedNet's matrix-product
convolutions (wide layers on small maps, ``models/conv.py``) are left as they are and their
backward counted as "conv gradients (products)".
"""
from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from cnnlab.core import hardware
from cnnlab.core.config import resolve
from cnnlab.engine import loop
from cnnlab.engine import trainer as trainer_module  # decay_weights is looked up there
from cnnlab.engine.callbacks import Callback
from cnnlab.engine.prepare import load_data, plan_run
from cnnlab.models.conv import Conv3x3

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "cifar10"

# (what the chain of enclosing scopes and the operator's name contains, category): first match.
RULES = [("optimizer", "optimizer"), ("weight averaging", "weight averaging (EMA, lookahead)"),
         ("augmentation", "augmentation and batching"),
         ("conv input gradient", "conv input gradient"), ("conv weight gradient", "conv weight gradient"),
         ("mapconv3x3backward", "conv gradients (products)"),
         ("batch_norm", "BatchNorm"), ("batchnorm", "BatchNorm"),
         ("gelu", "activations"), ("relu", "activations"), ("threshold", "activations"),
         ("pool", "pooling"),
         ("convolution", "conv forward"), ("conv2d", "conv forward"), ("mapconv3x3", "conv forward")]
TRAINING = ["conv forward", "conv input gradient", "conv weight gradient", "conv gradients (products)", "BatchNorm",
            "activations", "pooling", "optimizer", "weight averaging (EMA, lookahead)", "augmentation and batching",
            "other operators (loss, head, copies)", "between operators (Python)"]


class _SplitGradConv(torch.autograd.Function):
    """A convolution whose backward asks for the input and the weight gradient separately."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.args = stride, padding, dilation, groups
        return F.conv2d(x, weight, None, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.args
        def one(mask: list[bool], label: str) -> torch.Tensor:
            with record_function(label):
                return torch.ops.aten.convolution_backward(grad, x, weight, None, list(stride), list(padding),
                                                           list(dilation), False, [0, 0], groups, mask)[mask.index(True)]
        gx = one([True, False, False], "conv input gradient") if ctx.needs_input_grad[0] else None
        gw = one([False, True, False], "conv weight gradient") if ctx.needs_input_grad[1] else None
        return gx, gw, None, None, None, None


def _split_gradients(model: nn.Module) -> None:
    for m in model.modules():
        if type(m) is nn.Conv2d or isinstance(m, Conv3x3):
            plain = m.forward
            def forward(x, m=m, plain=plain):
                if isinstance(m, Conv3x3) and m._products_pay(max(x.shape[-2:]), x):
                    return plain(x)
                dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else m.weight.dtype
                with torch.autocast("cpu", enabled=False):
                    y = _SplitGradConv.apply(x.to(dtype), m.weight.to(dtype), m.stride, m.padding, m.dilation,
                                             m.groups)
                return y if m.bias is None else y + m.bias.to(dtype).view(1, -1, 1, 1)
            m.forward = forward


def _scoped(label: str, fn: Callable) -> Callable:
    def call(*args: Any, **kwargs: Any) -> Any:
        with record_function(label):
            return fn(*args, **kwargs)
    return call


def _scoped_batches(epoch: Callable) -> Callable:
    def batches(*args: Any) -> Iterator:
        it = iter(epoch(*args))
        while True:
            with record_function("augmentation"):
                try:
                    item = next(it)
                except StopIteration:
                    return
            yield item
    return batches


class _Profile(Callback):
    """Scopes the trainer's parts on the first epoch; profiles the steps after ``warmup``."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.target, self.prof = warmup, warmup + steps, profile(activities=[ProfilerActivity.CPU])
        self.start = self.train_end = 0.0
        self.steps = 0

    def on_epoch_begin(self, trainer: Any, steps: int) -> None:
        if self.start:
            return
        trainer.optimizer.step = _scoped("optimizer", trainer.optimizer.step)
        if trainer.ema is not None:
            trainer.ema.update = _scoped("weight averaging", trainer.ema.update)
        trainer.batches.epoch = _scoped_batches(trainer.batches.epoch)
        trainer.forward = _scoped("forward", trainer.forward)
        _split_gradients(trainer.model)
        if self.warmup == 0:
            self._begin()

    def _begin(self) -> None:
        self.prof.start()
        self.start = time.perf_counter()

    def on_step_end(self, trainer: Any) -> None:
        if trainer.state.global_step == self.warmup:
            self._begin()
        elif self.start and not self.train_end:
            self.steps += 1
            if trainer.state.global_step == self.target:
                self.train_end = time.perf_counter()
                self.prof.stop()


def categorise(prof: Any) -> dict[str, float]:
    """Seconds of operators' own time per category (RULES), over the profiled window."""
    totals: dict[str, float] = defaultdict(float)
    for e in prof.events():
        chain, p = [e.name], e.cpu_parent
        while p is not None:
            chain.append(p.name)
            p = p.cpu_parent
        text = " > ".join(chain).lower()
        category = next((c for key, c in RULES if key in text), "other operators (loss, head, copies)")
        totals[category] += e.self_cpu_time_total / 1e6
    return totals


def profile_recipe(recipe: str, data: str = str(DATA), steps: int = 12, warmup: int = 3) -> dict[str, Any]:
    """The recipe's step time by category: {"rows": [(category, ms a step, share, recipe s)],
    "evaluation_s", "steps", "total_steps", "config"}."""
    # A recipe name or a YAML file (a baseline under benchmarks/baselines, a candidate), as speedrun takes.
    source = {"config_file": recipe} if recipe.endswith(".yaml") else {"recipe": recipe}
    probe = resolve(**source, overrides={"data": data})
    dataset = load_data(plan_run(probe))
    per_epoch = len(dataset.train) // probe.batch_size
    # The schedule's shape does not change what a step costs: no warm-up longer than the run.
    cfg = resolve(**source, overrides={"data": data, "epochs": (warmup + steps) / per_epoch, "warmup": 0.0})
    callback = _Profile(warmup, steps)
    seconds: list[float] = []
    real_evaluate, real_decay = loop.evaluate, trainer_module.decay_weights

    def timed_evaluate(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return real_evaluate(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)
    loop.evaluate, trainer_module.decay_weights = timed_evaluate, _scoped("optimizer", real_decay)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            loop.fit(cfg, data=dataset, out=Path(tmp) / "run", progress=False, callbacks=[callback])
    finally:
        loop.evaluate, trainer_module.decay_weights = real_evaluate, real_decay
    cats = categorise(callback.prof)
    evaluation = seconds[-1] if seconds else 0.0   # the test split's (val_split 0: the only one)
    train_wall = callback.train_end - callback.start
    cats["between operators (Python)"] = max(0.0, train_wall - sum(cats.values()))
    total_steps = round(probe.epochs * per_epoch)
    n = max(1, callback.steps)
    rows = [(c, cats.get(c, 0.0) / n * 1e3, cats.get(c, 0.0) / max(train_wall, 1e-9), cats.get(c, 0.0) / n * total_steps)
            for c in TRAINING]
    return {"rows": rows, "evaluation_s": evaluation, "steps": n, "total_steps": total_steps, "config": probe,
            "step_ms": train_wall / n * 1e3}


def print_profile(result: dict[str, Any]) -> None:
    cfg = result["config"]
    print(f"{cfg.model}, batch {cfg.batch_size}, {cfg.optimizer}, tta {cfg.tta}: {result['steps']} profiled steps of "
          f"{result['step_ms']:.0f} ms; the recipe takes {result['total_steps']} steps")
    print(f"{'where the training step goes':<38} {'ms/step':>8} {'share':>7} {'recipe s':>9}")
    for category, ms, share, seconds in result["rows"]:
        print(f"{category:<38} {ms:>8.1f} {share:>7.1%} {seconds:>9.1f}")
    print(f"{'evaluation (10,000 test images, once)':<38} {'':>8} {'':>7} {result['evaluation_s']:>9.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="speed90", help="a recipe name or a YAML file")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    print(f"machine: {hardware.cpu_name()}, torch ISA {hardware.cpu_isa()}, {torch.get_num_threads()} threads")
    print_profile(profile_recipe(args.recipe, args.data, args.steps, args.warmup))


if __name__ == "__main__":
    main()
