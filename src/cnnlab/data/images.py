"""Reading one image file correctly, whatever its mode, depth or orientation.

Pillow's defaults get several cases wrong (as of Pillow 13): 16-bit
greyscale clips to white when converted naively, RGBA drops alpha and shows hidden colours,
EXIF orientation is ignored. Everything that reads an image (training data, predict,
the web API, the data checker) goes through ``load_image``.
"""
from __future__ import annotations

import io
import os
import struct
from pathlib import Path
from typing import cast

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cnnlab.core.errors import CnnlabError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
# The Pillow decoders for those suffixes, the only ones ever tried: left to itself Pillow picks
# any of its ~40 from the bytes, and some hand the file to another program (EPS runs
# Ghostscript, whatever the file is named). Phone photos (MPO) come through the JPEG decoder.
FORMATS = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
# Refuse images above this many pixels (decompression bombs). Pillow only warns below ~179M.
MAX_PIXELS = 40_000_000
GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
EXIF_ORIENTATION = 0x0112  # TIFF/EXIF tag 274: 1 = upright, 2-8 = mirrored and/or rotated


class ImageError(CnnlabError):
    """An image that cannot be used. ``kind``: missing-file, empty-file, not-image (no format
    in ``FORMATS``), damaged or too-large; ``reason`` is the message without the file name (the data checker's)."""

    def __init__(self, name: str, kind: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.kind, self.reason = kind, reason


def is_image_name(name: str) -> bool:
    dot = name.rfind(".")   # not os.path.splitext: this runs once per file of every listing
    return dot > 0 and not name.startswith(".") and name[dot:].lower() in IMAGE_SUFFIXES


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


def normalize_mode(img: Image.Image, notes: list[str] | None = None) -> Image.Image:
    """Return an 8-bit 'L' or 'RGB' image that looks like what a person sees.

    Each conversion that changes what is stored is described in ``notes`` when given (the
    data checker reports them), so the report and the loader cannot disagree.
    """
    note = notes.append if notes is not None else (lambda _: None)
    orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    if orientation in range(2, 9):
        note(f"turned upright (EXIF orientation {orientation})")
    img = ImageOps.exif_transpose(img) or img
    if getattr(img, "is_animated", False):
        note("animated: only the first frame is used")
    if img.mode == "P":
        note("palette expanded to RGB")
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        alpha_min, _ = cast("tuple[int, int]", img.getchannel(img.mode[-1]).getextrema())
        if alpha_min < 255:
            note(f"{img.mode}: transparency composited on white")
        img = _flatten_alpha(img)
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        depth = {"F": "floating-point", "I": "32-bit"}.get(img.mode, "16-bit")
        note(f"{depth} greyscale ({img.mode}) scaled to 8 bits")
        img = _to_8bit_grey(img)
    if img.mode == "1":
        img = img.convert("L")
    if img.mode not in ("L", "RGB"):
        note(f"{img.mode} to RGB")
        img = img.convert("RGB")  # CMYK, YCbCr, LAB, HSV: Pillow converts these correctly
    return img


def _too_large(name: str, w: int, h: int, limit: int) -> ImageError:
    return ImageError(name, "too-large", f"{w}x{h} = {w * h:,} pixels is over the limit of {limit:,} "
                                         f"(a possible decompression bomb); resize it first")


def _detected_format(head: bytes) -> str | None:
    """The Pillow format whose signature starts ``head``, found without opening the file."""
    Image.init()
    for fmt, (_, accept) in Image.OPEN.items():
        try:
            if accept is not None and accept(head) is True:
                return fmt
        except struct.error:   # a signature check given fewer bytes than it reads
            continue
    return None


def _unidentified(name: str, source: str | Path | bytes) -> ImageError:
    """Why no allowed decoder opened ``source``: another format, none, or a damaged header."""
    if isinstance(source, bytes):
        head = source[:16]
    else:
        with open(source, "rb") as f:
            head = f.read(16)
    fmt = _detected_format(head)
    if fmt in FORMATS:   # its decoder gave up on what follows the signature
        return ImageError(name, "damaged", f"not a readable image: damaged {fmt} header")
    found = (f"its bytes are {fmt}, not a format cnnlab reads" if fmt else
             "no image format recognised in its bytes (a text or HTML file named like an image?)")
    return ImageError(name, "not-image", f"not a readable image: {found}; convert it to one of "
                                         f"{', '.join(FORMATS)}")


def open_image(source: str | Path | bytes, *, max_pixels: int | None = None,
               notes: list[str] | None = None, name: str | None = None) -> Image.Image:
    """Open, fully decode and mode-normalise an image; raise ``ImageError`` if it cannot be.

    ``max_pixels`` defaults to ``MAX_PIXELS`` as it is at call time; ``notes`` collects the
    conversions made (see ``normalize_mode``); ``name`` is used in messages.
    """
    name = name or ("uploaded image" if isinstance(source, bytes) else str(source))
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    try:
        if (len(source) if isinstance(source, bytes) else os.path.getsize(source)) == 0:
            raise ImageError(name, "empty-file", "not a readable image: empty file (0 bytes)")
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=FORMATS) as img:
            w, h = img.size
            if w * h > limit:
                raise _too_large(name, w, h, limit)
            try:
                img.load()
                return normalize_mode(img, notes)
            except (OSError, ValueError, SyntaxError, EOFError, struct.error) as e:
                # The header was fine, the pixel data is not: cut short or corrupt.
                raise ImageError(name, "damaged", f"not a readable image: damaged or truncated pixel data ({e})") from None
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(name, "missing-file", "no such file") from None
    except Image.DecompressionBombError as e:
        # Pillow refuses at open above 2 x Image.MAX_IMAGE_PIXELS, before our check can run.
        raise ImageError(name, "too-large", f"over the limit of {limit:,} pixels (a possible "
                                            f"decompression bomb: {e})") from None
    except UnidentifiedImageError:
        raise _unidentified(name, source) from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as e:
        raise ImageError(name, "damaged", f"not a readable image: damaged or truncated header ({e})") from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001
        # Crafted files make decoders raise almost anything (NotImplementedError, AttributeError,
        # IndexError...); each is one damaged file, to report or skip, never a crash.
        raise ImageError(name, "damaged", f"not a readable image: the decoder failed "
                                          f"({type(e).__name__}: {e})") from None


def center_box(width: int, height: int, fraction: float) -> tuple[float, float, float, float] | None:
    """The centre square of side ``fraction`` x the shorter side; None for the whole image."""
    side = fraction * min(width, height)
    if side == width == height:
        return None
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


RESAMPLING = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def to_array(img: Image.Image, size: tuple[int, int] | None, channels: int, *,
             center_crop: float | None = None, resample: str = "bilinear") -> np.ndarray:
    """(H, W, C) uint8 at ``size`` = (width, height), converted to ``channels`` (1 or 3).
    ``center_crop``: resize only the centre square of that fraction of the shorter side (the
    ImageNet evaluation crop; None: the whole image, squeezed to ``size``)."""
    img = img.convert("L" if channels == 1 else "RGB")
    box = center_box(*img.size, center_crop) if center_crop is not None else None
    if size is not None and (img.size != (size[0], size[1]) or box is not None):
        img = img.resize((size[0], size[1]), RESAMPLING[resample], box=box, reducing_gap=3.0)
    a = np.asarray(img, dtype=np.uint8)
    return a[:, :, None] if a.ndim == 2 else a


def load_image(source: str | Path | bytes, size: tuple[int, int] | None = None,
               channels: int = 3, *, max_pixels: int | None = None) -> np.ndarray:
    return to_array(open_image(source, max_pixels=max_pixels), size, channels)
