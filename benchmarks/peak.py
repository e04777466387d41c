"""This machine's ceiling: the best convolution and matrix-product rates at SpeedNet's shapes.

    python benchmarks/peak.py [--model speednet] [--batch 64] [--dtypes float32,bfloat16]

For every convolution of the model (its shapes read by a forward hook on a CIFAR-sized
batch), times the forward pass, the input gradient and the weight gradient (oneDNN through
``aten.convolution_backward``, one gradient at a time), and the matrix product the forward
pass is as im2col (rows = images x output pixels, inner = in-channels x kernel taps, columns
= out-channels), in each dtype; prints GFLOP/s (2 flops a multiply-add) per layer and the
best of each kind. ``speedrun.py`` divides a recipe's achieved rate by the best one here.

bfloat16 on a CPU without native support (AVX2) is emulated: measured, and marked so.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.core import hardware
from cnnlab.models.registry import create_model

KINDS = ("forward", "input grad", "weight grad", "matmul")


def conv_shapes(model: str, size: int = 32) -> list[tuple[str, tuple[int, ...], nn.Conv2d]]:
    """(name, input shape for one image, layer) of every convolution in ``model``, in order."""
    net = create_model(model, 10, 3, size)
    found: list[tuple[str, tuple[int, ...], nn.Conv2d]] = []
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: found.append((name, tuple(i[0].shape[1:]), m)))
             for name, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        net.eval()(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return found


def _median_seconds(fn, min_seconds: float = 0.3, reps: int = 3) -> float:
    fn()                                           # oneDNN builds its kernel on the first call
    times = []
    start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start < min_seconds and len(times) < 50):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def layer_rates(conv: nn.Conv2d, in_shape: tuple[int, ...], batch: int, dtype: torch.dtype) -> dict[str, float]:
    """GFLOP/s of the forward pass, each gradient and the im2col matrix product of one layer."""
    x = torch.randn(batch, *in_shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = conv.weight.detach().to(dtype).contiguous(memory_format=torch.channels_last)
    stride, padding, dilation = list(conv.stride), list(conv.padding), list(conv.dilation)
    y = F.conv2d(x, w, None, stride, padding, dilation)
    g = torch.randn_like(y)
    out, cin, kh, kw = w.shape
    flops = 2.0 * y.numel() * cin * kh * kw        # per pass: every output element, its window

    def grad(mask):
        return lambda: torch.ops.aten.convolution_backward(g, x, w, None, stride, padding, dilation, False,
                                                           [0, 0], 1, mask)
    a = torch.randn(y.numel() // out, cin * kh * kw, dtype=dtype)
    b = torch.randn(cin * kh * kw, out, dtype=dtype)
    seconds = {"forward": _median_seconds(lambda: F.conv2d(x, w, None, stride, padding, dilation)),
               "input grad": _median_seconds(grad([True, False, False])),
               "weight grad": _median_seconds(grad([False, True, False])),
               "matmul": _median_seconds(lambda: a @ b)}
    return {k: flops / s / 1e9 for k, s in seconds.items()}


def square_matmul_rate(dtype: torch.dtype, n: int = 1024) -> float:
    """GFLOP/s of an n x n by n x n product: the BLAS's best case, for scale."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2.0 * n ** 3 / _median_seconds(lambda: a @ b) / 1e9


def peak_rates(model: str = "speednet", batch: int = 64, dtypes: tuple[str, ...] = ("float32", "bfloat16"),
               verbose: bool = False) -> dict[str, dict[str, float]]:
    """{dtype: {kind: best GFLOP/s over the model's layers}} (kinds: KINDS, "square matmul"
    and "best", the highest of them: the ceiling a recipe's rate is a fraction of)."""
    best: dict[str, dict[str, float]] = {}
    for name in dtypes:
        dtype = getattr(torch, name)
        rows = []
        for layer, shape, conv in conv_shapes(model):
            rates = layer_rates(conv, shape, batch, dtype)
            rows.append(rates)
            if verbose:
                print(f"{name:<9} {layer:<22} {'x'.join(map(str, shape)):>11} -> {conv.out_channels:>4}  "
                      + "  ".join(f"{rates[k]:>11.1f}" for k in KINDS), flush=True)
        best[name] = {k: max(r[k] for r in rows) for k in KINDS}
        best[name]["square matmul"] = square_matmul_rate(dtype)
        best[name]["best"] = max(best[name].values())
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="speednet")
    p.add_argument("--batch", type=int, default=64, help="images a timed pass (CPU rates are about flat from here)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    args = p.parse_args()
    native = hardware.cpu_has_bf16()
    print(f"machine: {hardware.cpu_name()}, torch ISA {hardware.cpu_isa()}, {torch.get_num_threads()} threads; "
          f"bfloat16 {'native' if native else 'emulated (no native support: slow, not a precision to train in)'}")
    print(f"{'dtype':<9} {'layer':<22} {'input':>11} {'out':>7}  " + "  ".join(f"{k:>11}" for k in KINDS)
          + "   (GFLOP/s)")
    best = peak_rates(args.model, args.batch, tuple(args.dtypes.split(",")), verbose=True)
    print()
    for name, rates in best.items():
        print(f"best {name:<9}: " + ", ".join(f"{k} {v:.1f}" for k, v in rates.items()) + " GFLOP/s")


if __name__ == "__main__":
    main()
