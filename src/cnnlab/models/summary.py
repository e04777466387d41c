"""Model summaries: parameter counts, a per-layer table, FLOPs, and the zoo at a glance.

The per-layer figures come from forward hooks on the leaf modules (those without children)
during one forward pass of a single all-zero image, in eval mode and without gradients;
the model's training mode is restored afterwards.

FLOPs here are **2 x the multiply-accumulates of the Conv and Linear layers** for one image
(one multiply and one add per MAC). Bias additions, normalisation, activations, pooling and
element-wise additions are not counted; they are a small fraction for these networks. A
grouped convolution does ``in_channels / groups`` MACs per output element and kernel tap.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from cnnlab.core.errors import CnnlabError
from cnnlab.models.registry import create_model, list_models, model_info
from cnnlab.models.weights import list_weights

__all__ = ["count_parameters", "layer_table", "count_flops", "format_summary", "zoo_table"]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_MEGA = 1e6


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (each shared tensor counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _leaves(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, m in model.named_modules():
        if not any(True for _ in m.children()):
            yield name or type(m).__name__, m


@contextmanager
def _hooked_pass(model: nn.Module, modules, hook: Callable):
    """Register ``hook(name, module, inputs, output)`` on ``modules`` [(name, module)] for the
    duration of the block, with the model in eval mode; restore both afterwards."""
    was_training = model.training
    handles = [m.register_forward_hook(lambda mod, inp, out, _n=n: hook(_n, mod, inp, out))
               for n, m in modules]
    model.eval()
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def _zero_batch(model: nn.Module, input_shape: tuple[int, ...]) -> torch.Tensor:
    p = next(model.parameters(), None)
    device, dtype = (p.device, p.dtype) if p is not None else (None, torch.float32)
    return torch.zeros(1, *input_shape, device=device, dtype=dtype)


def _shape(out) -> tuple:
    if isinstance(out, torch.Tensor):
        return tuple(out.shape[1:])
    if isinstance(out, (tuple, list)):
        return tuple(_shape(o) for o in out)
    return ()


def layer_table(model: nn.Module, input_shape: tuple[int, int, int] = (3, 32, 32)) -> list[dict]:
    """One row per leaf-module call, in execution order: ``layer`` (qualified name, e.g.
    "features.0"), ``type`` (class name), ``output_shape`` (without the batch dimension) and
    ``parameters`` (the module's own, counted on its first call only, so the column sums to
    the parameters of all leaves that ran)."""
    rows: list[dict] = []
    seen: set[int] = set()

    def hook(name, module, inputs, output):
        first = id(module) not in seen
        seen.add(id(module))
        rows.append({"layer": name, "type": type(module).__name__,
                     "output_shape": _shape(output),
                     "parameters": count_parameters(module) if first else 0})

    with _hooked_pass(model, list(_leaves(model)), hook), torch.no_grad():
        model(_zero_batch(model, input_shape))
    return rows


def _macs(module: nn.Module, output: torch.Tensor) -> int:
    if isinstance(module, _CONV_TYPES):
        per_output = (module.in_channels // module.groups) * math.prod(module.kernel_size)
        return output.numel() * per_output
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    return 0


def count_flops(model: nn.Module, input_shape: tuple[int, int, int] = (3, 32, 32)) -> int:
    """FLOPs for one image: 2 x multiply-accumulates of Conv1d/2d/3d and Linear layers
    (bias ignored), measured with hooks on a batch of one."""
    total = 0

    def hook(name, module, inputs, output):
        nonlocal total
        total += _macs(module, output)

    modules = [(n, m) for n, m in model.named_modules() if isinstance(m, (*_CONV_TYPES, nn.Linear))]
    with _hooked_pass(model, modules, hook), torch.no_grad():
        model(_zero_batch(model, input_shape))
    return 2 * total


def format_summary(model: nn.Module, name: str, input_shape: tuple[int, int, int] = (3, 32, 32)) -> str:
    """A Keras-style text table: Layer (type) | Output Shape | Param #, then the totals.
    Shapes are PyTorch's (None, C, H, W), None standing for the batch dimension."""
    rows = layer_table(model, input_shape)
    cells = [(f"{r['layer']} ({r['type']})", str((None, *r["output_shape"])), f"{r['parameters']:,}")
             for r in rows]
    header = ("Layer (type)", "Output Shape", "Param #")
    w0, w1, w2 = (max(len(c[i]) for c in (header, *cells)) for i in range(3))
    w0, w1 = w0 + 2, w1 + 2
    width = w0 + w1 + w2 + 1
    total, trainable = count_parameters(model), count_parameters(model, trainable_only=True)
    mflops = count_flops(model, input_shape) / _MEGA
    lines = [f'Model: "{name}"  input {tuple(input_shape)}', "_" * width,
             f" {header[0]:<{w0}}{header[1]:<{w1}}{header[2]:>{w2}}", "=" * width]
    lines += [f" {a:<{w0}}{b:<{w1}}{c:>{w2}}" for a, b, c in cells]
    lines += ["=" * width,
              f"Total params: {total:,}",
              f"Trainable params: {trainable:,}",
              f"Non-trainable params: {total - trainable:,}",
              f"MFLOPs per image: {mflops:,.2f}",
              "_" * width]
    return "\n".join(lines)


def zoo_table(input_size: int = 32, in_channels: int = 3, num_classes: int = 10) -> list[dict]:
    """One row per registered model, built for ``input_size``: name, family, year, parameters,
    mflops, its published weights (tag, ImageNet top-1, default), paper. Models whose ``input_sizes`` lack that size are still tried; where one
    cannot be built or run at that size its ``parameters``/``mflops`` are None."""
    rows = []
    for name in list_models():
        info = model_info(name)
        params = mflops = None
        try:
            model = create_model(name, num_classes=num_classes, in_channels=in_channels,
                                 input_size=input_size)
            params = count_parameters(model)
            mflops = count_flops(model, (in_channels, input_size, input_size)) / _MEGA
        except (CnnlabError, RuntimeError, ValueError):
            pass    # too small/large for this family: left as None
        weights = [{"tag": w.tag, "imagenet_top1": w.top1, "default": w.default} for w in list_weights(name)]
        rows.append({"name": name, "family": info.family, "year": info.year,
                     "parameters": params, "mflops": mflops, "weights": weights, "paper": info.paper})
    return rows
