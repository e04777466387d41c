"""The run's pictures, drawn with matplotlib's non-interactive Agg backend (never a window)."""
from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cnnlab.fileio import read_json, write_bytes  # noqa: E402


def save_figure(fig, path: Path) -> None:
    """Render to PNG bytes, then write atomically (the lesson saved after show(): a blank file)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_bytes(path, buf.getvalue())


def curve_plot(history: dict, key: str, title: str, ylabel: str):
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = np.arange(1, len(history.get(key, [])) + 1)
    ax.plot(epochs, history[key], marker="o", label="train")
    val = [np.nan if v is None else v for v in history.get(f"val_{key}", [])]
    if val and not all(np.isnan(val)):
        ax.plot(epochs, val, marker="o", label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def image_grid(images: np.ndarray, titles: list[str], ncols: int, colors: list[str] | None = None):
    n = len(images)
    nrows = max(1, math.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * 1.3, nrows * 1.45), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            img = images[i]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                      vmin=0, vmax=255)
            ax.set_title(titles[i], fontsize=7, color=(colors[i] if colors else "black"))
    fig.tight_layout()
    return fig


def samples_figure(images: np.ndarray, labels: np.ndarray, class_names: list[str], per_class: int = 8):
    """One row per class (up to 10 shown as columns of the lesson's 5x5 grid style)."""
    order = np.argsort(labels, kind="stable")
    images, labels = images[order], labels[order]
    return image_grid(images, [class_names[i] for i in labels], ncols=per_class)


def write_plots(run: str | Path) -> list[Path]:
    run = Path(run)
    plots = run / "plots"
    history = read_json(run / "history.json")
    card = read_json(run / "model.json")
    written = []
    for key, title, ylabel in (("accuracy", "Accuracy per epoch", "accuracy"), ("loss", "Loss per epoch", "loss")):
        save_figure(curve_plot(history, key, title, ylabel), plots / f"{key}.png")
        written.append(plots / f"{key}.png")
    if (run / "evaluation.npz").exists():
        with np.load(run / "evaluation.npz") as ev:
            fig = samples_figure(ev["sample_images"], ev["sample_labels"], card["class_names"])
        save_figure(fig, plots / "samples.png")
        written.append(plots / "samples.png")
    return written
