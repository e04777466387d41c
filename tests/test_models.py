"""The model zoo: every registered model honours the interface; parameter counts match the
figures in the papers and docstrings; the registry and the summaries behave."""
from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from cnnlab.core.errors import CnnlabError
from cnnlab.models import create_model, list_models, model_info, register_model
from cnnlab.models.summary import count_flops, count_parameters, format_summary, layer_table, zoo_table

NUM_CLASSES = 7          # not 10, so a hard-coded class count would show
BATCH = 2                # batch norm needs more than one value per channel in train mode
SMALL_SIZE_MAX = 64      # sizes up to this get forward + backward; larger ones forward only

ALL_MODELS = ("tutorial", "lenet5", "alexnet", "vgg11", "vgg13", "vgg16", "vgg19",
              "resnet20", "resnet56", "resnet18", "resnet34", "resnet50", "googlenet")

CASES = [(name, size, c) for name in list_models() for size in model_info(name).input_sizes
         for c in (1, 3)]


@pytest.mark.parametrize("name,size,in_channels", CASES,
                         ids=[f"{n}-{s}px-{c}ch" for n, s, c in CASES])
def test_every_model_honours_the_interface(name, size, in_channels):
    torch.manual_seed(0)
    model = create_model(name, num_classes=NUM_CLASSES, in_channels=in_channels, input_size=size)
    x = torch.randn(BATCH, in_channels, size, size)
    if size > SMALL_SIZE_MAX:   # ImageNet-sized: forward only, to keep the suite fast
        model.eval()
        with torch.no_grad():
            out = model(x)
        assert out.shape == (BATCH, NUM_CLASSES)
        assert torch.isfinite(out).all()
        return
    model.train()
    out = model(x)
    assert out.shape == (BATCH, NUM_CLASSES)
    assert torch.isfinite(out).all()
    out.sum().backward()
    trainable = [(pname, p) for pname, p in model.named_parameters() if p.requires_grad]
    assert trainable, f"{name} has no trainable parameters"
    for pname, p in trainable:
        assert p.grad is not None, f"{name}: {pname} received no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"


def test_every_model_is_registered_and_supports_the_small_sizes():
    assert set(ALL_MODELS) <= set(list_models())
    for name in ALL_MODELS:
        assert {28, 32} <= set(model_info(name).input_sizes), name
    for name in ("tutorial", "lenet5", "resnet20", "resnet56"):
        assert 224 not in model_info(name).input_sizes, name
    for name in set(ALL_MODELS) - {"tutorial", "lenet5", "resnet20", "resnet56"}:
        assert 224 in model_info(name).input_sizes, name


# (name, input size, exact parameters for 3 channels and 10 classes, module stating it)
EXACT_COUNTS = [
    ("tutorial", 32, 122_570, "cnnlab.models.tutorial"),
    ("lenet5", 32, 62_006, "cnnlab.models.lenet"),
    ("lenet5", 28, 62_006, "cnnlab.models.lenet"),
    ("alexnet", 32, 3_240_778, "cnnlab.models.alexnet"),
    ("alexnet", 224, 57_044_810, "cnnlab.models.alexnet"),
    ("vgg16", 32, 14_728_266, "cnnlab.models.vgg"),
    ("resnet20", 32, 269_722, "cnnlab.models.resnet"),
    ("resnet56", 32, 853_018, "cnnlab.models.resnet"),
    ("resnet18", 32, 11_173_962, "cnnlab.models.resnet"),
    ("resnet18", 224, 11_181_642, "cnnlab.models.resnet"),
]


@pytest.mark.parametrize("name,size,expected,module", EXACT_COUNTS)
def test_parameter_counts_are_exact_and_documented(name, size, expected, module):
    model = create_model(name, num_classes=10, in_channels=3, input_size=size)
    assert count_parameters(model) == expected
    assert f"{expected:,}" in importlib.import_module(module).__doc__


def test_cifar_resnets_match_the_paper():
    # Table 6 of He et al. (2015): 0.27M and 0.85M.
    assert 260_000 <= count_parameters(create_model("resnet20")) <= 280_000
    assert 840_000 <= count_parameters(create_model("resnet56")) <= 860_000


def test_reference_counts_with_1000_classes():
    # torchvision's published figures for the ImageNet networks.
    assert count_parameters(create_model("alexnet", num_classes=1000, input_size=224)) == 61_100_840
    assert count_parameters(create_model("resnet18", num_classes=1000, input_size=224)) == 11_689_512
    assert count_parameters(create_model("resnet50", num_classes=1000, input_size=224)) == 25_557_032


def test_small_stems_keep_the_feature_map_size():
    # ResNet-18 at 32 px reaches its last stage at 4x4; with the ImageNet stem, 224 -> 7x7.
    shapes = {r["layer"]: r["output_shape"] for r in layer_table(create_model("resnet18"), (3, 32, 32))}
    assert shapes["stages.3.1.relu_out"] == (512, 4, 4)
    big = create_model("resnet18", input_size=224)
    shapes = {r["layer"]: r["output_shape"] for r in layer_table(big, (3, 224, 224))}
    assert shapes["stages.3.1.relu_out"] == (512, 7, 7)


def test_duplicate_registration_is_refused():
    before = list_models()
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet18", family="x", year=2000, paper="x")(lambda **kw: nn.Identity())
    assert list_models() == before


def test_unknown_model_suggests_a_close_match():
    with pytest.raises(CnnlabError) as e:
        create_model("resnet2")
    suggestion = str(e.value).split("(known:")[0]
    assert "did you mean" in suggestion and "resnet20" in suggestion


def test_too_small_input_is_a_clear_error():
    with pytest.raises(CnnlabError, match="lenet5.*8x8"):
        create_model("lenet5", input_size=8)


def test_layer_table_of_the_tutorial():
    model = create_model("tutorial")
    rows = layer_table(model, (3, 32, 32))
    shapes = [r["output_shape"] for r in rows]
    assert shapes[:9] == [(32, 30, 30), (32, 30, 30), (32, 15, 15), (64, 13, 13), (64, 13, 13),
                          (64, 6, 6), (64, 4, 4), (64, 4, 4), (1024,)]
    assert shapes[-1] == (10,)
    assert rows[0] == {"layer": "0", "type": "Conv2d", "output_shape": (32, 30, 30),
                       "parameters": 896}
    assert sum(r["parameters"] for r in rows) == count_parameters(model) == 122_570
    assert model.training  # mode restored


def test_layer_table_sums_to_the_total_for_every_family():
    for name in ("lenet5", "resnet20", "googlenet"):
        model = create_model(name)
        assert sum(r["parameters"] for r in layer_table(model, (3, 32, 32))) == count_parameters(model)


def test_count_flops_matches_hand_computation():
    conv = nn.Conv2d(3, 8, 3, padding=1)            # out (8, 10, 10), 3*3*3 MACs per element
    assert count_flops(conv, (3, 10, 10)) == 2 * 8 * 10 * 10 * 3 * 3 * 3
    grouped = nn.Conv2d(4, 8, 3, groups=2)          # out (8, 4, 4), 2*3*3 MACs per element
    assert count_flops(grouped, (4, 6, 6)) == 2 * 8 * 4 * 4 * 2 * 3 * 3
    linear = nn.Sequential(nn.Flatten(), nn.Linear(20, 5))
    assert count_flops(linear, (20,)) == 2 * 20 * 5
    # Tutorial: three convs and two Dense layers.
    macs = (32 * 30 * 30 * 27 + 64 * 13 * 13 * 288 + 64 * 4 * 4 * 576 + 1024 * 64 + 64 * 10)
    assert count_flops(create_model("tutorial"), (3, 32, 32)) == 2 * macs


def test_format_summary_is_a_keras_like_table():
    text = format_summary(create_model("tutorial"), "tutorial", (3, 32, 32))
    assert "Layer (type)" in text and "Output Shape" in text and "Param #" in text
    assert "(None, 32, 30, 30)" in text
    assert "Total params: 122,570" in text and "Trainable params: 122,570" in text
    assert "MFLOPs per image: 9.10" in text


def test_zoo_table_covers_every_model_and_marks_misfits():
    rows = {r["name"]: r for r in zoo_table(input_size=16, in_channels=1, num_classes=10)}
    assert set(rows) == set(list_models())
    assert rows["tutorial"]["parameters"] is None and rows["tutorial"]["mflops"] is None
    assert rows["lenet5"]["parameters"] > 0 and rows["lenet5"]["mflops"] > 0
    assert rows["resnet18"]["year"] == 2015 and "He" in rows["resnet18"]["paper"]



# -- Conv3x3: products in place of oneDNN's slow weight gradient on small maps ----------------
def _output_and_grads(layer: nn.Module, x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor):
    """Output, input gradient and weight gradient of ``layer`` (holding ``weight``) for ``g``."""
    layer.weight = nn.Parameter(weight.detach().clone())
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    y.backward(g)
    return y.detach().float(), x.grad.float(), layer.weight.grad.float()


def _plain_conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, bias=False)


@pytest.mark.parametrize("size", [3, 4, 7, 15])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv3x3_products_match_the_plain_convolution(monkeypatch, size, channels_last):
    from cnnlab.models import conv
    monkeypatch.setattr(conv, "WIDE", 1)   # let these narrow test layers take the products
    torch.manual_seed(0)
    x = torch.randn(3, 6, size, size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g, w = torch.randn(3, 5, size, size), torch.randn(5, 6, 3, 3)
    ours = _output_and_grads(conv.Conv3x3(6, 5), x, g, w)
    ref = _output_and_grads(_plain_conv3x3(6, 5), x, g, w)
    # float32 sums of up to 3 x 15 x 15 = 675 products (the weight gradient), in another order
    # than oneDNN's: about sqrt(675) ulps of the result apart, 1e-4 relative is 20x that.
    for name, a, b in zip(("output", "input gradient", "weight gradient"), ours, ref):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), name


@pytest.mark.parametrize("size", [3, 7])
def test_conv3x3_products_under_bfloat16_autocast(monkeypatch, size):
    from cnnlab.models import conv
    monkeypatch.setattr(conv, "WIDE", 1)
    torch.manual_seed(0)
    x = torch.randn(4, 32, size, size).contiguous(memory_format=torch.channels_last)
    g, w = torch.randn(4, 16, size, size), torch.randn(16, 32, 3, 3) * 0.1
    with torch.autocast("cpu", torch.bfloat16):
        ours = _output_and_grads(conv.Conv3x3(32, 16), x, g, w)
        ref = _output_and_grads(_plain_conv3x3(32, 16), x, g, w)
    for name, a, b in zip(("output", "input gradient", "weight gradient"), ours, ref):
        assert (a - b).norm() / b.norm() < 1e-2, name   # bfloat16 rounding, nothing more


def test_conv3x3_keeps_onednn_where_the_products_do_not_pay():
    from cnnlab.models import conv
    taken = lambda layer, size: type(layer(torch.randn(2, layer.in_channels, size, size)).grad_fn).__name__
    wide, narrow = conv.Conv3x3(conv.WIDE, conv.WIDE), conv.Conv3x3(64, 64)
    assert "ConvolutionBackward" in taken(narrow, 3)                  # narrow: oneDNN throughout
    assert "ConvolutionBackward" in taken(wide, conv.SMALL_MAP + 1)   # wide, but a large map
    assert "ConvolutionBackward" not in taken(wide, 7)                # wide on a small map
    assert "ConvolutionBackward" not in taken(wide, 3)
    with torch.no_grad():                                             # inference: plain conv
        assert wide(torch.randn(1, conv.WIDE, 3, 3)).is_contiguous()  # the products' output is channels-last


def test_weight_grad_by_taps_is_the_convolution_weight_gradient():
    from cnnlab.models.conv import weight_grad_by_taps
    torch.manual_seed(1)
    x, g = torch.randn(2, 4, 5, 6), torch.randn(2, 3, 5, 6)   # not square: rows and columns differ
    expected = torch.nn.grad.conv2d_weight(x, (3, 4, 3, 3), g, padding=1)
    # 60-term float32 sums of randn products (values ~8) in another order: ~1e-6 apart.
    assert torch.allclose(weight_grad_by_taps(x, g), expected, atol=1e-4)
