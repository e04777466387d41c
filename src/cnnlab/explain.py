"""Look inside a network: first-layer filters, per-stage feature maps, and Grad-CAM.

Everything here works on any zoo model, bare or wrapped in a ``Classifier``, through forward
hooks alone (no model needs to cooperate). Layer names are the qualified module names that
``cnnlab summary`` prints, relative to the network (``"stages.3"``, ``"features.12"``);
``"net."``-prefixed names of the ``Classifier`` are accepted too.

**Stages.** One forward pass of the image with a hook on every module records, in the order
modules *finish* (a container finishes after its children), each output that is a
``(N, C, H, W)`` map. Consecutive outputs with the same spatial size ``(H, W)`` form one
stage; a stage ends where the spatial size changes (a strided conv, a pool, a valid conv).
The stage's output is the last module to finish in it: a ResNet stage (``stages.0``), an
Inception module (``inception3b``, its four branches concatenated), a VGG block's last ReLU.
A container that also holds earlier stages (``stages``, ``features``) is passed over for
its last child, and so is a call inside a block that takes this size and hands on the next
(the first 1x1 conv of a ResNet-50 bottleneck that strides in its 3x3). Stages whose maps
are 1x1 are left out: there is nothing spatial to show.

**Default Grad-CAM layer** (``find_target_layer(model)``): the output of the stage holding
the last ``nn.Conv2d`` whose output is larger than 1x1. That is the last residual stage
rather than the last conv inside its last block (the block's output includes the shortcut
and the final ReLU, which is what the classifier head reads), the whole Inception module
rather than one branch, and the activation after a plain conv. Modules run more than once
per forward pass (a shared activation) are never chosen: their output is not one map.

**Grad-CAM** (Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks via
Gradient-based Localization", ICCV): with ``A`` the layer's ``(C, h, w)`` output and ``y_c``
the class logit, weights ``a_k = mean_ij dy_c/dA_kij``; heatmap ``ReLU(sum_k a_k A_k)``,
bilinearly upsampled to the input size and divided by its maximum (all zeros when no
location raises the score).

Reusable by the report and the web page: ``gradcam``, ``gradcam_overlays``, ``gradcam_overlay_png``,
``overlay``.
"""
from __future__ import annotations

import difflib
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cnnlab.errors import CnnlabError
from cnnlab.fileio import write_json
from cnnlab.models.classifier import Classifier
from cnnlab.report.plots import plt, save_figure

__all__ = ["LayerChoice", "Stage", "find_target_layer", "layer_names", "first_conv", "filter_tiles",
           "feature_stages", "gradcam", "class_index", "overlay", "gradcam_overlays", "gradcam_overlay_png",
           "explain_image", "explain_run"]

# Side (pixels) of the zero image used to probe shapes when no input shape is given.
DEFAULT_PROBE_SIZE = 32
# Feature-map channels shown per stage, and first-layer kernels shown (of possibly 192).
CHANNELS_PER_STAGE = 8
MAX_FILTERS = 64
FILTER_COLUMNS = 8
# Grad-CAM colour map and blend weight: "jet" is the convention of the paper's figures.
HEAT_CMAP = "jet"
HEAT_ALPHA = 0.5
# Overlays for web/HTML are upscaled (nearest for pixels, bilinear for heat) to at least this.
OVERLAY_MIN_SIDE = 128
_SAFE_STEM = re.compile(r"[^A-Za-z0-9._-]")
# Error messages list every valid layer name up to this many; beyond, the outer ones.
_MAX_NAMES_LISTED = 60


class LayerChoice(NamedTuple):
    name: str                    # qualified name within the network, as `cnnlab summary` prints
    module: nn.Module
    output_shape: tuple          # (C, H, W) for the probed input


@dataclass
class Stage:
    name: str
    type: str
    output_shape: tuple          # (C, H, W)
    channels: list[int]          # strongest channels, strongest first
    maps: np.ndarray             # (len(channels), H, W) float32 activations of those channels


class _Call(NamedTuple):
    name: str
    module: nn.Module
    shape: tuple | None          # (C, H, W) when the output is a 4-D tensor, else None


# ----------------------------------------------------------------------------- hooks
def _network(model: nn.Module) -> nn.Module:
    """The zoo network inside a Classifier (names are relative to it), or the model itself."""
    return model.net if isinstance(model, Classifier) else model


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _probe_shape(model: nn.Module) -> tuple[int, int, int]:
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise CnnlabError(f"{type(_network(model)).__name__} has no nn.Conv2d: there are no "
                          f"filters, feature maps or Grad-CAM to show")
    return conv.in_channels, DEFAULT_PROBE_SIZE, DEFAULT_PROBE_SIZE


def _as_batch(x: torch.Tensor, model: nn.Module) -> torch.Tensor:
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4 or x.shape[0] != 1:
        raise CnnlabError(f"expected one image shaped (C, H, W) or (1, C, H, W), got {tuple(x.shape)}")
    return x.to(_device(model), torch.float32)


def _trace(model: nn.Module, x: torch.Tensor, keep: set[int] | None = None
           ) -> tuple[list[_Call], dict[int, torch.Tensor]]:
    """Forward ``x`` once (eval mode, no grad) with a hook on every module of the network.

    Returns the calls in the order modules finished and, for call numbers in ``keep``, a copy
    of their output (copied because a later in-place op may overwrite it)."""
    net = _network(model)
    calls: list[_Call] = []
    kept: dict[int, torch.Tensor] = {}

    def hook(name, module, inputs, out):
        shape = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) and out.dim() == 4 else None
        if keep is not None and len(calls) in keep:
            kept[len(calls)] = out.detach().float().clone()
        calls.append(_Call(name, module, shape))

    handles = [m.register_forward_hook(lambda mod, i, o, _n=n: hook(_n, mod, i, o))
               for n, m in net.named_modules() if n]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return calls, kept


def _spatial(c: _Call) -> tuple | None:
    """(H, W) of a call's output when it is a map larger than 1x1, else None."""
    return c.shape[1:] if c.shape is not None and c.shape[1] * c.shape[2] > 1 else None


def _count(calls: list[_Call]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for c in calls:
        counts[c.name] = counts.get(c.name, 0) + 1
    return counts


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _stages(calls: list[_Call]) -> list[tuple[list[int], int]]:
    """(call indices of the stage, index of the call standing for its output), per stage.

    Stages are runs of consecutive calls whose outputs have one spatial size (> 1x1). The
    output is the last call of the run, skipping (1) modules run more than once, (2)
    containers of an earlier stage's output (``stages``, ``features``), and (3) calls inside a
    module that takes this size and hands on the next one, such as the 1x1 conv of a
    bottleneck block that strides later: its output is part of the block, not a stage output.
    (3) is waived when it would leave nothing, e.g. an ImageNet stem's conv at 112 px.
    """
    runs: list[list[int]] = []
    run_of: dict[int, int] = {}
    size = None
    for i, c in enumerate(calls):
        hw = _spatial(c)
        if hw is None:
            continue
        if hw != size:
            runs.append([])
            size = hw
        runs[-1].append(i)
        run_of[i] = len(runs) - 1
    counts = _count(calls)
    # Runs that each module's calls (its own and its descendants') fall into.
    spans: dict[str, set[int]] = {}
    last_call: dict[str, int] = {}
    for i, c in enumerate(calls):
        last_call[c.name] = i
        if i in run_of:
            for a in (*_ancestors(c.name), c.name):
                spans.setdefault(a, set()).add(run_of[i])

    def inside_step(i: int) -> bool:
        r = run_of[i]
        for a in _ancestors(calls[i].name):
            j = last_call.get(a)
            if j is not None and counts[a] == 1 and run_of.get(j) == r + 1 and spans[a] == {r, r + 1}:
                return True
        return False

    chosen: list[str] = []
    result = []
    for run in runs:
        ok = [i for i in run if counts[calls[i].name] == 1
              and not any(o.startswith(calls[i].name + ".") for o in chosen)]
        best = [i for i in ok if not inside_step(i)] or ok or run
        result.append((run, best[-1]))
        chosen.append(calls[best[-1]].name)
    return result


# ----------------------------------------------------------------------------- layers
def _probe(model: nn.Module, input_shape: tuple[int, int, int] | None) -> list[_Call]:
    shape = input_shape or _probe_shape(model)
    return _trace(model, torch.zeros(1, *shape, device=_device(model)))[0]


def _valid_names(calls: list[_Call]) -> list[str]:
    counts = _count(calls)
    return [c.name for c in calls if c.shape is not None and counts[c.name] == 1]


def layer_names(model: nn.Module, input_shape: tuple[int, int, int] | None = None) -> list[str]:
    """Names ``--layer`` accepts: modules run once whose output is a (N, C, H, W) map."""
    return _valid_names(_probe(model, input_shape))


def _unknown_layer(name: str, valid: list[str]) -> CnnlabError:
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    if len(valid) <= _MAX_NAMES_LISTED:
        listed = ", ".join(valid)
    else:
        outer = [v for v in valid if v.count(".") <= 1]
        listed = f"{', '.join(outer)}, and {len(valid) - len(outer)} nested ones (see `cnnlab summary`)"
    return CnnlabError(f"no layer {name!r} with a (C, H, W) output in this network: {hint}"
                       f"valid names: {listed}")


def _choose_layer(model: nn.Module, calls: list[_Call], name: str | None) -> LayerChoice:
    counts = _count(calls)
    if name is not None:
        wanted = name[4:] if isinstance(model, Classifier) and name.startswith("net.") else name
        if counts.get(wanted, 0) > 1:
            raise CnnlabError(f"layer {name!r} runs {counts[wanted]} times per forward pass, so it has "
                              f"no single output map; choose another (see `cnnlab summary`)")
        for c in calls:
            if c.name == wanted and c.shape is not None:
                return LayerChoice(c.name, c.module, c.shape)
        raise _unknown_layer(name, _valid_names(calls))
    convs = [i for i, c in enumerate(calls) if isinstance(c.module, nn.Conv2d) and _spatial(c)]
    if not convs:
        raise CnnlabError(f"{type(_network(model)).__name__} has no Conv2d with an output larger than "
                          f"1x1 at this input size: give --layer NAME")
    last = convs[-1]
    for run, out in _stages(calls):
        if last in run and out >= last:
            return LayerChoice(calls[out].name, calls[out].module, calls[out].shape)
    return LayerChoice(calls[last].name, calls[last].module, calls[last].shape)


def find_target_layer(model: nn.Module, name: str | None = None,
                      input_shape: tuple[int, int, int] | None = None) -> LayerChoice:
    """The layer Grad-CAM reads: ``name`` if given (qualified module name, e.g. "stages.2"),
    else the output of the stage holding the last Conv2d whose output is larger than 1x1
    (see the module docstring for the rule). ``input_shape`` (C, H, W) is the image shape
    the model is used with (default: the first conv's channels at 32x32); the choice and the
    reported ``output_shape`` come from one probing forward pass of a zero image."""
    return _choose_layer(model, _probe(model, input_shape), name)


def _first_conv(calls: list[_Call], model: nn.Module) -> tuple[str, nn.Conv2d]:
    for c in calls:
        if isinstance(c.module, nn.Conv2d):
            return c.name, c.module
    raise CnnlabError(f"{type(_network(model)).__name__} runs no nn.Conv2d: there are no filters to show")


# ----------------------------------------------------------------------------- pictures' data
def first_conv(model: nn.Module, input_shape: tuple[int, int, int] | None = None) -> tuple[str, nn.Conv2d]:
    """(name, module) of the first nn.Conv2d to run on an image."""
    return _first_conv(_probe(model, input_shape), model)


def filter_tiles(conv: nn.Conv2d) -> np.ndarray:
    """The kernels as images: (out_channels, kh, kw, 3) RGB for 3 input channels per group,
    else (out_channels, kh, kw, 1) grey (the mean over input channels); each kernel scaled
    to [0, 1] by its own min and max, a constant kernel shown mid-grey."""
    w = conv.weight.detach().float().cpu()                  # (out, in/groups, kh, kw)
    w = w if w.shape[1] in (1, 3) else w.mean(1, keepdim=True)
    lo = w.amin(dim=(1, 2, 3), keepdim=True)
    span = w.amax(dim=(1, 2, 3), keepdim=True) - lo
    scaled = torch.where(span > 0, (w - lo) / span.clamp_min(1e-12), torch.full_like(w, 0.5))
    return scaled.permute(0, 2, 3, 1).numpy()


def _stage(call: _Call, act: torch.Tensor, top: int) -> Stage:
    a = act[0]                                               # (C, H, W)
    idx = a.abs().mean(dim=(1, 2)).argsort(descending=True)[:top]
    return Stage(call.name, type(call.module).__name__, call.shape, idx.tolist(), a[idx].cpu().numpy())


def feature_stages(model: nn.Module, x: torch.Tensor, top: int = CHANNELS_PER_STAGE) -> list[Stage]:
    """Each convolutional stage's output for one image ``x`` ((C, H, W) or (1, C, H, W), as the
    model takes it), with its ``top`` strongest channels (largest mean |activation|)."""
    x = _as_batch(x, model)
    calls, _ = _trace(model, x)
    stages = _stages(calls)
    _, kept = _trace(model, x, keep={out for _, out in stages})
    return [_stage(calls[i], kept[i], top) for _, i in stages]


def _gradcams(model: nn.Module, x: torch.Tensor, layer: nn.Module, classes: Sequence[int | None],
              keep: Sequence[nn.Module] = ()) -> tuple[list[np.ndarray], np.ndarray, dict[int, torch.Tensor]]:
    """One forward pass, one backward per class (None: the predicted one): the heatmaps, the
    logits, and copies of the outputs of the ``keep`` modules keyed by ``id(module)``."""
    x = _as_batch(x, model)
    store: list[torch.Tensor] = []
    kept: dict[int, torch.Tensor] = {}

    def hook(module, inputs, out):
        if not (isinstance(out, torch.Tensor) and out.dim() == 4):
            raise CnnlabError(f"Grad-CAM needs a layer with a (N, C, H, W) output; "
                              f"{type(module).__name__} gave {getattr(out, 'shape', type(out))}")
        store.append(out)
        return out.clone()      # later in-place ops (ReLU(inplace=True)) then leave `out` intact

    def keep_hook(module, inputs, out):
        kept[id(module)] = out.detach().float().clone()

    handles = [layer.register_forward_hook(hook)] + [m.register_forward_hook(keep_hook) for m in keep]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)      # a graph even if every weight is frozen
            logits = model(x)
            if len(store) != 1:
                raise CnnlabError(f"the Grad-CAM layer ran {len(store)} times in one forward pass; "
                                  f"choose a layer that runs once")
            grads = []
            for n, k in enumerate(classes):
                k = int(logits[0].argmax()) if k is None else int(k)
                if not 0 <= k < logits.shape[1]:
                    raise CnnlabError(f"class index {k} is out of range: the model has "
                                      f"{logits.shape[1]} classes")
                grads.append(torch.autograd.grad(logits[0, k], store[0],
                                                 retain_graph=n < len(classes) - 1)[0])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    acts = store[0].detach()                                 # (1, C, h, w)
    heats = []
    for g in grads:
        weights = g.mean(dim=(2, 3), keepdim=True)           # (1, C, 1, 1)
        cam = F.relu((weights * acts).sum(1, keepdim=True))  # (1, 1, h, w)
        cam = F.interpolate(cam.float(), size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[0, 0]
        peak = cam.max()
        cam = cam / peak if peak > 0 else torch.zeros_like(cam)
        heats.append(cam.clamp(0, 1).cpu().numpy().astype(np.float32))
    return heats, logits[0].detach().float().cpu().numpy(), kept


def gradcam(model: nn.Module, x: torch.Tensor, target_layer: nn.Module | str | None = None,
            class_index: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM of one image for ``class_index`` (default: the predicted class).

    ``x`` is (C, H, W) or (1, C, H, W) as the model takes it (floats in [0, 1] for a
    Classifier); ``target_layer`` a module of the model, its qualified name, or None for
    ``find_target_layer``'s default. Returns ``(heatmap, logits)``: float32 (H, W) in [0, 1]
    at the input size, and the float32 (num_classes,) logits. The model's mode is restored
    and no parameter's ``.grad`` is touched."""
    x = _as_batch(x, model)
    layer = target_layer if isinstance(target_layer, nn.Module) else \
        find_target_layer(model, target_layer, tuple(x.shape[1:])).module
    heats, logits, _ = _gradcams(model, x, layer, [class_index])
    return heats[0], logits


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = HEAT_ALPHA) -> np.ndarray:
    """uint8 (H, W, 3): ``image`` (uint8 (H, W) or (H, W, 1|3)) blended with ``heatmap``
    ((H, W) in [0, 1]) coloured by HEAT_CMAP."""
    img = image[..., None] if image.ndim == 2 else image
    rgb = np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img[..., :3]
    heat = plt.get_cmap(HEAT_CMAP)(np.clip(heatmap, 0, 1))[..., :3] * 255.0
    return np.clip((1 - alpha) * rgb.astype(np.float32) + alpha * heat, 0, 255).round().astype(np.uint8)


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, C) -> float (C, H, W) in [0, 1], what a Classifier takes."""
    return torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float().div(255)


def gradcam_overlays(model: nn.Module, images: np.ndarray, class_indices: Sequence[int | None], *,
                     layer: str | None = None, alpha: float = HEAT_ALPHA) -> np.ndarray:
    """uint8 (N, H, W, 3): each uint8 (H, W, C) image of ``images`` (already at the model's
    input shape) overlaid with its Grad-CAM for the matching ``class_indices`` entry (None:
    the predicted class). The target layer is found once for the whole batch."""
    if len(images) == 0:
        return np.zeros((0, *images.shape[1:3], 3), np.uint8)
    target = find_target_layer(model, layer, tuple(_to_tensor(images[0]).shape)).module
    return np.stack([overlay(img, gradcam(model, _to_tensor(img), target, k)[0], alpha)
                     for img, k in zip(images, class_indices)])


def _load_for_run(run, image) -> np.ndarray:
    from cnnlab.data.images import load_image
    from cnnlab.predict import fit_to_model
    h, w = run.input_size
    if isinstance(image, np.ndarray):
        return fit_to_model(run, image[None])[0]
    return load_image(image if isinstance(image, bytes) else Path(image), (w, h), run.in_channels)


def gradcam_overlay_png(run, image: str | Path | bytes | np.ndarray, class_index: int | None = None, *,
                        layer: str | None = None, device: str | torch.device = "cpu",
                        alpha: float = HEAT_ALPHA, min_side: int = OVERLAY_MIN_SIDE) -> bytes:
    """PNG bytes of ``image`` (a file, encoded bytes, or a uint8 (H, W[, C]) array; resized to
    the run's input as predict does) with its Grad-CAM for ``class_index`` (default: the
    predicted class) overlaid, upscaled to at least ``min_side`` pixels. For the HTML report
    and the web page; unreadable images raise CnnlabError."""
    img = _load_for_run(run, image)                          # (H, W, C) uint8 at the input size
    model = run.model(device)
    heat, _ = gradcam(model, _to_tensor(img), layer, class_index)
    h, w = img.shape[:2]
    scale = max(1, math.ceil(min_side / min(h, w)))
    size = (w * scale, h * scale)
    big = np.asarray(Image.fromarray(img[..., 0] if img.shape[2] == 1 else img).resize(size, Image.Resampling.NEAREST))
    big_heat = np.asarray(Image.fromarray(heat, "F").resize(size, Image.Resampling.BILINEAR))
    buf = io.BytesIO()
    Image.fromarray(overlay(big, big_heat, alpha), "RGB").save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- figures
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
    if top_k < 1:
        raise CnnlabError(f"--top-k must be at least 1, got {top_k}")
    out = Path(out)
    x = _to_tensor(image)
    shape = tuple(x.shape)
    extra = class_index(class_names, class_name) if class_name is not None else None
    calls, _ = _trace(model, _as_batch(x, model))          # shapes and order, on this image
    target = _choose_layer(model, calls, layer)
    conv_name, conv = _first_conv(calls, model)
    stage_calls = [calls[i] for _, i in _stages(calls)]
    heats, logits, kept = _gradcams(model, x, target.module, [None, extra] if extra is not None else [None],
                                    keep=[c.module for c in stage_calls])
    stages = [_stage(c, kept[id(c.module)], CHANNELS_PER_STAGE) for c in stage_calls]
    probs = torch.softmax(torch.from_numpy(logits), 0).numpy()
    pred = int(probs.argmax())
    order = np.argsort(-probs, kind="stable")[:min(top_k, len(probs))]
    top = [{"class": class_names[i], "probability": float(probs[i])} for i in order]
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
        "gradcam_classes": [class_names[pred]] + ([class_names[extra]] if len(panels) > 1 else []),
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
    from cnnlab.data.images import load_image
    from cnnlab.run import load_run
    from cnnlab.train.hardware import pick_device
    run = load_run(run_path)
    dev = pick_device(device)
    h, w = run.input_size
    arrays = [load_image(Path(p), (w, h), run.in_channels) for p in images]
    root = Path(out) if out is not None else run.path / "explain"
    model = run.model(dev)
    results = []
    for path, folder, image in zip(images, _folder_names([Path(p) for p in images]), arrays):
        info = {"run": str(run.path), "arch": run.card["arch"], "image": str(path), "device": str(dev)}
        summary = explain_image(model, image, run.class_names, root / folder, layer=layer,
                                class_name=class_name, top_k=top_k, info=info)
        results.append({**summary, "folder": str(root / folder)})
    return results
