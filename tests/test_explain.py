"""`cnnlab explain`: Grad-CAM on constructed cases with known answers and against its formula,
the stage and layer rules on the zoo, shapes against the model summary, every zoo model
drawing all three pictures, the reusable overlay, and the command end to end, on a run or on a
published model named instead."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cnnlab.apps.explain import explain_image, explain_run, gradcam_overlay_png
from cnnlab.cli import main
from cnnlab.core.config import Config
from cnnlab.core.errors import CnnlabError
from cnnlab.engine.runs import load_run, model_card, save_config, save_model
from cnnlab.models import list_models, model_info
from cnnlab.models.classifier import build_classifier
from cnnlab.models.googlenet import INCEPTION_TABLE
from cnnlab.models.inspect import (
    CHANNELS_PER_STAGE,
    feature_stages,
    filter_tiles,
    find_target_layer,
    first_conv,
    gradcam,
    layer_names,
)
from cnnlab.models.summary import layer_table
from conftest import IMAGENET_SAMPLE, zoo_params
from conftest import imagenet_photos as _photos

SIDE = 16                 # constructed cases: 16x16 grey images
SMALL = 28                # zoo models: the smallest size every family takes
CLASSES = ["cat", "dog", "ship"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The default Grad-CAM layer at 28 px: a ResNet's last residual stage, not the last conv inside
# its last block; the whole Inception module, not a branch; the activation after a plain conv;
# VGG's last 2x2 block (the 1x1 map after its pool is skipped).
DEFAULT_LAYER = {"resnet18": "stages.3", "resnet50": "stages.3", "resnet20": "stages.2",
                 "googlenet": "inception.inception5b", "tutorial": "7", "vgg11": "features.27",
                 "lenet5": "features.4", "alexnet": "features.11"}
SRC = Path(__file__).resolve().parents[1] / "src"


class HalfMask(nn.Module):
    """Zeroes the image except its left (or right) half: the model cannot see the rest."""

    def __init__(self, keep: str):
        super().__init__()
        self.keep = keep

    def forward(self, x):
        mask = torch.zeros_like(x)
        half = x.shape[-1] // 2
        if self.keep == "left":
            mask[..., :half] = 1
        else:
            mask[..., half:] = 1
        return x * mask


def _box_net(stride: int = 1, mask: nn.Module | None = None) -> nn.Sequential:
    """(N, 1, H, W) -> 3x3 box filter (no bias) -> ReLU -> global mean -> class 0 = +mean,
    class 1 = -mean: class 0's evidence is wherever the (visible) image is bright."""
    conv = nn.Conv2d(1, 1, 3, stride=stride, padding=1, bias=False)
    head = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1 / 9)
        head.weight.copy_(torch.tensor([[1.0], [-1.0]]))
    layers = [mask] if mask is not None else []
    return nn.Sequential(*layers, conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)


@pytest.mark.parametrize("keep", ["left", "right"])
def test_gradcam_heat_lies_where_the_model_can_see(keep):
    torch.manual_seed(0)
    net = _box_net(mask=HalfMask(keep))
    x = torch.rand(1, SIDE, SIDE) * 0.5 + 0.5
    heat, logits = gradcam(net, x)                  # default layer: the ReLU after the conv
    assert heat.shape == (SIDE, SIDE) and heat.dtype == np.float32
    assert heat.min() >= 0 and heat.max() == pytest.approx(1.0)
    seen, unseen = (heat[:, :SIDE // 2], heat[:, SIDE // 2:]) if keep == "left" else \
                   (heat[:, SIDE // 2:], heat[:, :SIDE // 2])
    assert seen.sum() > 0.9 * heat.sum()
    # Beyond the 3x3 kernel's one-pixel reach across the border there is no heat at all.
    far = unseen[:, 1:] if keep == "left" else unseen[:, :-1]
    assert far.max() == 0
    assert int(np.argmax(logits)) == 0


def test_gradcam_finds_a_bright_square_through_a_strided_layer():
    net = _box_net(stride=2)                        # 8x8 maps, upsampled back to 16x16
    x = torch.zeros(1, SIDE, SIDE)
    x[:, 2:6, 9:13] = 1.0                           # top right quadrant
    heat, _ = gradcam(net, x, "1", class_index=0)
    r, c = np.unravel_index(np.argmax(heat), heat.shape)
    assert 1 <= r <= 6 and 8 <= c <= 13
    assert heat[SIDE // 2:, :].max() < 0.2          # bottom half: far from the square
    # Class 1 is the negated score: no location raises it, so its map is all zeros.
    heat1, _ = gradcam(net, x, "1", class_index=1)
    assert heat1.max() == 0


def test_gradcam_equals_its_formula_and_leaves_the_model_as_it_was():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(5, 4))
    net.train()
    x = torch.rand(3, 12, 12)
    with torch.no_grad():
        acts = net[1](net[0](x[None]))[0]                            # (5, 12, 12)
        logits = net(x[None])[0]
    for k in range(4):
        heat, got_logits = gradcam(net, x, net[1], class_index=k)
        # d logit_k / d A_c(i, j) = W[k, c] / (h * w) for a global mean then a Linear layer.
        alpha = net[4].weight[k].detach() / (12 * 12)
        cam = torch.relu((alpha[:, None, None] * acts).sum(0))
        cam = cam / cam.max() if cam.max() > 0 else cam
        # float32 values of order 1, summed over 5 channels in another order than autograd's:
        # a few ulps (1.2e-7 each) apart; the same layers on the same input give the logits.
        np.testing.assert_allclose(heat, cam.numpy(), atol=1e-5)
        np.testing.assert_allclose(got_logits, logits.numpy(), atol=1e-6)
    assert net.training                                              # mode restored
    assert all(p.grad is None for p in net.parameters())             # nothing accumulated


def test_layer_names_can_be_chosen_and_wrong_ones_are_listed():
    model = build_classifier("resnet20", 10, 32, [0.5] * 3, [0.25] * 3)
    shape = (3, 32, 32)
    assert find_target_layer(model, "stages.1", shape).output_shape == (32, 16, 16)
    assert find_target_layer(model, "net.stages.1", shape).name == "stages.1"
    with pytest.raises(CnnlabError, match=r"did you mean stages\.1.*valid names:.*stages\.2"):
        find_target_layer(model, "stage.1", shape)
    with pytest.raises(CnnlabError, match="no layer 'fc'"):   # a 2-D output is no map
        find_target_layer(model, "fc", shape)
    assert "fc" not in layer_names(model, shape) and "stem.0" in layer_names(model, shape)


def _rows_spatial_runs(rows):
    sizes = [r["output_shape"][1:] for r in rows
             if len(r["output_shape"]) == 3 and r["output_shape"][1] * r["output_shape"][2] > 1]
    return [s for i, s in enumerate(sizes) if i == 0 or s != sizes[i - 1]]


@pytest.mark.parametrize("arch", zoo_params(list_models()))
def test_every_zoo_model_draws_all_three_pictures_with_the_summary_shapes(arch, tmp_path):
    torch.manual_seed(0)
    c = 3 if list_models().index(arch) % 2 else 1                   # both 1 and 3 channels
    side = max(SMALL, model_info(arch).min_size)                     # ConvNeXt takes 32 px and up
    model = build_classifier(arch, len(CLASSES), side, [0.5] * c, [0.25] * c)
    image = np.random.default_rng(0).integers(0, 256, (side, side, c), dtype=np.uint8)
    summary = explain_image(model, image, CLASSES, tmp_path, class_name="ship", top_k=2)
    for f in ("filters.png", "feature_maps.png", "gradcam.png"):
        assert (tmp_path / f).read_bytes()[:8] == PNG_MAGIC
        with Image.open(tmp_path / f) as im:
            assert min(im.size) > 100
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["predicted"]["class"] in CLASSES and len(summary["top"]) == 2
    assert sum(summary["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)

    rows = layer_table(model.net, (c, side, side))
    by_name = {r["layer"]: r for r in rows}
    first = next(r for r in rows if isinstance(model.net.get_submodule(r["layer"]), torch.nn.Conv2d))
    assert summary["first_conv"]["name"] == first["layer"]
    assert summary["first_conv"]["weight_shape"][0] == first["output_shape"][0]
    assert summary["layer"]["output_shape"] == list(by_name[summary["layer"]["name"]]["output_shape"]) \
        if summary["layer"]["name"] in by_name else summary["layer"]["output_shape"][1:] in \
        [list(s) for s in _rows_spatial_runs(rows)]
    if arch in DEFAULT_LAYER:
        assert summary["layer"]["name"] == DEFAULT_LAYER[arch]
    stages = summary["stages"]
    assert [tuple(s["output_shape"][1:]) for s in stages] == _rows_spatial_runs(rows)
    for s in stages:
        if s["name"] in by_name:                                     # a leaf: the same row
            assert tuple(s["output_shape"]) == by_name[s["name"]]["output_shape"]
        else:                                                        # a block: its last leaf's size
            last = [r for r in rows if r["layer"].startswith(s["name"] + ".")][-1]
            assert tuple(s["output_shape"][1:]) == last["output_shape"][1:]
        assert len(s["channels_shown"]) == min(CHANNELS_PER_STAGE, s["output_shape"][0])
    if arch == "googlenet":     # an Inception module's output is its four branches concatenated
        out = {n: w[0] + w[2] + w[4] + w[5] for n, w in (t for t in INCEPTION_TABLE if t != "M")}
        assert [s["output_shape"][0] for s in stages] == [out["3b"], out["4e"], out["5b"]]


@pytest.mark.parametrize("arch,c", [("tutorial", 3), ("resnet20", 1)])
def test_filter_tiles_and_feature_maps_arrays(arch, c):
    model = build_classifier(arch, 10, 32, [0.5] * c, [0.25] * c)
    name, conv = first_conv(model, (c, 32, 32))
    tiles = filter_tiles(conv)
    assert tiles.shape == (conv.out_channels, *conv.kernel_size, c)
    assert tiles.min() == 0 and tiles.max() == 1                     # each kernel stretched to [0, 1]
    for s in feature_stages(model, torch.rand(c, 32, 32)):
        n = min(CHANNELS_PER_STAGE, s.output_shape[0])
        assert s.maps.shape == (n, *s.output_shape[1:]) and len(set(s.channels)) == n
        strength = np.abs(s.maps).mean(axis=(1, 2))
        assert np.all(np.diff(strength) <= 1e-6)                     # strongest first


def _fake_run(path: Path, arch: str = "tutorial", c: int = 3, size: int = 32) -> Path:
    cfg = Config(model=arch)
    mean, std = [0.5] * c, [0.25] * c
    torch.manual_seed(0)
    model = build_classifier(arch, len(CLASSES), size, mean, std)
    save_model(path, model, model_card(cfg, CLASSES, (size, size, c), mean, std))
    save_config(path, cfg, {})
    return path


def _write_image(path: Path, size=(40, 30), mode="RGB") -> Path:
    rng = np.random.default_rng(len(str(path)))
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return path


def test_overlay_png_for_the_report_and_the_web_page(tmp_path):
    run = load_run(_fake_run(tmp_path / "run", "lenet5", c=1, size=28))
    img = _write_image(tmp_path / "a.png")
    for source in (img, str(img), img.read_bytes(),
                   np.zeros((50, 60, 3), np.uint8), np.full((28, 28), 200, np.uint8)):
        data = gradcam_overlay_png(run, source, layer="features.1")
        assert data[:8] == PNG_MAGIC
        with Image.open(io.BytesIO(data)) as im:
            assert im.mode == "RGB" and im.size == (140, 140)      # 28 px x 5 >= 128
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(CnnlabError, match="not a readable image"):
        gradcam_overlay_png(run, bad)


def test_explain_run_folders_errors_and_nothing_written_on_bad_input(tmp_path):
    run = _fake_run(tmp_path / "run")
    (tmp_path / "x").mkdir()
    a, b = _write_image(tmp_path / "img.png"), _write_image(tmp_path / "x" / "img.jpg", mode="L")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff")
    with pytest.raises(CnnlabError, match="broken.jpg"):
        explain_run(run, [a, bad], out=tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()
    with pytest.raises(CnnlabError, match="not one of the run's classes.*cat, dog, ship"):
        explain_run(run, [a], out=tmp_path / "out", class_name="horse", device="cpu")
    results = explain_run(run, [a, b], top_k=1, device="cpu")        # default out: RUN/explain
    assert [Path(r["folder"]).name for r in results] == ["img", "img-2"]
    assert all(Path(r["folder"]).parent == run / "explain" for r in results)
    doc = json.loads((run / "explain" / "img-2" / "summary.json").read_text())
    assert doc["image"] == str(b) and doc["arch"] == "tutorial" and len(doc["top"]) == 1


def test_cli_explain_end_to_end(tmp_path, capsys):
    run = _fake_run(tmp_path / "run")
    img = _write_image(tmp_path / "photo.jpg")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "cnnlab", "explain", str(run), str(img), "--out", str(out),
                           "--class", "dog", "--top-k", "3", "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    folder = out / "photo"
    assert sorted(p.name for p in folder.iterdir()) == ["feature_maps.png", "filters.png", "gradcam.png",
                                                        "summary.json"]
    doc = json.loads((folder / "summary.json").read_text())
    assert doc["layer"] == {"name": "7", "type": "ReLU", "output_shape": [64, 4, 4], "default": True}
    assert "dog" in doc["gradcam_classes"] and len(doc["top"]) == 3
    assert f"-> {folder}/" in proc.stdout
    # A wrong --layer: exit status 2 and the valid names in the message (in-process, faster).
    assert main(["explain", str(run), str(img), "--out", str(out), "--layer", "nope", "--device", "cpu"]) == 2
    assert "valid names: 0, 1, 2" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gradcam_on_cuda_matches_cpu():
    torch.manual_seed(0)
    model = build_classifier("resnet20", 10, 32, [0.5] * 3, [0.25] * 3).eval()
    x = torch.rand(3, 32, 32)
    heat_cpu, logits_cpu = gradcam(model, x)
    heat_gpu, logits_gpu = gradcam(model.cuda(), x)
    # cuDNN may pick TF32 or Winograd kernels: ~1e-3 of the logits, not the CPU's ulps.
    np.testing.assert_allclose(logits_gpu, logits_cpu, atol=1e-3)
    np.testing.assert_allclose(heat_gpu, heat_cpu, atol=1e-2)
    assert feature_stages(model, x)[-1].output_shape == (64, 8, 8)


# ----------------------------------------------------------------------------- a published model by name
@pytest.mark.shared_data(IMAGENET_SAMPLE)
def test_explain_takes_a_model_name(lite0_weights, tmp_path, capsys):
    photo = _photos(1)[0]
    assert main(["explain", "efficientnet_lite0", str(photo), "--out", str(tmp_path / "x")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{photo}: tench") and "Grad-CAM at head 1280x7x7" in out
