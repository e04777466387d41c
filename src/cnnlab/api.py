"""The calls a learner can guess: ``cnnlab.train``, ``cnnlab.load`` and the ``Run`` they return.

    import cnnlab
    run = cnnlab.train(data="../shared/data/cifar10", model="resnet20", epochs=5)
    run.history["val_accuracy"], run.evaluate(), run.predict(["cat.jpg"], top_k=3)

The top layer, beside the command line, and the same path through the layers: the config
resolved as ``cnnlab train`` resolves it (defaults < recipe < file < keywords, unknown keys
refused), ``cnnlab.engine.loop.fit`` (which checks the config before any data loads), the same
run folder, then the same report. ``Run`` holds the engine's run (``cnnlab.engine.runs.Run``)
and adds what lives in the layers above it: evaluation, the report, Grad-CAM. Pictures come
back as matplotlib ``Figure``s (inline in a notebook, ``fig.savefig(...)`` anywhere else);
errors are the one-line ``CnnlabError``s of the command line.
"""
from __future__ import annotations

import base64
import io
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure

from cnnlab.apps.evaluate import evaluate_run
from cnnlab.apps.explain import explain_image, explain_run
from cnnlab.core.config import Config, merge, resolve
from cnnlab.core.errors import CnnlabError
from cnnlab.core.hardware import pick_device
from cnnlab.engine import runs
from cnnlab.engine.callbacks import Callback
from cnnlab.engine.inference import fit_to_model
from cnnlab.engine.loop import fit
from cnnlab.models.classifier import Classifier
from cnnlab.models.registry import create_model, list_models, model_info
from cnnlab.models.summary import format_summary, zoo_table
from cnnlab.report import read_curves, write_report
from cnnlab.report.html import esc
from cnnlab.report.plots import DPI, PLOT_FILES, curve_plot
from cnnlab.report.samples import write_sample_grid

SOURCE = "cnnlab.train()"    # how config errors name where a bad key came from
PLOTS = tuple(name[:-4] for name in PLOT_FILES)   # run.plot(name): the report's pictures
EXPLAIN_PICTURES = ("gradcam", "filters", "feature_maps")
CARD_CURVE_DPI = 50          # the card's accuracy curve: curve_plot's 6 x 3.8 in at 300 x 190 px


# ----------------------------------------------------------------------------- figures
def _inline(fig: Figure) -> Figure:
    """``fig``, shown inline when it ends a notebook cell.

    cnnlab draws off-screen (``cnnlab.report.plots``: Agg, figures outside pyplot), so
    IPython's inline backend never registers its PNG printer for ``Figure``; register it here,
    unless the notebook already prints figures in some format."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    formatters = getattr(getattr(shell, "display_formatter", None), "formatters", None)
    if not formatters:
        return fig
    for mime in ("image/png", "image/svg+xml", "image/jpeg", "application/pdf"):
        try:
            formatters[mime].lookup_by_type(Figure)
            return fig
        except (KeyError, AttributeError):
            pass
    from IPython.core.pylabtools import print_figure
    formatters["image/png"].for_type(Figure, lambda f: print_figure(f, "png"))
    return fig


def png_figure(png: bytes | Path) -> Figure:
    """A picture cnnlab drew (PNG bytes or file) as a ``Figure`` of the same pixels."""
    from matplotlib.image import imread
    pixels = imread(io.BytesIO(png if isinstance(png, bytes) else Path(png).read_bytes()), format="png")
    h, w = pixels.shape[:2]
    fig = Figure(figsize=(w / DPI, h / DPI), dpi=DPI)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.imshow(pixels, interpolation="nearest")
    ax.set_axis_off()
    return _inline(fig)


def _png_bytes(fig: Figure, dpi: float) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Report:
    """What ``run.report()`` wrote: ``path`` (report.html), ``plots`` (name -> PNG file) and
    ``findings``, the plain-language reading of the curves."""
    path: Path
    plots: dict[str, Path]
    findings: list[str]

    def figure(self, name: str) -> Figure:
        if name not in self.plots:
            raise CnnlabError(f"the report has no {name!r} plot: it has {', '.join(self.plots) or 'none'}")
        return png_figure(self.plots[name])

    def __repr__(self) -> str:
        return f"Report({str(self.path)!r}: {len(self.plots)} plots; " + " ".join(self.findings) + ")"

    def _repr_html_(self) -> str:
        items = "".join(f"<li>{esc(f)}</li>" for f in self.findings)
        return (f"<div><b>Report</b> <code>{esc(self.path)}</code> and {len(self.plots)} plots in "
                f"<code>{esc(self.path.parent / 'plots')}</code><ul>{items}</ul></div>")


@dataclass(frozen=True)
class Explanation:
    """``run.explain(image)``: ``summary`` (what ``cnnlab explain`` writes to summary.json:
    ``predicted``, ``top``, ``layer``, ...), ``folder`` (the pictures) and the pictures, read
    when made. A notebook shows the Grad-CAM picture."""
    summary: dict[str, Any]
    folder: Path
    pictures: dict[str, bytes] = field(repr=False)

    @property
    def predicted(self) -> dict[str, Any]:
        return self.summary["predicted"]

    @property
    def top(self) -> list[dict[str, Any]]:
        return self.summary["top"]

    def figure(self, name: str = "gradcam") -> Figure:
        """"gradcam", "filters" (the first layer's) or "feature_maps" (one row per stage)."""
        if name not in self.pictures:
            raise CnnlabError(f"explain draws {', '.join(self.pictures)}; got {name!r}")
        return png_figure(self.pictures[name])

    def _repr_png_(self) -> bytes:
        return self.pictures["gradcam"]

    def __repr__(self) -> str:
        p = self.predicted
        return (f"Explanation({p['class']} {p['probability']:.1%}, Grad-CAM at {self.summary['layer']['name']}, "
                f"pictures in {str(self.folder)!r})")


def _image_batch(image: Any) -> np.ndarray:
    """uint8 (N, H, W[, C]) from one image ((H, W) or (H, W, 1|3|4)), a batch, or a list of images."""
    if isinstance(image, np.ndarray):
        return image[None] if image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (1, 3, 4)) else image
    return np.concatenate([_image_batch(np.asarray(i)) for i in image])


class Run:
    """A trained run: its folder's contents, and what can be asked of its model.

    ``history`` is Keras's ``history.history`` (per-epoch lists: loss, accuracy, val_loss,
    val_accuracy, lr, seconds); ``metrics`` is metrics.json (test accuracy and loss, per-class
    accuracy, ...); ``folder`` is the engine's ``cnnlab.engine.runs.Run``."""

    def __init__(self, folder: runs.Run):
        self.folder = folder

    @property
    def path(self) -> Path:
        return self.folder.path

    @property
    def config(self) -> Config:
        return self.folder.config

    @property
    def history(self) -> dict[str, list]:
        return self.folder.history

    @property
    def metrics(self) -> dict[str, Any]:
        return self.folder.metrics

    @property
    def class_names(self) -> list[str]:
        return self.folder.class_names

    @property
    def evaluation(self) -> dict[str, np.ndarray]:
        """evaluation.npz: the test ``logits`` and ``labels``, and the images the report shows
        (``sample_images``, ``mistake_images``, ``correct_images``: uint8 (N, H, W, C))."""
        ev = self.folder.evaluation
        if ev is None:
            raise CnnlabError(f"{self.folder.evaluation_file} is missing: the run has not finished its test evaluation")
        return ev

    @property
    def accuracy(self) -> float | None:
        """Test accuracy, measured once at the end of training."""
        return self.metrics.get("test_accuracy")

    def model(self, device: str = "cpu") -> Classifier:
        """The trained network (``cnnlab.models.classifier.Classifier``: takes float (N, C, H, W)
        in [0, 1] and normalises inside), in eval mode."""
        return self.folder.model(pick_device(device) if device == "auto" else device)

    def predict(self, inputs: Any, top_k: int = 5, device: str = "cpu") -> list[dict[str, Any]]:
        """One ``{"file", "top": [{"class", "probability"}, ...]}`` per image: image files (a path
        or a list of them), or uint8 images (one (H, W, C) array, a (N, H, W, C) batch or a list
        of arrays of any size, resized as files are)."""
        if isinstance(inputs, (str, os.PathLike)):
            inputs = [inputs]
        arrays = isinstance(inputs, np.ndarray) or (len(inputs) and all(isinstance(i, np.ndarray) for i in inputs))
        if arrays:
            inputs = np.concatenate([fit_to_model(self.folder, _image_batch(i))
                                     for i in ([inputs] if isinstance(inputs, np.ndarray) else inputs)])
        return self.folder.predict(inputs, top_k=top_k, device=device)

    def evaluate(self, data: str | os.PathLike | None = None, *, data_dir: str | None = None,
                 device: str = "auto", bad_images: str | None = None) -> dict[str, Any]:
        """Test accuracy, loss and per-class accuracy on the run's own test split, or on the test
        split of ``data`` (same classes), as ``cnnlab evaluate`` does."""
        return evaluate_run(self.path, data=None if data is None else str(data), data_dir=data_dir,
                            device=device, bad_images=bad_images)

    def report(self) -> Report:
        """(Re)write plots/ and report.html from the run folder, as ``cnnlab report`` does."""
        write_report(self.path)
        plots = {name: self.folder.plots_dir / f"{name}.png" for name in PLOTS
                 if (self.folder.plots_dir / f"{name}.png").is_file()}
        findings = [str(f) for f in read_curves(self.history, len(self.class_names))]
        return Report(self.folder.report_file, plots, findings)

    def plot(self, name: str = "accuracy") -> Figure:
        """One of the report's pictures (``cnnlab.api.PLOTS``): accuracy, loss, lr, samples,
        confusion_matrix, per_class_accuracy, mistakes, gradcam_mistakes, gradcam_correct."""
        if name not in PLOTS:
            raise CnnlabError(f"run.plot({name!r}): the plots are {', '.join(PLOTS)}")
        png = self.folder.plots_dir / f"{name}.png"
        if not png.is_file():
            return self.report().figure(name)
        return png_figure(png)

    def explain(self, image: Any, *, layer: str | None = None, class_name: str | None = None,
                top_k: int = 5, device: str = "auto", out: str | os.PathLike | None = None) -> Explanation:
        """Grad-CAM (where the network looked), the first layer's filters and each stage's feature
        maps for one image: a file, or a uint8 (H, W[, C]) array (resized as predict does), as
        ``cnnlab explain`` draws them, into ``out/<image name>/`` (default RUN/explain)."""
        if isinstance(image, (str, os.PathLike)):
            summary = explain_run(self.path, [Path(image)], out=None if out is None else Path(out), layer=layer,
                                  class_name=class_name, top_k=top_k, device=device)[0]
            folder = Path(summary.pop("folder"))
        else:
            batch = _image_batch(np.asarray(image))
            if len(batch) != 1:
                raise CnnlabError(f"run.explain takes one image; got {len(batch)} (shape {np.shape(image)})")
            dev = pick_device(device)
            folder = Path(out if out is not None else self.folder.explain_dir) / "array"
            info = {"run": str(self.path), "arch": self.folder.card["arch"], "image": "array", "device": str(dev)}
            summary = explain_image(self.folder.model(dev), fit_to_model(self.folder, batch)[0], self.class_names,
                                    folder, layer=layer, class_name=class_name, top_k=top_k, info=info)
        return Explanation(summary, folder, {n: (folder / f"{n}.png").read_bytes() for n in EXPLAIN_PICTURES})

    # -- how it shows ----------------------------------------------------------------------
    def _headline(self) -> tuple[str, str, str]:
        """(model, data, result) in words."""
        m, cfg = self.metrics, self.config
        acc = m.get("test_accuracy")
        result = (f"test accuracy {acc:.2%}" if isinstance(acc, float) else "not evaluated") + \
                  f" after {len(self.history.get('loss', []))} epochs"
        if isinstance(m.get("train_seconds"), float):
            result += f" ({m['train_seconds']:.0f} s)"
        data = f"{cfg.data}, {len(self.class_names)} classes"
        if isinstance(m.get("test_images"), int):
            data += f", {m['test_images']:,} test images"
        params = m.get("parameters")
        model = cfg.model + (f" ({params:,} parameters)" if isinstance(params, int) else "")
        return model, data, result

    def __repr__(self) -> str:
        model, data, result = self._headline()
        return f"Run({str(self.path)!r}: {model} on {data}; {result})"

    def _repr_html_(self) -> str:
        """A card: model, data, accuracy, and the accuracy curve as an inline PNG."""
        model, data, result = self._headline()
        curve = ""
        if self.history.get("accuracy"):
            png = _png_bytes(curve_plot(self.history, "accuracy", "Accuracy per epoch", "accuracy"), CARD_CURVE_DPI)
            curve = (f'<img src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}" '
                     f'alt="accuracy per epoch" style="flex:none">')
        return (f'<div style="display:flex;gap:14px;align-items:center;max-width:640px;padding:8px 12px;'
                f'border:1px solid #d0d7de;border-radius:6px;font-family:sans-serif;font-size:13px">{curve}'
                f'<div><b>{esc(model)}</b><br>on {esc(data)}<br>{esc(result)}<br>'
                f'<code>{esc(self.path)}</code></div></div>')


# ----------------------------------------------------------------------------- calls
def _plain(value: Any) -> Any:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def train(data: str | os.PathLike | None = None, model: str | None = None, epochs: float | None = None, *,
          recipe: str | None = None, config: Config | str | os.PathLike | None = None,
          out: str | os.PathLike | None = None, name: str | None = None, quiet: bool = False,
          callbacks: Sequence[Callback] = (), **keys: Any) -> Run:
    """Train as ``cnnlab train`` does and return the finished run.

    Any config key is a keyword (``lr=0.01``, ``train_size=2000``, ``init_from=run.path``;
    ``cnnlab train --help`` lists them), over ``recipe`` and over ``config`` (a YAML file, or a
    ``Config``); ``data``, ``model`` and ``epochs`` left out keep the config's. The run goes to
    ``out``, else runs/``name`` (default: model-data-time). ``quiet``: no header, progress or
    epoch lines. ``callbacks`` run after the config's own (``cnnlab.engine.callbacks``)."""
    given = {"data": data, "model": model, "epochs": epochs}
    changes = {k: _plain(v) for k, v in {**{k: v for k, v in given.items() if v is not None}, **keys}.items()}
    if isinstance(config, Config):
        if recipe:
            raise CnnlabError(f"{SOURCE}: give recipe={recipe!r} or a Config, not both (a Config already holds "
                              f"its recipe's values: cnnlab.core.config.resolve(recipe=...) makes one)")
        cfg = merge(config, changes, source=SOURCE)
    else:   # the keywords are the top layer, checked with the others as one config
        cfg = resolve(recipe=recipe, config_file=_plain(config), overrides=changes, overrides_source=SOURCE)
    if cfg.nproc > 1:
        raise CnnlabError(f"cnnlab.train() trains in this process: nproc {cfg.nproc} needs the command line, "
                          f"`cnnlab train --nproc {cfg.nproc} ...`")
    run = fit(cfg, out=_plain(out), name=name, progress=not quiet, callbacks=callbacks)
    write_report(run.path)   # plots/ and report.html, as the command line writes them after training
    return Run(run)


def load(path: str | os.PathLike) -> Run:
    """A run folder written by ``cnnlab train`` or ``cnnlab.train`` (finished or checkpointed),
    or a model with published ImageNet weights by name (``cnnlab.load("efficientnet_lite0")``,
    ``"resnet50.imagenet1k_v1"``), ready to predict and explain."""
    return Run(runs.load_run(_plain(path)))


def show_samples(data: str | os.PathLike = "cifar10", per_class: int = 8, *, data_dir: str | None = None,
                 seed: int = 0) -> Figure:
    """A grid of training images, one row per class with its name, as ``cnnlab data show``
    draws it (``data``: a dataset name or an image folder)."""
    with tempfile.TemporaryDirectory(prefix="cnnlab-samples-") as tmp:
        png = write_sample_grid(str(_plain(data)), Path(tmp) / "samples.png", data_dir=data_dir,
                                per_class=per_class, seed=seed)
        return png_figure(png.read_bytes())


def models(*, parameters: bool = False, input_size: int = 32, in_channels: int = 3,
           num_classes: int = 10) -> list[dict[str, Any]]:
    """The zoo, one dict per model: name, family, year, paper; ``parameters=True`` also builds
    each model for the input and counts ``parameters`` and ``mflops`` (seconds, as ``cnnlab
    models`` does)."""
    if parameters:
        return zoo_table(input_size=input_size, in_channels=in_channels, num_classes=num_classes)
    return [{"name": n, "family": (i := model_info(n)).family, "year": i.year, "paper": i.paper}
            for n in list_models()]


def summary(name: str, *, input_size: int = 32, in_channels: int = 3, num_classes: int = 10) -> str:
    """The Keras-style layer table of a zoo model (``print`` it), as ``cnnlab summary``."""
    net = create_model(name, num_classes=num_classes, in_channels=in_channels, input_size=input_size)
    return format_summary(net, name, (in_channels, input_size, input_size))


__all__ = ["train", "load", "show_samples", "models", "summary", "Run", "Report", "Explanation", "png_figure",
           "PLOTS"]
