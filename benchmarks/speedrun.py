"""The speed recipes, timed as whole processes on ../shared/data/cifar10, against the lesson.

    python benchmarks/speedrun.py [--recipes speed70,speed85] [--seeds 3] [--baseline-seeds 1]

For each recipe and seed, runs ``cnnlab train --recipe NAME --seed S`` in a fresh process
(the decoded-data cache warmed first) and reports wall seconds (process start to exit, the
whole job: start-up, data, training, evaluation, run folder and report), training seconds,
test accuracy and peak memory (max RSS); then the median per recipe, and the same for the
``tutorial`` recipe (the lesson) in the same run, with the ratios. Each recipe is a fixed
schedule: test accuracy is read once at the end and never used to stop early.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "cifar10"


def run_once(recipe: str, seed: int, data: str, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "cnnlab", "train", "--recipe", recipe, "--data", data, "--seed", str(seed),
           "--out", str(out), *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{recipe} seed {seed} failed ({proc.returncode}):\n{stdout[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"recipe": recipe, "seed": seed, "wall_s": wall, "train_s": metrics["train_seconds"],
            "test_accuracy": metrics["test_accuracy"], "peak_mib": usage.ru_maxrss / 1024}


def summarise(rows: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in rows) for k in ("wall_s", "train_s", "peak_mib")} | {
        "mean_accuracy": statistics.mean(r["test_accuracy"] for r in rows),
        "min_accuracy": min(r["test_accuracy"] for r in rows),
        "max_accuracy": max(r["test_accuracy"] for r in rows), "seeds": len(rows)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default="speed70,speed85,speed90,speed92")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--baseline-seeds", type=int, default=1, help="seeds of the tutorial recipe (0: skip)")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    from cnnlab.data.sources import load_dataset
    load_dataset(args.data)   # warm the decoded-array cache: the first decode is not part of a recipe
    recipes = args.recipes.split(",") + (["tutorial"] if args.baseline_seeds else [])
    results: dict[str, dict] = {}
    print(f"{'recipe':<10} {'seed':>4} {'wall s':>8} {'train s':>8} {'test acc':>9} {'peak MiB':>9}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in recipes:
            rows = []
            for seed in range(args.baseline_seeds if recipe == "tutorial" else args.seeds):
                r = run_once(recipe, seed, args.data, Path(tmp) / f"{recipe}-{seed}", [])
                rows.append(r)
                print(f"{recipe:<10} {seed:>4} {r['wall_s']:>8.1f} {r['train_s']:>8.1f} "
                      f"{r['test_accuracy']:>9.2%} {r['peak_mib']:>9.0f}", flush=True)
            results[recipe] = summarise(rows) | {"runs": rows}
    print()
    print(f"{'recipe':<10} {'seeds':>5} {'median wall s':>13} {'median train s':>14} {'mean acc':>9} "
          f"{'range':>15} {'peak MiB':>9} {'wall vs lesson':>14}")
    base = results.get("tutorial")
    for name, s in results.items():
        ratio = f"{base['wall_s'] / s['wall_s']:.1f}x faster" if base and name != "tutorial" else ""
        print(f"{name:<10} {s['seeds']:>5} {s['wall_s']:>13.1f} {s['train_s']:>14.1f} {s['mean_accuracy']:>9.2%} "
              f"{s['min_accuracy']:>7.2%}-{s['max_accuracy']:.2%} {s['peak_mib']:>9.0f} {ratio:>14}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
