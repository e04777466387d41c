"""The model zoo: every registered model honours the interface; parameter counts match the
figures in the papers and docstrings; the registry and the summaries behave; every model trains
through `cnnlab train`."""
from __future__ import annotations

import importlib
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.modules.utils import _pair

from cnnlab.cli import main
from cnnlab.core import hardware
from cnnlab.core.errors import CnnlabError
from cnnlab.models import create_model, list_models, model_info, register_model
from cnnlab.models.classifier import build_classifier
from cnnlab.models.registry import (
    Window,
    check_input_size,
    default_image_size,
    map_side,
    min_input_size,
    smallest_side,
)
from cnnlab.models.summary import count_flops, count_parameters, format_summary, layer_table, zoo_table
from conftest import write_synthetic_cifar, zoo_params

NUM_CLASSES = 7          # not 10, so a hard-coded class count would show
BATCH = 2                # batch norm needs more than one value per channel in train mode
SMALL_SIZE_MAX = 64      # sizes up to this get forward + backward; larger ones forward only
SMALL_STEM_MAX = 64      # AlexNet, ResNet-18/34/50 and GoogLeNet take their ImageNet stem above this

ALL_MODELS = ("tutorial", "lenet5", "alexnet", "vgg11", "vgg13", "vgg16", "vgg19",
              "resnet20", "resnet56", "resnet18", "resnet34", "resnet50", "googlenet")

CASES = [(name, size, c) for name in list_models() for size in model_info(name).input_sizes
         for c in (1, 3)]


@pytest.mark.parametrize("name,size,in_channels", zoo_params(CASES),
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


# -- Any size, any shape: (height, width) inputs, each model's smallest size, default sizes ---
def _strided_inputs_fit(model: nn.Module, hw: tuple[int, int]) -> bool:
    """Whether ``model`` runs on a (1, 3, h, w) input with every down-sampling layer (stride > 1)
    handed at least its stride in pixels along both sides: the rule ``min_size`` is derived by."""
    short = []

    def record(module, args):
        if any(side < stride for side, stride in zip(args[0].shape[-2:], _pair(module.stride))):
            short.append(module)

    hooks = [m.register_forward_pre_hook(record) for m in model.modules()
             if max(_pair(getattr(m, "stride", 1))) > 1]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, *hw))
        return not short
    except RuntimeError:        # a window that does not fit, or a Dense head of another size
        return False
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)


@pytest.mark.parametrize("name", list_models())
def test_every_model_trains_on_a_non_square_input_at_its_minimum(name):
    """Forward and backward at (min, 2 * min + 3): the smallest height the registry declares,
    a width that is neither; and one pixel less is below what the network takes."""
    info = model_info(name)
    m = info.min_size
    hw = (m, 2 * m + 3)
    torch.manual_seed(0)
    model = create_model(name, num_classes=NUM_CLASSES, in_channels=3, input_size=hw).train()
    out = model(torch.randn(BATCH, 3, *hw))
    assert out.shape == (BATCH, NUM_CLASSES) and torch.isfinite(out).all()
    out.sum().backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: {pname}"
    assert _strided_inputs_fit(model, hw), f"{name} does not take its declared minimum {m}"
    # One pixel less in height: either the family refuses to build it, or the same network
    # (its build does not depend on the size there) breaks the rule.
    smaller = (m - 1, hw[1])
    if m > 1:
        try:
            try:
                with torch.device("meta"):      # cheap: no memory, no initialisation
                    other = info.factory(num_classes=NUM_CLASSES, in_channels=3, input_size=smaller)
            except NotImplementedError:         # a build that reads values (torchvision's RegNet)
                other = info.factory(num_classes=NUM_CLASSES, in_channels=3, input_size=smaller)
        except ValueError:
            pass
        else:
            shapes = lambda net: [tuple(p.shape) for p in net.state_dict().values()]
            assert shapes(other) == shapes(model)
            assert not _strided_inputs_fit(model, smaller), f"{name} takes {smaller} too: min_size is not the smallest"
        with pytest.raises(CnnlabError, match=f"{name}.*{hw[1]}x{m - 1}.*{m}x{m}"):
            create_model(name, input_size=smaller)


@pytest.mark.parametrize("name", ["tutorial", "lenet5"])
@pytest.mark.parametrize("hw", [(40, 56), (56, 40)])
def test_flatten_heads_are_sized_from_height_and_width(name, hw):
    model = create_model(name, num_classes=NUM_CLASSES, in_channels=3, input_size=hw).train()
    out = model(torch.randn(BATCH, 3, *hw))
    assert out.shape == (BATCH, NUM_CLASSES)
    out.sum().backward()
    first_dense = next(m for m in model.modules() if isinstance(m, nn.Linear))
    # tutorial: 40 -> 38 -> 19 -> 17 -> 8 -> 6 and 56 -> ... -> 10, 64 channels;
    # lenet5 (no padding from 32 up): 40 -> 36 -> 18 -> 14 -> 7 and 56 -> ... -> 11, 16 channels.
    expected = {"tutorial": 64 * 6 * 10, "lenet5": 16 * 7 * 11}[name]
    assert first_dense.in_features == expected


@pytest.mark.parametrize("name", ["alexnet", "resnet18", "googlenet"])
def test_imagenet_stems_take_non_square_inputs(name):
    """The stem is chosen by the shorter side: 65 px and up gets the ImageNet one."""
    hw = (SMALL_STEM_MAX + 1, 90)
    model = create_model(name, num_classes=NUM_CLASSES, in_channels=3, input_size=hw).eval()
    assert model_info(name).min_size <= SMALL_STEM_MAX < hw[0]
    with torch.no_grad():
        assert model(torch.randn(1, 3, *hw)).shape == (1, NUM_CLASSES)
        assert model(torch.randn(1, 3, *reversed(hw))).shape == (1, NUM_CLASSES)
    small = create_model(name, num_classes=NUM_CLASSES, input_size=(SMALL_STEM_MAX, 90))
    assert count_parameters(model) != count_parameters(small)       # the other stem


@pytest.mark.parametrize("name", ["tutorial", "lenet5", "alexnet", "resnet20", "speednet_xs"])
def test_an_int_size_is_the_square(name):
    nets = []
    for size in (32, (32, 32), [32, 32]):
        torch.manual_seed(0)
        nets.append(create_model(name, input_size=size).state_dict())
    for other in nets[1:]:
        assert other.keys() == nets[0].keys()
        assert all(torch.equal(other[k], nets[0][k]) for k in other)


@pytest.mark.parametrize("bad", [(32,), (32, 32, 3), "32", 32.0, (32, 2.5)])
def test_an_input_size_is_an_int_or_height_and_width(bad):
    with pytest.raises(CnnlabError, match="one int .* or \\(height, width\\)"):
        create_model("resnet20", input_size=bad)


@pytest.mark.parametrize("name", list_models())
def test_check_input_size_names_the_smallest_size(name):
    m = min_input_size(name)
    check_input_size(name, m)
    check_input_size(name, (m, 500))
    check_input_size(name, [375, 500])
    with pytest.raises(CnnlabError) as e:
        check_input_size(name, (500, m - 1))
    assert str(e.value) == (f"{name} needs images of at least {m}x{m} pixels; "
                            f"got {m - 1}x500: raise --image-size")


def test_check_input_size_hint_is_the_callers():
    with pytest.raises(CnnlabError, match=r"got 10x10$"):
        check_input_size("alexnet", 10, hint=None)
    with pytest.raises(CnnlabError, match=r"got 10x10: pass --input-size 15$"):
        check_input_size("alexnet", 10, hint="pass --input-size 15")


# The smallest each model takes, and its training side on photo folders, per family.
SIZES = {"tutorial": (18, 32), "lenet5": (12, 32), "speednet_xs": (9, 32), "speednet": (9, 32),
         "resnet20": (3, 32), "resnet56": (3, 32), "alexnet": (15, 64), "vgg11": (17, 64),
         "vgg19": (17, 64), "resnet18": (5, 224), "resnet34": (5, 224), "resnet50": (5, 224),
         "googlenet": (4, 224)}


@pytest.mark.parametrize("name", sorted(SIZES))
def test_default_image_size_caps_the_shorter_side_per_family(name):
    smallest, cap = SIZES[name]
    assert (model_info(name).min_size, model_info(name).default_size) == (smallest, cap)
    size, why = default_image_size(name, 375)          # an ordinary photo: the family's cap
    assert size == cap and f"up to {cap} px" in why and "375 px" in why
    size, why = default_image_size(name, 28)            # smaller than every cap: kept
    assert size == 28 and "shorter side" in why
    size, why = default_image_size(name, cap)
    assert size == cap
    if smallest > 1:                                    # too small for the model: scaled up
        size, why = default_image_size(name, smallest - 1)
        assert size == smallest and "scaled up" in why and f"{smallest - 1} px" in why
    check_input_size(name, size)


def test_default_image_size_refuses_an_empty_side():
    with pytest.raises(CnnlabError, match="at least 1 pixel"):
        default_image_size("resnet18", 0)


def test_every_model_declares_sizes_within_reason():
    for name in list_models():
        info = model_info(name)
        assert 1 <= info.min_size <= min(info.input_sizes) <= info.default_size, name


def _torch_side(op, side: int, stride: int) -> int:
    """The output side of ``op`` on a (1, 1, side, side) map, 0 where torch refuses it or where it
    would down-sample fewer pixels than its stride (which runs, but Window refuses by design)."""
    try:
        out = op(torch.zeros(1, 1, side, side)).shape[-1]
    except RuntimeError:
        return 0
    return out if side >= stride else 0


@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("kernel,stride,padding", [(2, 2, 0), (3, 2, 0), (3, 2, 1), (3, 1, 1),
                                                   (5, 1, 2), (7, 2, 3), (11, 4, 2), (3, 1, 0)])
def test_window_output_side_is_torchs(kernel, stride, padding, ceil_mode):
    window = Window(kernel, stride, padding, ceil_mode)
    pool = lambda x: F.max_pool2d(x, kernel, stride, padding, ceil_mode=ceil_mode)
    conv = lambda x: F.conv2d(x, torch.zeros(1, 1, kernel, kernel), stride=stride, padding=padding)
    for side in range(1, 24):
        assert window.output_side(side) == _torch_side(pool, side, stride), (side, window)
        if not ceil_mode:       # convolutions have no ceil mode
            assert window.output_side(side) == _torch_side(conv, side, stride), (side, window)


def test_map_side_and_smallest_side():
    path = [Window(3), Window(2, 2), Window(3), Window(2, 2), Window(3)]   # the tutorial's
    assert map_side(32, path) == 4 and map_side(17, path) == 0
    assert smallest_side(path) == 18


# A model card's fields (engine/runs.py model_card) for a run on images 20 high and 44 wide.
NON_SQUARE_CARD = {"arch": "tutorial", "num_classes": 3, "in_channels": 3, "input_size": [20, 44],
                   "mean": [0.5] * 3, "std": [0.25] * 3}


def test_a_saved_card_with_height_and_width_rebuilds_the_model(tmp_path):
    """model.json stores input_size as [h, w]; build_classifier takes that list as it is."""
    card = json.loads(json.dumps(NON_SQUARE_CARD))          # as read back from model.json
    torch.manual_seed(0)
    trained = build_classifier(card["arch"], card["num_classes"],
                               card["input_size"], card["mean"], card["std"])
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, tmp_path / "w.safetensors")
    rebuilt = build_classifier(card["arch"], card["num_classes"],
                               card["input_size"], card["mean"], card["std"])
    rebuilt.load_state_dict(load_file(tmp_path / "w.safetensors"), strict=True)
    x = torch.rand(2, 3, 20, 44)
    assert torch.equal(trained.eval()(x), rebuilt.eval()(x))
    # The height alone builds another network (its Dense head is sized for 20x20).
    square = build_classifier("tutorial", 3, card["input_size"][0], [0.5] * 3, [0.25] * 3)
    assert square.state_dict()["net.9.weight"].shape != rebuilt.state_dict()["net.9.weight"].shape


def test_load_model_rebuilds_a_non_square_run(tmp_path):
    from cnnlab.engine.runs import load_model, save_model
    card = NON_SQUARE_CARD
    model = build_classifier("tutorial", 3, (20, 44), card["mean"], card["std"])
    save_model(tmp_path, model, card)
    loaded = load_model(tmp_path, json.loads((tmp_path / "model.json").read_text()))
    x = torch.rand(2, 3, 20, 44)
    assert torch.equal(model.eval()(x), loaded(x))



# -- Conv3x3: products in place of oneDNN's slow weight gradient on small maps ----------------
def _output_and_grads(layer: nn.Module, x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor):
    """Output, input gradient and weight gradient of ``layer`` (holding ``weight``) for ``g``."""
    layer.weight = nn.Parameter(weight.detach().clone())
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    y.backward(g)
    return y.detach().float(), x.grad.float(), layer.weight.grad.float()


@pytest.fixture
def products_everywhere():
    """Wide layers take the products on maps up to SMALL_MAP px, on any CPU, in float32 too."""
    from cnnlab.models import conv
    with conv.forced_limit(conv.SMALL_MAP):
        yield

def _plain_conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, bias=False)


@pytest.mark.parametrize("size", [3, 4, 7, 15])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv3x3_products_match_the_plain_convolution(products_everywhere, monkeypatch, size, channels_last):
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
def test_conv3x3_products_under_bfloat16_autocast(products_everywhere, monkeypatch, size):
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


def test_conv3x3_keeps_onednn_where_the_products_do_not_pay(products_everywhere, monkeypatch):
    from cnnlab.models import conv
    taken = lambda layer, size: type(layer(torch.randn(2, layer.in_channels, size, size)).grad_fn).__name__
    wide, narrow = conv.Conv3x3(conv.WIDE, conv.WIDE), conv.Conv3x3(64, 64)
    assert "ConvolutionBackward" in taken(narrow, 3)                  # narrow: oneDNN throughout
    assert "ConvolutionBackward" in taken(wide, conv.SMALL_MAP + 1)   # wide, but a large map
    assert "ConvolutionBackward" not in taken(wide, 7)                # wide on a small map
    assert "ConvolutionBackward" not in taken(wide, 3)
    with torch.no_grad():                                             # inference: plain conv
        assert wide(torch.randn(1, conv.WIDE, 3, 3)).is_contiguous()  # the products' output is channels-last


@pytest.mark.parametrize("amx,dtype,limit", [(True, torch.bfloat16, 8), (False, torch.bfloat16, 4),
                                             (True, torch.float32, 0), (False, torch.float32, 0)])
def test_conv3x3_takes_the_products_only_where_they_were_measured_to_pay(monkeypatch, amx, dtype, limit):
    from cnnlab.models import conv
    monkeypatch.setattr(hardware, "cpu_has_amx", lambda: amx)
    assert conv.products_limit(dtype) == limit
    wide = conv.Conv3x3(conv.WIDE, conv.WIDE)
    with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
        on_7x7, on_3x3 = (type(wide(torch.randn(2, conv.WIDE, s, s)).grad_fn).__name__ for s in (7, 3))
    assert ("ConvolutionBackward" not in on_7x7) == (limit >= 7)
    assert ("ConvolutionBackward" not in on_3x3) == (limit >= 3)


def test_weight_grad_by_taps_is_the_convolution_weight_gradient():
    from cnnlab.models.conv import weight_grad_by_taps
    torch.manual_seed(1)
    x, g = torch.randn(2, 4, 5, 6), torch.randn(2, 3, 5, 6)   # not square: rows and columns differ
    expected = torch.nn.grad.conv2d_weight(x, (3, 4, 3, 3), g, padding=1)
    # 60-term float32 sums of randn products (values ~8) in another order: ~1e-6 apart.
    assert torch.allclose(weight_grad_by_taps(x, g), expected, atol=1e-4)


# ----------------------------------------------------------------------------- every model through the command line
@pytest.fixture(scope="module")
def micro_cifar(tmp_path_factory):
    return write_synthetic_cifar(tmp_path_factory.mktemp("micro"), {"train": 4, "test": 2})


# Every registered model trains end to end through the real `cnnlab train` command: a minute
# and a half over the zoo on 2 cores, so the whole sweep is slow (the tests above check every
# model's forward and backward in the fast tier).
@pytest.mark.slow
@pytest.mark.parametrize("name", list_models())
def test_model_trains_through_the_cli(name, micro_cifar, tmp_path):
    out = tmp_path / name
    code = main(["train", "--data", str(micro_cifar), "--model", name, "--epochs", "1", "--batch-size", "8",
                 "--val-split", "0.25", "--optimizer", "sgd", "--lr", "0.01", "--out", str(out),
                 "--threads", "1"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and 0.0 <= metrics["test_accuracy"] <= 1.0
    history = json.loads((out / "history.json").read_text())
    assert all(v == v for v in history["loss"])     # finite, not NaN
