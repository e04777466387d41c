"""`cnnlab tune` and `cnnlab lr-find` on a tiny CIFAR-10 subset: SQLite studies, a failing
trial, a real PostgreSQL server shared by two worker processes, and the range test."""
from __future__ import annotations

import csv
import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

optuna = pytest.importorskip("optuna")

from cnnlab.apps.tune import parse_space, tune  # noqa: E402
from cnnlab.apps.tune.study import database_url, mask_url  # noqa: E402
from cnnlab.cli import main  # noqa: E402
from cnnlab.core.config import Config, resolve  # noqa: E402
from cnnlab.core.errors import CnnlabError  # noqa: E402

# 200 images: 160 to train, 40 to score on; one thread each so workers can run side by side.
TINY = ["--model", "tutorial", "--train-size", "200", "--val-split", "0.2", "--threads", "1"]


def _study(out: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- space files
@pytest.mark.parametrize("doc, message", [
    ({"learning_rate": [1e-3]}, "unknown parameter 'learning_rate'"),
    ({"lr": {"low": 1e-2, "high": 1e-3}}, "low must be below high"),
    ({"lr": {"low": 0, "high": 1e-1, "log": True}}, "log range needs low > 0"),
    ({"label_smoothing": {"low": 0.0, "high": 2.0}}, "label_smoothing must be between 0 and 1"),
    ({"batch_size": {"low": 16.5, "high": 64}}, "whole number"),
    ({"optimizer": {"low": 1, "high": 2}}, "cannot have a range"),
    ({"optimizer": ["adam", "rmsprop"]}, "optimizer must be one of"),
    ({"lr": {"low": "small", "high": 1}}, "low must be a number"),
    ({"lr": {"min": 1e-4, "high": 1}}, "unknown range key"),
    ({"val_split": [0.1, 0.2]}, "cannot be searched"),
    ({"muon_lr_scale": {"low": 0.0, "high": 0.5}}, "muon_lr_scale must be a positive fraction"),
    ({"tta_gate": [0.5, 1.5]}, "tta_gate must be in"),
    ({"unfreeze": ["all", "half"]}, "unfreeze must be all, last-N-blocks"),
    ({"augment": ["light", "heavy"]}, "augment must be one of"),
    ([1, 2], "must be a mapping"),
])
def test_space_file_errors_name_the_problem(doc, message):
    with pytest.raises(CnnlabError, match=message):
        parse_space(doc, source="space file s.yaml")


def test_the_documented_fine_tuning_space_parses():
    text = (Path(__file__).parents[1] / "docs" / "pretrained.md").read_text()
    doc = yaml.safe_load(text.split("```yaml\n", 1)[1].split("```", 1)[0])
    space = parse_space(doc, base=Config(model="efficientnet_lite0", pretrained=True), source="docs/pretrained.md")
    assert space.searched == ["body_lr_scale", "unfreeze", "freeze_epochs", "augment"]
    assert space.params["unfreeze"].choices == ("last-30%", "last-60%", "all")


def test_space_file_forms_and_flags_fixing_keys(tmp_path):
    (tmp_path / "space.yaml").write_text(
        "lr: {low: 1.0e-4, high: 1.0e-1, log: true}\nepochs: {low: 1, high: 3, type: int}\n"
        "weight-decay: {low: 1.0e-6, high: 1.0e-2, log: true, zero: true}\nbatch_size: [32, 64]\n"
        "optimizer: {choices: [adam, nesterov]}\nmomentum: 0.95\ntranslate: {low: 0, high: 4, step: 2}\n")
    from cnnlab.apps.tune import load_space
    space = load_space(tmp_path / "space.yaml")
    assert space.searched == ["lr", "epochs", "weight_decay", "batch_size", "optimizer", "translate"]
    assert space.params["momentum"].value == 0.95
    assert space.params["translate"].grid_values() == [0, 2, 4]
    assert space.params["weight_decay"].describe().endswith("log or 0")
    with pytest.raises(CnnlabError, match="grid sampler needs a finite set of values for lr"):
        space.grid()
    fixed = space.fixing({"epochs": 2.0})
    assert "epochs" not in fixed.searched and fixed.removed == {"epochs": 2.0}
    muon = parse_space({"optimizer": ["nesterov", "muon"], "muon_lr_scale": {"low": 0.05, "high": 1.0, "log": True}},
                       source="space file m.yaml")
    assert muon.params["optimizer"].choices == ("nesterov", "muon") and muon.params["muon_lr_scale"].bounds == (0.05, 1.0)


def test_tune_refuses_to_score_without_a_validation_split(tiny_cifar, tmp_path):
    cfg = resolve(overrides={"data": str(tiny_cifar), "model": "tutorial", "val_split": 0.0})
    with pytest.raises(CnnlabError, match="--val-split 0.1"):
        tune(cfg, trials=1, out=tmp_path / "t", progress=False)
    assert not (tmp_path / "t" / "study.db").exists()


# ----------------------------------------------------------------------------- storage URLs
# A password with an unescaped @ and : in it: SQLAlchemy reads "3x9@db.example" as the port.
SECRET = "Tr0ub@d0r:3x9"
SECRET_PARTS = ("Tr0ub", "d0r", "3x9")


@pytest.mark.parametrize("url, shown", [
    ("postgresql://alice:s3cr3t@db.example:5432/study", "postgresql://alice:***@db.example:5432/study"),
    ("postgresql://alice@db.example/study?sslpassword=s3cr3t&password=s3cr3t&sslmode=require",
     "postgresql://alice@db.example/study?sslpassword=***&password=***&sslmode=require"),
    (f"postgresql://alice:{SECRET}@db.example/study", "postgresql://***"),
    ("postgresql://alice:p@ss@db.example/study", "postgresql://***"),   # would show "ss@db.example"
    ("alice:s3cr3t@db.example", "***"),
    ("sqlite:////runs/tune/study.db", "sqlite:////runs/tune/study.db"),
])
def test_mask_url_hides_passwords_and_secret_query_values(url, shown):
    assert mask_url(url) == shown


def test_an_unparsable_storage_url_is_one_line_that_does_not_echo_it(tiny_cifar, tmp_path, capsys):
    out = tmp_path / "tune"
    code = main(["tune", "--data", str(tiny_cifar), *TINY, "--trials", "1", "--out", str(out),
                 "--storage", f"postgresql://alice:{SECRET}@db.example/study"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "--storage postgresql://*** is not a database URL" in err and "PGPASSWORD" in err
    assert not [part for part in SECRET_PARTS if part in err]
    assert not out.exists()   # refused before any data loads


@pytest.mark.slow
def test_a_storage_password_is_masked_in_everything_printed_and_saved(tiny_cifar, tmp_path, capsys, monkeypatch):
    from cnnlab.apps.tune import study as study_mod
    from cnnlab.core.files import read_json
    # The URL names a PostgreSQL server, its password given twice; a SQLite file stands in for it.
    open_storage = study_mod.open_storage
    monkeypatch.setattr(study_mod, "open_storage", lambda url: open_storage(f"sqlite:///{tmp_path / 'db.sqlite'}"))
    out = tmp_path / "tune"
    url = "postgresql://alice:s3cr3t@db.example/study?password=s3cr3t"
    assert main(["tune", "--data", str(tiny_cifar), *TINY, "--epochs", "1", "--trials", "1", "--no-test",
                 "--out", str(out), "--storage", url]) == 0
    printed = capsys.readouterr()
    assert "in postgresql://alice:***@db.example/study?password=*** (0 trial(s) so far)" in printed.out
    assert "s3cr3t" not in printed.out + printed.err
    assert read_json(out / "tune.json")["storage"] == "postgresql://alice:***@db.example/study?password=***"
    assert [p for p in out.rglob("*") if p.is_file() and b"s3cr3t" in p.read_bytes()] == []


# ----------------------------------------------------------------------------- SQLite studies
@pytest.mark.slow
def test_sqlite_study_best_yaml_and_rerun_continues(tiny_cifar, tmp_path, capsys):
    out = tmp_path / "tune"
    # The default space, with epochs fixed by the flag.
    args = ["tune", "--data", str(tiny_cifar), *TINY, "--epochs", "2", "--trials", "4", "--out", str(out),
            "--study", "tiny"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "fixed by the command line: epochs=2.0" in printed and "trial    3" in printed

    study = _study(out, "tiny")
    assert len(study.trials) == 4
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in study.trials)
    assert {"lr", "batch_size", "optimizer", "label_smoothing", "use_weight_decay"} <= set(study.trials[0].params)
    rows = _rows(out / "trials.csv")
    assert [r["number"] for r in rows] == ["0", "1", "2", "3"]

    best = study.best_trial
    cfg = resolve(config_file=out / "best.yaml")
    assert cfg.lr == pytest.approx(best.params["lr"]) and cfg.batch_size == best.params["batch_size"]
    assert cfg.epochs == 2 and cfg.model == "tutorial" and cfg.train_size == 200 and cfg.threads is None
    # Only the best trial keeps its weights.
    kept = sorted(p.parent.name for p in (out / "trials").glob("*/model.safetensors"))
    assert kept == [f"trial-{best.number:04d}"]
    assert (out / "plots" / "history.png").is_file() and (out / "plots" / "lr_slice.png").is_file()

    # The same command again continues the same study.
    assert main([*args[:-4], "--trials", "2", *args[-4:]]) == 0
    study = _study(out, "tiny")
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4, 5]
    assert len(_rows(out / "trials.csv")) == 6
    with pytest.raises(CnnlabError, match="holds study 'tiny'"):
        tune(resolve(overrides={"data": str(tiny_cifar)}), trials=1, study_name="other", out=out, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("key, bad, good, note", [
    ("lr", 1e6, 1e-3, "NonFiniteLoss"),   # a rate no network survives
    # The 32-px images' whole side: known only once the trial has its images.
    ("translate", 32, 2, "CnnlabError: --translate 32 shifts the 32x32 images by their whole side"),
])
def test_a_trial_that_cannot_train_fails_alone_and_the_study_goes_on(tiny_cifar, tmp_path, key, bad, good, note):
    out = tmp_path / "tune"
    cfg = resolve(overrides={"data": str(tiny_cifar), "model": "tutorial", "train_size": 200,
                             "val_split": 0.2, "threads": 1, "epochs": 1})
    out.mkdir()
    study = optuna.create_study(study_name="bad", storage=f"sqlite:///{out / 'study.db'}",
                                direction="maximize")
    study.enqueue_trial({key: bad})     # first
    study.enqueue_trial({key: good})
    space = parse_space({key: [bad, good], "batch_size": 64})
    result = tune(cfg, trials=2, space=space, study_name="bad", out=out, progress=False)

    first, second = _study(out, "bad").trials
    assert first.state == optuna.trial.TrialState.FAIL and first.user_attrs["note"].startswith(note)
    assert second.state == optuna.trial.TrialState.COMPLETE
    assert result.best["number"] == 1 and result.states == {"FAIL": 1, "COMPLETE": 1}
    assert getattr(resolve(config_file=out / "best.yaml"), key) == good
    assert _rows(out / "trials.csv")[0]["note"].startswith(note)


# ----------------------------------------------------------------------------- Optuna's own tools
@pytest.mark.slow
def test_optuna_tools_read_a_finished_study(tiny_cifar, tmp_path):
    """What cnnlab reports about a study is what optuna.load_study, the `optuna` command line
    and optuna-dashboard (when installed) read from its SQLite file."""
    import json

    out = tmp_path / "tune"
    cfg = resolve(overrides={"data": str(tiny_cifar), "model": "tutorial", "train_size": 200,
                             "val_split": 0.2, "threads": 1, "epochs": 1})
    space = parse_space({"lr": [1e-3, 3e-3], "batch_size": 64})
    result = tune(cfg, trials=2, space=space, sampler="grid", study_name="tools", out=out, progress=False)
    assert result.trials == 2 and result.best is not None
    url = f"sqlite:///{out / 'study.db'}"

    study = optuna.load_study(study_name="tools", storage=url)
    assert len(study.trials) == result.trials == len(_rows(out / "trials.csv"))
    assert study.best_trial.number == result.best["number"]
    assert study.best_value == pytest.approx(result.best["value"])
    assert study.best_trial.params["lr"] == pytest.approx(resolve(config_file=out / "best.yaml").lr)

    optuna_cli = Path(sys.executable).with_name("optuna")
    if not optuna_cli.exists():
        pytest.skip(f"no optuna command beside {sys.executable}")

    def cli(*args: str):
        done = subprocess.run([str(optuna_cli), *args, "--study-name", "tools", "--storage", url, "-f", "json"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    trials = cli("trials")
    assert len(trials) == result.trials and {t["state"] for t in trials} == {"COMPLETE"}
    best = cli("best-trial")
    assert best["number"] == result.best["number"] and best["value"] == pytest.approx(result.best["value"])

    # The README's `optuna-dashboard sqlite:///...`: its web API, called without a server.
    dashboard = pytest.importorskip("optuna_dashboard", reason="pip install optuna-dashboard")
    from wsgiref.util import setup_testing_defaults
    app = dashboard.wsgi(url)

    def get(path: str):
        environ: dict = {"PATH_INFO": path}
        setup_testing_defaults(environ)
        status: list[str] = []
        body = b"".join(app(environ, lambda s, headers, exc=None: status.append(s)))
        assert status[0].startswith("200"), (status, body[:300])
        return json.loads(body)

    [summary] = get("/api/studies")["study_summaries"]
    assert summary["study_name"] == "tools" and summary["directions"] == ["maximize"]
    detail = get(f"/api/studies/{summary['study_id']}")
    assert len(detail["trials"]) == result.trials
    assert [t["number"] for t in detail["best_trials"]] == [result.best["number"]]


# ----------------------------------------------------------------------------- PostgreSQL
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL cluster on a loopback port, for this test session only."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins:
        pytest.skip("PostgreSQL server binaries are not installed (/usr/lib/postgresql/*/bin/initdb): "
                    "apt-get install postgresql, as scripts/setup.sh --test does")
    pytest.importorskip("psycopg2", reason="pip install psycopg2-binary to reach PostgreSQL")
    bindir = Path(bins[-1]).parent
    prefix: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="cnnlab-pg-"))
    if os.geteuid() == 0:  # the server refuses to run as root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        os.chown(folder, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", _free_port()

    def run(*cmd):
        return subprocess.run([*prefix, *map(str, cmd)], check=True, capture_output=True, text=True, cwd=folder)

    try:
        run(bindir / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        run(bindir / "pg_ctl", "-D", data, "-l", folder / "server.log", "-w", "-t", "60", "-o",
            f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={folder} -c fsync=off",
            "start")
    except subprocess.CalledProcessError as e:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL: {e.stderr or e.stdout}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, cwd=folder)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_share_one_postgres_study(tiny_cifar, tmp_path, postgres_url):
    def worker(i: int) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "cnnlab", "tune", "--data", str(tiny_cifar), *TINY, "--epochs", "1",
               "--trials", "2", "--storage", postgres_url, "--study", "shared", "--out", str(tmp_path / f"w{i}")]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    workers = [worker(0), worker(1)]   # started together: they also race to create the tables
    logs = [w.communicate(timeout=240)[0] for w in workers]
    for w, log in zip(workers, logs):
        assert w.returncode == 0, log

    trials = optuna.load_study(study_name="shared", storage=database_url(postgres_url)).trials
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    runs = [Path(t.user_attrs["run"]) for t in trials]
    assert len(set(runs)) == 4 and all(r.is_dir() for r in runs)
    # Each worker ran its own two trials, and each trial ran in exactly one place.
    for i in (0, 1):
        assert len(list((tmp_path / f"w{i}" / "trials").iterdir())) == 2
    assert "in postgresql://postgres@127.0.0.1" in logs[0]
    assert yaml.safe_load((tmp_path / "w0" / "tune.json").read_text())["study"] == "shared"


# ----------------------------------------------------------------------------- lr-find
def test_lr_find_writes_plot_and_suggestion(tiny_cifar, tmp_path, capsys):
    import json
    out = tmp_path / "lrf"
    assert main(["lr-find", "--data", str(tiny_cifar), *TINY, "--steps", "40", "--start", "1e-5",
                 "--end", "1", "--out", str(out)]) == 0
    doc = json.loads((out / "lr_find.json").read_text())
    assert (out / "lr_find.png").stat().st_size > 10_000
    assert 1e-5 <= doc["suggested_lr"] <= 1 and doc["min_loss_lr_div_10"] == pytest.approx(doc["min_loss_lr"] / 10)
    assert len(doc["lrs"]) == doc["steps_run"] >= 10
    assert doc["lrs"][1] / doc["lrs"][0] == pytest.approx(doc["lrs"][-1] / doc["lrs"][-2])   # exponential
    assert "suggested lr" in capsys.readouterr().out
    # The valley's rate is the suggestion; the other two rules are kept beside it.
    assert doc["rule"] == "valley" and doc["valley_lrs"][0] <= doc["suggested_lr"] <= doc["valley_lrs"][1]
    assert doc["steepest_lr"] in doc["lrs"] and doc["min_loss_lr"] in doc["lrs"]


def test_lr_find_with_a_frozen_body_ramps_the_head_alone(tiny_cifar, tmp_path, capsys, monkeypatch):
    from cnnlab.engine import callbacks
    source = tmp_path / "source"
    assert main(["train", "--data", str(tiny_cifar), *TINY, "--epochs", "1", "--out", str(source)]) == 0
    frozen_for: list[int] = []
    real_init = callbacks.FreezeBody.__init__

    def spy(self, epochs, cached=True):
        real_init(self, epochs, cached)
        frozen_for.append(epochs)
    monkeypatch.setattr(callbacks.FreezeBody, "__init__", spy)
    out = tmp_path / "lrf"
    assert main(["lr-find", "--data", str(tiny_cifar), *TINY, "--init-from", str(source), "--freeze-epochs", "1",
                 "--steps", "40", "--out", str(out)]) == 0
    # 40 steps are several epochs of these few images: every one of them stays head-only.
    assert frozen_for == [40]
    assert "the ramp trained the head alone" in capsys.readouterr().out


def test_lr_find_refuses_a_backwards_range(tiny_cifar, tmp_path):
    assert main(["lr-find", "--data", str(tiny_cifar), "--start", "1", "--end", "1e-3",
                 "--out", str(tmp_path / "x")]) == 2


def test_valley_rule_on_a_drawn_curve():
    """A noisy plateau, a descent over steps 60..84, then divergence: the valley is the
    descent, the suggestion two thirds of the way down it; a noise dip in the plateau draws
    the steepest-descent rule, not the valley."""
    import numpy as np

    from cnnlab.apps.tune.lr_range import suggest
    rng = np.random.default_rng(0)
    curve = np.concatenate([2.3 + 0.002 * rng.standard_normal(60), np.linspace(2.29, 1.5, 25),
                            1.5 * 1.3 ** np.arange(1, 16)])
    curve[30:33] = [2.25, 2.1, 2.3]            # a sharp dip: the steepest slope, far from the valley
    found = suggest(curve)
    # fastai counts the valley's length back from its bottom: plateau points in the subsequence
    # move its top a few steps early.
    assert 45 <= found.valley_start <= 62 and found.valley_end == 84 and found.lowest == 84
    assert found.valley == found.valley_start + int(2 / 3 * (84 - found.valley_start))
    assert 60 < found.valley < 84 and found.steepest == 30


@pytest.mark.slow
def test_lr_find_suggestion_trains_near_the_best_of_a_grid(make_subset, tmp_path, capsys):
    """The issue's case, ``--steps 30`` for Adam, on 1,000 CIFAR-10-like images: three epochs
    at the suggested rate score within a few points of the best of 1e-4, 1e-3, 1e-2 and 1e-1
    on the 200 validation images (here about 78%, 83%, 69% and 12%; the suggestion, 1.4e-3:
    82%). (On real CIFAR-10 the steepest-descent rule suggested 3.6e-07: 10%.)"""
    import json

    from cnnlab.engine.loop import fit
    data = make_subset({"train": 100, "test": 5})
    flags = ["--model", "tutorial", "--val-split", "0.2", "--optimizer", "adam", "--threads", "1"]
    assert main(["lr-find", "--data", str(data), *flags, "--steps", "30", "--out", str(tmp_path / "lrf")]) == 0
    suggested = json.loads((tmp_path / "lrf" / "lr_find.json").read_text())["suggested_lr"]
    capsys.readouterr()

    base = resolve(overrides={"data": str(data), "model": "tutorial", "val_split": 0.2, "optimizer": "adam",
                              "threads": 1, "epochs": 3})

    def accuracy(lr: float) -> float:
        run = fit(base.replace(lr=lr), out=tmp_path / f"lr-{lr:g}", progress=False)
        return run.metrics["final_val_accuracy"]

    grid = {lr: accuracy(lr) for lr in (1e-4, 1e-3, 1e-2, 1e-1)}
    got = accuracy(suggested)
    # 200 images: one standard error of an accuracy near 0.8 is 2.8 points.
    assert got >= max(grid.values()) - 0.06, (suggested, got, grid)


def test_trials_that_agree_on_the_data_load_it_once(tiny_cifar, tmp_path, monkeypatch):
    from cnnlab.engine import prepare
    loads = []
    real = prepare.load_data

    def counted(plan, **kw):
        loads.append(plan.cfg.image_size)
        return real(plan, **kw)

    monkeypatch.setattr(prepare, "load_data", counted)
    cfg = resolve(overrides={"data": str(tiny_cifar), "model": "tutorial", "train_size": 200,
                             "val_split": 0.2, "threads": 1, "epochs": 1})
    space = parse_space({"lr": [1e-3, 3e-3, 1e-2], "batch_size": 64})
    result = tune(cfg, trials=3, space=space, sampler="grid", out=tmp_path / "t", progress=False)
    assert result.states == {"COMPLETE": 3}
    assert len(loads) == 1     # one load: the validation check before the study, kept for all 3 trials


# ----------------------------------------------------------------------------- the test split
class _CountedSplit:
    """A split that records each read of its images (``eval_batches``, ``take``) with what the
    study looked like at that moment: (read, trials in the study, trials still running)."""

    def __init__(self, split, reads: list, study_db: Path):
        self._split, self._reads, self._db = split, reads, study_db

    def __getattr__(self, name):
        return getattr(self._split, name)

    def __len__(self) -> int:
        return len(self._split)

    def _record(self, what: str) -> None:
        trials = _study(self._db.parent, "counted").trials if self._db.exists() else []
        running = [t.number for t in trials if t.state == optuna.trial.TrialState.RUNNING]
        self._reads.append((what, len(trials), running))

    def eval_batches(self, *args, **kwargs):
        self._record("eval_batches")
        return self._split.eval_batches(*args, **kwargs)

    def take(self, index):
        self._record("take")
        return self._split.take(index)


def _count_test_reads(monkeypatch, out: Path) -> list:
    import dataclasses

    from cnnlab.engine import prepare
    reads: list = []
    real = prepare.load_data

    def counted(cfg, **kw):
        data = real(cfg, **kw)
        return dataclasses.replace(data, test=_CountedSplit(data.test, reads, out / "study.db"))

    monkeypatch.setattr(prepare, "load_data", counted)
    return reads


@pytest.mark.slow
def test_trials_never_read_the_test_split_and_the_best_is_tested_once(tiny_cifar, tmp_path, monkeypatch,
                                                                      capsys):
    """Against the old tuner this fails: every trial's fit evaluated the test split (3 reads)."""
    import json
    out = tmp_path / "tune"
    reads = _count_test_reads(monkeypatch, out)
    args = ["tune", "--data", str(tiny_cifar), *TINY, "--epochs", "1", "--trials", "3", "--sampler", "random",
            "--out", str(out), "--study", "counted"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    # One evaluation of the test split (plus the images its report shows), all after the 3 trials.
    assert [r for r in reads if r[0] == "eval_batches"] == [("eval_batches", 3, [])]
    assert all(n == 3 and not running for _, n, running in reads)

    best = _study(out, "counted").best_trial
    for trial in (out / "trials").iterdir():
        metrics = json.loads((trial / "metrics.json").read_text())
        if trial.name == f"trial-{best.number:04d}":
            assert metrics["tested"] is True and metrics["test_images"] == 100
            assert (trial / "evaluation.npz").is_file() and "test accuracy" in (trial / "report.html").read_text()
        else:
            assert metrics["tested"] is False and "test_accuracy" not in metrics and "per_class_accuracy" not in metrics
        assert metrics["val_images"] == 40
    assert f"test: trial {best.number}'s model, tested once at the end of the study: test accuracy" in printed
    assert printed.count("test accuracy") == 1
    assert _study(out, "counted").user_attrs["tested_trials"] == [best.number]

    # Continued with --no-test: the test split is not read at all.
    reads.clear()
    assert main([*args[:-4], "--no-test", *args[-4:]]) == 0
    assert reads == [] and "test accuracy" not in capsys.readouterr().out


def test_the_tuner_says_when_its_ranking_is_noise(tiny_cifar, tmp_path):
    """40 validation images (one standard error near 8 points at 50%) and two nearly equal
    learning rates: both warnings, and every score with its standard error."""
    import math
    cfg = resolve(overrides={"data": str(tiny_cifar), "model": "tutorial", "train_size": 200,
                             "val_split": 0.2, "threads": 1, "epochs": 1})
    space = parse_space({"lr": [1e-3, 1.05e-3], "batch_size": 64})
    result = tune(cfg, trials=2, space=space, sampler="grid", out=tmp_path / "t", progress=False, test=False)
    best = result.best
    assert best["val_images"] == 40
    assert best["val_se"] == pytest.approx(math.sqrt(best["value"] * (1 - best["value"]) / 40))
    small, noise = result.warnings
    assert "40 validation images" in small and "--val-split" in small
    assert "less than one standard error" in noise and "runner-up" in noise
    assert result.test is None     # test=False: not even the best
    rows = _rows(tmp_path / "t" / "trials.csv")
    assert all(float(r["val_se"]) == pytest.approx(math.sqrt(float(r["val_accuracy"]) * (1 - float(r["val_accuracy"])) / 40),
                                                   abs=1e-4) for r in rows)


def test_standard_error_of_an_accuracy():
    import math

    from cnnlab.core.metrics import accuracy_se, with_se, worst_case_se
    assert accuracy_se(0.5, 100) == pytest.approx(0.05)
    assert accuracy_se(0.9, 400) == pytest.approx(0.015)
    assert worst_case_se(400) == pytest.approx(0.025)
    assert math.isnan(accuracy_se(0.5, 0)) and math.isnan(accuracy_se(None, 10))
    assert with_se(0.9, 400) == "90.00% ± 1.50" and with_se(0.9, None) == "90.00%" and with_se(None, 5) == "–"
