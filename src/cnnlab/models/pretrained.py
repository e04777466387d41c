"""Starting a network from trained weights (``--init-from``): fine-tuning.

The source is a cnnlab run folder or a ``.safetensors`` file, in cnnlab's own names or in the
names torchvision and timm publish ResNet-18/34/50 under (``conv1``, ``layer1.0.bn1``, ``fc``),
mapped onto cnnlab's ResNets. Every tensor whose name and shape match is copied; the
classifier head (the network's last ``nn.Linear``) starts afresh when the class count
differs; tensors only the network has stay at their initialisation. Pickles (``.pt``,
``.pth``, ``.bin``, ``.ckpt``) are refused, as everywhere in cnnlab: loading one runs code.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from cnnlab.core.errors import CnnlabError
from cnnlab.core.files import read_json
from cnnlab.core.run_folder import RunFolder
from cnnlab.core.tensors import few, require_finite

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".tar")
TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50")
# Wrappers that training scripts leave on the names (DDP, Lightning, EMA copies).
_PREFIXES = ("module.", "model.", "state_dict.")


@dataclass
class InitReport:
    source: Path
    naming: str                                            # "cnnlab" or "torchvision/timm"
    loaded: list[str] = field(default_factory=list)        # network tensor names copied
    replaced: list[tuple[str, tuple, tuple]] = field(default_factory=list)   # head: (name, file, here)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # left at init: shapes differ
    missing: list[str] = field(default_factory=list)       # not in the file: left at init
    unused: list[str] = field(default_factory=list)        # in the file, not in the network

    def lines(self) -> list[str]:
        out = [f"  init from {self.source} ({self.naming} names): loaded {len(self.loaded)} tensors"]
        if self.replaced:
            name, theirs, ours = self.replaced[0]
            out.append(f"    replaced the head ({', '.join(n for n, _, _ in self.replaced)}): {theirs[0]} classes "
                       f"in the file, {ours[0]} here; it trains from scratch")
        for name, theirs, ours in self.mismatched:
            out.append(f"    left at initialisation {name}: {_shape(theirs)} in the file, {_shape(ours)} here")
        if self.missing:
            out.append(f"    left at initialisation, not in the file: {few(self.missing)}")
        if self.unused:
            out.append(f"    in the file but not in this network (ignored): {few(self.unused)}")
        return out


def head_name(net: nn.Module) -> str:
    """The qualified name of the classifier head: the network's last ``nn.Linear``."""
    linears = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise CnnlabError(f"{type(net).__name__} has no nn.Linear head to replace")
    return linears[-1]


def body_blocks(net: nn.Module, head: str) -> list[str]:
    """The body's blocks, input first: the network's modules that hold weights, in the order it
    defines them, with plain containers (``nn.Sequential``, ``nn.ModuleList``) opened, the
    head and what holds it left out (``--unfreeze last-N-blocks`` counts these)."""
    blocks: list[str] = []

    def walk(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            qualified = prefix + name
            if qualified == head:
                continue
            opened = type(child) in (nn.Sequential, nn.ModuleList)
            if head.startswith(qualified + ".") or (opened and any(True for _ in child.parameters())):
                walk(qualified + ".", child)   # a container: its blocks (the head's: those before it)
            elif any(True for _ in child.parameters()):
                blocks.append(qualified)
    walk("", net)
    return blocks


def read_weights(source: str | Path) -> tuple[dict[str, torch.Tensor], str | None, Path]:
    """(tensors, the architecture when the source says it, the weights file) of a run folder or
    a ``.safetensors`` file."""
    path = Path(source).expanduser()
    arch = None
    if path.is_dir():
        folder = RunFolder(path)
        if not folder.weights_file.is_file():
            raise CnnlabError(f"--init-from {path}: not a finished cnnlab run folder (no "
                              f"{folder.weights_file.name}); give a run folder or a .safetensors file")
        card = read_json(folder.card_file) if folder.card_file.is_file() else {}
        arch = card.get("arch") if isinstance(card, dict) else None
        path = folder.weights_file
    elif path.suffix.lower() in PICKLE_SUFFIXES:
        raise CnnlabError(f"--init-from {path}: a {path.suffix} file is a pickle, and loading a pickle "
                          f"runs whatever code it holds; cnnlab reads only .safetensors (convert it with "
                          f"safetensors.torch.save_file on a machine you trust)")
    elif not path.exists():
        raise CnnlabError(f"--init-from {path} does not exist: give a cnnlab run folder or a .safetensors file")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CnnlabError(f"--init-from {path} is not a safetensors file ({e}): give a cnnlab run "
                          f"folder or a .safetensors file") from None
    require_finite(tensors, f"--init-from {path}", "weights that diverged cannot start a run; give ones "
                                                   "that trained without nan or inf")
    return tensors, arch, path


def _strip_prefixes(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if tensors and all(k.startswith(prefix) for k in tensors):
                tensors = {k[len(prefix):]: v for k, v in tensors.items()}
                changed = True
    return tensors


def is_torchvision_resnet(names) -> bool:
    return "conv1.weight" in names and any(n.startswith("layer1.0.") for n in names)


def torchvision_to_cnnlab(name: str) -> str:
    """One torchvision/timm ResNet tensor name as cnnlab's ResNet calls it."""
    name = re.sub(r"^conv1\.", "stem.0.", name)
    name = re.sub(r"^bn1\.", "stem.1.", name)
    name = re.sub(r"^layer(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}.", name)
    name = name.replace(".downsample.", ".shortcut.")
    return re.sub(r"^fc\.", "fc.1.", name)


def init_from(net: nn.Module, source: str | Path, arch: str) -> InitReport:
    """Copy the matching tensors of ``source`` into ``net`` (model ``arch``), in place."""
    tensors, source_arch, path = read_weights(source)
    if any(k.startswith("net.") for k in tensors):      # a Classifier's state: network + normalisation
        tensors = {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}
    tensors = _strip_prefixes(tensors)
    naming = "cnnlab"
    if is_torchvision_resnet(tensors) and not any(k.startswith("stages.") for k in tensors):
        if arch not in TORCHVISION_RESNETS:
            raise CnnlabError(f"--init-from {path} holds a torchvision/timm ResNet; its names map onto "
                              f"{', '.join(TORCHVISION_RESNETS)}, not --model {arch}")
        tensors = {torchvision_to_cnnlab(k): v for k, v in tensors.items()}
        naming = "torchvision/timm"
    if source_arch is not None and source_arch != arch:
        _refuse_mismatch(path, f"was trained as {source_arch!r}, not --model {arch!r}", net, tensors)
    ours = net.state_dict()
    head = head_name(net)
    report = InitReport(path, naming)
    for name, target in ours.items():
        theirs = tensors.get(name)
        if theirs is None:
            report.missing.append(name)
        elif theirs.shape == target.shape:
            target.copy_(theirs.to(target.dtype))
            report.loaded.append(name)
        elif name.startswith(head + "."):
            report.replaced.append((name, tuple(theirs.shape), tuple(target.shape)))
        elif name.startswith("stem."):
            # A ResNet stem for the other image size (3x3 for small images, 7x7 for large).
            report.mismatched.append((name, tuple(theirs.shape), tuple(target.shape)))
        else:
            _refuse_mismatch(path, "does not match this network", net, tensors)
    report.unused = sorted(set(tensors) - set(ours))
    body = [n for n in ours if not n.startswith(head + ".") and not n.endswith("num_batches_tracked")]
    if not any(n in report.loaded for n in body):
        _refuse_mismatch(path, f"shares no tensor with --model {arch!r}", net, tensors)
    return report


def _refuse_mismatch(path: Path, why: str, net: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """One line naming the first tensor that differs, with both shapes."""
    for name, target in net.state_dict().items():
        theirs = tensors.get(name)
        if theirs is not None and theirs.shape != target.shape and not name.startswith(head_name(net) + "."):
            raise CnnlabError(f"--init-from {path} {why}: {name} is {_shape(theirs.shape)} there and "
                              f"{_shape(target.shape)} here")
    for name in net.state_dict():
        if name not in tensors:
            raise CnnlabError(f"--init-from {path} {why}: it has no {name} (its first tensor is "
                              f"{next(iter(tensors), 'none')})")
    raise CnnlabError(f"--init-from {path} {why}")


def _shape(shape) -> str:
    return "x".join(map(str, shape)) or "scalar"
