"""models/pretrained.py: starting from trained weights (--init-from a run or a .safetensors file in
cnnlab's or torchvision's names, or --pretrained): the head replaced for new classes,
--freeze-epochs and --body-lr-scale, resume, refusals."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from cnnlab.cli import main
from cnnlab.core.config import Config
from cnnlab.core.errors import CnnlabError
from cnnlab.engine import loop, prepare
from cnnlab.engine.build import build_training
from cnnlab.engine.callbacks import Callback
from cnnlab.engine.runs import load_run
from cnnlab.models.pretrained import body_blocks, head_name, init_from
from cnnlab.models.registry import create_model, list_models
from conftest import checkpoint_step, start_and_wait_for_checkpoint, train_then_crash, write_synthetic_cifar


@pytest.fixture(scope="module")
def source_run(tiny_cifar, tmp_path_factory):
    """A finished 10-class tutorial run: the weights to start from."""
    cfg = Config(data=str(tiny_cifar), model="tutorial", epochs=1, batch_size=50, seed=3, threads=1)
    return loop.fit(cfg, out=tmp_path_factory.mktemp("src") / "run", progress=False)


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory):
    return write_synthetic_cifar(tmp_path_factory.mktemp("three"), {"train": 20, "test": 6}, ["cat", "dog", "ship"])


@pytest.mark.parametrize("name", list_models())
def test_the_head_is_the_last_linear_and_maps_to_the_classes(name):
    net = create_model(name, num_classes=7, in_channels=3, input_size=64)
    head = dict(net.named_modules())[head_name(net)]
    assert isinstance(head, torch.nn.Linear) and head.out_features == 7


def test_a_run_with_other_classes_loads_the_body_and_replaces_the_head(source_run):
    net = create_model("tutorial", num_classes=3, in_channels=3, input_size=32)
    fresh_head = net.state_dict()["11.weight"].clone()
    report = init_from(net, source_run.path, "tutorial")
    trained = {k[4:]: v for k, v in load_file(source_run.weights_file).items() if k.startswith("net.")}
    state = net.state_dict()
    body = [k for k in state if not k.startswith("11.")]
    assert sorted(report.loaded) == sorted(body) and all(torch.equal(state[k], trained[k]) for k in body)
    assert [r[0] for r in report.replaced] == ["11.weight", "11.bias"]
    assert report.replaced[0][1:] == ((10, 64), (3, 64))
    assert torch.equal(state["11.weight"], fresh_head)        # the new head keeps its initialisation
    assert "replaced the head (11.weight, 11.bias): 10 classes in the file, 3 here" in "\n".join(report.lines())


def _torchvision_names(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """cnnlab's ResNet state as torchvision/timm name it (written out here, independently of the
    mapping under test): conv1/bn1, layerN.i.*, downsample.0/1, fc."""
    out = {}
    for name, t in net.state_dict().items():
        name = name.replace("stem.0.", "conv1.", 1) if name.startswith("stem.0.") else name
        name = name.replace("stem.1.", "bn1.", 1) if name.startswith("stem.1.") else name
        name = re.sub(r"^stages\.(\d)\.", lambda m: f"layer{int(m.group(1)) + 1}.", name)
        name = name.replace(".shortcut.", ".downsample.").replace("fc.1.", "fc.")
        out[name] = t.clone()
    return out


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_resnet_weights_map_onto_cnnlab_resnets(arch, tmp_path):
    torch.manual_seed(0)
    imagenet = create_model(arch, num_classes=1000, in_channels=3, input_size=224)
    names = _torchvision_names(imagenet)
    assert "layer1.0.conv1.weight" in names and "fc.weight" in names and "conv1.weight" in names
    file = tmp_path / f"{arch}.safetensors"
    save_file({f"module.{k}": v for k, v in names.items()}, file)     # a DDP-wrapped checkpoint's names
    torch.manual_seed(1)
    net = create_model(arch, num_classes=5, in_channels=3, input_size=(96, 128))   # the ImageNet stem
    report = init_from(net, file, arch)
    assert report.naming == "torchvision/timm"
    state, source = net.state_dict(), imagenet.state_dict()
    assert all(torch.equal(state[k], source[k]) for k in report.loaded)
    assert set(report.loaded) == {k for k in state if not k.startswith("fc.")}
    assert [r[0] for r in report.replaced] == ["fc.1.weight", "fc.1.bias"] and report.unused == []
    small = create_model(arch, num_classes=5, in_channels=3, input_size=32)   # the 3x3 small-image stem
    report = init_from(small, file, arch)
    assert [m[0] for m in report.mismatched] == ["stem.0.weight"]             # 7x7 there, 3x3 here
    assert "stem.1.weight" in report.loaded and "stages.3.1.conv2.weight" in report.loaded


def test_refusals_name_what_is_wrong(source_run, tmp_path):
    pickle_file = tmp_path / "weights.pth"
    pickle_file.write_bytes(b"\x80\x04not really")
    with pytest.raises(CnnlabError, match="a .pth file is a pickle.*reads only .safetensors"):
        init_from(create_model("tutorial"), pickle_file, "tutorial")
    with pytest.raises(CnnlabError, match="was trained as 'tutorial', not --model 'lenet5': it has no features.0.weight"):
        init_from(create_model("lenet5"), source_run.path, "lenet5")
    with pytest.raises(CnnlabError, match="does not match this network: 0.weight is 32x3x3x3 there and 32x1x3x3 here"):
        init_from(create_model("tutorial", in_channels=1), source_run.path, "tutorial")   # grey images
    tv = tmp_path / "r18.safetensors"
    save_file(_torchvision_names(create_model("resnet18", input_size=224)), tv)
    with pytest.raises(CnnlabError, match="torchvision/timm ResNet.*not --model vgg11"):
        init_from(create_model("vgg11"), tv, "vgg11")
    unrelated = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(3)}, unrelated)
    with pytest.raises(CnnlabError, match="shares no tensor with --model 'tutorial'"):
        init_from(create_model("tutorial"), unrelated, "tutorial")
    with pytest.raises(CnnlabError, match="does not exist"):
        init_from(create_model("tutorial"), tmp_path / "nowhere.safetensors", "tutorial")


def test_cli_refuses_a_pickle_with_exit_2_and_leaves_no_folder(tiny_cifar, tmp_path):
    (tmp_path / "w.pt").write_bytes(b"x")
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "cnnlab", "train", "--data", str(tiny_cifar), "--epochs", "1",
                        "--init-from", str(tmp_path / "w.pt"), "--out", str(out)], capture_output=True, text=True)
    assert p.returncode == 2 and "is a pickle" in p.stderr and "Traceback" not in p.stderr
    assert not out.exists()


def test_freeze_epochs_train_only_the_head_then_everything_and_resume_exactly(source_run, three_classes, tmp_path):
    cfg = Config(data=str(three_classes), model="tutorial", epochs=2, batch_size=20, seed=5, threads=1,
                 init_from=str(source_run.path), freeze_epochs=1, body_lr_scale=0.1, optimizer="sgd",
                 lr=0.05, weight_decay=0.01)
    seen = []

    class Snapshot(Callback):
        def on_epoch_end(self, trainer, logs):
            seen.append({k: v.clone() for k, v in trainer.model.net.state_dict().items()})

    whole = loop.fit(cfg, out=tmp_path / "whole", progress=False, callbacks=[Snapshot()])
    trained = {k[4:]: v for k, v in load_file(source_run.weights_file).items() if k.startswith("net.")}
    body = [k for k in seen[0] if k.endswith("weight") and not k.startswith("11.")]
    assert all(torch.equal(seen[0][k], trained[k]) for k in body)            # frozen: untouched, decay too
    assert not torch.equal(seen[0]["11.weight"], seen[1]["11.weight"])         # the head trains throughout
    assert all(not torch.equal(seen[1][k], trained[k]) for k in body)        # thawed in epoch 2
    # The body's rate is a tenth of the head's, in every group that holds body parameters.
    plan = prepare.plan_run(cfg)
    t = build_training(plan.cfg, prepare.load_data(plan), torch.device("cpu"), start=cfg.init_from)
    rates = {(g["lr_scale"], any(p is t.model.net[11].weight for p in g["params"])) for g in t.optimizer.param_groups}
    assert (1.0, True) in rates and (0.1, False) in rates
    # Stopped after epoch 1 and resumed without the source: the same weights, bit for bit.
    moved = source_run.path.with_name("moved")
    train_then_crash(loop.fit, cfg, tmp_path / "cut")
    source_run.path.rename(moved)
    try:
        resumed = loop.resume(tmp_path / "cut", progress=False)
    finally:
        moved.rename(source_run.path)
    a, b = load_file(whole.weights_file), load_file(resumed.weights_file)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_head_epochs_on_cached_features_give_the_head_that_running_the_body_gives(source_run, three_classes, tmp_path):
    cfg = Config(data=str(three_classes), model="tutorial", epochs=3, freeze_epochs=3, batch_size=20, seed=5,
                 threads=1, init_from=str(source_run.path), augment="none", optimizer="adamw", lr=0.01)
    plan = prepare.plan_run(cfg)
    start = build_training(plan.cfg, prepare.load_data(plan), torch.device("cpu"), start=cfg.init_from).model
    cached, ran = (load_file(loop.fit(cfg.replace(cache_features=on), out=tmp_path / str(on), progress=False).weights_file)
                   for on in (True, False))
    initial = {f"net.{k}": v for k, v in start.net.state_dict().items()}
    assert all(torch.equal(cached[k], initial[k]) and torch.equal(ran[k], initial[k])   # the body never moved
               for k in initial if not k.startswith("net.11."))
    # The same features, from the same pixels through the same frozen weights: only the batch
    # the body saw them in differs (500 images cached, 20 a step running it), which changes
    # oneDNN's blocking and so the float32 rounding (about 1e-7 of a value); nine Adam steps
    # normalise each gradient and carry that on without growing it much. 1e-5 is a hundred times
    # that rounding and a thousandth of how far the head moved.
    moved = (cached["net.11.weight"] - initial["net.11.weight"]).abs().max()
    assert moved > 1e-2
    torch.testing.assert_close(cached["net.11.weight"], ran["net.11.weight"], rtol=0, atol=1e-5)
    torch.testing.assert_close(cached["net.11.bias"], ran["net.11.bias"], rtol=0, atol=1e-5)


def test_unfreeze_last_blocks_trains_only_those_blocks_and_the_head(source_run, three_classes, tmp_path):
    cfg = Config(data=str(three_classes), model="tutorial", epochs=1, batch_size=20, seed=5, threads=1,
                 init_from=str(source_run.path), unfreeze="last-1-blocks", optimizer="sgd", lr=0.05,
                 weight_decay=0.01)
    after = load_file(loop.fit(cfg, out=tmp_path / "run", progress=False).weights_file)
    trained = load_file(source_run.weights_file)
    net = create_model("tutorial", num_classes=3, in_channels=3, input_size=32)
    blocks = body_blocks(net, head_name(net))
    assert blocks == ["0", "3", "6", "9"] and head_name(net) == "11"
    for block in blocks[:-1]:   # frozen all run: untouched, weight decay too
        assert torch.equal(after[f"net.{block}.weight"], trained[f"net.{block}.weight"])
    assert not torch.equal(after["net.9.weight"], trained["net.9.weight"])
    with pytest.raises(CnnlabError, match=r"--unfreeze last-5-blocks is deeper than tutorial, whose body has 4 blocks"):
        prepare.plan_run(cfg.replace(unfreeze="last-5-blocks"))


def test_frozen_bn_keeps_the_trained_running_statistics_while_the_rest_trains(tiny_cifar, three_classes, tmp_path):
    source = loop.fit(Config(data=str(tiny_cifar), model="resnet20", epochs=1, batch_size=50, seed=3, threads=1),
                      out=tmp_path / "source", progress=False)
    cfg = Config(data=str(three_classes), model="resnet20", epochs=1, batch_size=20, seed=5, threads=1,
                 init_from=str(source.path), frozen_bn=True, augment="none")
    trained = load_file(source.weights_file)
    frozen = load_file(loop.fit(cfg, out=tmp_path / "frozen", progress=False).weights_file)
    free = load_file(loop.fit(cfg.replace(frozen_bn=False), out=tmp_path / "free", progress=False).weights_file)
    stats = [k for k in trained if k.endswith(("running_mean", "running_var"))]
    scales = [k for k in trained if k.replace("weight", "running_mean") in stats and k.endswith("weight")]
    assert stats and scales
    assert all(torch.equal(frozen[k], trained[k]) for k in stats)
    assert all(not torch.equal(free[k], trained[k]) for k in stats)     # batch statistics move them
    assert all(not torch.equal(frozen[k], trained[k]) for k in scales)  # scale and shift train


@pytest.mark.slow
def test_a_fine_tuned_run_killed_twice_resumes_bit_for_bit(source_run, three_classes, tmp_path):
    # Killed (SIGKILL: no chance to save) once in the head-only epochs, whose cached features the
    # resumed process computes again, and once after the thaw; augmented, BatchNorm frozen.
    args = ["--data", str(three_classes), "--model", "tutorial", "--init-from", str(source_run.path),
            "--freeze-epochs", "2", "--epochs", "6", "--augment", "standard", "--batch-size", "10",
            "--seed", "5", "--threads", "1"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    done = subprocess.run([sys.executable, "-m", "cnnlab", "train", *args, "--out", str(whole)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    steps_per_epoch = 6   # 54 training images (60 less a 10% hold-out) in batches of 10
    start = ["train", *args, "--out", str(cut), "--checkpoint-every", "1"]
    for after_step in (2, 3 * steps_per_epoch):   # mid head-only epoch 1; in thawed epoch 4 of 6
        proc = start_and_wait_for_checkpoint(start, cut, after_step)
        proc.kill()
        proc.communicate()
        assert 0 < checkpoint_step(cut) < 6 * steps_per_epoch, "the run ended before the kill"
        start = ["train", "--resume", str(cut), "--checkpoint-every", "1"]
    done = subprocess.run([sys.executable, "-m", "cnnlab", *start], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    a, b = load_file(whole / "model.safetensors"), load_file(cut / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- from published weights
def _grey_folder(root: Path, per_class: int = 6) -> Path:
    """Two classes of 40x40 greyscale images: bright squares and dark ones."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", 2)):
        for cls, level in (("bright", 200), ("dark", 40)):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(rng.normal(level, 20, (40, 40)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels, "L").save(root / split / cls / f"{i}.png")
    return root


def test_fine_tune_from_pretrained_weights_on_greyscale_photos(lite0_weights, tmp_path, capsys):
    data = _grey_folder(tmp_path / "grey")
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--model", "efficientnet_lite0", "--pretrained",
                 "--image-size", "64", "--epochs", "1", "--batch-size", "4", "--freeze-epochs", "1",
                 "--out", str(out)]) == 0
    header = capsys.readouterr().out
    assert "pretrained: efficientnet_lite0.imagenet1k" in header
    assert "greyscale images are repeated into the 3 channels" in header
    assert "replaced the head" in header and "only the head" in header
    run = load_run(out)
    card = run.card
    assert card["in_channels"] == 1 and card["num_classes"] == 2
    assert card["mean"] == pytest.approx([127 / 255] * 3) and card["std"] == pytest.approx([128 / 255] * 3)
    # The body is ImageNet's (frozen for the one epoch); the head is new.
    start = load_run("efficientnet_lite0").model().net.state_dict()
    tuned = run.model().net.state_dict()
    torch.testing.assert_close(tuned["stages.3.0.depthwise.0.weight"], start["stages.3.0.depthwise.0.weight"])
    assert tuned["fc.2.weight"].shape == (2, 1280)
    result = run.predict([data / "test" / "bright" / "0.png"], top_k=2)
    assert {t["class"] for t in result[0]["top"]} == {"bright", "dark"}


def test_a_pretrained_run_resumes_without_its_weights_cache(lite0_weights, tmp_path, monkeypatch):
    """A resumed run's weights come from its checkpoint: the published ones are neither read
    nor fetched again, so a cleared cache (or no network) does not stop it."""
    from cnnlab.core.config import Config
    from cnnlab.engine.loop import fit, resume
    from conftest import train_then_crash
    cfg = Config(data=str(_grey_folder(tmp_path / "grey")), model="efficientnet_lite0", pretrained=True,
                 image_size=32, epochs=2, batch_size=4, threads=1)
    train_then_crash(fit, cfg, tmp_path / "run")
    monkeypatch.setenv("CNNLAB_WEIGHTS", str(tmp_path / "empty-cache"))
    run = resume(tmp_path / "run", progress=False)
    assert run.metrics["epochs"] == 2 and not (tmp_path / "empty-cache").exists()
