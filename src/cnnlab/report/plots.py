"""The run's pictures, drawn with matplotlib's non-interactive Agg backend (never a window).

Image grids are one mosaic array drawn with a single ``imshow`` plus text labels (one axes
per image made an 80-image grid take 2 s; the mosaic takes ~0.1 s), and every figure is laid
out at fixed margins rather than with ``bbox_inches="tight"``, which draws everything twice.
A 10-class run's seven plots take about 1 s of CPU.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from cnnlab.core.files import write_bytes  # noqa: E402
from cnnlab.core.metrics import confusion_matrix  # noqa: E402
from cnnlab.core.metrics import per_class_accuracy as per_class  # noqa: E402
from cnnlab.core.run_folder import RunFolder, read_run  # noqa: E402

DPI = 110
TRAIN, VAL = "#1f77b4", "#d62728"
RIGHT, WRONG = "#1a7f37", "#c62828"
MAX_SAMPLE_CLASSES = 20      # beyond this a samples grid stops being readable
MIN_TICK_POINTS = 5.0        # smallest class-name font on the confusion matrix before naming sparsely
ANNOTATE_CLASSES = 15        # write the rate in each confusion-matrix cell up to this many classes
MISTAKE_COLUMNS = 6
CAPTION_POINTS = 7           # font of the captions under each mistake
PAD = 2                      # pixels of white between mosaic tiles
# Grad-CAM colour map and blend weight: "jet" is the convention of the paper's figures.
HEAT_CMAP = "jet"
HEAT_ALPHA = 0.5

PLOT_FILES = ("accuracy.png", "loss.png", "lr.png", "samples.png", "confusion_matrix.png",
              "per_class_accuracy.png", "mistakes.png", "gradcam_mistakes.png", "gradcam_correct.png")


def figure(width: float, height: float) -> tuple[Figure, plt.Axes]:
    """A figure not registered with pyplot's window manager (nothing to close, nothing to show)."""
    fig = Figure(figsize=(width, height), dpi=DPI)
    return fig, fig.add_subplot()


def save_figure(fig: Figure, path: Path, *, tight: bool = True) -> None:
    """Render to PNG bytes, then write atomically (the lesson saved after show(): a blank file).

    ``tight`` crops to the drawn content, at the cost of drawing twice; the run plots are laid
    out at fixed margins and pass False.
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight" if tight else None)
    plt.close(fig)  # a no-op for figures made by figure() above; frees pyplot ones from callers
    write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------- curves
def clean_series(values: Sequence) -> np.ndarray:
    """None (no validation) and NaN/inf (a diverged epoch) become gaps in the line."""
    a = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    a[~np.isfinite(a)] = np.nan
    return a


def curve_plot(history: dict, key: str, title: str, ylabel: str) -> Figure:
    """Train and validation ``key`` per epoch; the best validation epoch is marked."""
    fig, ax = figure(6, 3.8)
    train = clean_series(history.get(key) or [])
    epochs = np.arange(1, len(train) + 1)
    ax.plot(epochs, train, marker="o", ms=3, color=TRAIN, label="train")
    val = clean_series(history.get(f"val_{key}") or [])[:len(train)]
    if np.isfinite(val).any():
        ax.plot(epochs[:len(val)], val, marker="o", ms=3, color=VAL, label="validation")
        best = int(np.nanargmax(val) if key == "accuracy" else np.nanargmin(val))
        ax.axvline(best + 1, color=VAL, alpha=0.25, lw=1, ls="--")
        shown = f"{val[best]:.1%}" if key == "accuracy" else f"{val[best]:.3g}"
        right_half = best + 1 > (len(train) + 1) / 2
        ax.annotate(f"best {shown} (epoch {best + 1})", (best + 1, val[best]), textcoords="offset points",
                    xytext=(-6 if right_half else 6, -14 if key == "accuracy" else 8),
                    ha="right" if right_half else "left", fontsize=8, color=VAL)
    if len(history.get(key) or []) and not np.isfinite(train).all():
        ax.text(0.5, 0.5, "loss became NaN/inf", transform=ax.transAxes, ha="center", color=WRONG)
    if key == "accuracy":
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.14, top=0.91)  # fixed: no tight-bbox redraw
    return fig


def lr_plot(history: dict) -> Figure:
    fig, ax = figure(6, 3)
    lr = clean_series(history.get("lr") or [])
    ax.plot(np.arange(1, len(lr) + 1), lr, marker="o", ms=3, color="#6a3d9a")
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate (end of epoch)")
    ax.set_title("Learning rate schedule")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.18, top=0.86)
    return fig


# ----------------------------------------------------------------------------- mosaics
def mosaic(images: np.ndarray, ncols: int, pad: int = PAD) -> np.ndarray:
    """(N, H, W, C) uint8 -> one (rows*(H+pad), cols*(W+pad), 3) uint8 image on white."""
    n, h, w, c = images.shape
    if c == 1:
        images = np.repeat(images, 3, axis=-1)
    elif c > 3:
        images = images[..., :3]
    nrows = max(1, math.ceil(n / ncols))
    grid = np.full((nrows, ncols, h + pad, w + pad, 3), 255, dtype=np.uint8)
    flat = grid.reshape(nrows * ncols, h + pad, w + pad, 3)
    flat[:n, :h, :w] = images
    return grid.transpose(0, 2, 1, 3, 4).reshape(nrows * (h + pad), ncols * (w + pad), 3)


def plain(text: str, limit: int = 24) -> str:
    """Class or run names as literal text: shortened, and '$' escaped so matplotlib never
    parses a name such as ``cost_$5$`` as mathtext (and fails to draw)."""
    text = str(text)
    text = text if len(text) <= limit else text[:limit - 1] + "…"
    return text.replace("$", r"\$")


def mosaic_figure(canvas: np.ndarray, tile_px: int, tile_in: float, *, left_in: float = 0.05,
                  top_in: float = 0.35, title: str = "") -> tuple[Figure, plt.Axes]:
    """A figure holding ``canvas`` at ``tile_in`` inches per ``tile_px`` pixels, laid out by hand.

    Fixed margins instead of ``bbox_inches="tight"``, which draws the whole figure twice.
    """
    scale = tile_in / tile_px                       # inches per canvas pixel
    w_in, h_in = canvas.shape[1] * scale, canvas.shape[0] * scale
    W, H = left_in + w_in + 0.05, top_in + h_in + 0.05
    fig = Figure(figsize=(W, H), dpi=DPI)
    ax = fig.add_axes((left_in / W, 0.05 / H, w_in / W, h_in / H))
    small = canvas.shape[0] <= 64 * 40
    ax.imshow(canvas, interpolation="nearest" if tile_px <= 68 and small else "antialiased", aspect="auto")
    ax.axis("off")
    if title:
        fig.text(0.5, 1 - 0.06 / H, title, ha="center", va="top", fontsize=10)
    return fig, ax


def samples_figure(images: np.ndarray, labels: np.ndarray, class_names: list[str], per_class: int = 8,
                   heading: str = "Training samples") -> Figure:
    """One row per class (first ``MAX_SAMPLE_CLASSES``), its name on the left; one imshow."""
    images, labels = np.asarray(images), np.asarray(labels)
    present = sorted(set(labels.tolist()))
    shown = present[:MAX_SAMPLE_CLASSES]
    if not shown:
        return _empty("no sample images in this run")
    h, w = images.shape[1:3]
    rows = []
    for c in shown:
        idx = np.flatnonzero(labels == c)[:per_class]
        row = np.full((per_class, *images.shape[1:]), 255, dtype=np.uint8)
        row[:len(idx)] = images[idx]
        rows.append(row)
    grid = mosaic(np.concatenate(rows), ncols=per_class)
    names = [plain(class_names[c] if 0 <= c < len(class_names) else str(c)) for c in shown]
    left = 0.15 + 0.075 * max(len(n) for n in names)    # ~0.075 in per character at 9 pt
    more = len(present) - len(shown)
    title = heading + (f" (first {len(shown)} classes; {more} more not shown)" if more > 0 else "")
    fig, ax = mosaic_figure(grid, w + PAD, 0.6 if h <= 64 else 1.0, left_in=left, title=title)
    for r, name in enumerate(names):
        ax.text(-3, r * (h + PAD) + h / 2, name, ha="right", va="center", fontsize=9, clip_on=False)
    return fig


def mistakes_figure(images: np.ndarray, true: np.ndarray, pred: np.ndarray, conf: np.ndarray,
                    class_names: list[str], ncols: int = MISTAKE_COLUMNS, *, tile_in: float = 1.5,
                    title: str | None = None) -> Figure:
    """The most confident wrong test predictions, each captioned true / predicted (confidence).

    ``tile_in``: inches per tile (a tile may hold several images side by side)."""
    n = len(images)
    if n == 0:
        return _empty("no mistakes on the test set")
    ncols = min(ncols, n)
    h, w = images.shape[1:3]
    caption = max(1, round(0.34 / tile_in * (w + PAD)))   # two 7 pt lines under each tile, in pixels
    nrows = math.ceil(n / ncols)
    grid = mosaic(images, ncols)
    band = np.full((caption, grid.shape[1], 3), 255, dtype=np.uint8)
    canvas = np.concatenate([part for r in range(nrows) for part in (grid[r * (h + PAD):(r + 1) * (h + PAD)], band)])
    row_h = h + PAD + caption
    fig, ax = mosaic_figure(canvas, w + PAD, tile_in, top_in=0.5,
                            title=title or f"Most confident mistakes on the test set ({n} shown)\n"
                                  f"green: the true class; red: what the model predicted, and how sure it was")
    fits = int(tile_in * 72 / (CAPTION_POINTS * 0.6))    # characters that fit under a tile

    def name(k: int, room: int) -> str:
        return plain(class_names[k] if 0 <= k < len(class_names) else str(k), room)

    for i in range(n):
        r, c = divmod(i, ncols)
        x, y = c * (w + PAD) + w / 2, r * row_h + h + PAD / 2
        ax.text(x, y, f"true: {name(int(true[i]), fits - 6)}", ha="center", va="top", fontsize=CAPTION_POINTS,
                color=RIGHT)
        ax.text(x, y + caption * 0.45, f"pred: {name(int(pred[i]), fits - 11)} {conf[i]:.0%}", ha="center",
                va="top", fontsize=CAPTION_POINTS, color=WRONG)
    return fig


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = HEAT_ALPHA) -> np.ndarray:
    """uint8 (H, W, 3): ``image`` (uint8 (H, W) or (H, W, 1|3)) blended with ``heatmap``
    ((H, W) in [0, 1]) coloured by HEAT_CMAP."""
    img = image[..., None] if image.ndim == 2 else image
    rgb = np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img[..., :3]
    heat = plt.get_cmap(HEAT_CMAP)(np.clip(heatmap, 0, 1))[..., :3] * 255.0
    return np.clip((1 - alpha) * rgb.astype(np.float32) + alpha * heat, 0, 255).round().astype(np.uint8)


def gradcam_figure(images: np.ndarray, heatmaps: np.ndarray, true: np.ndarray, pred: np.ndarray,
                   conf: np.ndarray, class_names: list[str], what: str) -> Figure:
    """Each test image as a pair, the image then its Grad-CAM overlay for the predicted class,
    captioned like ``mistakes_figure``; three pairs per row, one mosaic. The first
    ``len(heatmaps)`` images are shown (training stored heatmaps for those); ``what`` ends the
    title: "got these wrong"."""
    n = len(heatmaps)
    images = images[:n]
    overlays = np.stack([overlay(img, heat.astype(np.float32)) for img, heat in zip(images, heatmaps)])
    rgb = np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images[..., :3]
    gap = np.full((*rgb.shape[:2], PAD, 3), 255, dtype=np.uint8)
    pairs = np.concatenate([rgb, gap, overlays], axis=2)
    return mistakes_figure(pairs, true[:n], pred[:n], conf[:n], class_names, ncols=MISTAKE_COLUMNS // 2,
                           tile_in=3.0, title=f"Where the network looked when it {what} ({n} shown)\n"
                                              f"each image, then its Grad-CAM for the predicted class (red: "
                                              f"what raised that class's score)")


def _empty(message: str) -> Figure:
    fig, ax = figure(4, 1)
    ax.text(0.5, 0.5, message, ha="center", va="center")
    ax.axis("off")
    return fig


# ----------------------------------------------------------------------------- test results
def row_normalise(counts: np.ndarray) -> np.ndarray:
    totals = counts.sum(1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros(counts.shape, dtype=np.float64), where=totals > 0)


def text_inches(labels: Sequence[str], points: float) -> float:
    """Rough width of the longest label: DejaVu Sans averages ~0.6 em per character."""
    return max((len(t) for t in labels), default=1) * points * 0.6 / 72


def placed_axes(width_in: float, height_in: float, left: float, bottom: float, right: float,
                top: float) -> tuple[Figure, plt.Axes]:
    """A figure whose axes sits at fixed margins (inches): no tight-bbox redraw needed."""
    W, H = left + width_in + right, bottom + height_in + top
    fig = Figure(figsize=(W, H), dpi=DPI)
    return fig, fig.add_axes((left / W, bottom / H, width_in / W, height_in / H))


def confusion_figure(counts: np.ndarray, class_names: list[str]) -> Figure:
    """Row-normalised: each row is where one true class's test images went."""
    k = len(counts)
    rates = row_normalise(counts)
    side = min(max(4.5, 0.45 * k), 14)            # the matrix itself, inches
    # Every class named while the names fit their row (>= MIN_TICK_POINTS), else every step-th.
    pitch = 72 * side / k                          # points per row
    step = max(1, math.ceil(MIN_TICK_POINTS / (0.75 * pitch)))
    fs = min(9.0, 0.75 * pitch * step)
    ticks = np.arange(0, k, step)
    names = [plain(class_names[i] if i < len(class_names) else str(i)) for i in ticks]
    label_in = text_inches(names, fs) + 0.12
    steep = k > 10                                 # vertical x labels, else 45 degrees
    fig, ax = placed_axes(side, side, left=label_in + 0.35,
                          bottom=(label_in if steep else 0.72 * label_in + 0.1) + 0.35, right=1.05, top=0.35)
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
    ax.set_xticks(ticks, names, rotation=90 if steep else 45, ha="center" if steep else "right",
                  rotation_mode="anchor" if not steep else "default", fontsize=fs)
    ax.set_yticks(ticks, names, fontsize=fs)
    if k <= ANNOTATE_CLASSES:
        for i in range(k):
            for j in range(k):
                if counts[i].sum() and (rates[i, j] >= 0.005 or i == j):
                    ax.text(j, i, f"{rates[i, j]:.2f}".lstrip("0") if rates[i, j] < 1 else "1",
                            ha="center", va="center", fontsize=7 if k > 10 else 8,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    sparse = f", one class in {step} named" if step > 1 else ""
    ax.set_title(f"Confusion matrix (rows sum to 1{sparse})", fontsize=10)
    W, H = fig.get_size_inches()
    cax = fig.add_axes((ax.get_position().x1 + 0.15 / W, ax.get_position().y0, 0.18 / W, side / H))
    fig.colorbar(im, cax=cax, label="fraction of the true class")
    return fig


def per_class_figure(accuracy: dict[str, float | None], overall: float | None) -> Figure:
    """Horizontal bars, worst class at the top."""
    items = sorted(((n, a) for n, a in accuracy.items() if a is not None), key=lambda t: t[1])
    if not items:
        return _empty("no per-class accuracy in this run")
    k = len(items)
    fs = 9 if k <= 30 else 6
    names = [plain(n) for n, _ in items]
    fig, ax = placed_axes(4.8, min(max(1.6, (fs + 4) / 72 * k), 22), left=text_inches(names, fs) + 0.2,
                          bottom=0.55, right=0.3, top=0.3)
    y = np.arange(k)
    vals = np.array([a for _, a in items])
    ax.barh(y, vals, color=[WRONG if overall is not None and a < overall else TRAIN for a in vals])
    ax.set_yticks(y, names, fontsize=fs)
    ax.set_ylim(k - 0.5, -0.5)                    # worst at the top
    ax.set_xlim(0, 1)
    ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    if overall is not None:
        ax.axvline(overall, color="black", ls="--", lw=1, label=f"overall {overall:.1%}")
        ax.legend(loc="lower right", fontsize=8)
    if k <= 30:
        for yi, a in zip(y, vals):
            ax.text(min(a + 0.01, 0.9), float(yi), f"{a:.0%}", va="center", fontsize=7)
    ax.set_xlabel("test accuracy")
    ax.set_title("Test accuracy per class (worst first)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return fig


def per_class_accuracy(rec: RunFolder) -> dict[str, float | None]:
    """From metrics.json, else from the saved test logits."""
    acc = rec.metrics.get("per_class_accuracy")
    if isinstance(acc, dict) and acc:
        return acc
    ev = rec.evaluation
    if ev is None or "logits" not in ev:
        return {}
    return per_class(ev["labels"], ev["logits"].argmax(1), rec.class_names)


# ----------------------------------------------------------------------------- entry point
def write_plots(run: str | Path | RunFolder) -> list[Path]:
    """Every plot of a run folder, from its files only; returns the paths written."""
    rec = run if isinstance(run, RunFolder) else read_run(run)
    plots = rec.plots_dir
    names = rec.class_names
    figs: dict[str, Figure] = {
        "accuracy.png": curve_plot(rec.history, "accuracy", "Accuracy per epoch", "accuracy"),
        "loss.png": curve_plot(rec.history, "loss", "Loss per epoch (cross-entropy)", "loss"),
        "lr.png": lr_plot(rec.history),
    }
    ev = rec.evaluation
    if ev is not None:
        if "sample_images" in ev and len(ev["sample_images"]):
            per = int(np.bincount(ev["sample_labels"]).max())
            figs["samples.png"] = samples_figure(ev["sample_images"], ev["sample_labels"], names, per)
        if "logits" in ev and len(ev["logits"]):
            logits, labels = ev["logits"].astype(np.float64), ev["labels"]
            preds = logits.argmax(1)
            figs["confusion_matrix.png"] = confusion_figure(confusion_matrix(labels, preds, len(names)), names)
            z = logits - logits.max(1, keepdims=True)
            conf = (np.exp(z) / np.exp(z).sum(1, keepdims=True)).max(1)
            idx = ev.get("mistake_index", np.zeros(0, np.int64))
            if "mistake_images" in ev:
                figs["mistakes.png"] = mistakes_figure(ev["mistake_images"], labels[idx], preds[idx], conf[idx], names)
            # Heatmaps are absent in runs from before cnnlab stored them.
            for kind, what in (("mistake", "got these wrong"), ("correct", "got these right, most sure of itself")):
                heatmaps = ev.get(f"{kind}_heatmaps")
                if heatmaps is not None and len(heatmaps):
                    i = ev[f"{kind}_index"]
                    figs[f"gradcam_{'mistakes' if kind == 'mistake' else kind}.png"] = gradcam_figure(
                        ev[f"{kind}_images"], heatmaps, labels[i], preds[i], conf[i], names, what)
    acc = per_class_accuracy(rec)
    if acc:
        overall = rec.metrics.get("test_accuracy")
        figs["per_class_accuracy.png"] = per_class_figure(acc, overall if isinstance(overall, float) else None)
    written = []
    for name, fig in figs.items():
        save_figure(fig, plots / name, tight=False)   # every figure here is laid out by hand
        written.append(plots / name)
    for name in set(PLOT_FILES) - set(figs):    # a rebuild never leaves a stale picture behind
        (plots / name).unlink(missing_ok=True)
    return written
