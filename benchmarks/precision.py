"""Training images/s in float32 against bfloat16 autocast, on this machine, side by side.

    python benchmarks/precision.py [--models speednet_xs,speednet,tutorial] [--rounds 5]

Each figure is the recipe's own training step (``cnnlab.engine.estimate.probe``: the model,
optimizer, augmentation and memory layout of the named recipe, at its batch size) on
synthetic CIFAR-sized batches, median over interleaved rounds so both precisions see the same
machine load. Where the CPU has no native bfloat16 (AVX2 chips: no AVX512_BF16, no AMX),
oneDNN emulates it, and this is what `--precision bf16` costs there.

Measured on a 2-core AMD EPYC (Zen 3, torch ISA AVX2, no native bf16), 2026-12-01,
``--rounds 3 --steps 2``:

    model        recipe    batch  fp32 img/s  bf16 img/s bf16 / fp32
    speednet_xs  speed70     256        1194          99       0.08x
    speednet     speed85     256         146           8       0.06x
    tutorial     tutorial     32        1782         218       0.12x
"""
from __future__ import annotations

import argparse
import statistics

from cnnlab.core import hardware
from cnnlab.core.config import resolve
from cnnlab.engine.estimate import probe

RECIPE_OF = {"speednet_xs": "speed70", "speednet": "speed85", "speednet_l": "speed92", "tutorial": "lesson"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="speednet_xs,speednet,tutorial")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="timed steps a round, after one warm-up")
    args = p.parse_args()
    print(f"machine: {hardware.cpu_name()}, torch ISA {hardware.cpu_isa()}, native bf16: "
          f"{hardware.cpu_has_bf16()}, {hardware.available_cores()} cores", flush=True)
    print(f"{'model':<12} {'recipe':<9} {'batch':>5} {'fp32 img/s':>11} {'bf16 img/s':>11} {'bf16 / fp32':>11}")
    for model in args.models.split(","):
        cfg = resolve(recipe=RECIPE_OF[model])
        rates: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for _ in range(args.rounds):
            for precision in rates:
                r = probe(cfg.replace(precision=precision), batch=cfg.batch_size, steps=args.steps)
                rates[precision].append(r.train_images_per_s)
        fp32, bf16 = (statistics.median(rates[k]) for k in ("fp32", "bf16"))
        print(f"{model:<12} {RECIPE_OF[model]:<9} {cfg.batch_size:>5} {fp32:>11.0f} {bf16:>11.0f} {bf16 / fp32:>10.2f}x",
              flush=True)


if __name__ == "__main__":
    main()
