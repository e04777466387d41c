"""Pictures of what a network computes: first-layer filters, feature maps, Grad-CAM panels and
overlays. Drawn from the numbers ``cnnlab.models.inspect`` computes; nothing here runs a model."""
from __future__ import annotations

import math

import numpy as np
from torch import nn

from cnnlab.models.inspect import MAX_FILTERS, LayerChoice, Stage
from cnnlab.report.plots import overlay, plt

FILTER_COLUMNS = 8


def _mosaic(tiles: np.ndarray, pad: int, fill: float) -> tuple[np.ndarray, list[float]]:
    """Tiles (n, h, w[, c]) side by side with ``pad`` pixels of ``fill`` between them; returns
    the image and the x centre of each tile (for its label)."""
    n, h, w = tiles.shape[:3]
    out = np.full((h, n * w + (n - 1) * pad, *tiles.shape[3:]), fill, dtype=np.float32)
    centres = []
    for i, t in enumerate(tiles):
        x0 = i * (w + pad)
        out[:, x0:x0 + w] = t
        centres.append(x0 + (w - 1) / 2)
    return out, centres


def _show_image(ax, image: np.ndarray, title: str) -> None:
    grey = image.ndim == 2 or image.shape[-1] == 1
    ax.imshow(image[..., 0] if grey and image.ndim == 3 else image, cmap="gray" if grey else None,
              vmin=0, vmax=255, interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def _tile_row(ax, img: np.ndarray, centres: list[float], labels: list[str], **imshow) -> None:
    """One axes: a mosaic row with a small label under each tile (text, not ticks: cheaper)."""
    ax.imshow(img, interpolation="nearest", **imshow)
    ax.set_anchor("W")
    ax.axis("off")
    for x, label in zip(centres, labels):
        ax.text(x, img.shape[0] - 0.5, label, ha="center", va="top", fontsize=6)


def filters_figure(name: str, conv: nn.Conv2d, tiles: np.ndarray):
    shown = tiles[:MAX_FILTERS]
    rows = math.ceil(len(shown) / FILTER_COLUMNS)
    k = shown.shape[1]
    fig, axes = plt.subplots(rows, 1, figsize=(FILTER_COLUMNS * 0.75, rows * 0.9 + 0.7), squeeze=False)
    for r, ax in enumerate(axes[:, 0]):
        part = shown[r * FILTER_COLUMNS:(r + 1) * FILTER_COLUMNS]
        img, centres = _mosaic(part, pad=max(1, k // 3), fill=1.0)
        _tile_row(ax, img[..., 0] if img.shape[-1] == 1 else img, centres,
                  [str(r * FILTER_COLUMNS + i) for i in range(len(part))], cmap="gray", vmin=0, vmax=1)
    colour = "RGB" if tiles.shape[-1] == 3 else ("grey" if conv.in_channels == 1 else
                                                 f"mean of {conv.in_channels} channels")
    more = f", first {len(shown)} shown" if len(tiles) > len(shown) else ""
    fig.suptitle(f"first convolution {name}: {conv.out_channels} kernels {k}x{shown.shape[2]} "
                 f"over {colour}{more}\neach scaled to its own min-max", fontsize=9)
    fig.subplots_adjust(hspace=0.45, top=1 - 0.55 / fig.get_figheight())
    return fig


def feature_maps_figure(image: np.ndarray, stages: list[Stage]):
    fig, axes = plt.subplots(len(stages) + 1, 1, figsize=(8, 1.5 * (len(stages) + 1)), squeeze=False)
    axes = axes[:, 0]
    h, w, c = image.shape
    _show_image(axes[0], image, "")
    axes[0].set_anchor("W")
    axes[0].set_title(f"input {c}x{h}x{w} (C x H x W)", loc="left", fontsize=8)
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    for n, (ax, st) in enumerate(zip(axes[1:], stages), 1):
        img, centres = _mosaic(st.maps, pad=max(1, st.maps.shape[1] // 16), fill=np.nan)
        _tile_row(ax, img, centres, [f"ch {i}" for i in st.channels], cmap=cmap,
                  vmin=float(np.nanmin(img)), vmax=float(np.nanmax(img)) + 1e-12)
        C, H, W = st.output_shape
        ax.set_title(f"stage {n}: {st.name} ({st.type}) -> {C}x{H}x{W}; strongest {len(st.channels)} "
                     f"of {C} channels, one colour scale per row", loc="left", fontsize=8)
    fig.subplots_adjust(hspace=0.5, top=1 - 0.1 / fig.get_figheight(), bottom=0.2 / fig.get_figheight())
    return fig


def gradcam_figure(image: np.ndarray, panels: list[tuple[str, np.ndarray]], top: list[dict],
                   layer: LayerChoice, predicted: str):
    n = 2 + len(panels)
    fig, axes = plt.subplots(1, n, figsize=(2.9 * n, 3.3), gridspec_kw={"width_ratios": [1] * (n - 1) + [1.3]})
    h, w, c = image.shape
    _show_image(axes[0], image, f"input {w}x{h}")
    for ax, (title, heat) in zip(axes[1:], panels):
        _show_image(ax, overlay(image, heat), title)
    ax = axes[-1]
    names = [t["class"] for t in top][::-1]
    probs = [t["probability"] for t in top][::-1]
    ax.barh(range(len(names)), probs, color=["tab:red" if nm == predicted else "tab:blue" for nm in names])
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability", fontsize=7)
    ax.tick_params(axis="x", labelsize=7)
    for i, p in enumerate(probs):
        ax.text(min(p + 0.02, 0.8), i, f"{p:.1%}", va="center", fontsize=7)
    ax.set_title(f"top {len(top)}", fontsize=8)
    C, H, W = layer.output_shape
    fig.suptitle(f"Grad-CAM at {layer.name} ({type(layer.module).__name__}, {C}x{H}x{W}): "
                 f"red = regions that raise the class's score", fontsize=8)
    fig.tight_layout()
    return fig
