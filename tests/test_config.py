"""core/config.py: the typed config's layers, values and refusals, each naming where a bad value
came from; a file completed by flags or keywords is one config."""
from __future__ import annotations

import pytest
import yaml

from cnnlab.cli import main
from cnnlab.core.config import Config, merge, resolve
from cnnlab.core.errors import CnnlabError


def test_config_layers_and_refusals(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 3\nlr: 0.01\nbatch_size: 64\n")
    cfg = resolve(config_file=f, overrides={"epochs": "5", "optimizer": None})
    assert (cfg.epochs, cfg.lr, cfg.batch_size) == (5, 0.01, 64)
    with pytest.raises(CnnlabError, match="unknown config key 'ephocs'; did you mean 'epochs'"):
        merge(Config(), {"ephocs": 3}, source="test")
    with pytest.raises(CnnlabError, match="optimizer must be one of"):
        merge(Config(), {"optimizer": "lbfgs"}, source="test")
    with pytest.raises(CnnlabError, match="batch_size must be an integer"):
        merge(Config(), {"batch_size": "many"}, source="test")
    for key, value in (("epochs", 0), ("lr", -1), ("batch_size", 0), ("lr", float("nan"))):
        with pytest.raises(CnnlabError, match=key):
            merge(Config(), {key: value}, source="test")


def test_image_size_is_one_side_or_height_and_width():
    assert merge(Config(), {"image_size": "48"}, source="t").image_size == 48
    assert merge(Config(), {"image_size": "96,128"}, source="t").image_size == (96, 128)
    assert merge(Config(), {"image_size": [64, 64]}, source="t").image_size == 64        # a square is one side
    cfg = merge(Config(), {"image_size": [96, 128]}, source="config.json")               # as a run saves it
    assert cfg.image_size == (96, 128) and cfg.to_dict()["image_size"] == [96, 128]
    for bad in ("96,", "a,b", "1,2,3", [1.5, 2], True):
        with pytest.raises(CnnlabError, match="image_size must be N or H,W"):
            merge(Config(), {"image_size": bad}, source="t")
    for size in ("64,4", "100000", "224,5000"):
        with pytest.raises(CnnlabError, match="image_size must be 8 to 4096 pixels a side"):
            resolve(overrides={"image_size": size})


def test_whitening_bias_epochs_need_whitening():
    with pytest.raises(CnnlabError, match="only applies with --whiten"):
        Config().replace(whiten_bias_epochs=3)
    with pytest.raises(CnnlabError, match="whiten_bias_epochs must be zero or more"):
        Config(whiten=True).replace(whiten_bias_epochs=-1)


@pytest.mark.usefixtures("restore_threads")
@pytest.mark.parametrize("lr, rule", [("nan", "a finite number (not nan or inf)"),
                                      ("inf", "a finite number (not nan or inf)"),
                                      ("-1", "a positive number, e.g. --lr 1e-3")])
def test_non_finite_learning_rate_is_refused_before_anything_is_written(tiny_cifar, tmp_path, capsys, lr, rule):
    code = main(["train", "--data", str(tiny_cifar), "--out", str(tmp_path / "r"), "--lr", lr])
    assert code == 2
    assert f"lr must be {rule}; got {float(lr)}" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_every_float_field_refuses_nan_and_inf():
    from cnnlab.core.config import FIELDS, field_type
    floats = [key for key in FIELDS if field_type(key).kind == "float"]
    assert {"weight_decay", "warmup", "bias_lr_scale", "ema", "time_limit"} <= set(floats)
    for key in floats:
        for value in (float("nan"), float("-inf")):
            with pytest.raises(CnnlabError, match=rf"^{key} must be a finite number \(not nan or inf\); got"):
                merge(Config(), {key: value}, source="test")


# Three levels of nine: 729 strings from 150 bytes, each level more nine times as many (453
# bytes of this asked for 2.1 GB while the error message was built).
ALIAS_BOMB = ("a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
              "b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
              "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
              "lr: *c\n")


def test_yaml_aliases_are_refused_in_config_and_space_files(tmp_path):
    pytest.importorskip("optuna")
    from cnnlab.apps.tune import load_space
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    with pytest.raises(CnnlabError, match=rf"^config file {path}, line 2 uses the alias \*a: cnnlab files take no "
                                          rf"aliases") as e:
        resolve(config_file=path)
    assert len(str(e.value).replace(str(path), "")) < 150   # one line: nothing of the expansion in it
    with pytest.raises(CnnlabError, match=rf"^space file {path}, line 2 uses the alias \*a"):
        load_space(path)
    path.write_text("lr: &lr 0.01\n")   # an anchor no alias uses expands nothing: allowed
    assert resolve(config_file=path).lr == 0.01


# ----------------------------------------------------------------------------- a file completed by flags
MISSING = "/no/such/folder"


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


def test_published_weights_bring_the_fine_tuning_defaults_under_every_other_layer(tmp_path):
    tuned = resolve(overrides={"pretrained": True, "model": "efficientnet_lite0", "lr": 0.01})
    assert (tuned.optimizer, tuned.lr, tuned.epochs, tuned.freeze_epochs, tuned.frozen_bn, tuned.body_lr_scale,
            tuned.unfreeze) == ("adamw", 0.01, 14, 4.0, True, 0.3, "last-60%")   # the flag's lr, the layer's rest
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"freeze_epochs": 0, "body_lr_scale": 1.0}))
    filed = resolve(config_file=path, overrides={"pretrained": True, "model": "efficientnet_lite0"})
    assert (filed.freeze_epochs, filed.body_lr_scale, filed.optimizer) == (0.0, 1.0, "adamw")
    lesson = resolve(recipe="lesson", overrides={"pretrained": True, "model": "efficientnet_lite0"})
    assert (lesson.optimizer, lesson.epochs, lesson.augment) == ("adam", 10, "none")   # the recipe's own
    scratch = resolve(overrides={"model": "efficientnet_lite0"})
    assert (scratch.optimizer, scratch.freeze_epochs, scratch.frozen_bn, scratch.unfreeze) == (
        Config().optimizer, 0.0, False, "all")


@pytest.mark.parametrize("value,blocks,depth", [
    ("all", 20, 20), ("last-3-blocks", 20, 3), ("last-1-block", 4, 1), ("last-60%", 20, 12), ("last-60%", 10, 6),
    ("last-50%", 5, 3), ("last-100%", 7, 7), ("last-0%", 20, None), ("last-3", 20, None), ("some", 20, None)])
def test_unfreeze_counts_the_blocks_nearest_the_head(value, blocks, depth):
    from cnnlab.core.config import unfreeze_depth
    assert unfreeze_depth(value, blocks) == depth


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
