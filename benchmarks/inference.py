"""CPU inference speed: PyTorch against ONNX Runtime, batch-1 latency and batch-256 throughput.

    python benchmarks/inference.py                       # tutorial and resnet20, all cores
    python benchmarks/inference.py --models resnet56 --threads 1 --json out.json

The models have untrained (random) weights: speed does not depend on the weights, only on
the architecture and input size. Each model is the full ``Classifier`` (normalisation
inside), as ``cnnlab predict`` runs it and as ``cnnlab export`` writes it (exported in
memory here, with the same exporter and the same ONNX Runtime settings a user would get).

Latency: the median (and 90th percentile) of many single-image calls after a warm-up.
Throughput: images per second of one 256-image batch, from the median of several calls.
The numbers move with whatever else the machine is doing; run it when it is quiet.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np
import torch

from cnnlab.apps.export import finish_graph, onnx_graph, onnx_session
from cnnlab.core.hardware import available_cores
from cnnlab.models.classifier import build_classifier

WARMUP_CALLS = 20
# Untrained-model normalisation: any constants do; these are CIFAR-10's rounded.
MEAN, STD = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]


def _timings(fn: Callable[[], Any], calls: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def measure(run_one: Callable[[Any], Any], one: Any, batch: Any, batch_size: int, latency_calls: int,
            batch_calls: int) -> dict[str, float]:
    lat = _timings(lambda: run_one(one), latency_calls, WARMUP_CALLS)
    thr = _timings(lambda: run_one(batch), batch_calls, 2)
    return {"latency_ms_median": 1000 * statistics.median(lat),
            "latency_ms_p90": 1000 * float(np.percentile(lat, 90)),
            "throughput_images_s": batch_size / statistics.median(thr)}


def bench_model(name: str, *, size: int, classes: int, threads: int, batch_size: int,
                latency_calls: int, batch_calls: int) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = build_classifier(name, classes, size, MEAN, STD).eval()
    one = torch.rand(1, 3, size, size)
    batch = torch.rand(batch_size, 3, size, size)
    rows = []

    @torch.inference_mode()
    def torch_run(x):
        return model(x)

    rows.append({"model": name, "runtime": f"PyTorch {torch.__version__.split('+')[0]}",
                 **measure(torch_run, one, batch, batch_size, latency_calls, batch_calls)})

    raw, exporter = onnx_graph(model, 3, (size, size))
    import onnxruntime as ort
    session = onnx_session(finish_graph(raw, {"arch": name}), threads=threads)

    def ort_run(x):
        return session.run(None, {"image": x})

    rows.append({"model": name, "runtime": f"ONNX Runtime {ort.__version__}",
                 **measure(ort_run, one.numpy(), batch.numpy(), batch_size, latency_calls, batch_calls)})
    params = sum(p.numel() for p in model.parameters())
    for r in rows:
        r.update(parameters=params, exporter=exporter)
    return rows


def format_table(rows: list[dict[str, Any]], batch_size: int) -> str:
    head = f"{'model':<10} {'runtime':<22} {'batch-1 median ms':>17} {'p90 ms':>8} {f'batch-{batch_size} images/s':>20}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<10} {r['runtime']:<22} {r['latency_ms_median']:>17.3f} "
                     f"{r['latency_ms_p90']:>8.3f} {r['throughput_images_s']:>20,.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["tutorial", "resnet20"])
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="default: every core available")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--latency-calls", type=int, default=300)
    p.add_argument("--batch-calls", type=int, default=7)
    p.add_argument("--json", default=None, metavar="FILE")
    args = p.parse_args(argv)

    threads = args.threads or available_cores()
    torch.set_num_threads(threads)
    rows = []
    for name in args.models:
        rows += bench_model(name, size=args.input_size, classes=args.classes, threads=threads,
                            batch_size=args.batch_size, latency_calls=args.latency_calls,
                            batch_calls=args.batch_calls)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"CPU inference, {args.input_size}x{args.input_size}x3 input, {args.classes} classes, untrained "
          f"weights (timing only), {threads} thread(s) each, {available_cores()} core(s); "
          f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
          f"load average {load:.1f} (other processes slow the numbers)")
    print(format_table(rows, args.batch_size))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": threads, "input_size": args.input_size, "load_average": load, "rows": rows},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
