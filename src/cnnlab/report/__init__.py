"""Plots and reports, built only from what a run folder holds.

``write_report(run)`` (called by the training loop at the end of every run, and by
``cnnlab report RUN``) writes ``plots/*.png`` and ``report.html``; it rebuilds TensorBoard
event files from the history only when asked (training with ``--tensorboard`` writes them live,
through ``cnnlab.engine.callbacks.TensorBoard``). ``compare_runs`` puts runs side by side;
``read_curves`` is the plain-language reading of a history.
"""
from __future__ import annotations

from pathlib import Path

from cnnlab.core.run_folder import RunFolder, read_run
from cnnlab.report.compare import compare_runs
from cnnlab.report.diagnose import Finding, read_curves
from cnnlab.report.plots import write_plots
from cnnlab.report.run_report import write_html


def write_report(run: str | Path, *, tensorboard: bool = False) -> None:
    """(Re)build every plot and ``report.html`` of a run folder; ``tensorboard``: also rebuild
    RUN/tensorboard from the history, replacing what training wrote there."""
    rec = read_run(run)
    write_plots(rec)
    write_html(rec)
    if tensorboard:
        from cnnlab.report.tensorboard import write_tensorboard
        write_tensorboard(rec.path)


__all__ = ["write_report", "write_plots", "write_html", "compare_runs", "read_curves", "Finding",
           "read_run", "RunFolder"]
