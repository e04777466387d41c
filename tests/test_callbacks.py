"""engine/callbacks.py: a callback sees every event, in order, and may set each step's rate or
stop the run; early stopping and the time limit."""
from __future__ import annotations

import torch

from cnnlab.core.config import Config


def test_a_callback_sees_every_hook_and_can_stop_the_run(tiny_cifar, tmp_path):
    from cnnlab.engine.callbacks import Callback
    from cnnlab.engine.loop import fit

    class Recorder(Callback):
        def __init__(self):
            self.calls = []

        def on_epoch_begin(self, trainer, steps):
            self.calls.append(("begin", trainer.state.epoch, steps))

        def on_step_end(self, trainer):
            self.calls.append(("step", trainer.state.global_step))

        def on_epoch_end(self, trainer, logs):
            self.calls.append(("end", trainer.state.epoch, logs["improved"]))
            if trainer.state.epoch == 2:
                trainer.request_stop("recorder: enough")

        def on_train_end(self, trainer, metrics):
            self.calls.append(("train_end", metrics))

    rec = Recorder()
    run = fit(Config(data=str(tiny_cifar), epochs=4, batch_size=64, threads=1), out=tmp_path / "r",
              progress=False, callbacks=[rec])
    steps = 270 // 64 + 1                                     # 270 training images, the last batch short
    assert [c for c in rec.calls if c[0] == "begin"] == [("begin", 0, steps), ("begin", 1, steps)]
    assert [c[1] for c in rec.calls if c[0] == "step"] == list(range(1, 2 * steps + 1))
    assert [c[:2] for c in rec.calls if c[0] == "end"] == [("end", 1), ("end", 2)]
    assert len(run.history["loss"]) == 2 and run.metrics["epochs"] == 2    # stopped, then saved
    assert rec.calls[-1] == ("train_end", run.metrics)                     # last, with metrics.json's scores


def test_a_callback_sets_each_steps_rate_and_the_events_come_in_order(tiny_cifar, tmp_path):
    """``on_step_begin`` may replace the schedule's rate (the range test's ramp); every event
    fires in the documented order, across epochs; a stop mid-epoch ends after that step."""
    from cnnlab.core.events import EVENTS, Callback
    from cnnlab.engine.build import build_training
    from cnnlab.engine.prepare import load_data, plan_run
    from cnnlab.engine.trainer import Trainer
    cfg = Config(data=str(tiny_cifar), batch_size=64, threads=1, bias_lr_scale=2.0, epochs=3)
    events: list[str] = []

    class Ramp(Callback):
        def __init__(self):
            self.rates = []

        def on_step_begin(self, trainer):
            events.append("on_step_begin")
            trainer.lr = 1e-4 * 2 ** trainer.state.global_step

        def on_backward_end(self, trainer):
            events.append("on_backward_end")

        def on_step_end(self, trainer):
            events.append("on_step_end")
            self.rates.append([g["lr"] for g in trainer.optimizer.param_groups])
            if trainer.state.global_step == trainer.steps_per_epoch + 2:
                trainer.end_epoch_now()
                trainer.request_stop(None)

        def on_epoch_begin(self, trainer, steps):
            events.append("on_epoch_begin")

        def on_epoch_end(self, trainer, logs):
            events.append("on_epoch_end")

    plan = plan_run(cfg)
    trainer = Trainer(build_training(plan.cfg, load_data(plan), torch.device("cpu"), start=None), tmp_path / "r",
                      progress=False)
    ramp = Ramp()
    trainer.fit([ramp])
    steps = trainer.steps_per_epoch
    assert ramp.rates == [[1e-4 * 2 ** i * g["lr_scale"] for g in trainer.optimizer.param_groups]
                          for i in range(steps + 2)]
    s = trainer.state
    assert (s.epoch, s.step_in_epoch, s.global_step) == (2, 0, steps + 2)
    assert s.history["lr"] == [1e-4 * 2 ** (steps - 1), 1e-4 * 2 ** (steps + 1)]   # what the last steps used
    step = ["on_step_begin", "on_backward_end", "on_step_end"]
    assert events == ["on_epoch_begin", *step * steps, "on_epoch_end", "on_epoch_begin", *step * 2, "on_epoch_end"]
    assert [e for e in EVENTS if e in events] == sorted(set(events), key=EVENTS.index)
    assert not (tmp_path / "r").exists()                     # no checkpoint callback, no run folder


def test_early_stop_and_time_limit_end_the_run(tiny_cifar, tmp_path, capsys):
    from cnnlab.engine.loop import fit
    base = dict(data=str(tiny_cifar), epochs=6, batch_size=64, threads=1)
    # A rate too small to change any prediction: validation never improves after epoch 1.
    run = fit(Config(**base, lr=1e-12, early_stop=2), out=tmp_path / "early")
    assert len(run.history["loss"]) == 3 and "early stop: validation accuracy has not improved for 2" \
        in capsys.readouterr().out
    run = fit(Config(**base, time_limit=1e-6), out=tmp_path / "timed")
    assert run.metrics["steps"] == 1 and len(run.history["loss"]) == 1
    assert "time limit: stopped after" in capsys.readouterr().out
