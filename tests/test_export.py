"""apps/export.py: ONNX export checked against PyTorch, on CIFAR-like images and on every zoo model."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnlab.cli import main
from cnnlab.core.config import Config
from cnnlab.core.errors import CnnlabError
from cnnlab.core.hardware import choose_precision
from cnnlab.data.images import load_image
from cnnlab.engine.runs import environment, model_card, save_config, save_model
from cnnlab.models import list_models
from cnnlab.models.classifier import build_classifier
from conftest import cifar_test_images as _cifar_test_images
from conftest import zoo_params

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
export = pytest.importorskip("cnnlab.apps.export")


def _fake_run(folder: Path, arch: str, classes: int = 5, channels: int = 3, size: int = 32) -> Path:
    """A run folder holding an untrained model: enough for export and predict."""
    torch.manual_seed(0)
    mean, std = [0.45] * channels, [0.25] * channels
    cfg = Config(model=arch)
    model = build_classifier(arch, classes, size, mean, std).eval()
    save_config(folder, cfg, environment(torch.device("cpu"), choose_precision("fp32", torch.device("cpu"))))
    save_model(folder, model, model_card(cfg, [f"class{i}" for i in range(classes)], (size, size, channels), mean, std))
    return folder


def test_onnx_matches_pytorch_on_200_cifar_images(trained_run, make_subset, tmp_path):
    out = tmp_path / "onnx" / "model.onnx"
    result = export.export_onnx(trained_run, out)
    assert result.real_images > 0                      # the export's own check used the run's data images
    assert os.listdir(out.parent) == ["model.onnx"]    # one file: no external data, no temp left

    proto = onnx.load(str(out), load_external_data=False)
    assert [i.name for i in proto.graph.input] == ["image"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    meta = export.read_metadata(out)
    assert meta["class_names"] == trained_run.class_names and meta["input_size"] == [32, 32]

    paths, _ = _cifar_test_images(make_subset({"test": 20}), per_class=20)
    assert len(paths) == 200
    x = np.stack([load_image(p, (32, 32), 3) for p in paths]).transpose(0, 3, 1, 2).astype(np.float32) / 255
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"image": x})[0]
    with torch.no_grad():
        ref = trained_run.model("cpu")(torch.from_numpy(x)).numpy()
    assert got.shape == (200, 10)
    # Two libraries' float32 kernels (ONNX Runtime's and oneDNN's, whatever the ISA): each layer
    # rounds its sums differently (~1e-6 relative), which five layers grow to ~1e-5 of logits ~10.
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    assert (got.argmax(1) == ref.argmax(1)).all()


def test_export_cli_writes_run_model_onnx(trained_run, capsys):
    assert main(["export", str(trained_run.path), "--format", "onnx"]) == 0
    assert "ONNX Runtime matches PyTorch" in capsys.readouterr().out
    assert (trained_run.path / "model.onnx").is_file()
    assert not [p for p in os.listdir(trained_run.path) if p.endswith(".tmp")]


def test_export_fails_when_onnx_runtime_disagrees(trained_run, tmp_path, monkeypatch):
    """A graph that does not compute what PyTorch computes is refused and nothing is written."""
    real = export.onnx_graph

    def wrong_graph(model, in_channels, input_size, exporter="auto"):
        other = build_classifier("tutorial", 10, 32, [0.5] * 3, [0.25] * 3).eval()
        return real(other, in_channels, input_size, exporter)

    monkeypatch.setattr(export, "onnx_graph", wrong_graph)
    out = tmp_path / "bad.onnx"
    with pytest.raises(CnnlabError, match="disagree|different classes"):
        export.export_onnx(trained_run, out)
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.fixture
def one_thread():
    """Tracing and tiny batches gain nothing from threads; on a busy machine they lose a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("arch", zoo_params(list_models()))
def test_every_zoo_model_exports(arch, tmp_path, one_thread):
    run = _fake_run(tmp_path / "run", arch)
    result = export.export_onnx(run)       # raises if ONNX Runtime disagrees with PyTorch
    assert result.path == run / "model.onnx" and export.read_metadata(result.path)["arch"] == arch


def test_grey_input_and_the_dynamo_exporter(tmp_path, one_thread):
    run = _fake_run(tmp_path / "run", "tutorial", classes=3, channels=1, size=28)
    result = export.export_onnx(run, exporter="dynamo")
    assert result.exporter == "dynamo"
    session = export.onnx_session(result.path)
    shape = session.get_inputs()[0].shape
    assert shape[1:] == [1, 28, 28] and session.run(None, {"image": np.zeros((7, 1, 28, 28), np.float32)})[0].shape == (7, 3)


@pytest.mark.parametrize("in_hw,out_hw", [((3, 3), (2, 2)), ((7, 5), (3, 2)), ((6, 6), (4, 1))])
def test_fixed_adaptive_pool_equals_pytorch(in_hw, out_hw):
    x = torch.randn(2, 4, *in_hw)
    fixed = export.FixedAdaptiveAvgPool2d(in_hw, out_hw)(x)
    torch.testing.assert_close(fixed, torch.nn.AdaptiveAvgPool2d(out_hw)(x))


def test_export_refuses_a_bad_out_path(trained_run, tmp_path):
    with pytest.raises(CnnlabError, match="ending in .onnx"):
        export.export_onnx(trained_run, tmp_path / "model.txt")
