"""Every rule a run's config must meet fires before any data loads, and rules apply to the
merged config: a value in a file may be completed by a flag."""
from __future__ import annotations

import pytest
import yaml

from cnnlab.cli import main
from cnnlab.core.config import resolve
from cnnlab.core.errors import CnnlabError

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
    (["--image-size", "4"], "image_size must be at least 8 pixels a side"),
    (["--freeze-epochs", "-1"], "freeze_epochs must be zero or more"),
    (["--freeze-epochs", "1"], "--freeze-epochs 1 freezes a body started from trained weights"),
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


def test_rules_that_need_a_dataset_fire_before_it_is_read(tmp_path, capsys):
    for flags, message in ((["--image-size", "64"], "--image-size applies to image folders; cifar10 is always"),
                           (["--loader", "stream"], "--loader stream reads image folders; cifar10 is read from")):
        assert main(["train", "--data", "cifar10", "--data-dir", str(tmp_path / "empty"), *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "empty").exists()


@pytest.mark.parametrize("file_values,flags,expected", [
    ({"freeze_epochs": 1}, {"init_from": "runs/base"}, {"freeze_epochs": 1.0, "init_from": "runs/base"}),
    ({"whiten_bias_epochs": 2, "model": "speednet"}, {"whiten": True}, {"whiten_bias_epochs": 2.0, "whiten": True}),
    ({"freeze_epochs": 1}, {"pretrained": True, "model": "resnet18"}, {"freeze_epochs": 1.0, "pretrained": True}),
])
def test_a_file_value_completed_by_a_flag_is_one_config(file_values, flags, expected, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(file_values))
    cfg = resolve(config_file=path, overrides=flags)
    assert {k: getattr(cfg, k) for k in expected} == expected


def test_a_bad_value_names_the_layer_it_came_from(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"lr": -1}))
    with pytest.raises(CnnlabError, match=rf"lr must be a positive number.*\(from the config file {path}\)"):
        resolve(config_file=path)
    with pytest.raises(CnnlabError, match=r"momentum must be between 0 and 1; got 3.0 \(from the command line\)"):
        resolve(config_file=path, overrides={"lr": 0.1, "momentum": 3})


def test_the_library_takes_a_file_completed_by_keywords(tmp_path):
    import cnnlab
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"freeze_epochs": 1, "data": MISSING}))
    with pytest.raises(CnnlabError) as e:   # the config is whole: what stops it is the missing folder
        cnnlab.train(config=path, init_from=str(tmp_path / "base"), quiet=True)
    assert MISSING in str(e.value) and "freeze" not in str(e.value)
