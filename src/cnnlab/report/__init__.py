"""Plots and reports, built only from what a run folder holds.

``write_report(run)`` (called by the training loop at the end of every run, and by
``cnnlab report RUN``) writes ``plots/*.png`` and ``report.html``, plus TensorBoard event
files when the run's config says ``tensorboard: true``. ``compare_runs`` puts runs side by
side; ``read_curves`` is the plain-language reading of a history.
"""
from __future__ import annotations

from pathlib import Path

from cnnlab.core.run_folder import RunFolder, read_run
from cnnlab.report.compare import compare_runs
from cnnlab.report.diagnose import Finding, read_curves
from cnnlab.report.plots import write_plots
from cnnlab.report.run_report import write_html


def write_report(run: str | Path, *, tensorboard: bool | None = None) -> None:
    """(Re)build every plot and ``report.html`` of a run folder.

    ``tensorboard`` None follows the run's config; True or False overrides it.
    """
    rec = read_run(run)
    write_plots(rec)
    write_html(rec)
    if tensorboard if tensorboard is not None else bool(rec.saved_config.get("tensorboard")):
        from cnnlab.report.tensorboard import write_tensorboard
        write_tensorboard(rec.path)


__all__ = ["write_report", "write_plots", "write_html", "compare_runs", "read_curves", "Finding",
           "read_run", "RunFolder"]
