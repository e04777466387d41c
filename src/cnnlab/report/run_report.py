"""``report.html``: one page per run, built only from the run folder."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from cnnlab.core.files import write_text
from cnnlab.core.metrics import confusion_matrix
from cnnlab.core.run_folder import RunFolder, finite
from cnnlab.report.diagnose import Finding, read_curves
from cnnlab.report.html import esc, fmt, img, kv_table, page, table
from cnnlab.report.plots import per_class_accuracy

METRIC_LABELS = {  # metrics.json key -> (label, format)
    "test_accuracy": ("test accuracy", "pct"), "test_loss": ("test loss", ""),
    "best_val_accuracy": ("best validation accuracy", "pct"), "best_epoch": ("best epoch", ""),
    "final_val_accuracy": ("final validation accuracy", "pct"), "epochs": ("epochs trained", ""),
    "steps": ("optimizer steps", ""), "train_seconds": ("training time", "s"),
    "parameters": ("parameters", ""), "test_images": ("test images", ""),
    "tta": ("test-time augmentation", ""), "keep": ("weights kept", ""),
}
PLOTS = (  # file, heading, caption
    ("accuracy.png", "Accuracy", "Training accuracy is measured on augmented batches while the weights change; "
                                 "validation accuracy at the end of each epoch."),
    ("loss.png", "Loss", "Cross-entropy; the gap between the lines is what the model memorised."),
    ("lr.png", "Learning rate", "The learning rate at the end of each epoch."),
    ("confusion_matrix.png", "Confusion matrix", "Row i shows where the test images of class i went; "
                                                 "off-diagonal cells are confusions."),
    ("per_class_accuracy.png", "Accuracy per class", "Classes below the overall accuracy are in red."),
    ("mistakes.png", "Most confident mistakes", "Test images the model got wrong while most sure of itself: "
                                                "look for label errors and look-alike classes."),
    ("gradcam_mistakes.png", "Grad-CAM of the mistakes", "Where the network looked when it got these wrong."),
    ("gradcam_correct.png", "Grad-CAM of right answers", "Where it looked on the test images it got right "
                                                         "with the most confidence: what it has learned to see."),
    ("samples.png", "Training samples", "What the model saw, as stored in the run folder."),
)
PLOT_GROUPS = (("accuracy.png", "loss.png", "lr.png"), ("confusion_matrix.png", "per_class_accuracy.png"),
               ("mistakes.png", "gradcam_mistakes.png"), ("gradcam_correct.png", "samples.png"))   # side by side when wide enough


def findings_html(findings: list[Finding]) -> str:
    return "".join(f'<div class="finding {esc(f.level)}">{esc(f.text)}</div>' for f in findings)


def history_table(rec: RunFolder) -> str:
    h = rec.history
    keys = [k for k in ("loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds") if k in h]
    best = rec.best_val
    rows, classes = [], []
    for i in range(rec.epochs):
        row: list[Any] = [i + 1]
        for k in keys:
            v = h[k][i] if i < len(h[k]) else None
            row.append(fmt(v, "pct" if k.endswith("accuracy") else ("s" if k == "seconds" else "")))
        rows.append(row)
        classes.append("best" if best and best[1] == i + 1 else "")
    return table(["epoch", *keys], rows, [True] * (len(keys) + 1), classes)


def per_class_table(rec: RunFolder) -> str:
    acc = per_class_accuracy(rec)
    if not acc:
        return "<p>No per-class results in this run folder.</p>"
    names = rec.class_names
    ev = rec.evaluation
    counts = None
    if ev is not None and "logits" in ev and len(ev["logits"]):
        counts = confusion_matrix(ev["labels"], ev["logits"].argmax(1), len(names))
    rows = []
    for i, name in enumerate(names):
        row: list[Any] = [name, fmt(acc.get(name), "pct")]
        if counts is not None:
            total = int(counts[i].sum())
            off = counts[i].copy()
            off[i] = 0
            j = int(off.argmax())
            row += [total, f"{names[j]} ({off[j] / total:.0%})" if total and off[j] else "–"]
        rows.append(row)
    header = ["class", "test accuracy"] + (["test images", "most often mistaken for"] if counts is not None else [])
    return f'<div class="scroll">{table(header, rows, [False, True, True, False])}</div>'


def metrics_table(rec: RunFolder) -> str:
    m = rec.metrics
    if not m:
        return "<p>No metrics.json: the run did not finish its test evaluation.</p>"
    pairs = [(label, fmt(m[k], kind)) for k, (label, kind) in METRIC_LABELS.items() if k in m]
    pairs += [(k, fmt(v)) for k, v in m.items()
              if k not in METRIC_LABELS and not isinstance(v, (dict, list))]
    return kv_table(pairs)


def config_table(config: dict[str, Any]) -> str:
    from cnnlab.core.config import FIELDS
    rows, classes = [], []
    for k, v in config.items():
        changed = k in FIELDS and FIELDS[k].default is not dataclasses.MISSING and FIELDS[k].default != v
        rows.append([k, fmt(v)])
        classes.append("best" if changed else "")
    return (f'<p class="sub">Highlighted: set differently from cnnlab\'s defaults.</p>'
            f'<div class="scroll">{table(["key", "value"], rows, None, classes)}</div>')


def model_table(card: dict[str, Any]) -> str:
    pairs = [("architecture", card.get("arch")), ("classes", card.get("num_classes")),
             ("input (H, W)", fmt(card.get("input_size"))), ("channels", card.get("in_channels")),
             ("normalisation mean", fmt([round(x, 4) for x in card.get("mean") or []])),
             ("normalisation std", fmt([round(x, 4) for x in card.get("std") or []]))]
    return kv_table([(k, fmt(v)) for k, v in pairs])


def render_report(rec: RunFolder) -> str:
    card, cfg, m = rec.card, rec.saved_config, rec.metrics
    findings = read_curves(rec.history, num_classes=len(rec.class_names) or None)
    test = m.get("test_accuracy")
    sub = [f"{card.get('arch', '?')} on {cfg.get('data', '?')}", f"{rec.epochs} epochs"]
    if finite(test):
        sub.append(f"test accuracy {test:.2%}")
    if rec.best_val:
        sub.append(f"best validation accuracy {rec.best_val[0]:.2%} (epoch {rec.best_val[1]})")
    if rec.environment.get("started"):
        sub.append(f"started {rec.environment['started']}")
    plots = rec.plots_dir
    figures = ""
    for group in PLOT_GROUPS:
        cells = "".join(f"<div><h3>{esc(head)}</h3>{img(plots / f, head, cap)}</div>"
                        for f, head, cap in PLOTS if f in group and (plots / f).exists())
        figures += f'<div class="grid">{cells}</div>' if cells else ""
    body = f"""
<h1>cnnlab run <code>{esc(rec.name)}</code></h1>
<p class="sub">{esc(' · '.join(sub))}</p>
<h2>Reading the curves</h2>
{findings_html(findings)}
<div class="cols"><div><h2>Final metrics</h2>{metrics_table(rec)}</div>
<div><h2>Model</h2>{model_table(card)}</div></div>
<h2>Plots</h2>
{figures or "<p>No plots in this run folder.</p>"}
<h2>Per-class results</h2>
{per_class_table(rec)}
<h2>History</h2>
<p class="sub">One row per epoch; the best validation epoch is highlighted.</p>
{history_table(rec)}
<div class="cols"><div><h2>Config</h2>{config_table(cfg) if cfg else "<p>No config.json.</p>"}</div>
<div><h2>Environment</h2>{kv_table((k, fmt(v)) for k, v in rec.environment.items()) if rec.environment
                         else "<p>Not recorded.</p>"}</div></div>
<p class="sub">Written by cnnlab from the files in this run folder; rebuild with
<code>cnnlab report {esc(rec.path)}</code>.</p>"""
    return page(f"cnnlab run {rec.name}", body)


def write_html(rec: RunFolder) -> Path:
    out = rec.report_file
    write_text(out, render_report(rec))
    return out

