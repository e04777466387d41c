"""Plots, the curve reading, report.html and compare.html, checked down to a real browser.

The browser checks drive Debian's ``chromium`` over the DevTools protocol on a pipe
(``--remote-debugging-pipe``: JSON messages ending in NUL on file descriptors 3 and 4), so
they need no Python package and no network port. They skip only when chromium is absent.
"""
from __future__ import annotations

import fcntl
import importlib.util
import json
import math
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnlab.cli import main
from cnnlab.core.config import Config
from cnnlab.engine.loop import fit
from cnnlab.report import compare_runs, read_curves, write_report
from cnnlab.report.plots import PLOT_FILES, samples_figure

HAVE_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HOSTILE = '<img src=x onerror=alert(1)> & "$cat$"'   # a class name that must stay text everywhere


# ----------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def runs(tiny_cifar, tmp_path_factory) -> tuple[Path, Path]:
    """Two real runs on the tiny CIFAR folder; the first also writes TensorBoard events."""
    root = tmp_path_factory.mktemp("report-runs")
    a = fit(Config(data=str(tiny_cifar), epochs=2, batch_size=32, val_split=0.2, tensorboard=HAVE_TENSORBOARD),
            out=root / "run-a", progress=False).path
    b = fit(Config(data=str(tiny_cifar), epochs=1, batch_size=32, val_split=0.2, lr=3e-3, train_size=100),
            out=root / "run-b", progress=False).path
    for run in (a, b):
        write_report(run)
    return a, b


def test_every_plot_is_a_valid_png(runs):
    run, _ = runs
    for name in PLOT_FILES:
        path = run / "plots" / name
        assert path.read_bytes()[:8] == PNG_MAGIC, name
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.width >= 200 and im.height >= 100, (name, im.size)
            # Not blank (the lesson's bug): more than a handful of distinct colours.
            assert len(im.convert("RGB").getcolors(maxcolors=1 << 20) or range(1 << 20)) > 20, name


def test_image_grids_are_one_mosaic():
    """One axes and one imshow however many images: per-image subplots took 2 s for 80."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (80, 32, 32, 3), dtype=np.uint8)
    fig = samples_figure(images, np.repeat(np.arange(10), 8), [f"class {i}" for i in range(10)], 8)
    assert len(fig.axes) == 1 and len(fig.axes[0].images) == 1


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of a TensorBoard folder as (step, value) pairs, read by TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _assert_epochs_match(scalars: dict[str, list[tuple[int, float]]], history: dict[str, list]) -> None:
    """One point per epoch (step = epoch) per history column, equal to history.json's value."""
    from cnnlab.engine.callbacks import TAGS
    for key, tag in TAGS.items():
        rows = [(epoch, v) for epoch, v in enumerate(history[key], start=1) if v is not None]
        assert [s for s, _ in scalars.get(tag, [])] == [s for s, _ in rows], tag
        # TensorBoard keeps float32: 6e-8 relative.
        assert [v for _, v in scalars.get(tag, [])] == pytest.approx([v for _, v in rows], rel=1e-6), tag


needs_tensorboard = pytest.mark.skipif(not HAVE_TENSORBOARD,
                                       reason="tensorboard is not installed (pip install cnnlab[tensorboard])")


@needs_tensorboard
def test_tensorboard_events_hold_the_history(runs):
    run, _ = runs
    # Written by training; the report (built in the fixture) wrote no second copy.
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    history = json.loads((run / "history.json").read_text())
    scalars = _scalars(run / "tensorboard")
    _assert_epochs_match(scalars, history)
    assert {"accuracy/validation", "learning_rate", "test/accuracy"} <= set(scalars)
    metrics = json.loads((run / "metrics.json").read_text())
    assert scalars["test/accuracy"] == [(2, pytest.approx(metrics["test_accuracy"], rel=1e-6))]


@needs_tensorboard
def test_tensorboard_scalars_are_on_disk_as_each_epoch_ends(tiny_cifar, tmp_path):
    from cnnlab.engine.callbacks import Callback
    seen: dict[int, dict[str, list[tuple[int, float]]]] = {}

    class Look(Callback):   # after the run's own callbacks, TensorBoard's among them
        def on_epoch_end(self, trainer, logs):
            seen[trainer.state.epoch] = _scalars(tmp_path / "live" / "tensorboard")
            _assert_epochs_match(seen[trainer.state.epoch], trainer.state.history)   # this epoch's row is there

    fit(Config(data=str(tiny_cifar), epochs=2, batch_size=32, val_split=0.2, train_size=100, tensorboard=True),
        out=tmp_path / "live", progress=False, callbacks=[Look()])
    assert [s for s, _ in seen[1]["loss/train"]] == [1]
    assert [s for s, _ in seen[2]["loss/train"]] == [1, 2]
    assert "test/accuracy" not in seen[2]                 # the test split is scored after training


@needs_tensorboard
def test_report_rebuilds_tensorboard_from_the_history(runs):
    a, b = runs
    assert not (b / "tensorboard").exists()             # trained without --tensorboard
    for run in (b, a):                                   # a: replaces what training wrote
        assert main(["report", str(run), "--tensorboard"]) == 0
        assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
        scalars = _scalars(run / "tensorboard")
        _assert_epochs_match(scalars, json.loads((run / "history.json").read_text()))
        assert "test/accuracy" in scalars


@needs_tensorboard
def test_a_resumed_run_replaces_the_epochs_it_redoes(tmp_path):
    """A run killed after TensorBoard saw epoch 2 but before a checkpoint held it resumes from
    epoch 1: its new epoch 2 replaces the old one (the writer's purge step)."""
    from types import SimpleNamespace

    from cnnlab.engine.callbacks import TensorBoard

    def session(epochs_done: int, losses: list[float]) -> None:
        history = {"loss": losses[:epochs_done]}
        trainer = SimpleNamespace(run=tmp_path, cfg=Config(), state=SimpleNamespace(epoch=epochs_done, history=history))
        tb = TensorBoard()
        for loss in losses[epochs_done:]:
            tb.on_epoch_begin(trainer, 1)
            history["loss"].append(loss)
            trainer.state.epoch += 1
            tb.on_epoch_end(trainer, {})
        tb.on_interrupt(trainer)

    session(0, [3.0, 2.0])
    session(1, [3.0, 1.5, 1.0])
    assert _scalars(tmp_path / "tensorboard")["loss/train"] == [(1, 3.0), (2, 1.5), (3, 1.0)]


def test_cli_report_and_compare(runs, tmp_path, capsys):
    a, b = runs
    (a / "report.html").unlink()
    assert main(["report", str(a)]) == 0
    assert (a / "report.html").is_file()
    out = tmp_path / "cmp"
    assert main(["compare", str(a), str(b), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "run-a" in table and "run-b" in table and "test accuracy" in table
    assert {p.name for p in out.iterdir()} >= {"compare.html", "compare.csv", "val_accuracy.png", "loss.png"}
    assert main(["compare", str(a), str(tmp_path / "missing")]) == 2
    assert main(["compare", str(a), str(tmp_path)]) == 2     # a folder, but not a run
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("cnnlab: error: ") for line in err)
    assert "no such folder" in err[0] and "model.json" in err[1]


def test_report_escapes_names_and_fetches_nothing(moved_run):
    text = (moved_run / "report.html").read_text()
    assert HOSTILE not in text and "&lt;img src=x onerror=alert(1)&gt;" in text
    assert "http://" not in text and "https://" not in text
    # Copied without its weights: every plot still, the Grad-CAM of the mistakes included (its
    # heatmaps were computed at the end of training and stored; the report runs no model).
    assert not (moved_run / "model.safetensors").exists()
    assert text.count('src="data:image/png;base64,') == len(PLOT_FILES)
    assert "Grad-CAM" in text


def test_report_shows_the_gradcam_of_the_mistakes(runs):
    run, _ = runs
    path = run / "plots" / "gradcam_mistakes.png"
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
    text = (run / "report.html").read_text()
    assert "where the network looked when it got these wrong" in text.lower()
    assert text.count('src="data:image/png;base64,') == len(PLOT_FILES)


def test_report_shows_the_gradcam_of_the_surest_right_answers(runs):
    """Stored at the end of training for the most confident correct test predictions."""
    run, _ = runs
    with np.load(run / "evaluation.npz") as ev:
        idx, heat, logits, labels = ev["correct_index"], ev["correct_heatmaps"], ev["logits"], ev["labels"]
        images = ev["correct_images"]
    assert 0 < len(idx) <= 6 and heat.shape == (len(idx), *images.shape[1:3])
    assert (logits[idx].argmax(1) == labels[idx]).all()                          # right answers only
    conf = np.exp(logits - logits.max(1, keepdims=True))
    conf = (conf / conf.sum(1, keepdims=True)).max(1)
    right = np.flatnonzero(logits.argmax(1) == labels)
    assert conf[idx].min() >= np.sort(conf[right])[-len(idx)] - 1e-6             # the surest of them
    with Image.open(run / "plots" / "gradcam_correct.png") as im:
        im.verify()
    assert "what it has learned to see" in (run / "report.html").read_text()


@pytest.fixture(scope="module")
def moved_run(runs, tmp_path_factory) -> Path:
    """The run moved elsewhere, with a class name full of HTML, rebuilt, then its plots deleted."""
    moved = tmp_path_factory.mktemp("elsewhere") / "moved-run"
    run = runs[0]
    shutil.copytree(run, moved, ignore=shutil.ignore_patterns("checkpoints", "*.safetensors"))
    card = json.loads((moved / "model.json").read_text())
    card["class_names"][0] = HOSTILE
    (moved / "model.json").write_text(json.dumps(card))
    metrics = json.loads((moved / "metrics.json").read_text())
    per_class = metrics["per_class_accuracy"]
    metrics["per_class_accuracy"] = {HOSTILE if i == 0 else k: v for i, (k, v) in enumerate(per_class.items())}
    (moved / "metrics.json").write_text(json.dumps(metrics))
    write_report(moved)
    shutil.rmtree(moved / "plots")          # the page must not depend on files beside it
    return moved


# ----------------------------------------------------------------------------- curve reading
def history(loss, val_loss=None, accuracy=None, val_accuracy=None):
    n = len(loss)
    accuracy = accuracy or [min(0.99, 0.3 + 0.1 * i) for i in range(n)]
    return {"loss": loss, "accuracy": accuracy, "val_loss": val_loss or [None] * n,
            "val_accuracy": val_accuracy or [None] * n, "lr": [1e-3] * n, "seconds": [1.0] * n}


CURVES = {
    "overfitting": history([1.5, 1.0, 0.7, 0.45, 0.3, 0.2], [1.4, 1.1, 0.95, 1.0, 1.1, 1.25],
                           [0.45, 0.65, 0.75, 0.85, 0.9, 0.94], [0.5, 0.6, 0.66, 0.66, 0.65, 0.64]),
    "still_improving": history([2.0, 1.6, 1.3, 1.1, 0.95, 0.85], [1.9, 1.55, 1.3, 1.12, 1.0, 0.9],
                               [0.3, 0.42, 0.52, 0.6, 0.66, 0.7], [0.3, 0.43, 0.52, 0.59, 0.64, 0.68]),
    "underfitting": history([1.9, 1.6, 1.55, 1.54, 1.54, 1.535], [1.85, 1.62, 1.58, 1.57, 1.57, 1.57],
                            [0.3, 0.4, 0.42, 0.43, 0.43, 0.43], [0.31, 0.4, 0.41, 0.42, 0.42, 0.42]),
    "diverged": history([2.1, 1.8, float("nan"), float("nan")], [2.0, 1.7, float("nan"), float("nan")]),
    "stuck": history([2.304, 2.3027, 2.3026, 2.3026], [2.3031, 2.3029, 2.3027, 2.3026],
                     [0.1, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1]),
    "healthy": history([1.5, 0.9, 0.7, 0.62, 0.6, 0.598], [1.4, 0.95, 0.8, 0.76, 0.75, 0.749],
                       [0.5, 0.7, 0.77, 0.8, 0.81, 0.81], [0.52, 0.68, 0.73, 0.75, 0.755, 0.755]),
}


@pytest.mark.parametrize("expected", sorted(CURVES))
def test_curve_reading(expected):
    findings = read_curves(CURVES[expected], num_classes=10)
    assert findings[0].kind == expected, [str(f) for f in findings]
    assert all(f.text and f.text[0].isupper() for f in findings)


def test_curve_reading_edge_cases():
    rising = history([1.0, 0.6, 0.9, 1.4])                       # train loss climbing back
    assert read_curves(rising)[0].kind == "diverged"
    assert read_curves(history([math.inf, 2.0]))[0].kind == "diverged"
    kinds = [f.kind for f in read_curves(history([2.0, 1.5, 1.2, 1.1, 1.08, 1.075]))]
    assert "no_validation" in kinds
    assert read_curves(history([1.0]))[0].kind == "too_short"
    barely_started = read_curves(history([2.31, 2.27], accuracy=[0.12, 0.18]), num_classes=10)
    assert "stuck" not in [f.kind for f in barely_started]     # two short epochs prove nothing
    assert read_curves({})[0].kind == "too_short"
    assert "--keep best" in str(read_curves(CURVES["overfitting"])[0])
    assert "--epochs" in str(read_curves(CURVES["still_improving"])[0])


# ----------------------------------------------------------------------------- browser
def find_chromium() -> str | None:
    for name in (os.environ.get("CNNLAB_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (no port, no package)."""

    TIMEOUT = 60.0

    def __init__(self, executable: str, profile: Path):
        to_chrome_r, to_chrome_w = os.pipe()
        from_chrome_r, from_chrome_w = os.pipe()
        # Chromium expects the pipe on fds 3 (commands in) and 4 (replies out); bash maps them,
        # from copies numbered 10 and up so that no redirection overwrites another's source.
        child_ends = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_chrome_r, from_chrome_w)]
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        to_chrome_r, from_chrome_w = child_ends
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
                 f"--user-data-dir={profile}", "--remote-debugging-pipe", "--window-size=1200,900"]
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{to_chrome_r} 4>&{from_chrome_w} {to_chrome_r}<&- {from_chrome_w}>&-',
             executable, *flags],
            pass_fds=(to_chrome_r, from_chrome_w), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.out, self.inp = to_chrome_w, from_chrome_r
        self.buffer, self.events, self.next_id = b"", [], 0

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.inp], [], [], left)[0]:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self.inp, 1 << 16)
            if not chunk:
                raise RuntimeError(f"chromium exited: {self.proc.stderr.read().decode(errors='replace')[-2000:]}")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.out, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.TIMEOUT
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, session: str) -> dict:
        deadline = time.monotonic() + self.TIMEOUT
        seen = 0
        while True:
            for e in self.events[seen:]:
                if e.get("method") == method and e.get("sessionId") == session:
                    return e
            seen = len(self.events)
            self.events.append(self._read_message(deadline))

    def open(self, path: Path) -> dict:
        """Load a file; return its images' states and every console error or exception."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=session)
        self.send("Page.navigate", {"url": path.resolve().as_uri()}, session=session)
        self.wait_event("Page.loadEventFired", session)
        images = self.send("Runtime.evaluate", {
            "expression": "Array.from(document.images, i => ({src: i.src.slice(0, 30), complete: i.complete, "
                          "width: i.naturalWidth}))", "returnByValue": True}, session=session)["result"]["value"]
        title = self.send("Runtime.evaluate", {"expression": "document.title", "returnByValue": True},
                          session=session)["result"]["value"]
        self.send("Runtime.evaluate", {"expression": "0"}, session=session)   # flush pending console events
        errors = [e for e in self.events if e.get("sessionId") == session and is_error(e)]
        return {"images": images, "errors": errors, "title": title, "session": session}

    def screenshot(self, session: str) -> bytes:
        import base64
        size = self.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
        shot = self.send("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}}, session=session)
        return base64.b64decode(shot["data"])

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.out)
        os.close(self.inp)


def is_error(event: dict) -> bool:
    method, params = event.get("method"), event.get("params", {})
    return (method == "Runtime.exceptionThrown"
            or (method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"))
            or (method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error"))


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    exe = find_chromium()
    if exe is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); the report pages are "
                    "checked in a real browser")
    b = Browser(exe, tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


def assert_page_ok(page: dict, images: int) -> None:
    assert not page["errors"], json.dumps(page["errors"], indent=1)[:3000]
    assert len(page["images"]) == images, page["images"]
    broken = [i for i in page["images"] if not (i["complete"] and i["width"] > 0)]
    assert not broken, broken


def test_browser_check_catches_a_broken_page(browser, tmp_path):
    """The checks below would fail on a page with a missing image or a blocked fetch."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><meta http-equiv="Content-Security-Policy" content="img-src data:">'
                   '<img src="missing.png"><img src="http://example.invalid/x.png"><script>nope()</script>')
    page = browser.open(bad)
    assert page["errors"] and all(i["width"] == 0 for i in page["images"])


def test_report_html_in_chromium(runs, moved_run, browser):
    assert_page_ok(browser.open(runs[0] / "report.html"), images=len(PLOT_FILES))
    page = browser.open(moved_run / "report.html")
    assert_page_ok(page, images=len(PLOT_FILES))         # no weights, yet Grad-CAM: stored at training
    if os.environ.get("CNNLAB_SCREENSHOT"):       # for looking at the page yourself
        Path(os.environ["CNNLAB_SCREENSHOT"]).write_bytes(browser.screenshot(page["session"]))


def test_compare_html_in_chromium(runs, browser, tmp_path):
    html, rows = compare_runs(list(runs), tmp_path / "cmp")
    assert [r["run"] for r in rows] == ["run-a", "run-b"]
    assert_page_ok(browser.open(html), images=2)


# ----------------------------------------------------------------------------- compare: what it compares
def test_compare_shows_standard_errors_warns_of_other_test_sets_and_groups_seeds(tiny_cifar, tmp_path, capsys):
    """Two seeds of one config tested on the folder's 100 test images, and a third run tested on
    30 of them: each accuracy ± its standard error, the test sets told apart, the seeds grouped.
    (Against the old compare: no standard error, no test set recorded, no warning, no groups.)"""
    import csv

    base = dict(data=str(tiny_cifar), epochs=1, batch_size=32, val_split=0.2, train_size=100, threads=1)
    a, b, c = (fit(Config(**base, **extra), out=tmp_path / name, progress=False).path
               for name, extra in (("seed-0", {"seed": 0}), ("seed-1", {"seed": 1}), ("small", {"test_size": 30})))
    metrics = {p.name: json.loads((p / "metrics.json").read_text()) for p in (a, b, c)}
    assert metrics["seed-0"]["val_images"] == 20 and metrics["seed-0"]["test_images"] == 100
    same = metrics["seed-0"]["test_set"]
    assert same == metrics["seed-1"]["test_set"] and same["images"] == 100
    assert len(same["labels_sha256"]) == 64 and len(same["files_sha256"]) == 64   # an image folder's files
    assert metrics["small"]["test_set"]["images"] == 30 and metrics["small"]["test_set"] != same

    assert main(["compare", str(a), str(b), str(c), "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    acc = metrics["seed-0"]["test_accuracy"]
    assert f"{acc:.2%} ± {100 * math.sqrt(acc * (1 - acc) / 100):.2f}" in printed
    small = metrics["small"]["test_accuracy"]
    assert f"{small:.2%} ± {100 * math.sqrt(small * (1 - small) / 30):.2f}" in printed
    warning = next(line for line in printed.splitlines() if "different test sets" in line)
    assert "seed-0, seed-1 on 100 images" in warning and "small on 30 images" in warning
    mean = (metrics["seed-0"]["test_accuracy"] + metrics["seed-1"]["test_accuracy"]) / 2
    assert "seeds 0, 1 of one config (seed-0, seed-1)" in printed and f"test accuracy: {mean:.2%}" in printed
    with open(tmp_path / "cmp" / "compare.csv", newline="") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert float(rows["small"]["test_accuracy_se"]) == pytest.approx(math.sqrt(small * (1 - small) / 30))
    assert rows["small"]["test_images"] == "30" and rows["seed-1"]["val_images"] == "20"
    page = (tmp_path / "cmp" / "compare.html").read_text()
    assert "Repeated over seeds" in page and "different test sets" in page
