"""The lesson made real: data splits, config, the run-folder contract and the CLI end to end."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnlab.core.config import Config, merge, resolve
from cnnlab.core.errors import CnnlabError
from cnnlab.data.dataset import Dataset, Split, prepare_splits, stratified_indices
from cnnlab.data.folder import load_image_folder
from cnnlab.engine.runs import HISTORY_KEYS, load_run
from conftest import CIFAR_FOLDER


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnlab", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


# ----------------------------------------------------------------------------- splits
def test_stratified_indices_keep_class_proportions():
    labels = np.repeat(np.arange(4), [100, 50, 30, 20])
    idx = stratified_indices(labels, 0.1, np.random.default_rng(0))
    assert len(idx) == 20
    assert np.bincount(labels[idx]).tolist() == [10, 5, 3, 2]
    assert len(np.unique(idx)) == len(idx)


def _toy(n_train=200, n_test=50, classes=4) -> Dataset:
    rng = np.random.default_rng(0)
    def split(n):
        return Split(rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8), np.arange(n) % classes)
    return Dataset("toy", [f"c{i}" for i in range(classes)], split(n_train), split(n_test))


def test_validation_hold_out_is_seeded_disjoint_and_leaves_test_alone():
    ds = _toy()
    a = prepare_splits(ds, val_split=0.1, train_size=None, test_size=None, seed=1)
    b = prepare_splits(ds, val_split=0.1, train_size=None, test_size=None, seed=1)
    c = prepare_splits(ds, val_split=0.1, train_size=None, test_size=None, seed=2)
    assert len(a.train) == 180 and len(a.val) == 20
    assert np.array_equal(a.val.images, b.val.images)
    assert not np.array_equal(a.val.images, c.val.images)
    train_rows = {r.tobytes() for r in a.train.images}
    assert not any(r.tobytes() in train_rows for r in a.val.images)
    assert a.test is ds.test  # the test split is never touched without --test-size


def test_subsets_and_zero_val_split():
    ds = _toy()
    d = prepare_splits(ds, val_split=0.0, train_size=40, test_size=8, seed=0)
    assert d.val is None and len(d.train) == 40 and len(d.test) == 8
    assert np.bincount(d.train.labels).tolist() == [10, 10, 10, 10]
    # The test subset does not depend on how train was cut.
    e = prepare_splits(ds, val_split=0.2, train_size=100, test_size=8, seed=0)
    assert np.array_equal(d.test.images, e.test.images)


# ----------------------------------------------------------------------------- config
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


# ----------------------------------------------------------------------------- image folders
def test_folder_reader_sizes_modes_and_cache(tmp_path):
    root = tmp_path / "shapes"
    for split, n in (("train", 3), ("test", 2)):
        for cls, colour in (("red", 200), ("blue", 40)):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                size = (20, 16) if i else (40, 30)  # most common: 20x16
                Image.new("L", size, colour).save(d / f"{i}.png")
    cache = tmp_path / "cache"
    ds = load_image_folder(root, cache_dir=cache)
    assert ds.class_names == ["blue", "red"]
    assert ds.train.images.shape == (6, 16, 20, 1)          # greyscale -> 1 channel
    assert ds.test.images.shape == (4, 16, 20, 1)
    assert ds.train.images[ds.train.labels == 1].min() == 200
    again = load_image_folder(root, cache_dir=cache)
    assert np.array_equal(again.train.images, ds.train.images)
    (root / "train" / "red" / "3.png").write_bytes((root / "train" / "red" / "0.png").read_bytes())
    changed = load_image_folder(root, cache_dir=cache)   # a new file invalidates the cache
    assert len(changed.train) == 7


@pytest.mark.parametrize("layout, message", [
    ({}, "does not exist"),
    ({"train/cat/a.png": 1}, "no test/ folder"),
    ({"train/a.png": 1, "test/a.png": 1}, "no class folders under"),
    ({"train/cat/a.png": 1, "train/dog/a.png": 1, "test/cat/a.png": 1}, "missing from test/: dog"),
])
def test_folder_layout_errors(tmp_path, layout, message):
    root = tmp_path / "data"
    for rel in layout:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(root / rel)
    with pytest.raises(CnnlabError, match=message):
        load_image_folder(root)


@pytest.mark.shared_data(CIFAR_FOLDER)
@pytest.mark.slow
def test_second_load_of_shared_cifar_comes_from_the_cache(tmp_path, monkeypatch):
    """All 60,000 real JPEGs (the real folder's counts): decoded once, then read from the cache."""
    from cnnlab.data import folder
    cache = tmp_path / "cache"
    first = load_image_folder(CIFAR_FOLDER, cache_dir=cache)
    assert first.train.images.shape == (50000, 32, 32, 3) and first.test.images.shape == (10000, 32, 32, 3)
    assert np.bincount(first.train.labels).tolist() == [5000] * 10

    def no_decoding(*args):
        raise AssertionError("decoded images although the cache was valid")
    monkeypatch.setattr(folder, "_map_chunks", no_decoding)
    second = load_image_folder(CIFAR_FOLDER, cache_dir=cache)
    assert np.array_equal(first.test.images, second.test.images)


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_train_cli_writes_the_run_folder_contract(tiny_cifar, tmp_path):
    out = tmp_path / "run"
    r = cli("train", "--data", str(tiny_cifar), "--model", "tutorial", "--epochs", "2", "--batch-size", "32",
            "--optimizer", "adam", "--lr", "1e-3", "--out", str(out), "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert "epoch 2/2" in r.stdout and "test accuracy" in r.stdout
    for name in ("config.json", "model.safetensors", "model.json", "history.json", "history.csv",
                 "metrics.json", "plots/accuracy.png", "plots/loss.png", "plots/samples.png"):
        assert (out / name).is_file(), name
    history = json.loads((out / "history.json").read_text())
    assert set(HISTORY_KEYS) <= set(history) and all(len(history[k]) == 2 for k in HISTORY_KEYS)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"test_accuracy", "test_loss", "per_class_accuracy", "train_seconds", "epochs"} <= set(metrics)
    assert len(metrics["per_class_accuracy"]) == 10 and metrics["epochs"] == 2
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["seed"] == 3 and cfg["environment"]["torch"]
    assert Image.open(out / "plots" / "accuracy.png").size[0] > 100

    run = load_run(out)
    assert run.history["loss"] == history["loss"]
    assert resolve(config_file=out / "config.json") == run.config   # a run's config re-trains it
    # evaluate reproduces the test figure the run recorded
    ev = cli("evaluate", str(out), "--json")
    assert ev.returncode == 0, ev.stderr
    # The same weights on the same images: a count of correct answers, equal unless an image's
    # top-2 margin is below the rounding a change of memory layout makes (~1e-6 of the logits).
    assert json.loads(ev.stdout)["test_accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    # predict accepts any size and mode
    big = tmp_path / "big.png"
    Image.new("RGBA", (123, 77), (250, 10, 10, 255)).save(big)
    p = cli("predict", str(out), str(big), str(next((tiny_cifar / "test" / "cat").iterdir())), "--top-k", "2",
            "--json")
    assert p.returncode == 0, p.stderr
    preds = json.loads(p.stdout)
    assert len(preds) == 2 and len(preds[0]["top"]) == 2
    assert abs(sum(t["probability"] for t in run.predict(np.zeros((1, 32, 32, 3), np.uint8), top_k=10)[0]["top"]) - 1) < 1e-4
    # a run is never overwritten silently
    again = cli("train", "--data", str(tiny_cifar), "--epochs", "1", "--out", str(out))
    assert again.returncode == 2 and "already exists" in again.stderr


def test_same_seed_gives_identical_weights(tiny_cifar, tmp_path):
    from safetensors.torch import load_file

    from cnnlab.engine.loop import fit
    cfg = Config(data=str(tiny_cifar), epochs=1, batch_size=32, flip="random", translate=2, seed=7)
    a = fit(cfg, out=tmp_path / "a", progress=False)
    b = fit(cfg, out=tmp_path / "b", progress=False)
    wa, wb = load_file(a.path / "model.safetensors"), load_file(b.path / "model.safetensors")
    assert all((wa[k] == wb[k]).all() for k in wa)


@pytest.mark.parametrize("args, message", [
    (["--data", "/no/such/folder"], "does not exist"),
    (["--data", "cifar11"], "did you mean 'cifar10'"),
    (["--model", "resnet2"], "did you mean resnet20"),
    (["--epochs", "0"], "epochs must be a positive number"),
    (["--lr", "-0.1"], "lr must be a positive number"),
    (["--batch-size", "-4"], "batch_size must be a positive integer"),
    (["--name", "../escape"], "not allowed"),
])
@pytest.mark.slow
def test_bad_input_gets_one_clear_line_and_exit_2(tiny_cifar, tmp_path, args, message):
    base = ["train", "--data", str(tiny_cifar), "--epochs", "1"]
    r = cli(*base, *args, cwd=tmp_path)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_data_show_writes_a_grid(tiny_cifar, tmp_path):
    r = cli("data", "show", str(tiny_cifar), "--out", str(tmp_path / "grid.png"), "--per-class", "3")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "grid.png").size[0] > 100


# ----------------------------------------------------------------------------- config as the source of truth
def test_every_config_key_carries_its_help_and_the_command_line_shows_it(capsys):
    from cnnlab.cli import build_parser
    from cnnlab.core.config import FIELDS, field_help
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    flags = {a.dest: a for a in train._actions}
    for name, f in FIELDS.items():
        assert f.metadata.get("help") and f.metadata.get("group"), name
        assert flags[name].help.replace("%%", "%") == field_help(name)       # argparse reads the field
    assert flags["device"].choices == ("auto", "cpu", "cuda", "mps")
    assert "(default: 0.001)" in flags["lr"].help


def test_print_config_reads_back_as_the_same_config(tmp_path, capsys):
    from cnnlab.cli import main
    from cnnlab.core.config import resolve
    assert main(["train", "--recipe", "speed70", "--epochs", "2", "--print-config"]) == 0
    text = capsys.readouterr().out
    (tmp_path / "c.yaml").write_text(text)
    cfg = resolve(config_file=tmp_path / "c.yaml")
    assert cfg == resolve(recipe="speed70", overrides={"epochs": 2}) and cfg.epochs == 2
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("cnnlab ")


def test_most_probable_orders_by_probability_and_keeps_ties_in_class_order():
    from cnnlab.core.metrics import most_probable
    probs = np.array([[0.1, 0.6, 0.3], [0.4, 0.2, 0.4]])
    first, second = most_probable(probs, ["a", "b", "c"], 2)
    assert [t["class"] for t in first] == ["b", "c"] and first[0]["probability"] == 0.6
    assert [t["class"] for t in second] == ["a", "c"]                     # 0.4 tie: class order
    assert len(most_probable(probs, ["a", "b", "c"], 9)[0]) == 3           # k beyond the classes
    with pytest.raises(CnnlabError, match="--top-k must be at least 1"):
        most_probable(probs, ["a", "b", "c"], 0)


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


# Flags of other programs that cnnlab's messages and comments name.
OTHER_PROGRAMS_FLAGS = {"--nnodes", "--nproc-per-node",   # torchrun
                        "--logdir",                       # tensorboard
                        "--force-reinstall",              # pip
                        "--rounds", "--flag"}             # a benchmark's, and the word in a docstring


def test_every_flag_the_code_names_exists():
    """A hint that names a flag must name one that some cnnlab command takes."""
    import argparse
    import re

    from cnnlab.cli import build_parser
    flags: set[str] = set()

    def walk(parser: argparse.ArgumentParser) -> None:
        for action in parser._actions:
            flags.update(o for o in action.option_strings if o.startswith("--"))
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)

    walk(build_parser())
    named = {}
    for path in (Path(__file__).parents[1] / "src" / "cnnlab").rglob("*.py"):
        for m in re.finditer(r"(?<![\w-])--[a-z][a-z0-9-]+", path.read_text()):
            named.setdefault(m.group(0), path.name)
    assert {f: p for f, p in named.items() if f not in flags | OTHER_PROGRAMS_FLAGS} == {}
    assert {"--bad-images", "--init-from", "--freeze-epochs"} <= flags


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(tiny_cifar, tmp_path, monkeypatch):
    from cnnlab.engine import loop
    from cnnlab.engine.trainer import Trainer
    cfg = Config(data=str(tiny_cifar), epochs=1, batch_size=50, threads=1)
    real = Trainer.run_epoch

    def crash(self, *args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(Trainer, "run_epoch", crash)
    with pytest.raises(RuntimeError, match="mat1"):
        loop.fit(cfg, out=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(Trainer, "run_epoch", real)
    run = loop.fit(cfg, out=tmp_path / "run", progress=False)     # the same --out works at once
    assert run.weights_file.is_file()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's")
    monkeypatch.setattr(Trainer, "run_epoch", crash)
    with pytest.raises(CnnlabError, match="already exists"):
        loop.fit(cfg, out=tmp_path / "mine", progress=False)       # a folder cnnlab did not make is never removed
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError):
        loop.fit(cfg, out=tmp_path / "empty", progress=False)
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())   # emptied, kept


def test_image_size_is_one_side_or_height_and_width():
    assert merge(Config(), {"image_size": "48"}, source="t").image_size == 48
    assert merge(Config(), {"image_size": "96,128"}, source="t").image_size == (96, 128)
    assert merge(Config(), {"image_size": [64, 64]}, source="t").image_size == 64        # a square is one side
    cfg = merge(Config(), {"image_size": [96, 128]}, source="config.json")               # as a run saves it
    assert cfg.image_size == (96, 128) and cfg.to_dict()["image_size"] == [96, 128]
    for bad in ("96,", "a,b", "1,2,3", [1.5, 2], True):
        with pytest.raises(CnnlabError, match="image_size must be N or H,W"):
            merge(Config(), {"image_size": bad}, source="t")
    with pytest.raises(CnnlabError, match="image_size must be at least 8 pixels a side"):
        resolve(overrides={"image_size": "64,4"})
