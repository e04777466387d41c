"""Export a run's model to one self-contained ONNX file, checked against PyTorch.

The file holds the whole ``Classifier``: normalisation and network. Its contract:

    input  ``image``   float32 (N, C, H, W), RGB (C=3) or grey (C=1) scaled to [0, 1],
                       H and W the run's input size, any batch size N
    output ``logits``  float32 (N, classes); softmax gives probabilities
    metadata_props     ``class_names`` (JSON list, in logit order), ``input_size`` ([h, w]),
                       ``in_channels``, ``arch``, ``mean``/``std`` (already applied inside),
                       ``input`` (the contract in words), ``cnnlab`` (version)

Weights are embedded (no external data files: ONNX external data paths are a path-traversal
risk, and a single file is what apps ship), so a model
must serialise under protobuf's 2 GiB limit. Before anything is written, ONNX Runtime runs
the exported graph on sample inputs (random, smooth, constant and real images) and its
logits must match PyTorch's; otherwise ``CnnlabError`` and no file.

Exporter: the TorchScript-based one (``dynamo=False``) is fast and handles every model in
the zoo once adaptive average pools with a non-dividing grid (AlexNet's 3x3 -> 2x2 at
32 px) are replaced by an exact fixed-window equivalent; ``exporter="auto"`` falls back to
the torch.export-based exporter when the TorchScript one fails or is removed.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch
from torch import nn

from cnnlab.core.errors import CnnlabError
from cnnlab.core.files import write_bytes
from cnnlab.core.version import __version__
from cnnlab.data.images import is_image_name
from cnnlab.models.inspect import forward_with_hooks

INPUT_NAME, OUTPUT_NAME = "image", "logits"
# Opset 17: run by every ONNX Runtime since 1.13 (2022) and by onnxruntime-web / mobile.
OPSET = 17
# PyTorch and ONNX Runtime may sum in different orders; float32 differences on the zoo's
# deepest nets are ~1e-5 of the largest logit. A real export bug is off by far more.
ATOL, RTOL = 1e-4, 1e-3
# Export with a batch above 1, so no exporter can specialise the batch dimension to 1.
_EXPORT_BATCH = 2
_PROTOBUF_LIMIT = 2**31 - 1          # bytes: a ModelProto larger than this cannot be one file
_REAL_SAMPLES = 8                    # images taken from the run's data folder for the check
_CHECK_THREADS = 1                   # ONNX Runtime threads for the check: a few small batches
Exporter = Literal["auto", "torchscript", "dynamo"]


@dataclass
class ExportResult:
    path: Path
    bytes: int
    exporter: str
    samples: int                     # inputs compared, real images included
    real_images: int
    max_abs_diff: float
    tolerance: float
    metadata: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------- graph
class FixedAdaptiveAvgPool2d(nn.Module):
    """``AdaptiveAvgPool2d`` for one known input size, as a matrix product.

    Output cell (i, j) averages rows floor(i*H/oh) .. ceil((i+1)*H/oh) and the same for
    columns, exactly as PyTorch does; the windows overlap when oh does not divide H, which
    the TorchScript exporter refuses. (N, C, H, W) -> (N, C, oh, ow).
    """

    def __init__(self, in_hw: tuple[int, int], out_hw: tuple[int, int]):
        super().__init__()
        (h, w), (oh, ow) = in_hw, out_hw
        rows, cols = _window_matrix(h, oh), _window_matrix(w, ow)       # (oh, H), (ow, W)
        # (oh*ow, H*W): weight of input pixel (y, x) in output cell (i, j)
        weights = torch.einsum("iy,jx->ijyx", rows, cols).reshape(oh * ow, h * w)
        self.register_buffer("weights", weights.t().contiguous(), persistent=False)  # (H*W, oh*ow)
        self.out_hw = (oh, ow)

    weights: torch.Tensor   # the buffer registered above

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[0], x.shape[1]
        return torch.matmul(x.flatten(2), self.weights).reshape(n, c, *self.out_hw)


def _window_matrix(size: int, out: int) -> torch.Tensor:
    m = torch.zeros(out, size)
    for i in range(out):
        start, end = (i * size) // out, -(-((i + 1) * size) // out)
        m[i, start:end] = 1.0 / (end - start)
    return m


def _pair(v: Any, like: tuple[int, int]) -> tuple[int, int]:
    v = (v, v) if isinstance(v, int) or v is None else tuple(v)
    h, w = (side if o is None else int(o) for o, side in zip(v, like))  # None keeps that side
    return h, w


def exportable(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """A copy of ``model`` whose adaptive average pools the TorchScript exporter accepts."""
    seen: dict[str, tuple[int, int]] = {}
    pools = {n: m for n, m in model.named_modules() if type(m) is nn.AdaptiveAvgPool2d}
    if not pools:
        return model
    forward_with_hooks(model, example, pools.items(),
                       lambda name, mod, inputs, out: seen.__setitem__(name, tuple(inputs[0].shape[-2:])))
    swaps = {}
    for name, in_hw in seen.items():
        out_hw = _pair(pools[name].output_size, in_hw)
        if in_hw[0] % out_hw[0] or in_hw[1] % out_hw[1]:      # dividing grids export as AveragePool
            swaps[name] = FixedAdaptiveAvgPool2d(in_hw, out_hw)
    if not swaps:
        return model
    copy_ = copy.deepcopy(model)
    for name, fixed in swaps.items():
        parent_name, _, attr = name.rpartition(".")
        setattr(copy_.get_submodule(parent_name), attr, fixed)
    return copy_


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporters' deprecation notes and log chatter; real errors still raise."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _export_torchscript(model: nn.Module, example: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    with _quiet_exporter():
        torch.onnx.export(exportable(model, example), (example,), buf, dynamo=False, opset_version=OPSET,  # type: ignore[arg-type]
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], do_constant_folding=True,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    return buf.getvalue()


def _export_dynamo(model: nn.Module, example: torch.Tensor) -> bytes:
    with _quiet_exporter():
        # Its own default opset: asking for an older one goes through a lossy, noisy converter.
        program = torch.onnx.export(model, (example,), None, dynamo=True,
                                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes=({0: torch.export.Dim("batch")},),
                                    optimize=True, verbose=False)
    assert program is not None   # f=None: the program is returned, not written
    return program.model_proto.SerializeToString()


def onnx_graph(model: nn.Module, in_channels: int, input_size: tuple[int, int],
               exporter: Exporter = "auto") -> tuple[bytes, str]:
    """Serialised ONNX for an eval-mode CPU model, and the name of the exporter that made it."""
    if exporter not in ("auto", "torchscript", "dynamo"):
        raise CnnlabError(f"unknown exporter {exporter!r}: use auto, torchscript or dynamo")
    example = torch.rand(_EXPORT_BATCH, in_channels, *input_size)
    errors = []
    for name, fn in (("torchscript", _export_torchscript), ("dynamo", _export_dynamo)):
        if exporter not in ("auto", name):
            continue
        try:
            return fn(model, example), name
        except Exception as e:  # noqa: BLE001  the exporters raise many types; all mean "could not export"
            errors.append(f"{name} exporter: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    raise CnnlabError("could not export the model to ONNX: " + "; ".join(errors))


def add_metadata(proto, metadata: dict[str, str]) -> None:
    for key, value in metadata.items():
        prop = next((p for p in proto.metadata_props if p.key == key), None) or proto.metadata_props.add()
        prop.key, prop.value = key, value


def run_metadata(run) -> dict[str, str]:
    card = run.card
    return {
        "class_names": json.dumps(list(run.class_names)),
        "input_size": json.dumps(list(run.input_size)),
        "in_channels": str(run.in_channels),
        "arch": str(card.get("arch", "")),
        "mean": json.dumps(card.get("mean")),
        "std": json.dumps(card.get("std")),
        "input": (f"float32 (N, {run.in_channels}, {run.input_size[0]}, {run.input_size[1]}) "
                  f"{'RGB' if run.in_channels == 3 else 'grey'} scaled to [0, 1]; "
                  f"mean/std normalisation is inside the graph"),
        "output": "float32 (N, classes) logits in class_names order; softmax for probabilities",
        "cnnlab": __version__,
    }


def _self_contained(proto) -> None:
    from onnx import TensorProto
    external = [t.name for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    if external:
        raise CnnlabError(f"the exported graph refers to external data for {len(external)} tensor(s) "
                          f"({', '.join(external[:3])}); cnnlab only writes self-contained ONNX files")


def finish_graph(raw: bytes, metadata: dict[str, str]) -> bytes:
    """Add metadata, check the graph is valid and self-contained, serialise it."""
    import onnx
    proto = onnx.load_from_string(raw)
    _self_contained(proto)
    add_metadata(proto, metadata)
    proto.doc_string = "cnnlab classifier: " + metadata.get("input", "")
    size = proto.ByteSize()
    if size > _PROTOBUF_LIMIT:
        raise CnnlabError(f"the model is {size / 2**30:.1f} GiB as ONNX, over protobuf's 2 GiB limit "
                          f"for a single self-contained file")
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        raise CnnlabError(f"the exported ONNX graph is invalid: {str(e).splitlines()[0]}") from None
    return proto.SerializeToString()


# ----------------------------------------------------------------------------- check
def onnx_session(source: bytes | str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session for a file or serialised model."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3   # errors only
    src = source if isinstance(source, bytes) else str(source)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def _sample_images(run, given: Sequence[str | Path]) -> list[np.ndarray]:
    """Real images for the check: those given (an unreadable one is an error), else a few
    from the run's image folder (unreadable ones skipped). Official datasets give none."""
    if given:
        return [run.load_image(p) for p in given]
    paths: list[Path] = []
    data = Path(str(run.config.data))
    for split in ("test", "val", "train") if data.is_dir() else ():
        for root, dirs, files in os.walk(data / split):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            paths += [Path(root) / f for f in sorted(files) if is_image_name(f)][:2]   # 2 per class
            if len(paths) >= _REAL_SAMPLES:
                break
        if paths:
            break
    images = []
    for p in paths[:_REAL_SAMPLES]:
        try:
            images.append(run.load_image(p))
        except CnnlabError:
            continue
    return images


def sample_inputs(in_channels: int, input_size: tuple[int, int], real: Sequence[np.ndarray] = (),
                  seed: int = 0) -> torch.Tensor:
    """(N, C, H, W) in [0, 1]: uniform noise, smooth noise, black, white, then real images."""
    g = torch.Generator().manual_seed(seed)
    h, w = input_size
    noise = torch.rand(4, in_channels, h, w, generator=g)
    smooth = torch.nn.functional.interpolate(torch.rand(4, in_channels, 4, 4, generator=g), size=(h, w),
                                             mode="bilinear", align_corners=False)
    flat = torch.stack([torch.zeros(in_channels, h, w), torch.ones(in_channels, h, w)])
    parts = [noise, smooth, flat]
    if len(real):
        parts.append(torch.as_tensor(np.stack(real)).permute(0, 3, 1, 2).float().div(255))
    return torch.cat(parts)


def compare_with_pytorch(session, model: nn.Module, x: torch.Tensor, *, atol: float = ATOL,
                         rtol: float = RTOL) -> dict[str, float]:
    """Run both on ``x`` (whole batch, and the first image alone); raise if they disagree."""
    with torch.no_grad():
        ref = model(x).float().numpy()
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy().astype(np.float32)})[0]
    single = session.run([OUTPUT_NAME], {INPUT_NAME: x[:1].numpy().astype(np.float32)})[0]
    if got.shape != ref.shape or single.shape != ref[:1].shape:
        raise CnnlabError(f"ONNX Runtime returned logits shaped {got.shape} (batch) and {single.shape} "
                          f"(single image); PyTorch gives {ref.shape}")
    diff = float(max(np.abs(got - ref).max(), np.abs(single - ref[:1]).max()))
    tol = atol + rtol * float(np.abs(ref).max())
    if not np.isfinite(got).all() or not diff <= tol:
        raise CnnlabError(f"ONNX Runtime and PyTorch disagree: largest logit difference {diff:.3g} over "
                          f"{len(x)} sample inputs, tolerance {tol:.3g}; the exported file was not written")
    # A top-1 flip only counts when PyTorch's own margin is clearly larger than the tolerance.
    top2 = np.sort(ref, axis=1)[:, -2:] if ref.shape[1] > 1 else np.zeros((len(ref), 2))
    clear = (top2[:, 1] - top2[:, 0]) > 2 * tol
    flips = int(((got.argmax(1) != ref.argmax(1)) & clear).sum())
    if flips:
        raise CnnlabError(f"ONNX Runtime and PyTorch pick different classes for {flips} of {len(x)} "
                          f"sample inputs; the exported file was not written")
    return {"max_abs_diff": diff, "tolerance": tol}


# ----------------------------------------------------------------------------- export
def export_onnx(run, out: str | Path | None = None, *, exporter: Exporter = "auto",
                check_images: Sequence[str | Path] = (), atol: float = ATOL, rtol: float = RTOL) -> ExportResult:
    """Write ``run`` as ONNX to ``out`` (default ``<run>/model.onnx``) after checking it.

    ``run`` is a ``Run`` or a run folder. The check uses ``check_images`` as its real
    images, or a few from the run's image folder when none are given.
    """
    from cnnlab.engine.runs import Run, load_run
    run = run if isinstance(run, Run) else load_run(run)
    out = Path(out) if out is not None else run.onnx_file
    if out.is_dir():
        raise CnnlabError(f"--out {out} is a folder: give a file name such as {out / 'model.onnx'}")
    if out.suffix.lower() != ".onnx":
        raise CnnlabError(f"--out {out}: use a file name ending in .onnx")
    model = run.model("cpu").eval()
    real = _sample_images(run, check_images)
    raw, used = onnx_graph(model, run.in_channels, run.input_size, exporter)
    metadata = run_metadata(run)
    data = finish_graph(raw, metadata)
    x = sample_inputs(run.in_channels, run.input_size, real)
    check = compare_with_pytorch(onnx_session(data, threads=_CHECK_THREADS), model, x, atol=atol, rtol=rtol)
    write_bytes(out, data)
    return ExportResult(out, len(data), used, len(x), len(real), check["max_abs_diff"], check["tolerance"],
                        metadata)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of an exported file, JSON values decoded (``class_names`` is a list)."""
    session = onnx_session(path)
    meta = dict(session.get_modelmeta().custom_metadata_map)
    for key in ("class_names", "input_size", "mean", "std"):
        if key in meta:
            meta[key] = json.loads(meta[key])
    if "in_channels" in meta:
        meta["in_channels"] = int(meta["in_channels"])
    return meta
