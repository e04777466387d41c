"""Every zoo model on ../shared/data/cifar10 under the same wall-clock training budget.

    python benchmarks/zoo.py [--budget 300] [--models a,b,...] [--test-size N] [--out docs/zoo.md]

Each model trains with one shared recipe (Adam, lr 1e-3 decaying linearly over the time
budget, batch 128, flips and 2-pixel shifts, bfloat16 autocast where the CPU has it,
channels_last) until ``--budget`` seconds of training have passed, mid-epoch if need be;
then its test accuracy is read once. The budget, not the epoch count, is fixed: the table
answers which architecture gives the most accuracy per minute on this machine. Each model
runs in its own process so memory and threads start clean.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "cifar10"
RECIPE = ["--optimizer", "adam", "--lr", "1e-3", "--schedule", "linear", "--batch-size", "128",
          "--flip", "random", "--translate", "2", "--precision", "auto", "--channels-last", "true",
          "--val-split", "0", "--epochs", "1000"]


def main() -> None:
    from cnnlab.models import list_models, model_info
    from cnnlab.models.summary import zoo_table
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=300, help="training seconds per model")
    p.add_argument("--models", default=None, help="comma-separated names (default: every model)")
    p.add_argument("--test-size", type=int, default=None, help="stratified test subset (default: all 10,000)")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--out", default=str(ROOT / "docs" / "zoo.md"))
    args = p.parse_args()
    names = args.models.split(",") if args.models else list_models()
    static = {r["name"]: r for r in zoo_table(input_size=32, in_channels=3, num_classes=10)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            out = Path(tmp) / name
            cmd = [sys.executable, "-m", "cnnlab", "train", "--data", args.data, "--model", name,
                   "--time-limit", str(args.budget), "--out", str(out), *RECIPE]
            if args.test_size:
                cmd += ["--test-size", str(args.test_size)]
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            metrics = json.loads((out / "metrics.json").read_text())
            steps = metrics["steps"]
            row = {"name": name, "family": model_info(name).family, "parameters": static[name]["parameters"],
                   "mflops": static[name]["mflops"], "train_seconds": metrics["train_seconds"],
                   "images_per_s": steps * 128 / metrics["train_seconds"],
                   "epochs": steps * 128 / 50000, "test_accuracy": metrics["test_accuracy"], "wall": wall}
            rows.append(row)
            print(f"{name:<12} {row['parameters']:>12,} params {row['mflops']:>9,.1f} MFLOPs "
                  f"{row['images_per_s']:>7,.0f} img/s {row['epochs']:>6.2f} epochs "
                  f"test {row['test_accuracy']:.2%}  ({wall:.0f} s wall)", flush=True)
    write_table(rows, args)


def machine() -> str:
    """The machine the table holds for: machines here differ by 5x (AMX in bf16, AVX2 in fp32)."""
    import torch

    from cnnlab.core import hardware
    device = hardware.pick_device("auto")
    precision = hardware.choose_precision("auto", device)
    return (f"{hardware.device_name(device)}, {hardware.available_cores()} cores, torch ISA "
            f"{hardware.cpu_isa()}, {precision.name} autocast" if precision.dtype else
            f"{hardware.device_name(device)}, {hardware.available_cores()} cores, torch ISA "
            f"{hardware.cpu_isa()}, float32") + f", torch {torch.__version__}"


def write_table(rows: list[dict], args) -> None:
    cmd = "python benchmarks/zoo.py --budget {:g}{}".format(
        args.budget, f" --test-size {args.test_size}" if args.test_size else "")
    lines = [
        "# The model zoo, side by side on this machine",
        "",
        f"Every model trained on ../shared/data/cifar10 for the same {args.budget:g} s of training "
        f"({machine()}, one shared recipe: Adam 1e-3 decaying linearly over the "
        f"budget, batch 128, flips and 2-pixel shifts), then scored once on the "
        f"{'stratified ' + str(args.test_size) + '-image subset of the ' if args.test_size else ''}test split. "
        "MFLOPs are per 32x32 image, forward, counted as 2 x multiply-adds.",
        "",
        f"Made by: `{cmd}`",
        "",
        "| model | family | parameters | MFLOPs | train images/s | epochs in budget | test accuracy |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: -r["test_accuracy"]):
        lines.append(f"| {r['name']} | {r['family']} | {r['parameters']:,} | {r['mflops']:,.1f} | "
                     f"{r['images_per_s']:,.0f} | {r['epochs']:.2f} | {r['test_accuracy']:.2%} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
