"""engine/runs.py: one writer per run folder (its lock), and the published weights a config asks for."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from cnnlab.engine.runs import requested_weights
from conftest import TUTORIAL, WAIT, flags, position
from conftest import cnnlab_in as cli


@pytest.mark.usefixtures("restore_threads")
@pytest.mark.slow
def test_one_writer_per_run_a_killed_one_leaves_no_stale_lock_and_a_finished_run_is_complete(tiny_cifar,
                                                                                            tmp_path):
    """A trainer holds its run's lock (stopped, so it holds it as long as the test needs): a
    second process resuming the run is refused with exit 2 and the holder's pid. kill -9 the
    trainer: the OS drops its lock, and the next resume takes it and finishes the run. Resuming
    the finished run says it is complete and trains nothing. (The old loop resumed alongside the
    trainer, and retrained a finished run's last epoch from its checkpoint.)"""
    run = tmp_path / "locked"
    log = tmp_path / "trainer.log"
    with open(log, "w") as err:
        trainer = subprocess.Popen([sys.executable, "-m", "cnnlab", "train", "--data", str(tiny_cifar), "--out",
                                    str(run), *flags(TUTORIAL)], stdout=subprocess.DEVNULL, stderr=err, cwd=tmp_path)
        deadline = time.monotonic() + WAIT
        while position(run) is None:   # the first checkpoint (after 3 steps): a run to resume
            if trainer.poll() is not None or time.monotonic() > deadline:
                trainer.kill()
                pytest.fail(f"no checkpoint appeared:\n{log.read_text()[-2000:]}")
            time.sleep(0.005)
        trainer.send_signal(signal.SIGSTOP)
        try:
            assert (run / "run.lock").read_text().strip() == str(trainer.pid)
            refused = cli(tmp_path, "train", "--resume", str(run))
            assert refused.returncode == 2, refused.stderr
            assert f"being written by another process (pid {trainer.pid}" in refused.stderr
            assert "Traceback" not in refused.stderr and "resuming" not in refused.stdout
        finally:
            trainer.kill()   # SIGKILL reaches a stopped process
            trainer.wait(timeout=WAIT)
    assert (run / "run.lock").read_text().strip() == str(trainer.pid)   # left behind, but not held

    with open(tmp_path / "resumer.log", "w") as out:
        resumer = subprocess.Popen([sys.executable, "-m", "cnnlab", "train", "--resume", str(run)], stdout=out,
                                   stderr=subprocess.STDOUT, cwd=tmp_path)
        assert resumer.wait(timeout=WAIT) == 0, (tmp_path / "resumer.log").read_text()
    assert "resuming" in (tmp_path / "resumer.log").read_text()
    assert (run / "run.lock").read_text().strip() == str(resumer.pid)
    assert json.loads((run / "metrics.json").read_text())["steps"] == 24

    files = ("checkpoints/last.safetensors", "model.safetensors", "metrics.json", "report.html")
    before = {f: (run / f).stat().st_mtime_ns for f in files}
    again = cli(tmp_path, "train", "--resume", str(run))
    assert again.returncode == 0, again.stderr
    assert f"{run} is complete: it trained 2 epoch(s), 24 steps" in again.stdout
    assert "resuming" not in again.stdout
    assert {f: (run / f).stat().st_mtime_ns for f in files} == before


def test_requested_weights_follow_the_config():
    from cnnlab.core.config import Config
    assert requested_weights(Config(model="resnet50")) is None
    assert requested_weights(Config(model="resnet50", pretrained=True)).tag == "imagenet1k_v2"
    assert requested_weights(Config(model="resnet50", weights="imagenet1k_v1")).tag == "imagenet1k_v1"
