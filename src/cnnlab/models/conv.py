"""A 3x3 convolution that computes wide layers on small maps as plain matrix products on a CPU.

On this project's CPUs (AVX-512 with AMX bfloat16), oneDNN's convolutions run near the matrix
units' speed on large maps, but on small ones its weight gradient costs three to four times
the forward pass, and at 3x3 even its forward pass is slow. Matrix products do not have
that problem:

- on maps up to 7x7, the weight gradient is one product per kernel tap (the forward pass and
  the input gradient stay oneDNN's);
- on maps up to 4x4, all three are one product each over im2col columns.

Only training takes these paths, only in layers at least WIDE channels wide (narrower ones
run as fast or faster on oneDNN alone), and only where they pay on this CPU and precision
(``products_limit``): oneDNN's small-map gradients are slow on AMX, not elsewhere. The
arithmetic is the same; only the summation order differs. ``benchmarks/conv_grad.py``
measures both sides.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.core import hardware

SMALL_MAP = 8   # with AMX the tap products win up to 7x7 maps; at 15x15 oneDNN is faster
TINY_MAP = 4    # up to here im2col pays for its copy in all three products
WIDE = 384      # narrower layers run as fast or faster on oneDNN alone (256: even; 128: 17% slower)
# The largest map side the products take, when ``forced_limit`` sets it (tests,
# benchmarks/conv_grad.py; 0: never); None: ``products_limit`` picks it for this CPU.
_forced: int | None = None


@contextlib.contextmanager
def forced_limit(limit: int | None) -> Iterator[None]:
    """Inside, wide layers take the products on maps up to ``limit`` px (0: never; None: as
    picked for this CPU), whatever the CPU; the choice before comes back on the way out."""
    global _forced
    before, _forced = _forced, limit
    try:
        yield
    finally:
        _forced = before


def products_limit(dtype: torch.dtype) -> int:
    """The largest map side on which wide layers computing in ``dtype`` take the products here.

    Measured with ``benchmarks/conv_grad.py`` (SpeedNet-L, batch 256, its whole training step):
    - bfloat16 on AMX (Intel Xeon): up to 7x7, where oneDNN's weight gradient costs three to
      four times its forward pass;
    - bfloat16 on AVX-512 BF16 without AMX (AMD Zen 5): 3x3 maps only, whose im2col backward is
      1.5-1.9x oneDNN's speed, while the taps on 7x7 run at 0.7x;
    - float32: never (the step with the products: 0.66x on AVX-512, 0.89x on AVX2).
    """
    if _forced is not None:
        return _forced
    if dtype != torch.bfloat16:
        return 0
    return SMALL_MAP if hardware.cpu_has_amx() else TINY_MAP


def weight_grad_by_taps(x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """The gradient of a 3x3, stride-1, padding-1 convolution's weight, as nine products.

    Both maps are laid out channels-last and zero-padded, then flattened to rows (one per pixel
    of the padded grid). A kernel tap at (i, j) then pairs each output row with the input row a
    fixed distance away, so its gradient is one product of two contiguous row ranges; the
    zeros in the padded output rows cancel the pairs that wrap across an edge.
    """
    c, o = x.shape[1], grad_out.shape[1]
    row = x.shape[3] + 2                                       # padded width
    X = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1)).reshape(-1, c)
    G = F.pad(grad_out.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1)).reshape(-1, o)
    lo, hi = row + 1, len(X) - (row + 1)                       # every interior pixel lies within
    Gt = G[lo:hi].t()
    taps = [Gt @ X[lo + d:hi + d] for d in (di * row + dj for di in (-1, 0, 1) for dj in (-1, 0, 1))]
    return torch.stack(taps, 2).reshape(o, c, 3, 3)


def _im2col(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N*H*W, 9*C): each pixel's 3x3 neighbourhood, taps major, channels minor."""
    n, c, h, w = x.shape
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))
    return torch.cat([xp[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], 3).reshape(n * h * w, 9 * c)


def _col2im(cols: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The adjoint of _im2col: each tap's column block added back where it was read from."""
    n, c, h, w = shape
    cols = cols.reshape(n, h, w, 9, c)
    out = cols.new_zeros(n, h + 2, w + 2, c, dtype=torch.float32)   # nine sums, in float32
    for t in range(9):
        i, j = divmod(t, 3)
        out[:, i:i + h, j:j + w] += cols[:, :, :, t]
    return out[:, 1:h + 1, 1:w + 1].permute(0, 3, 1, 2).to(cols.dtype)


class _SmallMapConv3x3(torch.autograd.Function):
    """oneDNN forward and input gradient; the weight gradient as products per kernel tap."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, padding=1)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad_by_taps(x, grad_out.to(x.dtype)).to(weight.dtype)
        return grad_x, grad_w


class _TinyMapConv3x3(torch.autograd.Function):
    """Maps of a few pixels: all three products as one matrix product each, over im2col columns
    (oneDNN's own forward is slow there too)."""

    @staticmethod
    def forward(ctx, x, weight):
        n, _, h, w = x.shape
        cols = _im2col(x)
        wmat = weight.permute(0, 2, 3, 1).reshape(len(weight), -1)    # taps major, as the columns
        ctx.save_for_backward(cols, wmat)
        ctx.x_shape, ctx.w_shape = x.shape, weight.shape
        return (cols @ wmat.t()).reshape(n, h, w, -1).permute(0, 3, 1, 2)   # channels-last memory

    @staticmethod
    def backward(ctx, grad_out):
        cols, wmat = ctx.saved_tensors
        g = grad_out.permute(0, 2, 3, 1).reshape(-1, wmat.shape[0]).to(cols.dtype)
        grad_x = _col2im(g @ wmat, ctx.x_shape) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            o, c, kh, kw = ctx.w_shape
            grad_w = (g.t() @ cols).reshape(o, kh, kw, c).permute(0, 3, 1, 2)
        return grad_x, grad_w


class Conv3x3(nn.Conv2d):
    """3x3 'same' convolution without bias; on a CPU, wide layers on small maps take the
    faster products."""

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = max(x.shape[-2:])
        if not self._products_pay(size, x):
            return super().forward(x)
        dtype = self._compute_dtype()
        fn = _TinyMapConv3x3 if size <= TINY_MAP else _SmallMapConv3x3
        return fn.apply(x.to(dtype), self.weight.to(dtype))

    def _compute_dtype(self) -> torch.dtype:
        return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else self.weight.dtype

    def _products_pay(self, size: int, x: torch.Tensor) -> bool:
        # Training only: inference, export and compilation see a plain convolution.
        return (x.device.type == "cpu" and min(self.in_channels, self.out_channels) >= WIDE
                and torch.is_grad_enabled() and not torch.jit.is_tracing() and not torch.compiler.is_compiling()
                and size <= products_limit(self._compute_dtype()))
