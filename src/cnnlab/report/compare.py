"""``cnnlab compare RUN RUN...``: which of my runs was best, as a table, overlaid curves and a page.

    <out>/compare.html   the table, the seed groups, the warnings and both plots, self-contained
    <out>/compare.csv    the table, with each accuracy's standard error
    <out>/val_accuracy.png, <out>/loss.png

Every accuracy comes with its binomial standard error, from the size of the split it was
measured on (``val_images``, ``test_images`` in metrics.json). Runs tested on different test
sets (metrics.json's ``test_set``: count and hashes) are named in a warning; runs whose configs
differ only in their seed (``SEED_ONLY``) are grouped into a mean and spread.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cnnlab.core.errors import CnnlabError
from cnnlab.core.files import write_text
from cnnlab.core.metrics import accuracy_se, with_se
from cnnlab.core.run_folder import RunFolder, finite, read_run
from cnnlab.report.html import esc, fmt, img, page, table
from cnnlab.report.plots import clean_series, figure, plain, save_figure

# key, header, format: "val"/"test" are accuracies shown with their standard error, from the
# size of the split they were measured on (val_images, test_images).
COLUMNS = (
    ("run", "run", ""), ("model", "model", ""), ("recipe", "recipe", ""), ("data", "data", ""),
    ("seed", "seed", ""), ("epochs", "epochs", ""), ("parameters", "parameters", ""),
    ("train_seconds", "train time", "s"), ("val_images", "val images", ""),
    ("best_val_accuracy", "best val accuracy", "val"), ("best_epoch", "best epoch", ""),
    ("final_val_accuracy", "final val accuracy", "val"), ("test_images", "test images", ""),
    ("test_accuracy", "test accuracy", "test"), ("test_set", "test set", ""),
)
TEXT_COLUMNS = 4            # run, model, recipe, data: left-aligned; the rest are figures
SE_KEYS = tuple(f"{k}_se" for k, _, kind in COLUMNS if kind in ("val", "test"))
CSV_KEYS = tuple(k for k, _, _ in COLUMNS) + SE_KEYS
# Config keys that may differ between runs of one experiment repeated over seeds: the seed,
# and where it ran (which device, how many threads).
SEED_ONLY = ("seed", "device", "threads")
NOT_TESTED = "not tested"


def default_out() -> Path:
    return Path(f"compare-{datetime.now():%Y%m%d-%H%M%S}")


def labels_for(records: Sequence[RunFolder], given: Sequence[str | Path]) -> list[str]:
    """Folder names, or the paths as given where two runs share a folder name."""
    names = [r.name for r in records]
    return [n if names.count(n) == 1 else str(g) for n, g in zip(names, given)]


def test_set_key(metrics: dict[str, Any]) -> tuple | None:
    """What identifies the images a run was tested on: count and hashes (``test_set`` in
    metrics.json), the count alone for a run from an older cnnlab; None when untested."""
    ident = metrics.get("test_set")
    if isinstance(ident, dict):
        return (ident.get("images"), ident.get("labels_sha256"), ident.get("files_sha256"))
    n = metrics.get("test_images")
    return (n, None, None) if isinstance(n, int) and finite(metrics.get("test_accuracy")) else None


def _test_set_text(key: tuple | None) -> str | None:
    if key is None or key[1] is None:
        return None
    return "#" + str(key[1])[:8] + ("/" + str(key[2])[:8] if key[2] else "")


def summary_row(rec: RunFolder, label: str) -> dict[str, Any]:
    va = rec.series("val_accuracy")
    best = rec.best_val
    m = rec.metrics
    test = m.get("test_accuracy")
    tested = finite(test)
    val_n = m.get("val_images") if isinstance(m.get("val_images"), int) and m.get("val_images") else None
    test_n = m.get("test_images") if tested and isinstance(m.get("test_images"), int) else None
    key = test_set_key(m) if tested else None
    config = rec.saved_config
    row: dict[str, Any] = {
        "run": label, "model": rec.card.get("arch"), "recipe": config.get("recipe"),
        "data": config.get("data"), "seed": config.get("seed"), "epochs": rec.epochs,
        "parameters": m.get("parameters"), "train_seconds": rec.train_seconds, "val_images": val_n,
        "best_val_accuracy": best[0] if best else None, "best_epoch": best[1] if best else None,
        "final_val_accuracy": float(va[-1]) if len(va) and np.isfinite(va[-1]) else None,
        "test_images": test_n, "test_accuracy": test if tested else None, "test_set": _test_set_text(key),
        "tested": tested, "untested": m.get("tested") is False,   # fit(test=False): a tuning trial
        # Not shown: what seed groups and the test-set check compare.
        "test_key": key,
        "experiment": (json.dumps({k: v for k, v in config.items() if k not in SEED_ONLY}, sort_keys=True,
                                  default=str) if config else None),
    }
    for k, _, kind in COLUMNS:
        if kind in ("val", "test"):
            n = val_n if kind == "val" else test_n
            row[f"{k}_se"] = accuracy_se(row[k], n) if row[k] is not None and n else None
    return row


def cell(row: dict[str, Any], key: str, kind: str) -> str:
    """A table cell: accuracies as ``61.20% ± 2.18`` (one standard error, in points)."""
    if kind in ("val", "test"):
        if key == "test_accuracy" and row.get("untested"):
            return NOT_TESTED
        return with_se(row[key], row["val_images" if kind == "val" else "test_images"])
    return fmt(row[key], kind)


# ----------------------------------------------------------------------------- what compares
@dataclass
class SeedGroup:
    """Runs whose configs differ only in ``SEED_ONLY`` keys, tested on the same images."""
    runs: list[str]
    seeds: list[Any]
    stats: dict[str, tuple[float, float, float, float, int]]   # key -> (mean, std, min, max, n)


GROUPED = (("best_val_accuracy", "best val accuracy"), ("final_val_accuracy", "final val accuracy"),
           ("test_accuracy", "test accuracy"))


def seed_groups(rows: Sequence[dict[str, Any]]) -> list[SeedGroup]:
    """Runs repeated over seeds, each group with the mean and spread (sample standard deviation
    over the seeds, and the range) of its accuracies."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("experiment") is not None:
            groups.setdefault((r["experiment"], r.get("test_key")), []).append(r)
    found = []
    for members in groups.values():
        if len(members) < 2 or len({json.dumps(m["seed"], default=str) for m in members}) < 2:
            continue
        stats = {}
        for key, _ in GROUPED:
            values = np.array([m[key] for m in members if m[key] is not None], dtype=np.float64)
            if len(values):
                std = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
                stats[key] = (float(values.mean()), std, float(values.min()), float(values.max()), len(values))
        found.append(SeedGroup([m["run"] for m in members], [m["seed"] for m in members], stats))
    return found


def spread_text(stat: tuple[float, float, float, float, int] | None) -> str:
    """``61.20% ± 1.10 (59.90–62.40%, 3 seeds)``: mean ± standard deviation over seeds, in points."""
    if stat is None:
        return "–"
    mean, std, low, high, n = stat
    sd = f" ± {100 * std:.2f}" if np.isfinite(std) else ""
    return f"{mean:.2%}{sd} ({100 * low:.2f}–{high:.2%}, {n} seed{'s' * (n != 1)})"


def comparison_warnings(rows: Sequence[dict[str, Any]]) -> list[str]:
    """What makes the test accuracies side by side misleading: runs tested on different images."""
    warnings = []
    tested = [r for r in rows if r.get("test_key") is not None]
    sets: dict[tuple, list[str]] = {}
    for r in tested:
        sets.setdefault(r["test_key"], []).append(r["run"])
    # A run from an older cnnlab records only its test size: it joins the one known set of that size.
    for key in [k for k in sets if k[1] is None]:
        same_size = [k for k in sets if k[1] is not None and k[0] == key[0]]
        if len(same_size) == 1:
            sets[same_size[0]] += sets.pop(key)
    if len(sets) > 1:
        parts = [f"{', '.join(runs)} on {key[0]:,} images" + (f" ({_test_set_text(key)})" if key[1] else "")
                 for key, runs in sorted(sets.items(), key=lambda kv: -(kv[0][0] or 0))]
        warnings.append("these runs were tested on different test sets, so their test accuracies do not "
                        "compare: " + "; ".join(parts))
    unchecked = [r["run"] for r in tested if r["test_key"][1] is None]
    if unchecked and len(tested) > 1:
        warnings.append(f"{', '.join(unchecked)}: metrics.json records the test size but not which images "
                        f"(written by an older cnnlab), so only the sizes were compared")
    untested = [r["run"] for r in rows if r.get("untested")]
    if untested:
        warnings.append(f"{', '.join(untested)}: not tested (trained with the test split unread, e.g. a "
                        f"tuning trial scored on validation only)")
    return warnings


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
    writer.writerow(CSV_KEYS)
    writer.writerows([["" if r[k] is None else r[k] for k in CSV_KEYS] for r in rows])
    write_text(out / "compare.csv", buf.getvalue())

    tests = [r["test_accuracy"] for r in rows]
    best = max((t for t in tests if t is not None), default=None)
    classes = ["best" if best is not None and t == best else "" for t in tests]
    cells = [[cell(r, k, kind) for k, _, kind in COLUMNS] for r in rows]
    numeric = [j >= TEXT_COLUMNS for j in range(len(COLUMNS))]
    sources = "".join(f"<li><code>{esc(label)}</code>: <code>{esc(rec.path.resolve())}</code></li>"
                      for rec, label in zip(records, labels))
    warnings = "".join(f'<div class="finding warn">{esc(w)}</div>' for w in comparison_warnings(rows))
    groups = seed_groups(rows)
    seeds = "" if not groups else f"""
<h2>Repeated over seeds</h2>
<p class="sub">Runs whose configs differ only in {esc(', '.join(SEED_ONLY))}, tested on the same images: the mean
± the standard deviation over seeds (and the range). A difference between two configs smaller than these
spreads is the seed's, not the config's.</p>
{table(["runs", "seeds", *(h for _, h in GROUPED)], [[", ".join(g.runs), fmt(g.seeds),
       *(spread_text(g.stats.get(k)) for k, _ in GROUPED)] for g in groups], [False, False, True, True, True])}"""
    body = f"""
<h1>cnnlab: {len(rows)} run{'s' if len(rows) != 1 else ''} compared</h1>
<p class="sub">Written {esc(datetime.now().isoformat(timespec='seconds'))}; the best test accuracy is highlighted.
Each accuracy ± one standard error (in points), from the number of images it was measured on: runs closer
than that are not told apart by these splits.</p>
{warnings}
<h2>Runs</h2>
{table([h for _, h, _ in COLUMNS], cells, numeric, classes)}{seeds}
<h2>Curves</h2>
<div class="grid"><div>{img(out / "val_accuracy.png", "validation accuracy per epoch of every run")}</div>
<div>{img(out / "loss.png", "loss per epoch of every run")}</div></div>
<h2>Run folders</h2><ul>{sources}</ul>"""
    html_path = out / "compare.html"
    write_text(html_path, page("cnnlab compare", body))
    return html_path, rows


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    """The comparison for the terminal: the table (accuracies ± one standard error), then the
    seed groups and the warnings."""
    cells = [[h for _, h, _ in COLUMNS]] + [[cell(r, k, kind) for k, _, kind in COLUMNS] for r in rows]
    widths = [max(len(row[j]) for row in cells) for j in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if j < TEXT_COLUMNS else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.append("accuracies ± one standard error, in points, from the split's size")
    for g in seed_groups(rows):
        lines.append(f"seeds {fmt(g.seeds)} of one config ({', '.join(g.runs)}): mean ± std over seeds")
        lines += [f"  {head}: {spread_text(g.stats.get(key))}" for key, head in GROUPED if key in g.stats]
    lines += [f"warning: {w}" for w in comparison_warnings(rows)]
    return "\n".join(lines)
