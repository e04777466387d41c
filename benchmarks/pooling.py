"""SpeedNet's 2x2 max pooling against two hand-written ones, forward and backward.

    python benchmarks/pooling.py [--model speednet] [--batch 512] [--rounds 10]

The profile (profile_steps.py) puts max pooling second after the convolutions (17% of
speed90's step on an AMD Zen 5, bfloat16). This times ``F.max_pool2d`` beside a max over a
reshaped 2x2 view and two elementwise maxima, on the maps each block pools (channels-last,
the recipes' layout), float32 and bfloat16. Medians over interleaved rounds in one process;
all three give the same forward result (checked).
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from cnnlab.models.speednet import PATCH, SPEEDNET_SPECS


def library(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 2)


def view_max(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    y = x[:, :, : h // 2 * 2, : w // 2 * 2].permute(0, 2, 3, 1)   # the channels-last memory as NHWC
    return y.reshape(n, h // 2, 2, w // 2, 2, c).amax(dim=(2, 4)).permute(0, 3, 1, 2)


def pairwise_max(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    x = x[:, :, : h // 2 * 2, : w // 2 * 2]
    rows = torch.maximum(x[:, :, 0::2], x[:, :, 1::2])
    return torch.maximum(rows[:, :, :, 0::2], rows[:, :, :, 1::2])


POOLS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "F.max_pool2d": library, "max over a 2x2 view": view_max, "two elementwise maxima": pairwise_max}


def pooled_shapes(model: str, batch: int, side: int = 32) -> list[tuple[int, int, int, int]]:
    """(N, C, H, W) of the map each ConvBlock pools: after the patch conv, then halved."""
    widths = SPEEDNET_SPECS[model][0]
    size = side - PATCH + 1
    shapes = []
    for width in widths:
        shapes.append((batch, width, size, size))
        size //= 2
    return shapes


def forward_backward_ms(pool: Callable, x: torch.Tensor) -> tuple[float, float]:
    x.grad = None   # time the gradient itself, not its accumulation into the last one
    start = time.perf_counter()
    y = pool(x)
    mid = time.perf_counter()
    y.backward(torch.ones_like(y))
    return (mid - start) * 1e3, (time.perf_counter() - mid) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="speednet", choices=sorted(SPEEDNET_SPECS))
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args()
    print(f"torch ISA {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads; "
          f"{args.model}, batch {args.batch}; ms forward + backward, median of {args.rounds}")
    print(f"{'map (N, C, H, W)':<22} {'dtype':<9} " + " ".join(f"{name:>24}" for name in POOLS))
    for shape in pooled_shapes(args.model, args.batch):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(shape, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
            reference = library(x.detach())
            assert all(torch.equal(pool(x.detach()), reference) for pool in POOLS.values())
            times: dict[str, list[tuple[float, float]]] = {name: [] for name in POOLS}
            for round_ in range(args.rounds + 2):   # two warm-up rounds
                for name, pool in POOLS.items():
                    ms = forward_backward_ms(pool, x)
                    if round_ >= 2:
                        times[name].append(ms)
            cells = []
            for name in POOLS:
                fwd = statistics.median(f for f, _ in times[name])
                bwd = statistics.median(b for _, b in times[name])
                cells.append(f"{fwd:6.1f} + {bwd:6.1f} = {fwd + bwd:6.1f}")
            print(f"{str(shape):<22} {str(dtype)[6:]:<9} " + " ".join(f"{c:>24}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
