"""``tune``: an Optuna study whose every trial is a normal ``fit`` run, scored on validation.

The tune folder (``--out``, default ``runs/tune-<study>``):

    study.db               the study, when no --storage is given (SQLite: one machine)
    tune.json              which study and storage this folder belongs to
    trials/trial-NNNN/     each trial's run folder, as `cnnlab train` leaves it but untested; only
                           the best trial's stays whole (and is tested at the end): the others,
                           once finished, keep config.json, history, metrics.json and model.json,
                           and lose their weights, checkpoint and plots (2-3 MB each on CIFAR,
                           down to ~20 kB)
    trials.csv             one row per trial of the whole study (every worker's)
    best.yaml              the best trial's config: `cnnlab train --config best.yaml`
    plots/                 history.png, importances.png, parallel.png, lr_slice.png

Trials are scored on the validation split: the accuracy of the model the run keeps
(``keep: last`` the last epoch's, ``keep: best`` the best epoch's), reported after every
epoch so the pruner can stop a bad trial early. No trial reads the test split
(``fit(test=False)``: its metrics.json says ``"tested": false``, and it has no test logits).
When the study ends, the best trial's model is tested once (``score_test_split``), and that is
the one test figure the study reports (``test=False``, ``--no-test``: not even that). A study
continued later tests its best again only if the best is a new trial; the study remembers
every trial it tested (its ``tested_trials`` user attribute), and the summary says so.

Every validation and test accuracy is shown with its binomial standard error, from the
split's size; the tuner warns when the validation split is too small to rank trials
(``RANKING_SE``), and when the best trial beats the runner-up by less than one standard error.

Many workers: give every worker the same ``--storage postgresql://user@host/db`` and
``--study NAME`` (each machine its own ``--out``), with the password in ``PGPASSWORD`` or
``~/.pgpass``, never in the URL: a command line is visible to every user (``ps``). A password
in a URL is masked wherever the tuner prints or saves it (``mask_url``). ``--trials N`` is
the number of trials *this* command runs, as in Optuna, so k workers run k x N; running the
command again continues the study. A running trial writes a heartbeat every ``HEARTBEAT_SECONDS``; one
silent for ``GRACE_SECONDS`` (its worker was killed) is marked FAIL by the next worker to
start a trial, and re-queued once with the same parameters. Each trial's run folder lives
on the machine that ran it (``host`` and ``run`` in trials.csv).
"""
from __future__ import annotations

import csv
import io
import math
import random
import re
import shutil
import socket
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, cast

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from cnnlab.apps.tune.space import SearchSpace, default_space, load_space, parse_space
from cnnlab.core.config import FIELDS, Config, merge
from cnnlab.core.errors import CnnlabError, TrainingInterrupted
from cnnlab.core.events import Callback
from cnnlab.core.files import read_json, write_json, write_text
from cnnlab.core.metrics import accuracy_se, with_se, worst_case_se
from cnnlab.core.run_folder import RunFolder
from cnnlab.data.dataset import Dataset
from cnnlab.engine.runs import RUNS_ROOT

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "hyperband", "none")
HEARTBEAT_SECONDS = 30       # a running trial's worker writes a heartbeat this often
GRACE_SECONDS = 120          # ... and is declared dead after this long without one
STALE_RETRIES = 1            # a dead worker's trial is re-run once with the same parameters
MEDIAN_STARTUP_TRIALS = 5    # the median pruner compares against at least this many trials
STORAGE_ATTEMPTS = 4         # workers starting together may race to create the tables
# A shared study's URL carries no password: a command line is visible to every user (ps).
STORAGE_EXAMPLE = "postgresql://user@host:5432/dbname (the password in PGPASSWORD or ~/.pgpass) or sqlite:///study.db"
RUN_SPECIFIC = ("device", "threads")     # best.yaml leaves the hardware to the machine that trains
# What a trial other than the best loses once finished: 2-3 MB of weights, checkpoint, plots
# and report (and the test logits of a best since overtaken), down to ~20 kB (config, history,
# metrics, model card).
STRIPPED_FILES = ("weights_file", "evaluation_file", "report_file")     # RunFolder's names for them
STRIPPED_DIRS = ("checkpoints_dir", "plots_dir")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
# A validation split whose standard error at 50% accuracy exceeds 2.5 points (under 400
# images) cannot rank trials a few points apart: the tuner says so before it starts.
RANKING_SE = 0.025
TESTED_ATTR = "tested_trials"   # the study's user attribute: every trial whose model was tested


class PruneTrial(Callback):
    """A trial's validation accuracy reported to Optuna after each epoch; training stops when
    the pruner says so (never after the last epoch: nothing is left to save by stopping)."""

    def __init__(self, trial: optuna.Trial, last_epoch: int):
        self.trial, self.last_epoch = trial, last_epoch
        self.pruned_at: list[int] = []

    def on_epoch_end(self, trainer: Any, logs: dict[str, Any]) -> None:
        epoch = trainer.state.epoch
        acc = trainer.state.history["val_accuracy"][-1]
        if acc is None or not math.isfinite(acc):
            raise CnnlabError(f"no validation accuracy after epoch {epoch}")
        self.trial.report(acc, epoch)
        if epoch < self.last_epoch and self.trial.should_prune():
            self.pruned_at.append(epoch)
            trainer.request_stop(None)


def _trial_errors() -> tuple[type[Exception], ...]:
    """What fails one trial but not the study: bad values, NaN loss, a batch too big for the GPU."""
    import torch
    return (CnnlabError, torch.OutOfMemoryError)


@dataclass
class TuneResult:
    out: Path
    study_name: str
    storage: str                 # the URL with any password hidden
    states: dict[str, int]       # trials of the whole study by state
    ran: int                     # trials this call ran
    best: dict[str, Any] | None  # number, value, val_images, val_se, params, config, run; None while nothing completed
    # The best trial's one test: test_accuracy, test_loss, test_images, test_se, trial; None when
    # not tested (--no-test, nothing completed, the best ran on another machine, or interrupted).
    test: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)   # what makes the ranking or the test doubtful
    tested_trials: list[int] = field(default_factory=list)   # every trial of the study ever tested

    @property
    def trials(self) -> int:
        return sum(self.states.values())


# ----------------------------------------------------------------------------- pieces
def default_study_name(cfg: Config) -> str:
    data = re.sub(r"[^A-Za-z0-9._-]", "_", Path(cfg.data).name or "data")
    return f"{cfg.model}-{data}"


# Query parameters whose values are secrets (password, sslpassword, passwd, a token...).
SECRET_QUERY = re.compile(r"pass|secret|token", re.IGNORECASE)


def _parse_url(url: str) -> Any:
    """SQLAlchemy's URL object, or None for a string it cannot parse. A host with an ``@`` is
    the rest of a password that held one unescaped (``user:p@ss@host``): not parsed either."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):   # ValueError: a port that is not a number
        return None
    return None if "@" in (parsed.host or "") else parsed


def mask_url(url: str) -> str:
    """``url`` as it may be printed or saved: the password and every secret query value as
    ``***``; a URL SQLAlchemy cannot parse shows only its scheme (what failed to parse may be
    the password)."""
    from urllib.parse import urlencode
    parsed = _parse_url(url)
    if parsed is None:
        scheme = re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", url)
        return f"{scheme.group(0) if scheme else ''}***"
    base = parsed.set(query={}).render_as_string(hide_password=True)
    query = urlencode({k: "***" if SECRET_QUERY.search(k) else v for k, v in parsed.query.items()},
                      doseq=True, safe="*")
    return f"{base}?{query}" if query else base


def check_storage_url(url: str) -> None:
    """Refuse a ``--storage`` URL SQLAlchemy cannot parse before any work, without echoing it."""
    if _parse_url(url) is None:
        raise CnnlabError(f"--storage {mask_url(url)} is not a database URL SQLAlchemy can parse: expected "
                          f"e.g. {STORAGE_EXAMPLE}")


def database_url(url: str) -> str:
    """``postgresql://`` with the driver that is installed (SQLAlchemy 2.1 assumes psycopg 3;
    cnnlab ships psycopg2-binary); other URLs unchanged."""
    import importlib.util
    scheme, sep, rest = url.partition("://")
    if sep and scheme in ("postgresql", "postgres"):
        for module in ("psycopg2", "psycopg"):
            if importlib.util.find_spec(module) is not None:
                return f"postgresql+{module}://{rest}"
    return url


@contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Our own line per trial replaces Optuna's log; its experimental-API warnings are noise here."""
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(level)


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats; a dead worker's trial is failed and retried once."""
    import sqlalchemy.exc
    engine_kwargs: dict[str, Any] = ({"connect_args": {"timeout": 60}} if url.startswith("sqlite")
                                     else {"pool_pre_ping": True})
    for attempt in range(STORAGE_ATTEMPTS):
        try:
            return optuna.storages.RDBStorage(
                database_url(url), engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_SECONDS,
                grace_period=GRACE_SECONDS,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=STALE_RETRIES))
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            # Two workers creating the tables of an empty database at once: one wins, retry.
            if attempt == STORAGE_ATTEMPTS - 1:
                raise
            time.sleep(0.5 + random.random())
        except ImportError:  # Optuna's word for a missing database driver
            raise CnnlabError(f"--storage {mask_url(url)} needs a database driver that is not "
                              f"installed (PostgreSQL: pip install psycopg2-binary; MySQL: pip install "
                              f"pymysql and write mysql+pymysql://...)") from None
        except sqlalchemy.exc.NoSuchModuleError as e:   # names the scheme, never the password
            raise CnnlabError(f"--storage {mask_url(url)} is not a database URL ({e}); expected e.g. "
                              f"{STORAGE_EXAMPLE}") from None
        except sqlalchemy.exc.OperationalError as e:
            reason = str(e.orig).strip().splitlines()[0] if e.orig else str(e).splitlines()[0]
            raise CnnlabError(f"cannot open study storage {mask_url(url)}: {reason}") from None
    raise AssertionError("unreachable")


def make_sampler(name: str, space: SearchSpace, seed: int | None) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler(space.grid(), seed=seed)
    raise CnnlabError(f"--sampler must be one of {', '.join(SAMPLERS)}; got {name!r}")


def make_pruner(name: str, max_epochs: float) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP_TRIALS)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, math.ceil(max_epochs)))
    if name == "none":
        return optuna.pruners.NopPruner()
    raise CnnlabError(f"--pruner must be one of {', '.join(PRUNERS)}; got {name!r}")


def _claim_folder(out: Path, study_name: str, storage_label: str) -> None:
    """One tune folder, one study: trial folders are named by trial number."""
    meta = {"study": study_name, "storage": storage_label}
    path = out / "tune.json"
    if path.exists():
        old = read_json(path)
        if (old.get("study"), old.get("storage")) != (study_name, storage_label):
            raise CnnlabError(f"{out} holds study {old.get('study')!r} ({old.get('storage')}); give study "
                              f"{study_name!r} ({storage_label}) another --out")
        return
    write_json(path, meta)


def _check_validation(objective: "_Objective") -> int:
    """The number of validation images (the base config's images, kept for the first trials);
    none is an error (trials are never scored on test)."""
    cfg = objective.base
    data = objective.data_for(cfg)
    n = 0 if data.val is None else len(data.val)
    if n == 0:
        raise CnnlabError(f"tune scores trials on a validation split, and {cfg.data} has none with "
                          f"val_split {cfg.val_split:g}: give --val-split 0.1 (a stratified hold-out of "
                          f"train) or add a val/<class>/<image> folder")
    return n


# ----------------------------------------------------------------------------- tune
def tune(base: Config, *, trials: int | None = None, timeout: float | None = None,
         space: SearchSpace | dict | str | Path | None = None, fixed: dict[str, Any] | None = None,
         study_name: str | None = None, storage: str | None = None, sampler: str = "tpe",
         pruner: str = "median", out: str | Path | None = None, progress: bool = True,
         test: bool = True) -> TuneResult:
    """Run ``trials`` trials (or until ``timeout`` seconds) of a study, then write its outputs.

    ``base`` gives every key the space does not search; ``space`` is a SearchSpace, a space
    file or its mapping (None: the default); ``fixed`` (command-line flags) takes keys out of it. ``storage`` None means an SQLite file in the tune folder.
    Trials never read the test split; ``test``: the best trial's model is tested once at the end.
    """
    if trials is not None and trials < 1:
        raise CnnlabError(f"--trials must be a positive number, got {trials}")
    if timeout is not None and not timeout > 0:
        raise CnnlabError(f"--timeout must be a positive number of seconds, got {timeout}")
    if trials is None and timeout is None and sampler != "grid":
        raise CnnlabError("say how long to search: --trials N and/or --timeout SECONDS")
    if sampler not in SAMPLERS:
        raise CnnlabError(f"--sampler must be one of {', '.join(SAMPLERS)}; got {sampler!r}")
    if pruner not in PRUNERS:
        raise CnnlabError(f"--pruner must be one of {', '.join(PRUNERS)}; got {pruner!r}")
    if storage is not None:
        check_storage_url(storage)
    if isinstance(space, dict):
        space = parse_space(space, base=base, source="space")
    elif not isinstance(space, SearchSpace):
        space = default_space(base) if space is None else load_space(space, base)
    space = space.fixing(fixed or {})
    if not space.searched:
        raise CnnlabError(f"nothing left to search: every key of the {space.source} is fixed "
                          f"({', '.join(space.describe() + [f'{k}={v}' for k, v in space.removed.items()])})")
    grid = space.grid() if sampler == "grid" else None   # refuses continuous ranges before any work
    study_name = study_name or default_study_name(base)
    out = Path(out) if out is not None else RUNS_ROOT / f"tune-{study_name}"
    objective = _Objective(base, space, out, grid is not None)
    n_val = _check_validation(objective)   # loads the images the first trials train on
    out.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    label = mask_url(storage) if storage else "study.db"
    if (out / "tune.json").exists():
        _claim_folder(out, study_name, label)   # refuse another study's folder before touching storage

    with _quiet_optuna():
        rdb = open_storage(url)
        _claim_folder(out, study_name, label)
        try:
            before = len(rdb.get_all_trials(rdb.get_study_id_from_name(study_name), deepcopy=False))
        except KeyError:
            before = 0
        # One process: reproducible from --seed (offset so a re-run does not replay its start).
        # Many workers: unseeded, or workers started together would all try the same values.
        seed = None if storage else base.seed * 100_003 + before
        study = optuna.create_study(
            study_name=study_name, storage=rdb, direction="maximize", load_if_exists=True,
            sampler=make_sampler(sampler, space, seed),
            pruner=make_pruner(pruner, space.max_value("epochs", base.epochs)))

    if progress:
        print(f"tune: study {study_name!r} in {label} ({before} trial(s) so far) -> {out}", flush=True)
        print(f"  searching {'; '.join(space.describe())}", flush=True)
        if space.removed:
            print(f"  fixed by the command line: {', '.join(f'{k}={v}' for k, v in space.removed.items())}",
                  flush=True)
        print(f"  scoring: validation accuracy on {n_val:,} images (± {100 * worst_case_se(n_val):.1f} points at "
              f"50%, one standard error); the test split is {'read once, for the best trial, at the end' if test else 'not read (--no-test)'}; "
              f"sampler {sampler}, pruner {pruner}", flush=True)
    warned = [_small_validation_warning(n_val, base)] if worst_case_se(n_val) > RANKING_SE else []
    if progress and warned:
        print(f"warning: {warned[0]}", flush=True)

    bar = tqdm(total=trials if trials is not None else (math.prod(map(len, grid.values())) if grid else None),
               desc="tune", unit="trial", file=sys.stderr, dynamic_ncols=True, disable=not progress)
    ran = [0]

    def after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
        ran[0] += 1
        bar.update(1)
        _keep_best_weights(study, out)
        _write_tables(study, out, space)
        if progress:
            tqdm.write(_trial_line(study, trial, space), file=sys.stdout)

    finished = False
    tested: dict[str, Any] | None = None
    try:
        with _quiet_optuna():
            study.optimize(objective, n_trials=trials, timeout=timeout, catch=_trial_errors(),
                           callbacks=[after_trial])
        finished = True
    finally:
        bar.close()
        with _quiet_optuna():
            _keep_best_weights(study, out)
            _write_tables(study, out, space)
            plots = write_plots(study, out / "plots")
            if finished and test:   # an interrupted study is tested when it is continued
                tested = _test_best(study, out, objective)
        _report_best(study, out, refresh=tested is not None and tested.get("now", False))
    result = _result(study, out, label, ran[0], tested, warned, test)
    if progress:
        _print_summary(result, plots)
    return result


def _small_validation_warning(n_val: int, base: Config) -> str:
    return (f"{n_val:,} validation images score a trial to ± {100 * worst_case_se(n_val):.1f} points (one "
            f"standard error at 50% accuracy): too few to rank trials that differ by a few points. Hold out "
            f"more with --val-split (now {base.val_split:g}) or give more data (--train-size, a val/ folder)")


class _Objective:
    """One trial: suggest, train through ``fit``, report each epoch, score on validation."""

    def __init__(self, base: Config, space: SearchSpace, out: Path, grid: bool):
        self.base, self.space, self.out, self.grid = base, space, out, grid
        self._data: tuple[tuple, Dataset] | None = None   # the last trial's images, by data_key

    def data_for(self, cfg: Config) -> Dataset:
        """Trials that agree on the data keys share one load (in memory: streamed data is
        reopened per trial, its worker processes belong to one run)."""
        from cnnlab.engine.prepare import data_key, load_data, plan_run
        if self._data is None or self._data[0] != data_key(cfg):
            self._data = None   # the old images go before the new ones load
            data = load_data(plan_run(cfg))
            if data.train.streamed:
                return data
            self._data = (data_key(cfg), data)
        return self._data[1]

    def __call__(self, trial: optuna.Trial) -> float:
        from cnnlab.engine.loop import fit
        run_dir = self.out / "trials" / f"trial-{trial.number:04d}"
        trial.set_user_attr("run", str(run_dir))
        trial.set_user_attr("host", socket.gethostname())
        try:
            cfg = merge(self.base, self.space.suggest(trial, grid=self.grid), source=f"trial {trial.number}")
            trial.set_user_attr("config", cfg.to_dict())
            pruning = PruneTrial(trial, math.ceil(cfg.epochs))
            pruned_at = pruning.pruned_at
            # Scored on validation only: no trial reads the test split (score_test_split tests the
            # best one when the study ends).
            run = fit(cfg, self.data_for(cfg), out=run_dir, progress=False, callbacks=[pruning], test=False)
            history = run.history
            trial.set_user_attr("epochs_run", len(history.get("loss", [])))
            trial.set_user_attr("val_images", run.metrics.get("val_images"))
            if pruned_at:
                trial.set_user_attr("note", f"pruned after epoch {pruned_at[0]}")
                raise optuna.TrialPruned(f"pruned after epoch {pruned_at[0]}")
            key = "best_val_accuracy" if cfg.keep == "best" else "final_val_accuracy"
            score = run.metrics.get(key)
            if score is None or not math.isfinite(score):
                raise CnnlabError(f"the run finished without a validation accuracy ({key}: {score})")
            return float(score)
        except _trial_errors() as e:
            trial.set_user_attr("note", f"{type(e).__name__}: {e}"[:1000])
            raise
        except TrainingInterrupted as e:   # stops the study too: the CLI says how to continue
            trial.set_user_attr("note", f"interrupted (exit status {e.exit_code})")
            raise


# ----------------------------------------------------------------------------- outputs
def _best(study: optuna.Study) -> FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no completed trial yet
        return None


def _keep_best_weights(study: optuna.Study, out: Path) -> None:
    """Strip every finished trial's folder but the best's (``STRIPPED_FILES``, ``STRIPPED_DIRS``)."""
    best = _best(study)
    for t in study.get_trials(deepcopy=False, states=FINISHED):
        if best is not None and t.number == best.number:
            continue
        run = out / "trials" / f"trial-{t.number:04d}"
        if not run.is_dir():
            continue  # another machine's trial, or one that failed before training
        folder = RunFolder(run)
        for name in STRIPPED_FILES:
            getattr(folder, name).unlink(missing_ok=True)
        for name in STRIPPED_DIRS:
            shutil.rmtree(getattr(folder, name), ignore_errors=True)


def _test_best(study: optuna.Study, out: Path, objective: "_Objective") -> dict[str, Any] | None:
    """The best trial's model on the test split, once: its figures (``now`` True when this call
    read the test split; a best already tested by an earlier call of the study is not read
    again). None when the best trial's model is not here (no completed trial, or it ran on
    another machine)."""
    from cnnlab.engine.loop import score_test_split
    best = _best(study)
    if best is None:
        return None
    run = RunFolder(out / "trials" / f"trial-{best.number:04d}")
    if not run.weights_file.is_file():
        return None
    metrics, now = run.metrics, False
    if not metrics.get("tested", "test_accuracy" in metrics):   # an older cnnlab tested every trial
        cfg = merge(objective.base, best.user_attrs.get("config") or {}, source=f"trial {best.number}")
        metrics, now = score_test_split(run.path, objective.data_for(cfg), device=cfg.device), True
        tested = list(study.user_attrs.get(TESTED_ATTR, []))
        study.set_user_attr(TESTED_ATTR, sorted({*tested, best.number}))
    n = int(metrics.get("test_images") or 0)
    return {"trial": best.number, "test_accuracy": metrics.get("test_accuracy"), "test_loss": metrics.get("test_loss"),
            "test_images": n, "test_se": accuracy_se(metrics.get("test_accuracy"), n), "now": now}


def _report_best(study: optuna.Study, out: Path, refresh: bool = False) -> None:
    """Trials train without plots; the best one, when it ran here, gets them as `cnnlab train`
    would (``refresh``: again, now that it has been tested)."""
    from cnnlab.report import write_report
    best = _best(study)
    run = None if best is None else RunFolder(out / "trials" / f"trial-{best.number:04d}")
    if run is not None and run.weights_file.is_file() and (refresh or not run.report_file.exists()):
        write_report(run.path)


def _searched_keys(study_trials: list[FrozenTrial]) -> list[str]:
    keys: dict[str, None] = {}
    for t in study_trials:
        for name in t.params:
            keys[name[4:] if name.startswith("use_") and name[4:] in FIELDS else name] = None
    return list(keys)


def _trial_values(t: FrozenTrial, keys: list[str]) -> dict[str, Any]:
    """The config value each searched key had (weight_decay 0 when its switch said no)."""
    cfg = t.user_attrs.get("config") or {}
    return {k: cfg.get(k, t.params.get(k)) for k in keys}


def _write_tables(study: optuna.Study, out: Path, space: SearchSpace) -> None:
    trials = study.get_trials(deepcopy=False)
    keys = _searched_keys(trials) or space.searched
    retried = {t.system_attrs["failed_trial"]: t.number for t in trials if "failed_trial" in t.system_attrs}
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["number", "state", "val_accuracy", "val_se", *keys, "epochs_run", "seconds", "started", "host",
                "run", "note"])
    for t in trials:
        seconds = t.duration.total_seconds() if t.duration else None
        se = _val_se(t)
        w.writerow([t.number, t.state.name, "" if t.value is None else t.value, "" if se is None else f"{se:.4f}",
                    *("" if v is None else v for v in _trial_values(t, keys).values()),
                    t.user_attrs.get("epochs_run", ""), "" if seconds is None else f"{seconds:.1f}",
                    t.datetime_start.isoformat(timespec="seconds") if t.datetime_start else "",
                    t.user_attrs.get("host", ""), t.user_attrs.get("run", ""), _note(t, retried)])
    write_text(out / "trials.csv", buf.getvalue())
    best = _best(study)
    if best is not None and best.user_attrs.get("config"):
        write_text(out / "best.yaml", best_yaml(study, best))


def _val_se(t: FrozenTrial) -> float | None:
    """The standard error of a completed trial's validation accuracy (None: no score or size)."""
    n = t.user_attrs.get("val_images")
    if t.value is None or not n:
        return None
    return accuracy_se(t.value, int(n))


def _note(t: FrozenTrial, retried: dict[int, int]) -> str:
    note = t.user_attrs.get("note", "")
    if t.state == TrialState.FAIL and not note:
        note = "stopped without a result: its worker was killed or lost (no heartbeat)"
    if t.number in retried:
        note += f"; retried as trial {retried[t.number]}"
    if "failed_trial" in t.system_attrs:
        note = f"retry of trial {t.system_attrs['failed_trial']}" + (f"; {note}" if note else "")
    return note


def best_yaml(study: optuna.Study, best: FrozenTrial) -> str:
    cfg = {k: v for k, v in best.user_attrs["config"].items() if k not in RUN_SPECIFIC}
    header = (f"# cnnlab tune: the best of {len(study.trials)} trial(s) of study {study.study_name!r}:\n"
              f"# trial {best.number}, validation accuracy {with_se(best.value, best.user_attrs.get('val_images'))}"
              f" (± one standard error, in points), run folder "
              f"{best.user_attrs.get('run')} on {best.user_attrs.get('host')}.\n"
              f"# Train it with `cnnlab train --config best.yaml`; flags override any key\n"
              f"# (e.g. a larger --train-size, or --epochs). Device and threads are left to that machine.\n")
    return header + yaml.safe_dump(cfg, sort_keys=False)


def write_plots(study: optuna.Study, folder: Path) -> dict[str, str]:
    """Optuna's matplotlib plots; returns {file: "written" or why it was skipped}."""
    from optuna.visualization import matplotlib as ovm

    from cnnlab.report.plots import save_figure
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    params = {p for t in complete for p in t.params}
    plans = {
        "history.png": (1, lambda: ovm.plot_optimization_history(study, target_name="validation accuracy")),
        "importances.png": (2, lambda: ovm.plot_param_importances(study)),
        "parallel.png": (2, lambda: ovm.plot_parallel_coordinate(study, target_name="validation accuracy")),
        "lr_slice.png": (1, lambda: ovm.plot_slice(study, params=["lr"], target_name="validation accuracy")),
    }
    status: dict[str, str] = {}
    for name, (need, draw) in plans.items():
        if len(complete) < need:
            status[name] = f"skipped: needs {need} completed trial(s), have {len(complete)}"
            continue
        if name == "lr_slice.png" and "lr" not in params:
            status[name] = "skipped: lr is not searched"
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)   # "importances may be inaccurate" etc.
                ax = draw()
        except (ValueError, RuntimeError, ZeroDivisionError) as e:  # e.g. importances of a constant
            status[name] = f"skipped: {e}"
            continue
        fig = cast("Figure", (ax.flat[0] if hasattr(ax, "flat") else ax).figure)   # the top figure
        save_figure(fig, folder / name)
        status[name] = "written"
    return status


def _trial_line(study: optuna.Study, t: FrozenTrial, space: SearchSpace) -> str:
    values = _trial_values(t, [k for k in space.searched])
    shown = "  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
    seconds = t.duration.total_seconds() if t.duration else 0.0
    if t.state == TrialState.COMPLETE:
        best = _best(study)
        se = _val_se(t)
        outcome = f"val_accuracy {t.value:.4f}" + (f" ± {se:.4f}" if se is not None else "")
        if best is not None:
            outcome += "  (new best)" if best.number == t.number else f"  (best {best.value:.4f}, trial {best.number})"
    else:
        outcome = t.user_attrs.get("note", "")
    return f"trial {t.number:>4}  {t.state.name:<8}  {outcome}  |  {shown}  |  {seconds:.0f}s"


def _result(study: optuna.Study, out: Path, label: str, ran: int, tested: dict[str, Any] | None,
            warned: list[str], test: bool) -> TuneResult:
    states: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        states[t.state.name] = states.get(t.state.name, 0) + 1
    best = _best(study)
    info = None if best is None else {
        "number": best.number, "value": best.value, "val_images": best.user_attrs.get("val_images"),
        "val_se": _val_se(best), "params": dict(best.params),
        "config": best.user_attrs.get("config"), "run": best.user_attrs.get("run"),
        "host": best.user_attrs.get("host")}
    warnings = list(warned)
    if best is not None and best.value is not None:
        runner_up = _runner_up(study, best)
        se = _val_se(best)
        if runner_up is not None and runner_up.value is not None and se is not None \
                and best.value - runner_up.value < se:
            gap = best.value - runner_up.value
            warnings.append(f"the best trial ({best.number}, {best.value:.4f}) and the runner-up "
                            f"({runner_up.number}, {runner_up.value:.4f}) differ by {100 * gap:.2f} points, less "
                            f"than one standard error ({100 * se:.2f} points on "
                            f"{best.user_attrs.get('val_images'):,} validation images): which of them is better "
                            f"is noise. More validation images (--val-split, more data) would tell them apart")
        run = best.user_attrs.get("run")
        if test and tested is None and run and not RunFolder(run).weights_file.is_file():
            warnings.append(f"the best trial ran on {best.user_attrs.get('host')}, not here: test it there "
                            f"with `cnnlab evaluate {run}`")
    figures = None if tested is None else {k: v for k, v in tested.items() if k != "now"}
    return TuneResult(out, study.study_name, label, states, ran, info, figures, warnings,
                      list(study.user_attrs.get(TESTED_ATTR, [])))


def _runner_up(study: optuna.Study, best: FrozenTrial) -> FrozenTrial | None:
    others = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if t.number != best.number and t.value is not None]
    return max(others, key=lambda t: t.value or 0.0, default=None)


def _print_summary(result: TuneResult, plots: dict[str, str]) -> None:
    counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(result.states.items()))
    print(f"study {result.study_name!r}: {result.trials} trial(s) ({counts}); this run added {result.ran}",
          flush=True)
    if result.best is None:
        print("no trial completed yet: no best.yaml (see trials.csv for the reasons)", flush=True)
    else:
        b = result.best
        se = f" ± {b['val_se']:.4f} (one standard error, {b['val_images']:,} images)" if b["val_se"] is not None else ""
        print(f"best: trial {b['number']}, validation accuracy {b['value']:.4f}{se}, run {b['run']} on {b['host']}",
              flush=True)
        t = result.test
        if t is not None:
            print(f"test: trial {t['trial']}'s model, tested once at the end of the study: test accuracy "
                  f"{t['test_accuracy']:.4f} ± {t['test_se']:.4f} ({t['test_images']:,} images), test loss "
                  f"{t['test_loss']:.4f}", flush=True)
        if len(result.tested_trials) > 1:
            print(f"  this study has tested {len(result.tested_trials)} trials' models, each the best when a "
                  f"run of it ended (trials {', '.join(map(str, result.tested_trials))})", flush=True)
        print(f"  train it: cnnlab train --config {result.out / 'best.yaml'}", flush=True)
    for line in result.warnings:   # the small-split one again: beside the figures it concerns
        print(f"warning: {line}", flush=True)
    skipped = {k: v for k, v in plots.items() if v != "written"}
    for name, why in skipped.items():
        print(f"  plot {name} {why}", flush=True)
    print(f"wrote {result.out / 'trials.csv'}, plots in {result.out / 'plots'}", flush=True)
