"""Look inside a network through forward hooks: its stages, its layers, first-layer filters,
feature maps and Grad-CAM heatmaps. Numbers only; the pictures are drawn by
``cnnlab.report.explain``, and the command is ``cnnlab.apps.explain``.

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
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.core.errors import CnnlabError
from cnnlab.models.classifier import Classifier

# Side (pixels) of the zero image used to probe shapes when no input shape is given.
DEFAULT_PROBE_SIZE = 32
# Feature-map channels shown per stage, and first-layer kernels shown (of possibly 192).
CHANNELS_PER_STAGE = 8
MAX_FILTERS = 64
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


def _choice(call: _Call) -> LayerChoice:
    assert call.shape is not None, f"{call.name} has no output map"
    return LayerChoice(call.name, call.module, call.shape)


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


def forward_with_hooks(model: nn.Module, x: torch.Tensor, modules: Iterable[tuple[str, nn.Module]],
                       hook: Callable[[str, nn.Module, tuple, Any], None]) -> None:
    """Forward ``x`` through ``model`` once (eval mode, no grad), calling ``hook(name, module,
    inputs, output)`` as each of the named ``modules`` finishes. The hooks are removed and the
    model's training mode restored afterwards, even when the forward pass raises."""
    handles = [m.register_forward_hook(lambda mod, i, o, _n=n: hook(_n, mod, i, o)) for n, m in modules]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def _trace(model: nn.Module, x: torch.Tensor, keep: set[int] | None = None
           ) -> tuple[list[_Call], dict[int, torch.Tensor]]:
    """Forward ``x`` once (eval mode, no grad) with a hook on every module of the network.

    Returns the calls in the order modules finished and, for call numbers in ``keep``, a copy
    of their output (copied because a later in-place op may overwrite it)."""
    calls: list[_Call] = []
    kept: dict[int, torch.Tensor] = {}

    def hook(name, module, inputs, out):
        shape = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) and out.dim() == 4 else None
        if keep is not None and len(calls) in keep:
            kept[len(calls)] = out.detach().float().clone()
        calls.append(_Call(name, module, shape))

    forward_with_hooks(model, x, ((n, m) for n, m in _network(model).named_modules() if n), hook)
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
def _probe(model: nn.Module, input_shape: tuple[int, ...] | None) -> list[_Call]:
    shape = input_shape or _probe_shape(model)
    return _trace(model, torch.zeros(1, *shape, device=_device(model)))[0]


def _valid_names(calls: list[_Call]) -> list[str]:
    counts = _count(calls)
    return [c.name for c in calls if c.shape is not None and counts[c.name] == 1]


def layer_names(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> list[str]:
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
                return _choice(c)
        raise _unknown_layer(name, _valid_names(calls))
    convs = [i for i, c in enumerate(calls) if isinstance(c.module, nn.Conv2d) and _spatial(c)]
    if not convs:
        raise CnnlabError(f"{type(_network(model)).__name__} has no Conv2d with an output larger than "
                          f"1x1 at this input size: give --layer NAME")
    last = convs[-1]
    for run, out in _stages(calls):
        if last in run and out >= last:
            return _choice(calls[out])
    return _choice(calls[last])


def find_target_layer(model: nn.Module, name: str | None = None,
                      input_shape: tuple[int, ...] | None = None) -> LayerChoice:
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
def first_conv(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> tuple[str, nn.Conv2d]:
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
    return Stage(call.name, type(call.module).__name__, tuple(a.shape), idx.tolist(), a[idx].cpu().numpy())


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


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, C) -> float (C, H, W) in [0, 1], what a Classifier takes."""
    return torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float().div(255)


def gradcam_heatmaps(model: nn.Module, images: np.ndarray, class_indices: Sequence[int | None], *,
                     layer: str | None = None) -> np.ndarray:
    """float32 (N, H, W) in [0, 1]: the Grad-CAM of each uint8 (H, W, C) image of ``images``
    (already at the model's input shape) for the matching ``class_indices`` entry (None: the
    predicted class). The target layer is found once for the whole batch."""
    if len(images) == 0:
        return np.zeros((0, *images.shape[1:3]), np.float32)
    target = find_target_layer(model, layer, tuple(image_tensor(images[0]).shape)).module
    return np.stack([gradcam(model, image_tensor(img), target, k)[0] for img, k in zip(images, class_indices)])


@dataclass
class Inspection:
    """Everything ``cnnlab explain`` shows of one image, from two forward passes and one
    backward pass per Grad-CAM class."""
    target: LayerChoice                 # the Grad-CAM layer
    first_conv_name: str
    first_conv: nn.Conv2d
    stages: list[Stage]
    heatmaps: list[np.ndarray]          # (H, W) in [0, 1], one per entry of ``classes``
    logits: np.ndarray                  # (classes,)


def inspect_image(model: nn.Module, x: torch.Tensor, *, layer: str | None = None,
                  classes: Sequence[int | None] = (None,), top: int = CHANNELS_PER_STAGE) -> Inspection:
    """Stages, first convolution and Grad-CAM of ``x`` (C, H, W) for each of ``classes``."""
    calls, _ = _trace(model, _as_batch(x, model))          # shapes and order, on this image
    target = _choose_layer(model, calls, layer)
    conv_name, conv = _first_conv(calls, model)
    stage_calls = [calls[i] for _, i in _stages(calls)]
    heats, logits, kept = _gradcams(model, x, target.module, list(classes), keep=[c.module for c in stage_calls])
    stages = [_stage(c, kept[id(c.module)], top) for c in stage_calls]
    return Inspection(target, conv_name, conv, stages, heats, logits)
