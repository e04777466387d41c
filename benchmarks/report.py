"""How long the end-of-run report takes: every plot and report.html, and the Grad-CAM of the
mistakes on its own (the one figure that runs the model).

    python benchmarks/report.py RUN_FOLDER [--repeats 5]

The report is drawn at the end of every `cnnlab train`, so its time is part of every recipe's
wall time. The run folder is copied to a temporary folder first and left untouched.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from cnnlab.report import read_run, write_report
from cnnlab.report.plots import gradcam_figure


def _median_seconds(fn, repeats: int) -> tuple[float, float, float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a finished run folder (with model.safetensors)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / args.run.name
        shutil.copytree(args.run, run, ignore=shutil.ignore_patterns("checkpoints"))
        rec = read_run(run)
        ev = rec.evaluation
        if ev is None or not len(ev["mistake_index"]):
            raise SystemExit(f"{args.run} has no evaluation with mistakes to draw")
        idx = ev["mistake_index"]
        preds = ev["logits"].argmax(1)

        def cam():
            gradcam_figure(ev["mistake_images"], ev["mistake_heatmaps"], ev["labels"][idx], preds[idx],
                           np.ones(len(idx)), rec.class_names, "got these wrong")

        rows = [("whole report", _median_seconds(lambda: write_report(run, tensorboard=False), args.repeats)),
                ("gradcam of the mistakes", _median_seconds(cam, args.repeats))]
    print(f"{args.run} ({rec.saved_config.get('model')}), {args.repeats} repeats")
    print(f"{'part':26s} {'median s':>9s} {'min s':>7s} {'max s':>7s}")
    for name, (med, lo, hi) in rows:
        print(f"{name:26s} {med:9.2f} {lo:7.2f} {hi:7.2f}")


if __name__ == "__main__":
    main()
