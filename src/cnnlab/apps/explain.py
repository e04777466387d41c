"""``cnnlab explain``: first-layer filters, per-stage feature maps and Grad-CAM of a run's
model on images, written as pictures and a summary; and Grad-CAM overlays for the report and
the web page. The numbers come from ``cnnlab.models.inspect``, the pictures from
``cnnlab.report.explain``."""
from __future__ import annotations

import difflib
import io
import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from cnnlab.core.errors import CnnlabError
from cnnlab.core.files import write_json
from cnnlab.core.metrics import check_top_k, most_probable
from cnnlab.models.inspect import filter_tiles, gradcam, gradcam_heatmaps, image_tensor, inspect_image
from cnnlab.report.explain import feature_maps_figure, filters_figure, gradcam_figure
from cnnlab.report.plots import HEAT_ALPHA, overlay, save_figure

# Overlays for web/HTML are upscaled (nearest for pixels, bilinear for heat) to at least this.
OVERLAY_MIN_SIDE = 128
_SAFE_STEM = re.compile(r"[^A-Za-z0-9._-]")


def gradcam_overlays(model: nn.Module, images: np.ndarray, class_indices: Sequence[int | None], *,
                     layer: str | None = None, alpha: float = HEAT_ALPHA) -> np.ndarray:
    """uint8 (N, H, W, 3): each image overlaid with its Grad-CAM (see ``gradcam_heatmaps``)."""
    heats = gradcam_heatmaps(model, images, class_indices, layer=layer)
    return (np.stack([overlay(img, heat, alpha) for img, heat in zip(images, heats)]) if len(images)
            else np.zeros((0, *images.shape[1:3], 3), np.uint8))


def _load_for_run(run, image) -> np.ndarray:
    from cnnlab.engine.inference import fit_to_model
    if isinstance(image, np.ndarray):
        return fit_to_model(run, image[None])[0]
    return run.load_image(image if isinstance(image, bytes) else Path(image))


def gradcam_overlay_png(run, image: str | Path | bytes | np.ndarray, class_index: int | None = None, *,
                        layer: str | None = None, device: str | torch.device = "cpu",
                        alpha: float = HEAT_ALPHA, min_side: int = OVERLAY_MIN_SIDE) -> bytes:
    """PNG bytes of ``image`` (a file, encoded bytes, or a uint8 (H, W[, C]) array; resized to
    the run's input as predict does) with its Grad-CAM for ``class_index`` (default: the
    predicted class) overlaid, upscaled to at least ``min_side`` pixels. For the HTML report
    and the web page; unreadable images raise CnnlabError."""
    img = _load_for_run(run, image)                          # (H, W, C) uint8 at the input size
    model = run.model(device)
    heat, _ = gradcam(model, image_tensor(img), layer, class_index)
    h, w = img.shape[:2]
    scale = max(1, math.ceil(min_side / min(h, w)))
    size = (w * scale, h * scale)
    big = np.asarray(Image.fromarray(img[..., 0] if img.shape[2] == 1 else img).resize(size, Image.Resampling.NEAREST))
    big_heat = np.asarray(Image.fromarray(heat, "F").resize(size, Image.Resampling.BILINEAR))
    buf = io.BytesIO()
    Image.fromarray(overlay(big, big_heat, alpha), "RGB").save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- commands
def class_index(class_names: list[str], name: str, given_as: str = "--class") -> int:
    """The index of class ``name`` (or of a number given as text); CnnlabError with close names.
    ``given_as`` names the option or field the user typed it into, for the message."""
    if name in class_names:
        return class_names.index(name)
    if name.isdigit() and int(name) < len(class_names):
        return int(name)
    close = difflib.get_close_matches(name, class_names, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise CnnlabError(f"{given_as} {name!r} is not one of the run's classes: {hint}"
                      f"known: {', '.join(class_names)}")


def explain_image(model: nn.Module, image: np.ndarray, class_names: list[str], out: str | Path, *,
                  layer: str | None = None, class_name: str | None = None, top_k: int = 5,
                  info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write filters.png, feature_maps.png, gradcam.png and summary.json into ``out`` for one
    uint8 (H, W, C) image already at the model's input shape; return the summary (``info``,
    e.g. the run and image paths, goes first in it). Two forward passes and one backward pass
    per Grad-CAM class."""
    check_top_k(top_k)
    out = Path(out)
    x = image_tensor(image)
    shape = tuple(x.shape)
    extra = class_index(class_names, class_name) if class_name is not None else None
    seen = inspect_image(model, x, layer=layer, classes=[None, extra] if extra is not None else [None])
    target, conv_name, conv, stages, heats, logits = (seen.target, seen.first_conv_name, seen.first_conv,
                                                      seen.stages, seen.heatmaps, seen.logits)
    probs = torch.softmax(torch.from_numpy(logits), 0).numpy()
    pred = int(probs.argmax())
    top = most_probable(probs[None], class_names, top_k)[0]
    panels = [(f"predicted: {class_names[pred]} {probs[pred]:.1%}", heats[0])]
    if extra is not None and extra != pred:
        panels.append((f"--class {class_names[extra]} {probs[extra]:.1%}", heats[1]))

    save_figure(filters_figure(conv_name, conv, filter_tiles(conv)), out / "filters.png")
    save_figure(feature_maps_figure(image, stages), out / "feature_maps.png")
    save_figure(gradcam_figure(image, panels, top, target, class_names[pred]), out / "gradcam.png")
    summary = {
        **(info or {}),
        "input_shape": list(shape),
        "predicted": {"class": class_names[pred], "index": pred, "probability": float(probs[pred])},
        "top": top,
        "probabilities": {n: float(p) for n, p in zip(class_names, probs)},
        "layer": {"name": target.name, "type": type(target.module).__name__,
                  "output_shape": list(target.output_shape), "default": layer is None},
        "gradcam_classes": [class_names[pred]] + ([class_names[extra]] if extra is not None and len(panels) > 1 else []),
        "first_conv": {"name": conv_name, "weight_shape": list(conv.weight.shape)},
        "stages": [{"name": s.name, "type": s.type, "output_shape": list(s.output_shape),
                    "channels_shown": s.channels} for s in stages],
        "files": ["filters.png", "feature_maps.png", "gradcam.png", "summary.json"],
    }
    write_json(out / "summary.json", summary)
    return summary


def _folder_names(images: Sequence[Path]) -> list[str]:
    """One safe, distinct folder name per image: its stem, then -2, -3 for repeats."""
    seen: dict[str, int] = {}
    names = []
    for p in images:
        stem = _SAFE_STEM.sub("_", Path(p).stem).lstrip(".") or "image"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return names


def explain_run(run_path: str | Path, images: Sequence[str | Path], *, out: str | Path | None = None,
                layer: str | None = None, class_name: str | None = None, top_k: int = 5,
                device: str = "auto") -> list[dict[str, Any]]:
    """``cnnlab explain``: for each image, a folder ``out/<image stem>/`` (default out:
    ``RUN/explain``) with the three pictures and summary.json. Every image is read before
    anything is written, so an unreadable one leaves no partial output."""
    from cnnlab.core.hardware import pick_device
    from cnnlab.engine.runs import load_run
    run = load_run(run_path)
    dev = pick_device(device)
    arrays = [run.load_image(Path(p)) for p in images]
    root = Path(out) if out is not None else run.explain_dir
    model = run.model(dev)
    results = []
    for path, folder, image in zip(images, _folder_names([Path(p) for p in images]), arrays):
        info = {"run": str(run.path), "arch": run.card["arch"], "image": str(path), "device": str(dev)}
        summary = explain_image(model, image, run.class_names, root / folder, layer=layer,
                                class_name=class_name, top_k=top_k, info=info)
        results.append({**summary, "folder": str(root / folder)})
    return results
