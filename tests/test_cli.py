"""cli.py: the `cnnlab` command end to end: the run folder `train` writes (read back by evaluate
and predict), one-line errors with exit 2, flags that carry the config's help, `data show`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnlab.core.config import resolve
from cnnlab.engine.runs import HISTORY_KEYS, load_run


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnlab", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


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
