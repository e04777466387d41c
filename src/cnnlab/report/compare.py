"""``cnnlab compare RUN RUN...``: which of my runs was best, as a table, overlaid curves and a page.

    <out>/compare.html   the table and both plots, self-contained
    <out>/compare.csv    the table
    <out>/val_accuracy.png, <out>/loss.png
"""
from __future__ import annotations

import csv
import io
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cnnlab.core.errors import CnnlabError
from cnnlab.core.files import write_text
from cnnlab.core.run_folder import RunFolder, finite, read_run
from cnnlab.report.html import esc, fmt, img, page, table
from cnnlab.report.plots import clean_series, figure, plain, save_figure

COLUMNS = (  # key, header, format
    ("run", "run", ""), ("model", "model", ""), ("recipe", "recipe", ""), ("data", "data", ""),
    ("epochs", "epochs", ""), ("parameters", "parameters", ""), ("train_seconds", "train time", "s"),
    ("best_val_accuracy", "best val accuracy", "pct"), ("best_epoch", "best epoch", ""),
    ("final_val_accuracy", "final val accuracy", "pct"), ("test_accuracy", "test accuracy", "pct"),
)


def default_out() -> Path:
    return Path(f"compare-{datetime.now():%Y%m%d-%H%M%S}")


def labels_for(records: Sequence[RunFolder], given: Sequence[str | Path]) -> list[str]:
    """Folder names, or the paths as given where two runs share a folder name."""
    names = [r.name for r in records]
    return [n if names.count(n) == 1 else str(g) for n, g in zip(names, given)]


def summary_row(rec: RunFolder, label: str) -> dict[str, Any]:
    va = rec.series("val_accuracy")
    best = rec.best_val
    test = rec.metrics.get("test_accuracy")
    return {
        "run": label, "model": rec.card.get("arch"), "recipe": rec.saved_config.get("recipe"),
        "data": rec.saved_config.get("data"), "epochs": rec.epochs,
        "parameters": rec.metrics.get("parameters"), "train_seconds": rec.train_seconds,
        "best_val_accuracy": best[0] if best else None, "best_epoch": best[1] if best else None,
        "final_val_accuracy": float(va[-1]) if len(va) and np.isfinite(va[-1]) else None,
        "test_accuracy": test if finite(test) else None,
    }


def _colors(n: int) -> list:
    import matplotlib
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def overlay_figure(records: Sequence[RunFolder], labels: Sequence[str], key: str):
    """Validation ``key`` per run (solid); training (dashed) for loss, or when a run has no validation."""
    fig, ax = figure(7, 4.2)
    for rec, label, color in zip(records, labels, _colors(len(records))):
        train, val = clean_series(rec.history.get(key) or []), clean_series(rec.history.get(f"val_{key}") or [])
        has_val = np.isfinite(val).any()
        if has_val:
            ax.plot(np.arange(1, len(val) + 1), val, color=color, marker="o", ms=3, label=plain(label, 40))
        if key == "loss" or not has_val:
            ax.plot(np.arange(1, len(train) + 1), train, color=color, ls="--", alpha=0.8,
                    label=plain(f"{label} (train)", 48) if not has_val or key != "loss" else None)
    if key == "accuracy":
        import matplotlib.ticker
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
        ax.set_title("Validation accuracy per epoch")
    else:
        ax.set_title("Loss per epoch (solid: validation, dashed: training)")
    ax.set_xlabel("epoch")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig


def compare_runs(runs: Sequence[str | Path], out: str | Path | None = None) -> tuple[Path, list[dict[str, Any]]]:
    """Write the comparison into ``out`` (default ``compare-<timestamp>/``); returns (page, rows)."""
    if not runs:
        raise CnnlabError("give at least one run folder to compare")
    records = [read_run(r) for r in runs]  # each raises a one-line CnnlabError
    labels = labels_for(records, runs)
    rows = [summary_row(rec, label) for rec, label in zip(records, labels)]
    out = Path(out) if out is not None else default_out()
    if out.exists() and not out.is_dir():
        raise CnnlabError(f"--out {out} is a file; give a folder for the comparison")
    save_figure(overlay_figure(records, labels, "accuracy"), out / "val_accuracy.png")
    save_figure(overlay_figure(records, labels, "loss"), out / "loss.png")

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow([k for k, _, _ in COLUMNS])
    writer.writerows([["" if r[k] is None else r[k] for k, _, _ in COLUMNS] for r in rows])
    write_text(out / "compare.csv", buf.getvalue())

    tests = [r["test_accuracy"] for r in rows]
    best = max((t for t in tests if t is not None), default=None)
    classes = ["best" if best is not None and t == best else "" for t in tests]
    cells = [[fmt(r[k], kind) for k, _, kind in COLUMNS] for r in rows]
    numeric = [k not in ("run", "model", "recipe", "data") for k, _, _ in COLUMNS]
    sources = "".join(f"<li><code>{esc(label)}</code>: <code>{esc(rec.path.resolve())}</code></li>"
                      for rec, label in zip(records, labels))
    body = f"""
<h1>cnnlab: {len(rows)} run{'s' if len(rows) != 1 else ''} compared</h1>
<p class="sub">Written {esc(datetime.now().isoformat(timespec='seconds'))}; the best test accuracy is highlighted.</p>
<h2>Runs</h2>
{table([h for _, h, _ in COLUMNS], cells, numeric, classes)}
<h2>Curves</h2>
<div class="grid"><div>{img(out / "val_accuracy.png", "validation accuracy per epoch of every run")}</div>
<div>{img(out / "loss.png", "loss per epoch of every run")}</div></div>
<h2>Run folders</h2><ul>{sources}</ul>"""
    html_path = out / "compare.html"
    write_text(html_path, page("cnnlab compare", body))
    return html_path, rows


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    """The comparison as a plain-text table for the terminal."""
    cells = [[h for _, h, _ in COLUMNS]] + [[fmt(r[k], kind) for k, _, kind in COLUMNS] for r in rows]
    widths = [max(len(row[j]) for row in cells) for j in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) if j < 4 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths)))
                     for row in cells)
