"""Your own photos: train from scratch against fine-tuning from a CIFAR-10 run, and the first decode.

    python benchmarks/finetune.py [--seeds 3] [--epochs 8] [--source-epochs 5] [--source-train-size 10000]

Builds a flat folder of real photos (``<class>/<image>``, the layout most downloads come in)
from ../shared/data/imagenet-sample, one photo per ImageNet class grouped into superclasses by
ImageNet class index (dogs, birds, reptiles and amphibians, insects and spiders). cnnlab splits
it (seeded, stratified) into train, validation and test and trains at the model's default size
for photo folders. Then, per seed, the same config twice: from scratch, and ``--init-from`` a
model trained on the CIFAR-10 image folder (``--freeze-epochs 1``, ``--body-lr-scale 0.3``):
test accuracy as mean +- standard error over the seeds. Also times the first decode of the
folder (fresh cache) with and without ``--train-size``.
"""
from __future__ import annotations

import argparse
import math
import shutil
import statistics
import tempfile
import time
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


def first_decode_seconds(folder: Path, train_size: int | None) -> float:
    from cnnlab.data.sources import load_dataset
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        load_dataset(str(folder), data_dir=cache, image_size=32, train_size=train_size, progress=False)
        return time.perf_counter() - start


def mean_se(values: list[float]) -> str:
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return f"{100 * statistics.mean(values):.1f}% +- {100 * se:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=float, default=8)
    p.add_argument("--source-epochs", type=float, default=5)
    p.add_argument("--source-train-size", type=int, default=10_000, help="CIFAR-10 training images for the source")
    p.add_argument("--model", default="resnet20")
    args = p.parse_args()
    from cnnlab.core.config import Config
    from cnnlab.core.hardware import cpu_isa, cpu_name
    from cnnlab.engine.loop import fit

    print(f"machine: {cpu_name()} (torch ISA {cpu_isa()})")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photos = tmp / "photos"
        counts = build_photos(photos)
        print(f"photo folder: {sum(counts.values())} photos, {counts}")
        full, subset = first_decode_seconds(photos, None), first_decode_seconds(photos, 60)
        print(f"first decode (fresh cache): all {full:.2f} s, --train-size 60 {subset:.2f} s")
        base = dict(model=args.model, optimizer="nesterov", lr=0.2, lr_per_1024=True, weight_decay=5e-4,
                    batch_size=64, schedule="linear", warmup=1.0, flip="random", translate=2)
        t0 = time.perf_counter()
        source = fit(Config(data=str(SHARED / "cifar10"), epochs=args.source_epochs, seed=0,
                            train_size=args.source_train_size, **base),
                     out=tmp / "cifar10", progress=False)
        print(f"source: {args.model} on {args.source_train_size:,} CIFAR-10 images, {args.source_epochs:g} epochs: test accuracy "
              f"{source.metrics['test_accuracy']:.2%} ({time.perf_counter() - t0:.0f} s)")
        results: dict[str, list[float]] = {"scratch": [], "fine-tuned": []}
        for seed in range(args.seeds):
            common = Config(data=str(photos), epochs=args.epochs, seed=seed, **base)
            for kind, extra in (("scratch", {}), ("fine-tuned", {"init_from": str(source.path),
                                                                  "freeze_epochs": 1.0, "body_lr_scale": 0.3})):
                run = fit(common.replace(**extra), out=tmp / f"{kind}-{seed}", progress=False)
                results[kind].append(run.metrics["test_accuracy"])
                print(f"  seed {seed} {kind:10s} test accuracy {run.metrics['test_accuracy']:.2%} "
                      f"on {run.metrics.get('test_images', '?')} photos")
        for kind, accs in results.items():
            print(f"{kind:10s}: {mean_se(accs)} (mean +- standard error, {len(accs)} seeds)")


if __name__ == "__main__":
    main()
