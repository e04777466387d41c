"""Predictions from a trained run on image files or arrays, any size or mode."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from cnnlab.data.images import load_image, to_array
from cnnlab.errors import CnnlabError


def fit_to_model(run, images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W[, C]) arrays of any size/channels -> the run's input shape."""
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.dtype != np.uint8 or images.shape[-1] not in (1, 3, 4):
        raise CnnlabError(f"expected uint8 images shaped (N, H, W, C) with C in 1, 3, 4; "
                          f"got {images.dtype} {images.shape}")
    h, w = run.input_size
    if images.shape[1:] == (h, w, run.in_channels):
        return images
    modes = {1: "L", 3: "RGB", 4: "RGBA"}
    return np.stack([to_array(Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im, modes[im.shape[-1]]),
                              (w, h), run.in_channels) for im in images])


@torch.no_grad()
def logits_for(run, images: np.ndarray, device="cpu", batch_size: int = 256) -> torch.Tensor:
    """float32 (N, classes) logits for uint8 images already at the run's input shape."""
    model = run.model(device)
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.as_tensor(images[i:i + batch_size]).to(device).permute(0, 3, 1, 2).float().div_(255)
        out.append(model(x).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, len(run.class_names))


def top_classes(class_names: list[str], logits: torch.Tensor, k: int) -> list[list[dict[str, Any]]]:
    probs = torch.softmax(logits, 1)
    p, idx = probs.topk(max(1, min(k, probs.shape[1])), dim=1)
    return [[{"class": class_names[j], "probability": float(q)} for q, j in zip(pr, ix.tolist())]
            for pr, ix in zip(p, idx)]


def predict(run, inputs: Sequence[str | Path] | np.ndarray, *, top_k: int = 5, device="cpu",
            batch_size: int = 256) -> list[dict[str, Any]]:
    """One dict per input: ``{"file": path or None, "top": [{"class", "probability"}, ...]}``."""
    if top_k < 1:
        raise CnnlabError(f"--top-k must be at least 1, got {top_k}")
    h, w = run.input_size
    if isinstance(inputs, np.ndarray):
        images, names = fit_to_model(run, inputs), [None] * len(inputs)
    else:
        names = [str(p) for p in inputs]
        images = (np.stack([load_image(p, (w, h), run.in_channels) for p in inputs]) if names
                  else np.zeros((0, h, w, run.in_channels), np.uint8))
    tops = top_classes(run.class_names, logits_for(run, images, device, batch_size), top_k)
    return [{"file": n, "top": t} for n, t in zip(names, tops)]
