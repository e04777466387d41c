"""Augmentation of whole batches with tensor ops, on the training device.

Randomness comes from an explicit ``torch.Generator`` the caller seeds from (seed, epoch,
step), so any batch can be regenerated exactly: that is what makes resume bit-identical.
All functions take and return ``(N, C, H, W)`` tensors.

``AUGMENTATIONS`` is the table a run's batches go through: a config field's name, and the
function applied when that field is not at its default (off). Adding an augmentation is a
field in ``cnnlab.core.config.Config`` and a row here. ``--augment`` names a preset, a row of
``PRESETS``: the photo policies practitioners use (torchvision's transforms v2 where it has
them: RandomResizedCrop, TrivialAugmentWide, RandAugment, RandomErasing, MixUp, CutMix),
applied before the single-field rows. Mirroring and shifting run on the whole batch at once;
torchvision's per-image ops draw from torch's global generator, so they run under
``torch.random.fork_rng`` seeded from the batch's generator: reproducible, and the caller's
random state is left as it was.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F

from cnnlab.core.config import Config


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    mask = torch.rand(x.shape[0], generator=gen, device=gen.device) < 0.5
    return torch.where(mask.to(x.device)[:, None, None, None], x.flip(-1), x)


def alternating_flip(x: torch.Tensor, base_flip: torch.Tensor, epoch: int) -> torch.Tensor:
    """Epoch 0 flips the images whose ``base_flip`` bit is set; each later epoch flips the
    opposite set from the epoch before, so every image is seen both ways on alternate epochs.

    ``base_flip`` is a bool per image of this batch, drawn once for the whole run.
    """
    mask = base_flip if epoch % 2 == 0 else ~base_flip
    return torch.where(mask.to(x.device)[:, None, None, None], x.flip(-1), x)


def random_translate(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``pad`` pixels in each direction, filling by reflection.

    One gather for the whole batch: output pixel (i, j) of image n reads padded pixel
    (i + dy[n], j + dx[n]).
    """
    if pad == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=gen.device).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=gen.device).to(x.device)
    rows = (torch.arange(h, device=x.device)[None, :] + dy[:, None])[:, None, :, None]   # (N, 1, H, 1)
    cols = (torch.arange(w, device=x.device)[None, :] + dx[:, None])[:, None, None, :]   # (N, 1, 1, W)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


def cutout(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Zero one ``size`` x ``size`` square per image (centre uniform, square clipped at edges)."""
    if size == 0:
        return x
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n,), generator=gen, device=gen.device).to(x.device)
    cx = torch.randint(0, w, (n,), generator=gen, device=gen.device).to(x.device)
    ys = torch.arange(h, device=x.device)[None, :]
    xs = torch.arange(w, device=x.device)[None, :]
    in_y = (ys >= (cy - size // 2)[:, None]) & (ys < (cy - size // 2 + size)[:, None])   # (N, H)
    in_x = (xs >= (cx - size // 2)[:, None]) & (xs < (cx - size // 2 + size)[:, None])   # (N, W)
    hole = (in_y[:, :, None] & in_x[:, None, :])[:, None]                                 # (N, 1, H, W)
    return x.masked_fill(hole, 0.0)


@dataclass(frozen=True)
class Preset:
    """One ``--augment`` policy: what it does to each training image (mirror and shift on the
    whole batch, then per image crop, policy and erasing; mixing after the float conversion)."""
    description: str
    crop: tuple[float, float] | None = None   # RandomResizedCrop's area range, back to the same size
    flip: bool = False                        # mirror with probability 1/2
    shift: float = 0.0                        # random shift of up to this fraction of the side (reflect)
    policy: Literal["trivial", "randaugment"] | None = None   # TrivialAugmentWide, RandAugment(2, 9)
    erase: float = 0.0                        # RandomErasing's probability (noise-filled box)
    mix: bool = False                         # each batch MixUp (alpha 0.2) or CutMix (alpha 1), half each
    min_side: int = 0                         # smaller images are refused: the crops would be a few pixels

    @property
    def per_image(self) -> bool:
        return self.crop is not None or self.policy is not None or self.erase > 0


PRESETS: dict[str, Preset] = {
    "none": Preset("no augmentation (the lesson)"),
    "light": Preset("mirror, shift by up to 1/8 of the side", flip=True, shift=0.125, min_side=8),
    "standard": Preset("random resized crop (35-100% of the area), mirror, TrivialAugmentWide, random erasing "
                       "(p 0.25)", crop=(0.35, 1.0), flip=True, policy="trivial", erase=0.25, min_side=16),
    "strong": Preset("random resized crop (8-100%), mirror, RandAugment (2 ops, magnitude 9), random erasing "
                     "(p 0.25), MixUp or CutMix", crop=(0.08, 1.0), flip=True, policy="randaugment", erase=0.25,
                     mix=True, min_side=32),
}
MIXUP_ALPHA, CUTMIX_ALPHA = 0.2, 1.0   # timm's and torchvision's reference recipes


def check_preset(name: str, image_hw: tuple[int, int], num_classes: int) -> None:
    """Refuse a preset these images or classes cannot take (before any data loads)."""
    from cnnlab.core.errors import CnnlabError
    preset = PRESETS[name]
    if min(image_hw) < preset.min_side:
        raise CnnlabError(f"--augment {name} crops and distorts images of at least {preset.min_side} px; these are "
                          f"{image_hw[1]}x{image_hw[0]}: use --augment light (or none), or a larger --image-size")
    if preset.mix and num_classes < 2:
        raise CnnlabError(f"--augment {name} mixes images of two classes (MixUp, CutMix); this data has "
                          f"{num_classes}: use --augment standard")


def check_translate(pad: int, image_hw: tuple[int, int]) -> None:
    """Refuse a ``--translate`` the reflection padding cannot make: a shift of the image's side
    or more (before any data loads where the size is known, else before training)."""
    from cnnlab.core.errors import CnnlabError
    if pad >= min(image_hw):
        raise CnnlabError(f"--translate {pad} shifts the {image_hw[1]}x{image_hw[0]} images by their whole side or "
                          f"more: give less than {min(image_hw)} pixels, e.g. --translate {max(1, min(image_hw) // 8)}")


def _torch_seed(gen: torch.Generator) -> int:
    return int(torch.randint(0, 2 ** 62, (1,), generator=gen, device=gen.device))


def apply_preset(x: torch.Tensor, preset: Preset, draw: Draw, *, crop: bool = True) -> torch.Tensor:
    """uint8 (N, C, H, W) -> the same, as ``preset`` augments it; ``crop=False`` leaves the crop
    to the streaming decoder, which cuts one from the whole photo."""
    if preset.flip:
        x = random_flip(x, draw.gen)
    if preset.shift:
        x = random_translate(x, max(1, round(preset.shift * min(x.shape[-2:]))), draw.gen)
    if not preset.per_image:
        return x
    from torchvision.transforms import v2  # imported when a preset needs it: torchvision is slow to import
    h, w = x.shape[-2:]
    ops: list[Any] = []
    if preset.crop is not None and crop:
        ops.append(v2.RandomResizedCrop((h, w), scale=preset.crop, antialias=True))
    if preset.policy == "trivial":
        ops.append(v2.TrivialAugmentWide())
    elif preset.policy == "randaugment":
        ops.append(v2.RandAugment(num_ops=2, magnitude=9))
    if preset.erase:
        ops.append(v2.RandomErasing(p=preset.erase, value="random"))
    if not ops:
        return x
    pipeline = v2.Compose(ops)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_torch_seed(draw.gen))
        return torch.stack([pipeline(img) for img in x.cpu()]).to(x.device)


def mix_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Float (N, C, H, W) and int labels -> the batch with MixUp or CutMix (one per batch, half
    each) and soft labels (N, num_classes)."""
    from torchvision.transforms import v2
    pick = v2.MixUp(alpha=MIXUP_ALPHA, num_classes=num_classes) if torch.rand(
        (), generator=gen, device=gen.device) < 0.5 else v2.CutMix(alpha=CUTMIX_ALPHA, num_classes=num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_torch_seed(gen))
        return pick(x, y)


@dataclass(frozen=True)
class Draw:
    """What one batch's augmentations draw on."""
    gen: torch.Generator          # seeded from (seed, epoch, step[, rank])
    epoch: int
    base_flip: torch.Tensor       # the run's fixed bit per image (alternating flip)
    index: torch.Tensor           # this batch's items, indexing ``base_flip``
    cropped: bool = False         # the streaming decoder cut a random crop already


def _flip(x: torch.Tensor, mode: str, draw: Draw) -> torch.Tensor:
    if mode == "random":
        return random_flip(x, draw.gen)
    return alternating_flip(x, draw.base_flip[draw.index], draw.epoch)


# Applied in this order: the order fixes which random numbers each one draws, so it is part of
# what makes a seeded run reproducible.
AUGMENTATIONS: dict[str, Callable[[torch.Tensor, Any, Draw], torch.Tensor]] = {
    "augment": lambda x, name, draw: apply_preset(x, PRESETS[name], draw, crop=not draw.cropped),
    "flip": _flip,
    "translate": lambda x, pad, draw: random_translate(x, pad, draw.gen),
    "cutout": lambda x, size, draw: cutout(x, size, draw.gen),
}
_OFF = {name: getattr(Config(), name) for name in AUGMENTATIONS} | {"augment": "none"}   # each row's "off"


class Augmentation:
    """The settings of ``AUGMENTATIONS`` a run uses (any left out are off); ``num_classes``:
    for a preset that mixes labels (MixUp, CutMix)."""

    def __init__(self, num_classes: int = 0, **settings: Any):
        unknown = sorted(set(settings) - set(AUGMENTATIONS))
        if unknown:
            raise ValueError(f"unknown augmentation {', '.join(unknown)}: known are {', '.join(AUGMENTATIONS)}")
        if settings.get("augment") == "auto":
            raise ValueError("--augment auto is decided by cnnlab.engine.prepare.plan_run, before batches are made")
        self.settings = {name: settings.get(name, _OFF[name]) for name in AUGMENTATIONS}
        self._on = [(AUGMENTATIONS[n], v) for n, v in self.settings.items() if v != _OFF[n]]
        self.num_classes = num_classes
        self.mixes = PRESETS[self.settings["augment"]].mix

    @classmethod
    def from_config(cls, cfg: Config, num_classes: int = 0) -> "Augmentation":
        return cls(num_classes, **{name: getattr(cfg, name) for name in AUGMENTATIONS})

    @property
    def active(self) -> bool:
        return bool(self._on)

    def __call__(self, x: torch.Tensor, draw: Draw) -> torch.Tensor:
        for fn, value in self._on:
            x = fn(x, value, draw)
        return x

    def mix(self, x: torch.Tensor, y: torch.Tensor, draw: Draw) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images and int labels -> mixed images and soft labels, when the preset mixes."""
        return mix_batch(x, y, self.num_classes, draw.gen) if self.mixes else (x, y)

    def __repr__(self) -> str:
        return f"Augmentation({', '.join(f'{k}={v!r}' for k, v in self.settings.items())})"
