"""Images/s of the streaming loader at 224 px against the images/s a model trains on.

    python benchmarks/loader.py [--workers 2] [--batches 20] [--model resnet50] [--steps 3]

The data: ../shared/data/imagenet-sample (1,000 real ImageNet photos, mostly ~500x375 JPEG)
arranged as train/<class>/ in a temporary folder (hard links where the filesystem allows).
The loader figure is the training pipeline as ``fit`` runs it: JPEG decode, random-resized
crop to 224, uint8 batches from worker processes, then flip and scaling to float. The model
figure is a whole training step (forward, backward, SGD) at batch 32, bfloat16 autocast when
the CPU has it, channels_last. Training keeps up when the first figure exceeds the second.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cnnlab.core.config import Config
from cnnlab.core.hardware import autocast, available_cores, choose_precision
from cnnlab.engine.distributed import training_batches
from cnnlab.engine.prepare import load_data, plan_run
from cnnlab.models.classifier import build_classifier

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"
SIZE = 224
BATCH = 32
CLASSES = 10          # the 1,000 photos (one per ImageNet class) grouped into 10 folders


def arrange(dest: Path) -> Path:
    """dest/train/cNN/<photo> for all photos, dest/test/cNN/ one each (the layout needs it)."""
    photos = sorted(SAMPLE.glob("*.JPEG"))
    if not photos:
        raise SystemExit(f"{SAMPLE} holds no .JPEG files")
    for i, src in enumerate(photos):
        cls = f"c{i % CLASSES:02d}"
        for split in ("train",) + (("test",) if i < CLASSES else ()):
            d = dest / split / cls
            d.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, d / src.name)
            except OSError:   # another filesystem: copy (105 MB)
                shutil.copy2(src, d / src.name)
    return dest


def loader_rate(folder: Path, workers: int, batches: int) -> tuple[float, float, int]:
    """(images/s after the first batch, seconds to the first batch, images) of training batches."""
    cfg = Config(data=str(folder), loader="stream", image_size=SIZE, crop="random_resized", flip="random",
                 workers=workers, batch_size=BATCH, val_split=0.0)
    data = load_data(plan_run(cfg))
    assert data.train.streamed
    stream = training_batches(cfg, data, torch.device("cpu"))
    start = time.perf_counter()
    it = stream.epoch(0)
    next(it)
    first = time.perf_counter() - start
    t0, n = time.perf_counter(), 0
    for _, (x, _) in zip(range(batches), it):
        n += len(x)
    return n / (time.perf_counter() - t0), first, n


def model_rate(arch: str, steps: int) -> tuple[float, str]:
    """Images/s of full training steps at 224 px, batch 32, channels_last."""
    device = torch.device("cpu")
    dtype = choose_precision("auto", device).dtype
    model = build_classifier(arch, 1000, SIZE, [0.5] * 3, [0.25] * 3).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.rand(BATCH, 3, SIZE, SIZE).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (BATCH,))

    def step():
        with autocast(device, dtype):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()   # warm-up: oneDNN picks its kernels
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * BATCH / (time.perf_counter() - t0), str(dtype).replace("torch.", "") if dtype else "float32"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=20, help="timed loader batches of 32")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--steps", type=int, default=3, help="timed training steps")
    args = p.parse_args()
    print(f"{available_cores()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("CNNLAB_DATA", str(Path(tmp) / "cache"))
        folder = arrange(Path(tmp) / "imagenet-sample")
        rate, first, n = loader_rate(folder, args.workers, args.batches)
        print(f"streaming loader, {args.workers} workers, {SIZE} px random-resized crops + flip: "
              f"{rate:,.0f} images/s over {n} images ({first:.1f} s to the first batch)")
    model, dtype = model_rate(args.model, args.steps)
    print(f"{args.model} training step, batch {BATCH} at {SIZE} px, {dtype}, channels_last: {model:,.1f} images/s")
    verdict = "keeps up with" if rate >= model else "is slower than"
    print(f"the loader {verdict} the model here ({rate / model:.1f}x)")


if __name__ == "__main__":
    main()
