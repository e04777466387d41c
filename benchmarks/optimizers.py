"""Nesterov against Muon on one recipe, side by side in one process: test accuracy and images/s.

    python benchmarks/optimizers.py [--recipe speed70] [--train-size 5000] [--epochs 2] [--seeds 1]

Each seed trains the recipe (default speed70: speednet_xs, its rates, schedule, augmentation
and precision) on a stratified ``--train-size`` subset of ../shared/data/cifar10 for
``--epochs``, once with ``--optimizer nesterov`` and once with ``--optimizer muon``,
alternating, on data loaded once, and tests on the whole test split. images/s is training
images over training seconds (the loop's own clock: no evaluation, no start-up), so it shows
what the Newton-Schulz iterations cost. A short schedule on a subset ranks the two only
roughly: it is a smoke test of the update and a measure of its cost, not a tuned comparison.

Measured on a 2-core AMD EPYC (Zen 3, torch ISA AVX2, float32), 2026-12-01, while other jobs
held the cores (load average 5-6: both rates about a tenth of an idle machine's, and a
2-thread matmul's synchronisation costs the many small Newton-Schulz products more than the
convolutions), ``--train-size 2500 --epochs 2``, seed 0:

    optimizer   test accuracy  images/s  vs nesterov
    nesterov          44.11%       126        1.00x
    muon              44.70%       111        0.88x
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from cnnlab.core import hardware
from cnnlab.core.config import resolve
from cnnlab.engine.loop import fit
from cnnlab.engine.optim import NS_STEPS, effective_lr
from cnnlab.engine.prepare import load_data

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "cifar10"
OPTIMIZERS = ("nesterov", "muon")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="speed70")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--train-size", type=int, default=5000)
    p.add_argument("--epochs", type=int, default=2, help="whole epochs, so images/s counts whole passes")
    p.add_argument("--seeds", type=int, default=1)
    args = p.parse_args()
    base = resolve(recipe=args.recipe, overrides={"data": args.data, "train_size": args.train_size,
                                                  "epochs": args.epochs})
    precision = hardware.choose_precision(base.precision, hardware.pick_device(base.device))
    print(f"machine: {hardware.cpu_name()}, torch ISA {hardware.cpu_isa()}, {hardware.available_cores()} cores, "
          f"{precision.dtype or 'float32'} ({precision.reason})", flush=True)
    data = load_data(base)
    lr = effective_lr(base)
    print(f"{args.recipe}: {base.model}, {len(data.train)} training images, {args.epochs} epochs, batch "
          f"{base.batch_size}, momentum {base.momentum}; nesterov at lr {lr:.3g} a step; muon: its convolutions at "
          f"{lr * base.muon_lr_scale:.3g} ({base.muon_lr_scale:g} x), {NS_STEPS} Newton-Schulz steps, the rest as nesterov",
          flush=True)
    rows: dict[str, list[tuple[float, float]]] = {o: [] for o in OPTIMIZERS}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for opt in OPTIMIZERS:
                cfg = base.replace(optimizer=opt, seed=seed)
                run = fit(cfg, data=data, out=Path(tmp) / f"{opt}-{seed}", progress=False)
                rate = len(data.train) * args.epochs / run.metrics["train_seconds"]
                rows[opt].append((run.metrics["test_accuracy"], rate))
                print(f"  seed {seed} {opt:<9} test {run.metrics['test_accuracy']:.2%}  {rate:6.0f} img/s", flush=True)
    print(f"{'optimizer':<10} {'test accuracy':>14} {'images/s':>9} {'vs nesterov':>12}")
    speed = {o: statistics.median(r for _, r in rows[o]) for o in OPTIMIZERS}
    for opt in OPTIMIZERS:
        accs = [a for a, _ in rows[opt]]
        spread = f" ({min(accs):.1%}-{max(accs):.1%})" if len(accs) > 1 else ""
        print(f"{opt:<10} {statistics.mean(accs):>13.2%} {speed[opt]:>9.0f} {speed[opt] / speed['nesterov']:>11.2f}x"
              f"{spread}")


if __name__ == "__main__":
    main()
