"""Reading one image file correctly, whatever its mode, depth or orientation.

Pillow's defaults get several cases wrong (see ../shared/notes/reliability.md): 16-bit
greyscale clips to white when converted naively, RGBA drops alpha and shows hidden colours,
EXIF orientation is ignored. Everything that reads an image (training data, predict,
the web API, the data checker) goes through ``load_image``.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from cnnlab.errors import CnnlabError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
# Refuse images above this many pixels (decompression bombs). Pillow only warns below ~179M.
MAX_PIXELS = 40_000_000
GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def is_image_file(path: Path) -> bool:
    return is_image_name(path.name)


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """Composite transparent pixels onto white, so hidden colours never show."""
    grey = img.mode == "LA"
    rgba = img.convert("LA" if grey else "RGBA")
    background = Image.new(rgba.mode, rgba.size, (255, 255) if grey else (255, 255, 255, 255))
    return Image.alpha_composite(background.convert("RGBA"), rgba.convert("RGBA")).convert("L" if grey else "RGB")


def _to_8bit_grey(img: Image.Image) -> Image.Image:
    """Scale 16-bit / 32-bit / float greyscale to 0-255 instead of clipping."""
    a = np.asarray(img)
    if img.mode == "F":
        a = np.clip(a, 0.0, 1.0) * 255.0 if a.max(initial=0) <= 1.0 else np.clip(a, 0, 255)
    elif a.dtype != np.uint8:
        # I;16 covers 0..65535; mode I is 32-bit but holds 16-bit PNG data in practice.
        a = a.astype(np.float64) / (65535.0 if a.max(initial=0) > 255 or img.mode.startswith("I;16") else 255.0) * 255.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def normalize_mode(img: Image.Image) -> Image.Image:
    """Return an 8-bit 'L' or 'RGB' image that looks like what a person sees."""
    img = ImageOps.exif_transpose(img) or img
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = _flatten_alpha(img)
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        img = _to_8bit_grey(img)
    if img.mode == "1":
        img = img.convert("L")
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")  # CMYK, YCbCr, LAB, HSV: Pillow converts these correctly
    return img


def open_image(source: str | Path | bytes, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open, fully decode and mode-normalise an image; raise CnnlabError if it cannot be."""
    name = "uploaded image" if isinstance(source, bytes) else str(source)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise CnnlabError(f"{name}: {w}x{h} = {w * h:,} pixels is over the limit of "
                                  f"{max_pixels:,} (a possible decompression bomb); resize it first")
            img.load()
            return normalize_mode(img)
    except CnnlabError:
        raise
    except FileNotFoundError:
        raise CnnlabError(f"{name}: no such file") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise CnnlabError(f"{name}: not a readable image ({e})") from None


def to_array(img: Image.Image, size: tuple[int, int] | None, channels: int) -> np.ndarray:
    """(H, W, C) uint8 at ``size`` = (width, height), converted to ``channels`` (1 or 3)."""
    img = img.convert("L" if channels == 1 else "RGB")
    if size is not None and img.size != tuple(size):
        img = img.resize(tuple(size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    a = np.asarray(img, dtype=np.uint8)
    return a[:, :, None] if a.ndim == 2 else a


def load_image(source: str | Path | bytes, size: tuple[int, int] | None = None,
               channels: int = 3, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    return to_array(open_image(source, max_pixels=max_pixels), size, channels)
