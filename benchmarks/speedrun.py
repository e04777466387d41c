"""The speed recipes, timed as whole processes on ../shared/data/cifar10, against the lesson
and the record holder.

    python benchmarks/speedrun.py [--recipes speed70,speed85] [--seeds 3] [--first-seed 0] [--baseline-seeds 1]
                                  [--peer] [--peer-steps N] [--peak] [--profile speed90]

For each seed, then each recipe (interleaved), runs ``cnnlab train --recipe NAME --seed S``
in a fresh process (the decoded-data cache warmed first) and reports wall seconds (process
start to exit, the whole job: start-up, data, training, evaluation, run folder and report),
training seconds, test accuracy and peak memory (max RSS); then the median per recipe, its
images/s and achieved GFLOP/s, and the same for the ``lesson`` recipe (the lesson) in the
same run, with the ratios. Each recipe is a fixed
schedule: test accuracy is read once at the end and never used to stop early.

``--peer`` runs the benchmark peer (``../shared/peers/airbench94_muon_cpu.py``, the current
CIFAR-10 record ported to the CPU) the same way, on the same images (written once as the
``train.pt``/``test.pt`` it reads), seeds and precision choice (bfloat16 only where the CPU
has it natively), and prints each recipe's wall time as a ratio to its. ``--peer-steps N``
stops the peer after N steps: a throughput probe whose images/s is compared, not its accuracy.
``--peak`` measures this machine's best convolution and matrix-product rates (``peak.py``)
and prints each recipe's achieved rate (3 x forward FLOPs an image) as a fraction of them;
``--profile RECIPE`` prints where that recipe's training step goes (``profile_steps.py``).
A recipe name with a path (``benchmarks/baselines/speed70.yaml``) runs that file.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "cifar10"
PEER = ROOT.parent / "shared" / "peers" / "airbench94_muon_cpu.py"
PEER_BATCH = 2000       # the peer's batch size (its main())
PEER_LINE = re.compile(r"PEER \S+ tta_test_accuracy=([0-9.]+) wall_seconds=([0-9.]+)")


def _timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[str, float, float, int]:
    """(stdout, wall seconds, peak MiB, exit code) of ``cmd`` as a whole process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    return stdout, time.perf_counter() - start, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


def run_once(recipe: str, seed: int, data: str, out: Path, extra: list[str], python: str = sys.executable) -> dict:
    source = ["--config", recipe] if recipe.endswith(".yaml") else ["--recipe", recipe]
    cmd = [python, "-m", "cnnlab", "train", *source, "--data", data, "--seed", str(seed),
           "--out", str(out), *extra]
    stdout, wall, peak, code = _timed(cmd)
    if code != 0:
        raise SystemExit(f"{recipe} seed {seed} failed ({code}):\n{stdout[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    saved = json.loads((out / "config.json").read_text())
    cfg = saved["config"]
    return {"recipe": recipe, "seed": cfg["seed"], "wall_s": wall, "train_s": metrics["train_seconds"],
            "test_accuracy": metrics["test_accuracy"], "peak_mib": peak,
            "images": metrics["steps"] * cfg["batch_size"], "model": cfg["model"],
            "precision": saved["environment"]["precision"]}


def write_peer_data(data: str, folder: Path) -> Path:
    """The peer's inputs from cnnlab's copy of the data (once per folder): ``train.pt`` and
    ``test.pt``, each {"images": uint8 (N, 32, 32, 3), "labels": int64 (N,), "classes": [...]}."""
    import torch

    from cnnlab.data.sources import load_dataset
    if (folder / "train.pt").exists() and (folder / "test.pt").exists():
        return folder
    ds = load_dataset(data)
    folder.mkdir(parents=True, exist_ok=True)
    for name, split in (("train", ds.train), ("test", ds.test)):
        torch.save({"images": torch.from_numpy(split.images.copy()), "labels": torch.from_numpy(split.labels.copy()),
                    "classes": list(ds.class_names)}, folder / f"{name}.pt.tmp")
        (folder / f"{name}.pt.tmp").rename(folder / f"{name}.pt")
    return folder


def run_peer(peer: Path, seed: int, peer_data: Path, bf16: bool, steps: int | None) -> dict:
    env = dict(os.environ, PEER_DATA=str(peer_data), PEER_SEED=str(seed), PEER_BF16="1" if bf16 else "0")
    if steps:
        env["PEER_MAX_STEPS"] = str(steps)
    stdout, wall, peak, code = _timed([sys.executable, str(peer)], env)
    found = PEER_LINE.search(stdout)
    if code != 0 or not found:
        raise SystemExit(f"the peer (seed {seed}) failed ({code}):\n{stdout[-3000:]}")
    # Its table's last epoch row: time_seconds is its own training clock (no evaluation in it).
    epochs = [row for row in stdout.splitlines() if row.startswith("|") and row.split("|")[2].strip().isdigit()]
    train_s = float(epochs[-1].split("|")[-2])
    images = steps * PEER_BATCH if steps else 8 * (50_000 // PEER_BATCH) * PEER_BATCH
    return {"recipe": "peer", "seed": seed, "wall_s": wall, "train_s": train_s, "peak_mib": peak,
            "test_accuracy": float(found.group(1)), "images": images, "model": "airbench94_muon",
            "precision": "bfloat16" if bf16 else "float32"}


def training_gflop_s(row: dict) -> float:
    """Achieved training rate: 3 x the forward FLOPs an image (forward, input and weight
    gradients), times the images trained, over the training seconds."""
    from cnnlab.models.registry import create_model
    from cnnlab.models.summary import count_flops
    # The peer's network has SpeedNet's widths (64/256/256) and 2x2 whitening: the same FLOPs.
    model = "speednet" if row["model"] == "airbench94_muon" else row["model"]
    return 3 * count_flops(create_model(model, 10, 3, 32)) * row["images"] / row["train_s"] / 1e9


def summarise(rows: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in rows) for k in ("wall_s", "train_s", "peak_mib")} | {
        "mean_accuracy": statistics.mean(r["test_accuracy"] for r in rows),
        "min_accuracy": min(r["test_accuracy"] for r in rows),
        "max_accuracy": max(r["test_accuracy"] for r in rows), "seeds": len(rows)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default="speed70,speed85,speed90,speed92",
                   help="recipe names or YAML files, comma-separated ('' for none)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0, help="seeds run from here: a run too long for one "
                                                              "sitting goes on later with the next seeds")
    p.add_argument("--baseline-seeds", type=int, default=1, help="seeds of the lesson recipe (0: skip)")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--peer", action="store_true", help=f"also run the peer ({PEER.name})")
    p.add_argument("--peer-path", default=str(PEER))
    p.add_argument("--peer-steps", type=int, default=None, help="stop the peer after this many steps (a "
                                                                 "throughput probe: compare images/s)")
    p.add_argument("--peak", action="store_true", help="measure the machine's peak rates (peak.py) first")
    p.add_argument("--profile", default=None, metavar="RECIPE", help="print where RECIPE's step goes")
    p.add_argument("--train-args", default="", help="more cnnlab train flags for every recipe, e.g. '--epochs 1' "
                                                     "(a throughput probe beside --peer-steps)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--pythons", default=None, metavar="PY,PY", help="run every recipe with each of these "
                   "interpreters (venvs with cnnlab and another torch build), interleaved; rows are named "
                   "RECIPE@torch VERSION (default: this interpreter only)")
    args = p.parse_args()
    import torch

    from cnnlab.core import hardware
    from cnnlab.data.sources import load_dataset
    bf16 = hardware.choose_precision("auto", torch.device("cpu"), strict=False).dtype == torch.bfloat16
    print(f"machine: {hardware.cpu_name()}, torch ISA {hardware.cpu_isa()}, {hardware.available_cores()} cores, "
          f"precision auto -> {'bfloat16' if bf16 else 'float32'}", flush=True)
    peak = None
    if args.peak:
        from peak import peak_rates
        peak = peak_rates(dtypes=("float32", "bfloat16") if bf16 else ("float32",))
        print("peak GFLOP/s at SpeedNet's shapes: " + "; ".join(
            f"{d} {r['best']:.0f} (conv forward {r['forward']:.0f}, input grad {r['input grad']:.0f}, weight grad "
            f"{r['weight grad']:.0f}, matmul {r['matmul']:.0f})" for d, r in peak.items()), flush=True)
    load_dataset(args.data)   # warm the decoded-array cache: the first decode is not part of a recipe
    recipes = [r for r in args.recipes.split(",") if r] + (["lesson"] if args.baseline_seeds else [])
    pythons = {sys.executable: ""}
    if args.pythons:   # label each interpreter by its torch build
        pythons = {py: "@torch " + subprocess.run([py, "-c", "import torch; print(torch.__version__)"], text=True,
                                                   capture_output=True, check=True).stdout.strip()
                   for py in args.pythons.split(",")}
    print(f"{'recipe':<34} {'seed':>4} {'wall s':>8} {'train s':>8} {'test acc':>9} {'peak MiB':>9}", flush=True)

    def show(name: str, r: dict) -> None:
        print(f"{name:<34} {r['seed']:>4} {r['wall_s']:>8.1f} {r['train_s']:>8.1f} "
              f"{r['test_accuracy']:>9.2%} {r['peak_mib']:>9.0f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        # Seed-major: every recipe (and the peer) runs seed 0, then seed 1, ...: a machine that
        # drifts (a neighbour, the clock) shifts all of them alike, not one recipe's runs.
        peer_data = write_peer_data(args.data, Path(tmp) / "peer-data") if args.peer else None
        runs: dict[str, list[dict]] = {name + label: [] for name in (["peer"] if args.peer else []) + recipes
                                       for label in (pythons.values() if name != "peer" else [""])}
        for n in range(max(args.seeds, args.baseline_seeds)):
            seed = args.first_seed + n
            if peer_data is not None and n < args.seeds:
                runs["peer"].append(run_peer(Path(args.peer_path), seed, peer_data, bf16, args.peer_steps))
                show("peer", runs["peer"][-1])
            for i, recipe in enumerate(recipes):
                for j, (python, label) in enumerate(pythons.items()):
                    if n < (args.baseline_seeds if recipe == "lesson" else args.seeds):
                        out = Path(tmp) / f"{i}-{j}-{Path(recipe).stem}-{seed}"   # a baseline and its recipe share a stem
                        runs[recipe + label].append(run_once(recipe, seed, args.data, out, shlex.split(args.train_args),
                                                             python))
                        show(recipe + label, runs[recipe + label][-1])
        results = {name: summarise(rows) | {"runs": rows} for name, rows in runs.items() if rows}
    print()
    print(f"{'recipe':<34} {'seeds':>5} {'median wall s':>13} {'median train s':>14} {'mean acc':>9} "
          f"{'range':>15} {'peak MiB':>9} {'img/s':>7} {'GFLOP/s':>8} {'wall vs lesson':>14} {'wall vs peer':>12}")
    base, peer = results.get("lesson"), results.get("peer")
    for name, s in results.items():
        ratio = f"{base['wall_s'] / s['wall_s']:.1f}x faster" if base and name != "lesson" else ""
        runs = s["runs"]
        img_s = statistics.median(r["images"] / r["train_s"] for r in runs)
        rate = statistics.median(training_gflop_s(r) for r in runs)
        rate_text = f"{rate:.1f}" + (f" ({rate / peak[runs[0]['precision']]['best']:.0%} of peak)"
                                     if peak and runs[0]["precision"] in peak else "")
        vs_peer = ""
        if peer and name != "peer":
            vs_peer = (f"{s['wall_s'] / peer['wall_s']:.2f}x" if not args.peer_steps
                       else f"{img_s / statistics.median(r['images'] / r['train_s'] for r in peer['runs']):.2f}x img/s")
        print(f"{name:<34} {s['seeds']:>5} {s['wall_s']:>13.1f} {s['train_s']:>14.1f} {s['mean_accuracy']:>9.2%} "
              f"{s['min_accuracy']:>7.2%}-{s['max_accuracy']:.2%} {s['peak_mib']:>9.0f} {img_s:>7.0f} {rate_text:>8} "
              f"{ratio:>14} {vs_peer:>12}")
    if args.peer_steps:
        print(f"(the peer stopped after {args.peer_steps} steps: its accuracy is not a result; compare images/s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.profile:   # last, in its own process: a parent's memory would count in the runs' peak RSS
        print(flush=True)
        subprocess.run([sys.executable, str(Path(__file__).with_name("profile_steps.py")), "--recipe", args.profile,
                        "--data", args.data], check=True)


if __name__ == "__main__":
    main()
