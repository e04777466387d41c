"""engine/optim.py: the learning-rate schedule, decoupled weight decay, MomentumSGD against
torch's SGD, and --optimizer muon: the update against torch.optim.Muon, its groups, precision
and resume."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from cnnlab.core.config import FIELDS, Config, validate
from cnnlab.core.errors import CnnlabError
from cnnlab.core.run_folder import RunFolder
from cnnlab.engine import checkpoint as ckpt
from cnnlab.engine.optim import (
    NS_STEPS,
    Muon,
    Schedule,
    build_optimizer,
    decay_weights,
    effective_lr,
    orthogonalise,
)
from conftest import train_then_crash

# A power of two, so torch's coupled decay lr * (WD / lr) is exactly our decoupled WD.
LR, WD, MOMENTUM = 0.5, 2.0 ** -7, 0.9


def _muon(params: list[torch.Tensor], dtype: torch.dtype) -> Muon:
    return Muon([{"params": params, "lr": LR, "lr_scale": 1.0, "decay_scale": 1.0, "orthogonalise": True}],
                momentum=MOMENTUM, ns_dtype=dtype)


def _torch_muon(params: list[torch.Tensor]) -> torch.optim.Muon:
    return torch.optim.Muon(params, lr=LR, weight_decay=WD / LR, momentum=MOMENTUM, nesterov=True,
                            ns_steps=NS_STEPS)


def _mlp() -> nn.Sequential:
    # Wide, tall and square 2-D weights: both orientations of the iteration, and the
    # sqrt(rows / cols) step scaling of the tall one.
    return nn.Sequential(nn.Linear(24, 40, bias=False), nn.Tanh(), nn.Linear(40, 40, bias=False), nn.Tanh(),
                         nn.Linear(40, 8, bias=False))


def _twins(dtype: torch.dtype, seed: int) -> tuple[nn.Module, nn.Module, Muon, torch.optim.Muon]:
    """The same MLP twice, one for our Muon (Newton-Schulz in ``dtype``), one for torch's."""
    torch.manual_seed(seed)
    ours, ref = _mlp(), _mlp()
    ref.load_state_dict(ours.state_dict())
    return ours, ref, _muon(list(ours.parameters()), dtype), _torch_muon(list(ref.parameters()))


DECAY = Config(optimizer="muon", weight_decay=WD)


def _step(model: nn.Module, opt, cfg: Config | None, x: torch.Tensor) -> None:
    """The loop's order: gradients, the decoupled decay, then the step."""
    opt.zero_grad(set_to_none=True)
    model(x).square().sum().backward()
    if cfg is not None:
        decay_weights(opt, cfg, multiplier=1.0)
    opt.step()


def test_muon_in_bfloat16_is_torch_muon_bit_for_bit_through_a_checkpoint():
    # torch.optim.Muon runs Newton-Schulz in bfloat16 always. Ours in bfloat16 does the same
    # operations in the same order (the cast, the transpose of a tall matrix, the norm, three
    # addmm's an iteration, the mixed-precision add), in the same process on the same kernels,
    # and our momentum average and decay are torch's: nothing may differ, not one bit.
    ours, ref, opt, torch_opt = _twins(torch.bfloat16, seed=0)
    for step in range(6):
        x = torch.randn(16, 24)
        _step(ours, opt, DECAY, x)
        _step(ref, torch_opt, None, x)   # torch's own (coupled, lr * WD / lr) decay
        for a, b in zip(ours.parameters(), ref.parameters()):
            assert torch.equal(a, b), f"step {step}"
        if step == 2:   # through the checkpoint's flat form and its JSON: changes nothing
            tensors, meta = ckpt.optimizer_to_flat(opt)
            meta = json.loads(json.dumps(meta))
            twin = _mlp()
            twin.load_state_dict(ours.state_dict())
            resumed = _muon(list(twin.parameters()), torch.float32)   # the saved groups' bfloat16 wins
            ckpt.optimizer_from_flat(resumed, tensors, meta)
            assert resumed.param_groups[0]["ns_dtype"] == "bfloat16"
            ours, opt = twin, resumed


def test_muon_in_float32_is_torch_muon_within_bfloat16_rounding():
    # Step by step from the same weights and buffers (each step starts ours from torch's
    # weights), so each comparison is one update. Ours keeps float32; torch rounds to bfloat16
    # (8 significant bits: at most 2^-9 relative) the input, its normalisation and the three
    # products of each of the 3 iterations: 11 roundings, at most 11 * 2^-9 = 2.1% of the
    # update if every one adds up. To first order the iteration carries a relative error
    # through at a gain of at most 1.03 for singular values in [0, 1] (|s p'(s) / p(s)| of the
    # quintic p), more only for those pushed past 1 (up to 1.2 after an iteration): allow half
    # as much again, 2^-5 of the update's norm. (Measured: about 0.9%.)
    ours, ref, opt, torch_opt = _twins(torch.float32, seed=1)
    for step in range(5):
        x = torch.randn(16, 24)
        start = [p.detach().clone() for p in ref.parameters()]
        _step(ours, opt, DECAY, x)
        _step(ref, torch_opt, None, x)
        for a, b, s in zip(ours.parameters(), ref.parameters(), start):
            ours_update, torch_update = a.detach() - s * (1 - WD), b.detach() - s * (1 - WD)
            err = (ours_update - torch_update).norm() / torch_update.norm()
            assert err <= 2 ** -5, f"step {step}: {err:.2e}"
            # Gradients at the same weights, averaged alike: the buffers agree exactly.
            assert torch.equal(opt.state[a]["momentum_buffer"], torch_opt.state[b]["momentum_buffer"])
        with torch.no_grad():
            for a, b in zip(ours.parameters(), ref.parameters()):
                a.copy_(b)


@pytest.mark.parametrize("shape", [(32, 72), (72, 32)])
def test_float32_iteration_is_the_float64_one_within_float32_rounding(shape):
    # The same 11 roundings at 2^-24, where each product's dot product of up to 72 terms adds
    # up to 72 * 2^-24 (4.3e-6) more: 9 products, 3.9e-5 at unit gain if every error aligned,
    # so 2^-14 (6.1e-5) of the norm with the gain allowed above. float32 is the accurate choice.
    torch.manual_seed(2)
    g = torch.randn(shape, dtype=torch.float64)
    exact = orthogonalise(g, dtype=torch.float64)
    err = (orthogonalise(g.float()).double() - exact).norm() / exact.norm()
    assert err <= 2 ** -14
    s = torch.linalg.svdvals(exact)   # orthogonalised: singular values near 1 (0.68-1.19 here), not all 1
    assert 0.5 < s.min() and s.max() < 1.25


def test_a_convolution_is_orthogonalised_as_its_filter_matrix_in_any_memory_layout():
    # Filters (out, in, kh, kw) viewed as out x (in * kh * kw): the same update as
    # torch.optim.Muon on that matrix, channels_last or not. Exact, as above (bfloat16).
    torch.manual_seed(3)
    conv = nn.Conv2d(6, 16, 3, bias=False).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    matrix = nn.Parameter(conv.weight.detach().reshape(16, -1).clone())
    opt, torch_opt = _muon([conv.weight], torch.bfloat16), _torch_muon([matrix])
    for _ in range(3):
        grad = torch.randn(16, 6, 3, 3)
        conv.weight.grad = grad.contiguous(memory_format=torch.channels_last)
        matrix.grad = grad.reshape(16, -1).clone()
        decay_weights(opt, DECAY, 1.0)
        opt.step()
        torch_opt.step()
        assert torch.equal(conv.weight.detach().reshape(16, -1), matrix.detach())


def _names(model: nn.Module, group: dict) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_muon_groups_conv_and_linear_weights_and_leaves_the_head_and_biases_to_nesterov():
    from cnnlab.models.classifier import build_classifier
    from cnnlab.models.pretrained import head_name
    model = build_classifier("tutorial", 10, (32, 32), [0.5] * 3, [0.25] * 3)
    head = "net." + head_name(model.net)
    cfg = Config(optimizer="muon", lr=2.0, lr_per_1024=True, batch_size=256, bias_lr_scale=64, momentum=0.85)
    opt = build_optimizer(model, cfg, head=head)
    assert isinstance(opt, Muon)
    by_kind = {g["orthogonalise"]: g for g in opt.param_groups if g["lr_scale"] != 64}
    matrices = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n != head}
    assert _names(model, by_kind[True]) == {f"{n}.weight" for n in matrices} and len(matrices) >= 4
    assert _names(model, by_kind[False]) == {f"{head}.weight"}
    biases = [g for g in opt.param_groups if g["lr_scale"] == 64]
    assert len(biases) == 1 and all(n.endswith(".bias") for n in _names(model, biases[0]))
    assert all(g["nesterov"] and g["momentum"] == 0.85 for g in opt.param_groups)
    lr = effective_lr(cfg)   # per 1024 examples: 2.0 * 256 / 1024
    assert by_kind[True]["lr"] == pytest.approx(lr * cfg.muon_lr_scale) and by_kind[False]["lr"] == pytest.approx(lr)
    # Without a head's name (a caller that has none): the last nn.Linear is the head.
    assert _names(model, next(g for g in build_optimizer(model, cfg).param_groups if g["orthogonalise"])) == \
        _names(model, by_kind[True])


def test_muon_weights_take_the_decoupled_decay_and_bodies_the_body_rate():
    conv = nn.Conv2d(3, 8, 3)
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(8, 4))
    cfg = Config(optimizer="muon", weight_decay=0.01, body_lr_scale=0.1, lr=1.0)
    opt = build_optimizer(model, cfg, head="2")
    group = next(g for g in opt.param_groups if g["orthogonalise"])
    assert group["params"] == [conv.weight]
    assert group["lr"] == pytest.approx(cfg.muon_lr_scale * 0.1)   # the body's fraction of Muon's rate
    before = conv.weight.detach().clone()
    decay_weights(opt, cfg, multiplier=0.5)
    assert torch.allclose(conv.weight, before * (1 - 0.01 * 0.5))


def test_muon_momentum_and_decay_scale_set_the_orthogonalised_weights_alone():
    # airbench94_muon's split: its filters at momentum 0.6 and undecayed, the rest at 0.85.
    conv = nn.Conv2d(3, 8, 3)
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(8, 4))
    cfg = Config(optimizer="muon", momentum=0.85, muon_momentum=0.6, weight_decay=0.01, muon_decay_scale=0.0)
    opt = build_optimizer(model, cfg, head="2")
    ortho = next(g for g in opt.param_groups if g["orthogonalise"])
    assert ortho["momentum"] == 0.6 and {g["momentum"] for g in opt.param_groups if g is not ortho} == {0.85}
    before = {p: p.detach().clone() for p in model.parameters()}
    decay_weights(opt, cfg, multiplier=1.0)
    assert torch.equal(conv.weight, before[conv.weight])                      # undecayed
    assert torch.allclose(model[2].weight, before[model[2].weight] * 0.99)   # the head decays
    # Left out, the orthogonalised weights share --momentum and the whole decay.
    default = build_optimizer(model, Config(optimizer="muon", momentum=0.85), head="2")
    assert {(g["momentum"], g["decay_scale"]) for g in default.param_groups} == {(0.85, 1.0)}


def test_a_groups_own_momentum_is_torch_muons_momentum_bit_for_bit():
    # build_optimizer gives the orthogonalised group muon_momentum as its own "momentum"
    # (above); Muon must use it, not the momentum it was built with.
    torch.manual_seed(4)
    ours, ref = _mlp(), _mlp()
    ref.load_state_dict(ours.state_dict())
    opt = Muon([{"params": list(ours.parameters()), "lr": LR, "lr_scale": 1.0, "decay_scale": 1.0,
                 "orthogonalise": True, "momentum": 0.6}], momentum=MOMENTUM, ns_dtype=torch.bfloat16)
    torch_opt = torch.optim.Muon(list(ref.parameters()), lr=LR, weight_decay=0.0, momentum=0.6, nesterov=True,
                                 ns_steps=NS_STEPS)
    for _ in range(4):
        x = torch.randn(16, 24)
        _step(ours, opt, None, x)
        _step(ref, torch_opt, None, x)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), ref.parameters()))


@pytest.mark.parametrize("field, value, message", [("muon_momentum", 1.0, "muon_momentum must be in \\[0, 1\\)"),
                                                   ("muon_decay_scale", -0.5, "muon_decay_scale must be in \\[0, 1\\]")])
def test_muon_momentum_and_decay_scale_refuse_nonsense(field, value, message):
    with pytest.raises(CnnlabError, match=message):
        validate(Config(optimizer="muon", **{field: value}))


@pytest.mark.parametrize("precision, dtype", [("fp32", "float32"), ("bf16", "bfloat16")])
def test_newton_schulz_runs_in_bfloat16_only_under_bfloat16_autocast(precision, dtype):
    opt = build_optimizer(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), Config(optimizer="muon", precision=precision))
    assert {g["ns_dtype"] for g in opt.param_groups} == {dtype}


def test_muon_lr_scale_sets_the_orthogonalised_rate_and_refuses_nonsense():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 4))
    opt = build_optimizer(model, Config(optimizer="muon", lr=1.0, muon_lr_scale=0.2), head="2")
    assert next(g for g in opt.param_groups if g["orthogonalise"])["lr"] == pytest.approx(0.2)
    assert "--muon-lr-scale x lr" in FIELDS["optimizer"].metadata["help"]
    with pytest.raises(CnnlabError, match="muon_lr_scale must be a positive fraction"):
        validate(Config(optimizer="muon", muon_lr_scale=0.0))


def test_muon_resume_after_a_crash_equals_the_uninterrupted_run(tiny_cifar, tmp_path):
    from cnnlab.engine import loop
    cfg = Config(data=str(tiny_cifar), model="tutorial", optimizer="muon", lr=0.5, momentum=0.85,
                 muon_momentum=0.6, weight_decay=5e-3, epochs=2, seed=3, threads=1, train_size=160)
    whole = loop.fit(cfg, out=tmp_path / "whole", progress=False)
    train_then_crash(loop.fit, cfg, tmp_path / "cut")
    # The cut run's checkpoint carries the Muon groups and their momentum buffers.
    with safe_open(str(RunFolder(tmp_path / "cut").last_checkpoint), framework="pt") as f:
        meta = json.loads(f.metadata()["state"])
        buffers = [k for k in f.keys() if k.startswith("optim.") and k.endswith(".momentum_buffer")]
    groups = meta["optimizer"]["groups"]
    assert any(g["orthogonalise"] for g in groups) and len(buffers) == sum(len(g["params"]) for g in groups)
    resumed = loop.resume(tmp_path / "cut", progress=False)
    a, b = load_file(whole.path / "model.safetensors"), load_file(resumed.path / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)   # same process: bit for bit
    assert resumed.history["loss"] == whole.history["loss"]


# ----------------------------------------------------------------------------- schedule, decay and momentum
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
