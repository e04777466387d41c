"""Plots and reports, built only from what a run folder holds."""
from cnnlab.report.plots import write_plots


def write_report(run) -> None:
    """(Re)build every plot of a run folder."""
    write_plots(run)


__all__ = ["write_report", "write_plots"]
