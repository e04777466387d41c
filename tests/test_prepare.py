"""engine/prepare.py: every rule a run's config must meet (config.validate, then check_config's,
which need the registries) fires before any data loads; the image size chosen from the data and
the model; and loading only the splits asked for."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from cnnlab.cli import main
from cnnlab.core.config import Config
from cnnlab.core.errors import CnnlabError
from cnnlab.engine import loop, prepare
from conftest import IMAGENET_SAMPLE, counting_decoder

MISSING = "/no/such/folder"

# (flags, a piece of the one-line error): one row per rule of config.validate and
# engine.prepare.check_config. Every run names a folder that does not exist: an error about
# the folder would mean the rule fired only after the data was looked for.
RULES = [
    (["--epochs", "0"], "epochs must be a positive number"),
    (["--batch-size", "0"], "batch_size must be a positive integer"),
    (["--lr", "0"], "lr must be a positive number"),
    (["--momentum", "1.5"], "momentum must be between 0 and 1"),
    (["--label-smoothing", "2"], "label_smoothing must be between 0 and 1"),
    (["--ema", "1"], "ema must be in [0, 1)"),
    (["--warmup", "-1"], "warmup must be zero or more"),
    (["--ema-every", "0"], "ema_every must be a positive integer"),
    (["--whiten-bias-epochs", "1"], "whiten_bias_epochs (1.0) only applies with --whiten"),
    (["--model", "speednet", "--whiten", "--whiten-bias-epochs", "-1"], "whiten_bias_epochs must be zero or more"),
    (["--time-limit", "0"], "time_limit must be a positive number of seconds"),
    (["--time-limit", "60", "--nproc", "2"], "--time-limit is not supported with data-parallel training"),
    (["--early-stop", "0"], "early_stop must be a positive number of epochs"),
    (["--threads", "0"], "threads must be a positive integer"),
    (["--workers", "-1"], "workers must be zero"),
    (["--nproc", "0"], "nproc must be a positive number of processes"),
    (["--center-crop", "0"], "center_crop must be in (0, 1]"),
    (["--image-size", "4"], "image_size must be 8 to 4096 pixels a side"),
    (["--image-size", "100000"], "image_size must be 8 to 4096 pixels a side"),
    (["--weight-decay", "nan"], "weight_decay must be a finite number (not nan or inf); got nan"),
    (["--warmup", "inf"], "warmup must be a finite number (not nan or inf); got inf"),
    (["--freeze-epochs", "nan"], "freeze_epochs must be a finite number"),
    (["--seed", "-1"], "seed must be a whole number from 0 to 4294967295"),
    (["--bias-lr-scale", "-5"], "bias_lr_scale must be a positive multiple of the learning rate"),
    (["--freeze-epochs", "-1"], "freeze_epochs must be a whole number of epochs"),
    (["--freeze-epochs", "0.5", "--pretrained", "--model", "resnet18"], "freeze_epochs must be a whole number"),
    (["--freeze-epochs", "1"], "--freeze-epochs 1 freezes a body started from trained weights"),
    (["--unfreeze", "some"], "unfreeze must be all, last-N-blocks with N a positive whole number, or last-P%"),
    (["--unfreeze", "last-150%"], "unfreeze must be all, last-N-blocks"),
    (["--frozen-bn"], "--frozen-bn keeps the running statistics of trained weights"),
    (["--unfreeze", "last-0-blocks"], "unfreeze must be all, last-N-blocks"),
    (["--unfreeze", "last-2-blocks"], "--unfreeze last-2-blocks keeps part of a body started from trained weights"),
    (["--body-lr-scale", "0"], "body_lr_scale must be a positive fraction"),
    (["--tta-gate", "0"], "tta_gate must be in (0, 1]"),
    (["--muon-lr-scale", "0"], "muon_lr_scale must be a positive fraction"),
    (["--muon-momentum", "1"], "muon_momentum must be in [0, 1)"),
    (["--muon-decay-scale", "2"], "muon_decay_scale must be in [0, 1]"),
    (["--test-split", "1"], "test_split must be in (0, 1)"),
    (["--val-split", "1"], "val_split must be in [0, 1)"),
    (["--train-size", "0"], "train_size must be a positive number of images"),
    (["--loader", "memory", "--crop", "random_resized"], "--crop random_resized needs the original images"),
    (["--init-from", "x.safetensors", "--pretrained"], "both name the starting weights: give one"),
    # check_config: the rules that need a registry
    (["--model", "nosuchnet"], "unknown model 'nosuchnet'"),
    (["--model", "resnet18", "--whiten"], "--whiten needs a model with a patch-whitening first layer"),
    (["--model", "alexnet", "--image-size", "12"], "alexnet needs images of at least 15x15 pixels"),
    (["--model", "tutorial", "--pretrained"], "tutorial has no published weights"),
    (["--model", "resnet18", "--weights", "v9"], "resnet18 has no weights 'v9'"),
]


@pytest.mark.parametrize("flags,message", RULES, ids=[" ".join(f) for f, _ in RULES])
def test_every_rule_fires_before_data_loads(flags, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", MISSING, *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert MISSING not in err[0] and not out.exists()


def test_a_translate_of_the_whole_side_is_refused_before_a_folder_is_decoded(tiny_cifar, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(tiny_cifar), "--translate", "32", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--translate 32 shifts the 32x32 images" in err[0] and "--translate 4" in err[0], err
    assert not out.exists() and not (Path(os.environ["CNNLAB_DATA"]) / "cache").exists()


@pytest.mark.parametrize("flags,message", [
    (["--model", "nosuchnet", "--nproc", "2"], "unknown model 'nosuchnet'"),
    (["--nproc", "100000"], "--nproc 100000 asks for more processes than this machine has"),
])
def test_nproc_and_the_model_are_checked_before_any_process_starts(flags, message, tmp_path, capsys, monkeypatch):
    from cnnlab.engine import distributed
    started: list[int] = []
    monkeypatch.setattr(distributed, "launch_local", lambda argv, nproc: started.append(nproc) or 0)
    assert main(["train", "--data", MISSING, *flags, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert started == [] and len(err) == 1 and message in err[0], err


def test_rules_that_need_a_dataset_fire_before_it_is_read(tmp_path, capsys):
    for flags, message in ((["--image-size", "64"], "--image-size applies to image folders; cifar10 is always"),
                           (["--loader", "stream"], "--loader stream reads image folders; cifar10 is read from"),
                           (["--translate", "32"], "--translate 32 shifts the 32x32 images by their whole side")):
        assert main(["train", "--data", "cifar10", "--data-dir", str(tmp_path / "empty"), *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "empty").exists()


@pytest.mark.parametrize("changes, message", [
    ({"val_split": 1.0}, "val_split must be in \\[0, 1\\)"),
    ({"train_size": 0}, "train_size must be a positive number of images"),
    ({"test_size": -3}, "test_size must be a positive number of images"),
    ({"loader": "memory", "crop": "random_resized"}, "only the streaming loader keeps"),
    ({"whiten": True}, "--whiten needs a model with a patch-whitening first layer; 'tutorial' has none"),
    ({"model": "alexnet", "image_size": 12}, "alexnet needs images of at least 15x15 pixels; got 12x12"),
    ({"model": "resnet7"}, "unknown model 'resnet7'"),
])
def test_config_rules_fire_before_any_data_loads(changes, message):
    """The folder does not exist: a rule checked after loading would report that instead."""
    from cnnlab.engine.loop import fit
    with pytest.raises(CnnlabError, match=message):
        fit(Config(data="/no/such/folder", **changes), progress=False)


def test_rules_that_need_a_registry_refuse_official_datasets_before_loading(tmp_path):
    """No archive exists under data_dir: each rule must fire before anything is looked for."""
    from cnnlab.engine.prepare import check_config
    for changes, message in [({"loader": "stream"}, "--loader stream reads image folders"),
                             ({"image_size": 64}, "--image-size applies to image folders; mnist is always 28x28")]:
        with pytest.raises(CnnlabError, match=message):
            check_config(Config(data="mnist", data_dir=str(tmp_path), **changes))
    assert check_config(Config(data="mnist", model="lenet5")).model == "lenet5"
    assert list(tmp_path.iterdir()) == []


def test_freeze_without_init_from_is_refused_before_loading():
    with pytest.raises(CnnlabError, match="--freeze-epochs 2 freezes a body started from trained weights"):
        loop.fit(Config(data="/no/such/folder", freeze_epochs=2), progress=False)


# ----------------------------------------------------------------------------- the image size and the splits loaded
@pytest.mark.shared_data(IMAGENET_SAMPLE)
def test_the_training_size_follows_the_model_family(photos):
    from cnnlab.data.stream import scan_data_folder
    cfg = Config(data=str(photos))
    side = prepare.image_side(cfg, prepare.training_headers(scan_data_folder(cfg)))
    size, why = prepare.image_size_for(cfg.replace(model="resnet18"), side, None)
    assert size == 224 and why.startswith("resnet18 trains at up to 224 px; the images' shorter side is")
    assert prepare.image_size_for(cfg.replace(model="alexnet"), side, None)[0] == 64
    assert prepare.image_size_for(cfg.replace(image_size=48), side, None) == (48, "--image-size")
    with pytest.raises(CnnlabError, match="alexnet needs images of at least 15x15 pixels; got 12x12"):
        prepare.check_config(cfg.replace(model="alexnet", image_size=12))


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_a_test_only_load_decodes_no_training_image(big_split, monkeypatch, loader):
    from cnnlab.engine.prepare import load_data, plan_run
    plan = plan_run(Config(data=str(big_split), loader=loader, val_split=0.1, test_size=10, image_size=24))
    full = load_data(plan)
    opened = counting_decoder(monkeypatch)
    only = load_data(plan, splits=("test",))
    assert len(only.train) == 0 and only.val is None and only.image_shape == full.image_shape
    assert np.array_equal(only.test.labels, full.test.labels)
    if loader == "memory":   # streamed splits decode when read: nothing was opened for either
        assert len(opened) == 10 and all("/test/" in p for p in opened)
    with pytest.raises(ValueError, match="unknown splits"):
        load_data(plan, splits=("tset",))


def test_pretrained_weights_see_small_images_upscaled_at_most_four_times(tmp_path):
    from cnnlab.engine.runs import requested_weights
    cfg = Config(data=str(tmp_path), model="efficientnet_lite0", pretrained=True)
    weights = requested_weights(cfg)
    assert weights is not None and weights.preprocessing.size == 224
    assert prepare.image_side(cfg, [((32, 32), "RGB")] * 3 + [((500, 375), "RGB")]) == 32   # the most common size
    assert prepare.image_side(cfg.replace(data="cifar10"), None) == 32                     # by name
    assert prepare.image_side(cfg, None) is None
    size, why = prepare.image_size_for(cfg, 32, weights)
    assert size == 128 and "4x the images' 32 px" in why
    assert prepare.image_size_for(cfg, 375, weights)[0] == 224     # photos: the weights' size
    assert prepare.image_size_for(cfg, None, weights)[0] == 224
    assert prepare.image_size_for(cfg.replace(image_size=96), 32, weights) == (96, "--image-size")
    assert prepare.image_size_for(cfg.replace(data="cifar10", pretrained=False), 32, None) == (None, "")


def test_fine_tuning_augments_photos_with_crops_and_upscaled_small_images_lightly(tmp_path):
    from cnnlab.engine.runs import requested_weights
    cfg = Config(data=str(tmp_path), model="efficientnet_lite0", pretrained=True)
    weights = requested_weights(cfg)
    assert prepare.augment_for(cfg.replace(image_size=128), weights, 32) == (
        "light", "auto: fine-tuning on 32-px images upscaled to 128")
    assert prepare.augment_for(cfg.replace(image_size=224), weights, 375)[0] == "standard"
    assert prepare.augment_for(cfg.replace(image_size=224), weights, None)[0] == "standard"
    assert prepare.augment_for(cfg.replace(image_size=128, augment="strong"), weights, 32) == ("strong", "as set")
    assert prepare.augment_for(Config(data=str(tmp_path)), None, 32)[0] == "light"      # a folder from scratch
    assert prepare.augment_for(Config(data="cifar10"), None, 32)[0] == "none"           # the lesson's data
