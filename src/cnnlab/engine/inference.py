"""Predictions from a trained run on image files, folders or arrays, any size or mode.

Folders are walked recursively for image files (hidden files and folders skipped, symlinked
folders not followed); images are decoded ``batch_size`` at a time, so a folder of any size
needs the memory of one batch. Unreadable files become error entries and the rest go on.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from cnnlab.core.errors import CnnlabError
from cnnlab.core.files import write_text
from cnnlab.core.hardware import reuse_freed_memory
from cnnlab.core.metrics import check_top_k, most_probable
from cnnlab.data.batches import model_input
from cnnlab.data.images import IMAGE_SUFFIXES, is_image_name

# Images decoded and classified together: bounds memory whatever the folder holds.
DEFAULT_BATCH = 64


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
    return np.stack([run.image_array(Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im, modes[im.shape[-1]]))
                     for im in images])


@torch.no_grad()
def logits_for(run, images: np.ndarray, device="cpu", batch_size: int = 256) -> torch.Tensor:
    """float32 (N, classes) logits for uint8 images already at the run's input shape;
    ``CnnlabError`` where any is nan or inf (its probabilities would be meaningless)."""
    model = run.model(device, channels_last=True)
    out = []
    for i in range(0, len(images), batch_size):
        x = model_input(torch.as_tensor(images[i:i + batch_size]).to(device).permute(0, 3, 1, 2), channels_last=True)
        out.append(model(x).float().cpu())
    logits = torch.cat(out) if out else torch.zeros(0, len(run.class_names))
    bad = int((~logits.isfinite().all(1)).sum())
    if bad:
        raise CnnlabError(f"{run.path.name}: the model's outputs are nan or inf for {bad} of {len(logits)} "
                          f"image(s), so it has no prediction to give; its weights or normalisation are "
                          f"damaged: train the run again")
    return logits


def top_classes(class_names: list[str], logits: torch.Tensor, k: int) -> list[list[dict[str, Any]]]:
    return most_probable(torch.softmax(logits, 1).numpy(), class_names, k)


def predict(run, inputs: Sequence[str | Path] | np.ndarray, *, top_k: int = 5, device="cpu",
            batch_size: int = 256) -> list[dict[str, Any]]:
    """One dict per input: ``{"file": path or None, "top": [{"class", "probability"}, ...]}``.

    Raises ``CnnlabError`` on the first unreadable file; ``predict_files`` skips them instead.
    """
    check_top_k(top_k)
    if isinstance(inputs, np.ndarray):
        images = fit_to_model(run, inputs)
        tops = top_classes(run.class_names, logits_for(run, images, device, batch_size), top_k)
        return [{"file": None, "top": t} for t in tops]
    results = []
    for r in predict_files(run, [Path(p) for p in inputs], top_k=top_k, device=device,
                           batch_size=batch_size, walk=False):
        if "error" in r:
            raise CnnlabError(r["error"])
        results.append(r)
    return results


def iter_image_paths(paths: Iterable[str | Path]) -> Iterator[tuple[Path, str | None]]:
    """``(path, None)`` for each image file to classify, ``(path, message)`` for a path that
    does not exist. Files named directly are always tried; folders give their image files,
    recursively, sorted, skipping hidden names and not following symlinked folders."""
    seen: set[str] = set()
    for p in map(Path, paths):
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for f in sorted(files):
                    if is_image_name(f):
                        path = Path(root) / f
                        if str(path) not in seen:
                            seen.add(str(path))
                            yield path, None
        elif p.exists():
            if str(p) not in seen:
                seen.add(str(p))
                yield p, None
        else:
            yield p, f"{p}: no such file or folder"


def predict_files(run, paths: Iterable[str | Path], *, top_k: int = 5, device="cpu",
                  batch_size: int = DEFAULT_BATCH, walk: bool = True) -> Iterator[dict[str, Any]]:
    """Yield ``{"file", "top"}`` per image, or ``{"file", "error"}`` for one that cannot be
    read, in input order, decoding ``batch_size`` images at a time. ``walk``: expand folders."""
    check_top_k(top_k)
    if batch_size < 1:
        raise CnnlabError(f"--batch-size must be at least 1, got {batch_size}")
    listed = iter_image_paths(paths) if walk else ((Path(p), None) for p in paths)
    chunk: list[tuple[str, np.ndarray | None, str | None]] = []

    def flush() -> Iterator[dict[str, Any]]:
        good = [im for _, im, _ in chunk if im is not None]
        tops = iter(top_classes(run.class_names, logits_for(run, np.stack(good), device, batch_size), top_k)
                    if good else [])
        for name, im, err in chunk:
            yield {"file": name, "error": err} if im is None else {"file": name, "top": next(tops)}
        chunk.clear()

    # Each batch frees what the next one needs again: kept, not faulted in afresh. EfficientNet-
    # Lite0 on 192 ImageNet photos, both ways in one process on a 2-core AMD Zen 3: 59 against
    # 27 img/s, decoding included (glibc otherwise spent most of the time in page faults).
    with reuse_freed_memory():
        for path, err in listed:
            image = None
            if err is None:
                try:
                    image = run.load_image(path)
                except CnnlabError as e:
                    err = str(e)
            chunk.append((str(path), image, err))
            if sum(im is not None for _, im, _ in chunk) >= batch_size:
                yield from flush()
        yield from flush()


def no_prediction_error(paths: Sequence[str | Path], errors: int) -> CnnlabError:
    """The error when nothing could be classified: says whether files were bad or absent."""
    shown = ", ".join(map(str, paths[:3])) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    if errors:
        return CnnlabError(f"no image could be classified: all {errors} file(s) under {shown} were "
                           f"unreadable (see the messages above)")
    return CnnlabError(f"no image files found in {shown}: folders are searched recursively for "
                       f"{', '.join(sorted(IMAGE_SUFFIXES))} (hidden files and folders skipped)")


def results_csv(results: Sequence[dict[str, Any]], top_k: int) -> str:
    """One row per file: ``file, class_1, probability_1, ..., class_k, probability_k, error``."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["file", *(f"{col}_{i}" for i in range(1, top_k + 1) for col in ("class", "probability")),
                     "error"])
    for r in results:
        cells: list[Any] = []
        for i in range(top_k):
            t = r.get("top", [])
            cells += [t[i]["class"], f"{t[i]['probability']:.6f}"] if i < len(t) else ["", ""]
        writer.writerow([r["file"], *cells, r.get("error", "")])
    return buf.getvalue()


def write_results_csv(path: str | Path, results: Sequence[dict[str, Any]], top_k: int) -> None:
    write_text(path, results_csv(results, top_k))
