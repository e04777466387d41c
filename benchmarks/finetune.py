"""Small data, from ImageNet weights or from scratch, against the Keras lesson's fit time.

    python benchmarks/finetune.py [--seeds 1] [--sizes 1000,5000] [--keras-python PY]
                                  [--only cifar10-1000,photos] [--methods pretrained,scratch,probe]

Datasets: CIFAR-10 (../shared/data/cifar10, 32-px JPEGs) with 1,000 and 5,000 training images
(``--train-size``: a seeded, stratified subset, a tenth of it held out for validation), each
tested on all 10,000 test images; and a photo folder built from ../shared/data/imagenet-sample
(one photo per ImageNet class, grouped into four superclasses; these photos are ImageNet's
own, so the pretrained network has seen them: read that row as a check of the photo path, not
as transfer). For each, one ``python -m cnnlab train`` process per method and seed, timed
whole (start-up, decoding, training, the test split):

- ``pretrained``: ``--model efficientnet_lite0 --pretrained`` and no other setting: the
  fine-tuning defaults (``core/config.py``'s ``FINE_TUNING``) and the image size they choose.
- ``scratch``: the best from-scratch settings found for the data (``SCRATCH`` below).
- ``defaults``: from scratch at cnnlab's defaults, ``--model resnet20 --epochs 40`` (the run the
  issue measured at 24.9% before image folders were augmented by default).
- ``probe``: the linear classifier on frozen ImageNet features (every epoch head-only, on the
  body's cached features).

With ``--keras-python`` (a Python that has tensorflow-cpu, e.g. ``python -m venv /tmp/tf &&
/tmp/tf/bin/pip install tensorflow-cpu pillow``), the Keras lesson (``keras_lesson.py``) runs
first, on all 50,000 images, and its fit time is the yardstick: each row says its wall time as
a multiple of it. Accuracy: mean over seeds +- its standard error (across seeds; with one
seed, the binomial standard error of the test accuracy).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
# ImageNet-1k class indices (sorted wnid order) of each superclass.
SUPERCLASSES = {
    "bird": [*range(7, 25), *range(80, 101), *range(127, 147)],
    "reptile": range(25, 69),
    "dog": range(151, 269),
    "insect": [*range(70, 80), *range(300, 327)],
}
MODEL = "efficientnet_lite0"
METHODS = {
    "pretrained": ["--model", MODEL, "--pretrained"],
    # The linear classifier: every epoch trains the head alone on the body's cached features.
    "probe": ["--model", MODEL, "--pretrained", "--epochs", "20", "--freeze-epochs", "20", "--augment", "none"],
}
# From scratch: resnet20 with light augmentation (auto's choice for an image folder) and a
# long schedule, which small data can afford; at the lesson's 10 epochs it stays under 40%.
SCRATCH = ["--model", "resnet20", "--epochs", "60", "--optimizer", "nesterov", "--lr", "0.1",
           "--weight-decay", "5e-4", "--batch-size", "64", "--schedule", "cosine", "--warmup", "1"]


@dataclass
class Result:
    accuracy: float
    test_images: int
    seconds: float


def build_photos(dest: Path) -> dict[str, int]:
    files = sorted((SHARED / "imagenet-sample").glob("*.JPEG"))
    if len(files) != 1000:
        raise SystemExit(f"{SHARED / 'imagenet-sample'} should hold 1,000 photos, found {len(files)}")
    counts = {}
    for name, indices in SUPERCLASSES.items():
        (dest / name).mkdir(parents=True, exist_ok=True)
        for i in indices:
            shutil.copy2(files[i], dest / name / files[i].name)
        counts[name] = len(indices)
    return counts


def train(data: Path, args: list[str], out: Path, seed: int) -> Result:
    """One whole ``cnnlab train`` process: its test accuracy and wall seconds."""
    cmd = [sys.executable, "-m", "cnnlab", "train", "--data", str(data), *args, "--seed", str(seed), "--out", str(out)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return Result(metrics["test_accuracy"], metrics["test_images"], seconds)


def keras_fit_seconds(python: str) -> dict:
    done = subprocess.run([python, str(ROOT / "benchmarks" / "keras_lesson.py"), "--data", str(SHARED / "cifar10")],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the Keras lesson failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary(results: list[Result]) -> tuple[str, float]:
    accs = [r.accuracy for r in results]
    mean = statistics.mean(accs)
    se = (statistics.stdev(accs) / math.sqrt(len(accs)) if len(accs) > 1
          else math.sqrt(mean * (1 - mean) / results[0].test_images))
    return f"{100 * mean:5.1f}% +- {100 * se:.1f}", statistics.mean(r.seconds for r in results)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--sizes", default="1000,5000", help="CIFAR-10 training-set sizes")
    p.add_argument("--only", default=None, help="datasets to run, e.g. cifar10-1000,photos")
    p.add_argument("--methods", default="pretrained,probe,scratch,defaults")
    p.add_argument("--keras-python", default=None, help="a Python with tensorflow-cpu: time the Keras lesson")
    args = p.parse_args()
    import torch

    from cnnlab.core.hardware import cpu_isa, cpu_name

    print(f"machine: {cpu_name()}, torch {torch.__version__}, ISA {cpu_isa()}, {torch.get_num_threads()} threads")
    lesson = None
    if args.keras_python:
        keras = keras_fit_seconds(args.keras_python)
        lesson = keras["fit_seconds"]
        print(f"the Keras lesson (TensorFlow {keras['tensorflow']}, {keras['train_images']:,} images, 10 epochs): "
              f"fit {lesson:.1f} s, test accuracy {100 * keras['test_accuracy']:.1f}%", flush=True)
    methods = {**METHODS, "scratch": SCRATCH, "defaults": ["--model", "resnet20", "--epochs", "40"]}
    chosen = args.methods.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        photos = tmp_path / "photos"
        counts = build_photos(photos)
        datasets = {f"cifar10-{n}": (SHARED / "cifar10", ["--train-size", n]) for n in args.sizes.split(",")}
        datasets["photos"] = (photos, [])
        if args.only:
            datasets = {k: v for k, v in datasets.items() if k in args.only.split(",")}
        print(f"photos: {sum(counts.values())} ImageNet photos in {len(counts)} superclasses {counts}, "
              f"split by cnnlab into train, validation and test")
        header = f"{'data':<14} {'method':<11} {'test accuracy':>15} {'test images':>11} {'wall s':>8}"
        print(header + (f" {'x lesson fit':>12}" if lesson else ""), flush=True)
        for name, (data, extra) in datasets.items():
            for method in chosen:
                runs = [train(data, [*extra, *methods[method]], tmp_path / f"{name}-{method}-{seed}", seed)
                        for seed in range(args.seeds)]
                acc, seconds = summary(runs)
                line = f"{name:<14} {method:<11} {acc:>15} {runs[0].test_images:>11,} {seconds:>8.1f}"
                print(line + (f" {seconds / lesson:>12.2f}" if lesson else ""), flush=True)
    print(f"{args.seeds} seed(s); pretrained: {' '.join(METHODS['pretrained'])}; scratch: {' '.join(SCRATCH)}; "
          f"probe: {' '.join(METHODS['probe'])}")


if __name__ == "__main__":
    main()
