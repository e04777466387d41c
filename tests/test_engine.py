"""The speed recipes' engine pieces, each checked against what it promises."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from cnnlab.core.config import Config, list_recipes, resolve
from cnnlab.core.errors import CnnlabError
from cnnlab.core.hardware import autocast
from cnnlab.data import augment
from cnnlab.data.augment import Augmentation
from cnnlab.data.batches import BatchStream
from cnnlab.data.dataset import Split
from cnnlab.engine.ema import WeightAverage
from cnnlab.engine.optim import Schedule, build_optimizer, decay_weights
from cnnlab.models import create_model


@pytest.mark.parametrize("model", ["speednet_xs", "speednet"])   # linear, and in +/- pairs
def test_whitening_makes_patch_covariance_near_identity(model):
    torch.manual_seed(0)
    # Correlated "images": smooth noise, so neighbouring pixels and channels covary strongly.
    base = torch.randn(400, 1, 33, 33)
    images = (base[..., 1:, 1:] + base[..., :-1, :-1] + base[..., 1:, :-1]).repeat(1, 3, 1, 1)
    images = images + 0.3 * torch.randn_like(images)
    net = create_model(model)
    net.init_whitening(images, eps=1e-6)
    with torch.no_grad():
        out = net.whiten(images) - net.whiten.bias[None, :, None, None]      # (N, 12 or 24, H', W')
    half = out[:, :12].permute(0, 2, 3, 1).reshape(-1, 12)                    # the + filters
    cov = torch.cov(half.T)
    # Sampling noise of a covariance over some 400,000 (correlated) patches, well under 0.01;
    # the unwhitened input's neighbouring pixels covary at ~0.6.
    assert torch.allclose(cov, torch.eye(12), atol=0.05)
    assert out.shape[1] == (24 if net.whiten_pairs else 12)
    if net.whiten_pairs:
        assert torch.allclose(out[:, 12:], -out[:, :12])                      # the - twins
    assert not net.whiten.weight.requires_grad                                # kept frozen



def test_whitening_bias_trains_for_its_epochs_then_stays_put(tiny_cifar, tmp_path):
    from safetensors.torch import load_file

    from cnnlab.engine.loop import fit
    base = dict(data=str(tiny_cifar), model="speednet_xs", whiten=True, optimizer="nesterov", lr=0.05,
                weight_decay=5e-3, batch_size=50, seed=3)

    def trained(name: str, **changes) -> dict[str, torch.Tensor]:
        fit(Config(**base, **changes), out=tmp_path / name, progress=False)
        return load_file(tmp_path / name / "model.safetensors")

    one = trained("one", epochs=1)
    frozen = trained("frozen", epochs=3, whiten_bias_epochs=1)
    free = trained("free", epochs=3)
    bias, conv = "net.whiten.bias", "net.blocks.0.0.weight"
    assert not torch.equal(one[bias], torch.zeros_like(one[bias]))    # it did train in epoch 1
    assert torch.equal(frozen[bias], one[bias])                       # then neither steps nor decay moved it
    assert not torch.equal(free[bias], one[bias])
    assert not torch.equal(frozen[conv], one[conv])                   # while the rest trained on


def test_whitening_bias_epochs_need_whitening():
    with pytest.raises(CnnlabError, match="only applies with --whiten"):
        Config().replace(whiten_bias_epochs=3)
    with pytest.raises(CnnlabError, match="whiten_bias_epochs must be zero or more"):
        Config(whiten=True).replace(whiten_bias_epochs=-1)

def test_alternating_flip_flips_each_image_on_alternate_epochs():
    images = np.arange(6 * 4 * 4 * 1, dtype=np.uint8).reshape(6, 4, 4, 1)
    stream = BatchStream(Split(images, np.zeros(6)), batch_size=6, device=torch.device("cpu"), seed=0,
                         aug=Augmentation(flip="alternating"))
    seen = []
    for epoch in range(4):
        idx = torch.arange(6)   # fixed order so images line up across epochs
        x, _ = stream.finish(stream.images[idx], stream.labels[idx], idx, epoch, 0)
        original = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255
        seen.append([bool(torch.equal(x[i], original[i].flip(-1))) for i in range(6)])
    for i in range(6):
        assert [seen[e][i] for e in range(4)] in ([True, False, True, False], [False, True, False, True])
    assert any(seen[0]) and not all(seen[0])   # epoch 0 is a random half


def test_translate_is_a_reflect_padded_shift_and_cutout_a_square():
    x = torch.rand(64, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    y = augment.random_translate(x, 2, g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for i in range(64):
        assert any(torch.equal(y[i], padded[i, :, a:a + 8, b:b + 8]) for a in range(5) for b in range(5))
    z = augment.cutout(torch.ones(32, 3, 16, 16), 4, torch.Generator().manual_seed(1))
    zeros = (z[:, 0] == 0).sum(dim=(1, 2))
    assert zeros.max() == 16 and zeros.min() >= 4        # clipped at the border at most to 2x2
    assert torch.equal(z[:, 0] == 0, z[:, 2] == 0)        # the same hole in every channel


def test_ema_matches_a_hand_computation():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = WeightAverage(model, decay=0.9, every=2)
    expected = 1.0
    for step, value in enumerate([2.0, 3.0, 4.0, 5.0]):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update(step)
        if (step + 1) % 2 == 0:      # updates on every 2nd step, pulling by 1 - 0.9**2
            expected = expected + (1 - 0.9 ** 2) * (value - expected)
    assert ema.avg_params[0][0, 0].item() == pytest.approx(expected)
    look = WeightAverage(model, decay=0.5, every=1, lookahead=True)
    with torch.no_grad():
        model.weight.fill_(9.0)
    look.update(0)
    # the average started at 5 and moved half way to 9; lookahead puts the live weight there too
    assert model.weight[0, 0].item() == pytest.approx(7.0)


def test_bfloat16_autocast_leaves_batchnorm_in_float32():
    net = create_model("speednet_xs").train()
    x = torch.rand(8, 3, 32, 32)
    with autocast(torch.device("cpu"), torch.bfloat16):
        conv_out = net.blocks[0][0](net.whiten(x))     # speednet_xs whitens linearly
        out = net(x)
    bn = net.blocks[0][2]
    assert conv_out.dtype == torch.bfloat16            # the convolutions do run in bfloat16
    for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
        assert t.dtype == torch.float32
    assert out.dtype in (torch.bfloat16, torch.float32)
    assert torch.isfinite(bn.running_var).all() and (bn.running_var > 0).all()


def test_schedule_warms_up_then_decays_linearly_and_follows_time():
    s = Schedule(base_lr=1.0, total_steps=100, warmup_steps=10, kind="linear", final_fraction=0.1)
    assert s.multiplier(0) == pytest.approx(0.1) and s.multiplier(9) == pytest.approx(1.0)
    assert s.multiplier(10) == pytest.approx(1.0)
    assert s.multiplier(55) == pytest.approx(1 - 0.9 * 0.5)
    assert s.multiplier(100) == pytest.approx(0.1)
    assert s.multiplier(20, progress=0.5) == pytest.approx(0.55)       # a time-limited run
    c = Schedule(base_lr=2.0, total_steps=10, kind="cosine")
    assert c.lr(5) == pytest.approx(1.0) and c.lr(10) == pytest.approx(0.0)


def test_decoupled_weight_decay_and_bias_groups():
    cfg = Config(optimizer="nesterov", lr=0.1, weight_decay=0.01, bias_lr_scale=8)
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    opt = build_optimizer(model, cfg)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.1), pytest.approx(0.8)]
    before = model[0].weight.detach().clone()
    decay_weights(opt, cfg, multiplier=0.5)
    assert torch.allclose(model[0].weight, before * (1 - 0.01 * 0.5))   # independent of the lr


def test_decoupled_decay_is_the_shrink_coupled_l2_makes_through_momentum():
    # The unit of `weight_decay` for SGD (the config's comment): a coupled L2 term lam at
    # lr and momentum m shrinks weights by lr * lam / (1 - m) per step once momentum builds up.
    # Converting a published coupled value by this rule must give the same shrink.
    lr, lam, m = 0.01, 0.05, 0.85
    p = nn.Parameter(torch.ones(4, dtype=torch.float64))
    coupled = torch.optim.SGD([p], lr=lr, momentum=m, nesterov=True, weight_decay=lam)
    for _ in range(200):                      # no loss gradient: only the decay moves p
        p.grad = torch.zeros_like(p)
        coupled.step()
    before = p.detach().clone()
    p.grad = torch.zeros_like(p)
    coupled.step()
    coupled_shrink = 1 - (p.detach() / before).mean().item()

    model = nn.Linear(4, 1, bias=False).double()
    cfg = Config(optimizer="nesterov", lr=lr, momentum=m, weight_decay=lr * lam / (1 - m))
    before = model.weight.detach().clone()
    decay_weights(build_optimizer(model, cfg), cfg, multiplier=1.0)
    decoupled_shrink = 1 - (model.weight.detach() / before).mean().item()
    assert decoupled_shrink == pytest.approx(coupled_shrink, rel=0.02)


@pytest.mark.parametrize("recipe", list_recipes())
def test_every_recipe_resolves_and_names_a_real_model(recipe):
    from cnnlab.models import list_models
    cfg = resolve(recipe=recipe, overrides={"data": "somewhere"})
    assert cfg.recipe == recipe and cfg.model in list_models()
    assert math.isfinite(cfg.lr) and cfg.epochs > 0


def test_speed_recipe_trains_end_to_end_on_a_subset(tiny_cifar, tmp_path):
    from cnnlab.engine.loop import fit
    cfg = resolve(recipe="speed70", overrides={"data": str(tiny_cifar), "batch_size": 32, "epochs": 10})
    run = fit(cfg, out=tmp_path / "run", progress=False)
    assert run.metrics["test_accuracy"] > 0.2 and run.config.whiten   # chance: 0.1


@pytest.mark.parametrize("nesterov", [True, False])
def test_momentum_sgd_matches_torch_sgd_and_round_trips_its_state(nesterov):
    from cnnlab.engine.optim import MomentumSGD
    torch.manual_seed(0)
    ours, ref = nn.Linear(4, 3), nn.Linear(4, 3)
    ref.load_state_dict(ours.state_dict())
    opt = MomentumSGD([{"params": list(ours.parameters()), "lr": 0.1}], momentum=0.9, nesterov=nesterov)
    torch_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, nesterov=nesterov)
    for step in range(5):
        x = torch.randn(8, 4)
        for model, o in ((ours, opt), (ref, torch_opt)):
            o.zero_grad(set_to_none=True)
            model(x).square().sum().backward()
            o.step()
        if step == 2:   # a checkpoint round trip mid-way changes nothing
            twin = nn.Linear(4, 3)
            twin.load_state_dict(ours.state_dict())
            resumed = MomentumSGD([{"params": list(twin.parameters()), "lr": 0.1}], momentum=0.9, nesterov=nesterov)
            resumed.load_state_dict(opt.state_dict())
            ours, opt = twin, resumed
    # The same three roundings a step as torch's loop, in foreach kernels that may fuse or
    # vectorise them differently: at most an ulp each, 15 over 5 steps (1.8e-6 relative).
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=16 * 2 ** -23, atol=1e-7)


# ----------------------------------------------------------------------------- callbacks
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


# ----------------------------------------------------------------------------- evaluation
def test_evaluate_scores_a_streamed_run_as_training_did(tiny_cifar, tmp_path, monkeypatch):
    """``cnnlab evaluate`` loads the data as training did: a run that streamed its images (here
    with random-resized crops, which only the streaming loader makes) is scored on the same
    centre-cropped test subset, to the same accuracy."""
    from cnnlab.apps.evaluate import evaluate_run
    from cnnlab.data.stream import StreamingDataset
    from cnnlab.engine import loop, prepare
    cfg = Config(data=str(tiny_cifar), loader="stream", workers=0, image_size=32, crop="random_resized",
                 center_crop=0.875, test_size=60, epochs=1, batch_size=64, threads=1)
    run = loop.fit(cfg, out=tmp_path / "run", progress=False)
    loaded = []
    real = prepare.load_data
    monkeypatch.setattr(prepare, "load_data", lambda c, **kw: loaded.append(real(c, **kw)) or loaded[-1])
    result = evaluate_run(run.path, device="cpu")
    assert len(loaded) == 1 and isinstance(loaded[0], StreamingDataset)
    assert result["test_images"] == run.metrics["test_images"] == 60
    # The same weights on the same images: equal unless an image's top-2 margin is below float rounding.
    assert result["test_accuracy"] == pytest.approx(run.metrics["test_accuracy"], abs=1e-6)
    assert result["test_loss"] == pytest.approx(run.metrics["test_loss"], rel=1e-5)
    assert result["per_class_accuracy"] == pytest.approx(run.metrics["per_class_accuracy"], abs=1e-6)

    # Another dataset, all of its test split: in memory at its own size; streamed when it is too
    # large for memory, decoded to the model's size.
    from cnnlab.data import stream
    loaded.clear()
    assert evaluate_run(run.path, data=str(tiny_cifar), device="cpu")["test_images"] == 100
    monkeypatch.setattr(stream, "memory_budget", lambda processes=1: 0)
    assert evaluate_run(run.path, data=str(tiny_cifar), device="cpu")["test_images"] == 100
    assert [isinstance(d, StreamingDataset) for d in loaded] == [False, True]
    assert [d.image_shape for d in loaded] == [(32, 32, 3)] * 2


@pytest.mark.parametrize("tta", ["none", "flip", "flip_translate"])
def test_tta_views_counts_the_forward_passes(tta):
    from cnnlab.engine.evaluation import TTA_VIEWS, tta_logits
    calls = []

    def model(x):
        calls.append(x.shape)
        return x.mean((2, 3))

    out = tta_logits(model, torch.rand(2, 3, 8, 8), tta)
    assert len(calls) == TTA_VIEWS[tta] and out.shape == (2, 3)   # the estimate times this many


def test_a_tta_gate_gives_the_extra_views_to_the_least_confident_images_only():
    from cnnlab.engine.evaluation import tta_logits
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(5))
    x = torch.rand(10, 3, 8, 8)
    with torch.no_grad():
        plain, full = tta_logits(net, x, "none"), tta_logits(net, x, "flip_translate")
        gated = tta_logits(net, x, "flip_translate", gate=0.3)
        seen = []
        tta_logits(lambda v: seen.append(len(v)) or net(v), x, "flip_translate", gate=0.3)
    top2 = plain.softmax(1).topk(2, 1).values
    unsure = set((top2[:, 0] - top2[:, 1]).argsort()[:3].tolist())   # ceil(0.3 * 10)
    for i in range(10):   # the three least sure rows get every view; the rest keep the plain logits
        assert torch.allclose(gated[i], full[i] if i in unsure else plain[i], atol=1e-6)
    assert seen == [10] + [3] * 5   # one pass over the batch, then five views of three images
    assert not torch.allclose(full, plain)   # the views do change the logits


def test_tta_gate_reaches_the_test_evaluation_and_is_checked(tiny_cifar, tmp_path, monkeypatch):
    from cnnlab.apps.evaluate import evaluate_run
    from cnnlab.core.config import validate
    from cnnlab.engine import evaluation
    from cnnlab.engine.loop import fit
    with pytest.raises(CnnlabError, match="tta_gate must be in"):
        validate(Config(tta="flip", tta_gate=0.0))
    gates, real = [], evaluation.tta_logits
    monkeypatch.setattr(evaluation, "tta_logits",
                        lambda m, x, tta, gate=1.0: gates.append((tta, gate)) or real(m, x, tta, gate))
    cfg = Config(data=str(tiny_cifar), model="tutorial", epochs=1, train_size=100, seed=1, threads=1,
                 tta="flip", tta_gate=0.5)
    run = fit(cfg, out=tmp_path / "gated", progress=False)
    assert ("flip", 0.5) in gates and {g for g in gates if g[0] != "none"} == {("flip", 0.5)}   # validation: no TTA
    gates.clear()
    assert run.metrics["test_accuracy"] == pytest.approx(evaluate_run(run.path, device="cpu")["test_accuracy"])
    assert set(gates) == {("flip", 0.5)}
