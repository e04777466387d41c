"""Training steps with glibc's default malloc settings against ``reuse_freed_memory``.

    python benchmarks/malloc.py [--recipes speed70,speed90,speed92] [--rounds 5] [--steps 3]

Training runs inside ``cnnlab.core.hardware.reuse_freed_memory``: large blocks a step frees
stay in the heap for the next step instead of going back to the OS and faulting in again as
fresh pages. This times each recipe's own training step (``cnnlab.engine.estimate.probe``: its
model, optimizer, augmentation, precision and layout at its batch size, synthetic CIFAR-sized
images) outside and inside it, median over interleaved rounds in one process.
"""
from __future__ import annotations

import argparse
import contextlib
import resource
import statistics

from cnnlab.core import hardware
from cnnlab.core.config import resolve
from cnnlab.engine.estimate import probe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default="speed70,speed90,speed92")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="timed steps a round, after one warm-up")
    args = p.parse_args()
    if hardware.glibc() is None:
        raise SystemExit("this C library is not glibc: reuse_freed_memory changes nothing here")
    print(f"machine: {hardware.cpu_name()}, torch ISA {hardware.cpu_isa()}, {hardware.available_cores()} cores",
          flush=True)
    print(f"{'recipe':<9} {'model':<12} {'batch':>5} {'default img/s':>14} {'reused img/s':>13} {'ratio':>6}")
    for recipe in args.recipes.split(","):
        cfg = resolve(recipe=recipe)
        rates: dict[str, list[float]] = {"default": [], "reused": []}
        for _ in range(args.rounds):
            for mode in rates:
                with hardware.reuse_freed_memory() if mode == "reused" else contextlib.nullcontext():
                    rates[mode].append(probe(cfg, batch=cfg.batch_size, steps=args.steps).train_images_per_s)
        default, reused = (statistics.median(rates[k]) for k in rates)
        print(f"{recipe:<9} {cfg.model:<12} {cfg.batch_size:>5} {default:>14.0f} {reused:>13.0f} "
              f"{reused / default:>5.2f}x", flush=True)
    print(f"peak resident memory of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
