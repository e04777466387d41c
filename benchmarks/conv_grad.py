"""Conv3x3's products against oneDNN alone, per layer and for a whole SpeedNet training step.

    python benchmarks/conv_grad.py [--model speednet_l] [--batch 256] [--rounds 5] [--precision bf16]

Every figure is a median over interleaved rounds in one process (bfloat16 autocast, or
float32 with ``--precision fp32`` as on CPUs without bfloat16; channels-last; freed memory
kept for reuse as in training), so drifts in the machine's speed hit both sides alike.
"oneDNN" is the same layer with the products switched off (``conv.forced_limit(0)``), "products"
with them on every map up to 7x7; the whole step is also timed as ``conv.products_limit``
picks for this CPU and precision.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from cnnlab.core import hardware
from cnnlab.models import conv, create_model

SHAPES = [(384, 384, 7), (384, 512, 7), (512, 512, 3)]   # SpeedNet-L's wide layers on small maps
# name, the conv.forced_limit that selects it
MODES = (("oneDNN", 0), ("products", conv.SMALL_MAP))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def autocast(dtype: torch.dtype):
    return torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16)


def layer_times(cin: int, cout: int, size: int, batch: int, rounds: int,
                dtype: torch.dtype) -> dict[str, list[float]]:
    layer = conv.Conv3x3(cin, cout)
    x = torch.randn(batch, cin, size, size).contiguous(memory_format=torch.channels_last).requires_grad_()
    times: dict[str, list[float]] = {}
    for _ in range(rounds):
        for mode, limit in MODES:
            with conv.forced_limit(limit):
                for _ in range(2):
                    with autocast(dtype):
                        y = layer(x)
                    times.setdefault(f"{mode} backward", []).append(timed(lambda: y.backward(torch.ones_like(y))))
                    with autocast(dtype):
                        times.setdefault(f"{mode} forward", []).append(timed(lambda: layer(x)))
    return times


def step_times(model_name: str, batch: int, rounds: int, dtype: torch.dtype) -> dict[str, list[float]]:
    torch.manual_seed(0)
    model = create_model(model_name, 10, 3, 32).to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.85, nesterov=True)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))

    def step():
        with autocast(dtype):
            loss = F.cross_entropy(model(x).float(), y, label_smoothing=0.2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times: dict[str, list[float]] = {}
    for _ in range(rounds):
        for mode, limit in (*MODES, ("as picked here", None)):
            with conv.forced_limit(limit):
                step()   # the first step after a switch warms that path's kernels
                times.setdefault(mode, []).extend(timed(step) for _ in range(3))
    return times


@hardware.reuse_freed_memory()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="speednet_l")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    print(f"torch ISA {torch.backends.cpu.get_cpu_capability()}, {args.precision}")
    ms = lambda v: statistics.median(v) * 1000
    print(f"per layer, batch {args.batch}: median ms over {args.rounds * 2} calls each")
    print(f"{'cin':>5} {'cout':>5} {'map':>4}  {'fwd oneDNN':>10} {'fwd ours':>9}  {'bwd oneDNN':>10} {'bwd ours':>9}  {'bwd ratio':>9}")
    for cin, cout, size in SHAPES:
        t = layer_times(cin, cout, size, args.batch, args.rounds, dtype)
        print(f"{cin:5d} {cout:5d} {size:4d}  {ms(t['oneDNN forward']):10.1f} {ms(t['products forward']):9.1f}  "
              f"{ms(t['oneDNN backward']):10.1f} {ms(t['products backward']):9.1f}  "
              f"{ms(t['oneDNN backward']) / ms(t['products backward']):8.2f}x")
    t = step_times(args.model, args.batch, args.rounds, dtype)
    base, ours, picked = ms(t["oneDNN"]), ms(t["products"]), ms(t["as picked here"])
    print(f"\n{args.model} training step, batch {args.batch}: median of {len(t['products'])} steps each")
    print(f"  oneDNN alone {base:7.1f} ms   with the products {ours:7.1f} ms ({base / ours:.2f}x)   "
          f"as picked here (maps up to {conv.products_limit(dtype)}) {picked:7.1f} ms ({base / picked:.2f}x)")


if __name__ == "__main__":
    main()
