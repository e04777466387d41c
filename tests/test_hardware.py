"""Every machine a user has: the device and precision chosen, said, and refused with the fix;
float16 with loss scaling (run on the CPU, where torch supports fp16 autocast and GradScaler);
bfloat16 autocast leaves BatchNorm in float32."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from cnnlab.core import hardware
from cnnlab.core.config import Config
from cnnlab.core.errors import CnnlabError
from cnnlab.core.hardware import Precision, autocast, choose_precision, pick_device
from cnnlab.engine import build, loop
from cnnlab.models import create_model
from conftest import train_then_crash

CPU = torch.device("cpu")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnlab", *args], capture_output=True, text=True, timeout=300)


# ----------------------------------------------------------------------------- device
@pytest.mark.parametrize("cuda,mps,expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_picks_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(hardware, "mps_available", lambda: mps)
    assert pick_device("auto").type == expected
    if mps:
        assert pick_device("mps").type == "mps"


def test_a_missing_gpu_is_refused_with_what_was_found(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(hardware, "mps_available", lambda: False)
    with pytest.raises(CnnlabError, match=r"--device cuda .* no CUDA GPU \(found only the CPU\); use --device auto"):
        pick_device("cuda")
    with pytest.raises(CnnlabError, match=r"--device mps .* no Apple GPU \(found only the CPU\).*--device auto"):
        pick_device("mps")


# ----------------------------------------------------------------------------- precision
def test_auto_precision_per_device(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: True)
    assert choose_precision("auto", CPU) == Precision(torch.bfloat16, "auto: native bf16 on this CPU")
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: False)
    p = choose_precision("auto", CPU)
    assert p.dtype is None and str(p) == "float32 (auto: no native bf16 on this CPU)" and not p.scaled
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)   # a T4
    p = choose_precision("auto", torch.device("cuda"))
    assert p.dtype == torch.float16 and p.scaled and "loss scaling" in str(p)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert choose_precision("auto", torch.device("cuda")).dtype == torch.bfloat16
    assert choose_precision("auto", torch.device("mps")).dtype is None
    assert choose_precision("fp16", torch.device("mps")).scaled


def test_bf16_is_native_only_where_the_isa_has_it(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_isa", lambda: "AVX2")
    assert not hardware.cpu_has_bf16()                     # no AVX2 chip has bfloat16 arithmetic
    monkeypatch.setattr(hardware, "cpu_isa", lambda: "AVX512")
    monkeypatch.setattr(hardware, "_cpuinfo", lambda: {"flags": "fpu avx2 avx512f avx512bw"})
    assert not hardware.cpu_has_bf16()                     # Cascade Lake: AVX-512, bf16 in software
    monkeypatch.setattr(hardware, "_cpuinfo", lambda: {"flags": "avx512f avx512_bf16 amx_bf16"})
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")       # oneDNN capped as an AVX2 laptop
    assert not hardware.cpu_has_bf16()


def test_fp16_on_cpu_is_refused_and_emulated_bf16_warns_once(monkeypatch, capsys):
    with pytest.raises(CnnlabError, match=r"--precision fp16 needs a GPU .* use --precision auto"):
        choose_precision("fp16", CPU)
    assert choose_precision("fp16", CPU, strict=False) == choose_precision("auto", CPU)   # evaluating elsewhere
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(hardware, "_warned", set())
    for _ in range(3):
        assert choose_precision("bf16", CPU).dtype == torch.bfloat16      # as asked, but said
    err = capsys.readouterr().err
    assert err.count("warning:") == 1
    assert "emulated" in err and "slower than float32" in err and "--precision auto" in err


@pytest.mark.slow
def test_cli_bad_device_and_precision_exit_2_with_one_line(tiny_cifar, tmp_path):
    if torch.cuda.is_available() or hardware.mps_available():
        pytest.skip("this machine has a GPU")
    for flags, expected in ((["--device", "cuda"], "no CUDA GPU"), (["--device", "mps"], "no Apple GPU"),
                            (["--precision", "fp16"], "needs a GPU")):
        r = cli("train", "--data", str(tiny_cifar), "--epochs", "1", "--out", str(tmp_path / "r"), *flags)
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().count("\n") == 0 and expected in r.stderr
        assert not (tmp_path / "r").exists()                # refused before any folder is made


@pytest.mark.slow
def test_header_and_config_say_what_ran(tiny_cifar, tmp_path):
    r = cli("train", "--data", str(tiny_cifar), "--epochs", "1", "--precision", "auto", "--out", str(tmp_path / "r"))
    assert r.returncode == 0, r.stderr
    env = json.loads((tmp_path / "r" / "config.json").read_text())["environment"]
    precision = choose_precision("auto", CPU)
    assert env["isa"] == hardware.cpu_isa() and env["device_name"] == hardware.cpu_name()
    assert (env["precision"], env["precision_reason"]) == (precision.name, precision.reason)
    line = f"device cpu: {hardware.cpu_name()} (ISA {hardware.cpu_isa()}, "
    assert line in r.stdout and f"precision {precision}" in r.stdout


def test_amx_is_seen_only_where_onednn_may_use_it(monkeypatch):
    monkeypatch.setattr(hardware, "_cpuinfo", lambda: {"flags": "avx512f avx512_bf16 amx_bf16 amx_tile"})
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: True)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert hardware.cpu_has_amx()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")   # capped below the matrix units
    assert not hardware.cpu_has_amx()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert hardware.cpu_has_amx()
    monkeypatch.setattr(hardware, "_cpuinfo", lambda: {"flags": "avx512f avx512_bf16"})   # AMD Zen 5
    assert not hardware.cpu_has_amx()


# ----------------------------------------------------------------------------- memory
# In a fresh process: what malloc does with a large block depends on what the process did before.
RESIDENT_AFTER_EACH_STEP = """
import os, torch
from cnnlab.core import hardware

def resident_mib():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

def step():   # a training step's large block: 64 MiB, every page written, then freed
    block = torch.ones(64 * 2**20, dtype=torch.uint8)
    del block
    return resident_mib()

print(resident_mib(), step())
with hardware.reuse_freed_memory():
    with hardware.reuse_freed_memory():   # nested: its exit must leave the outer one's settings
        print(step())
    print(*[step() for _ in range(2)])
print(resident_mib())
"""


@pytest.mark.skipif(hardware.glibc() is None, reason="tunes glibc's malloc only")
def test_training_keeps_freed_blocks_for_the_next_step_and_gives_them_back_after():
    out = subprocess.run([sys.executable, "-c", RESIDENT_AFTER_EACH_STEP], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    base, default, *inside, after = map(float, out)
    assert default < base + 16            # glibc's default: a block this large goes back at once
    assert min(inside) > base + 48        # inside: kept in the heap for the next step
    assert after < base + 16              # released on the way out


# ----------------------------------------------------------------------------- float16
FP16 = Precision(torch.float16, "test: float16 autocast on the CPU")


def _scaler_state(run: Path) -> dict:
    with safe_open(str(run / "checkpoints" / "last.safetensors"), framework="pt") as f:
        return json.loads(f.metadata()["state"])["scaler"]


@pytest.fixture
def fp16_on_cpu(monkeypatch):
    """Training in float16 with a GradScaler, on the CPU, from a loss scale so large that the
    first steps overflow: the path a T4 takes, with its overflows made certain."""
    monkeypatch.setattr(build, "choose_precision", lambda choice, device: FP16)
    monkeypatch.setattr(hardware, "INIT_LOSS_SCALE", 2.0 ** 30)


def test_float16_overflow_is_skipped_not_divergence(fp16_on_cpu, tiny_cifar, tmp_path):
    cfg = Config(data=str(tiny_cifar), model="tutorial", optimizer="sgd", lr=0.05, epochs=2, seed=1, threads=1,
                 train_size=160)
    run = loop.fit(cfg, out=tmp_path / "r", progress=False)
    scale = _scaler_state(run.path)["scale"]
    # Each overflow halves the scale: the first steps were skipped, then training went on.
    assert 2.0 ** 16 < scale < 2.0 ** 30
    assert all(torch.isfinite(torch.tensor(run.history["loss"])))
    w = load_file(run.path / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in w.values())
    assert run.metrics["test_accuracy"] >= 0


@pytest.mark.slow
def test_float16_resume_restores_the_loss_scale_exactly(fp16_on_cpu, tiny_cifar, tmp_path):
    cfg = Config(data=str(tiny_cifar), model="tutorial", optimizer="nesterov", lr=0.05, weight_decay=5e-3,
                 epochs=2, seed=2, threads=1, train_size=160)
    whole = loop.fit(cfg, out=tmp_path / "whole", progress=False)
    train_then_crash(loop.fit, cfg, tmp_path / "cut")
    after_one = _scaler_state(tmp_path / "cut")["scale"]
    assert after_one < 2.0 ** 30                           # the state to restore is not the initial one
    resumed = loop.resume(tmp_path / "cut", progress=False)
    assert _scaler_state(resumed.path) == _scaler_state(whole.path)
    a, b = load_file(whole.path / "model.safetensors"), load_file(resumed.path / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)          # same process, same kernels: bit for bit


# ----------------------------------------------------------------------------- recipe estimates
def test_recipe_estimate_probes_once_per_machine(monkeypatch, tmp_path):
    from cnnlab.core.config import resolve
    from cnnlab.engine import estimate
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []
    real = estimate.probe

    def counted(cfg, **kw):
        calls.append(cfg.model)
        return real(cfg, batch=8, steps=1)               # the real step, kept small for the test

    monkeypatch.setattr(estimate, "probe", counted)
    cfg = resolve(recipe="speed70")
    first = estimate.estimate(cfg)
    assert first.probe.train_images_per_s > 0 and first.probe.eval_images_per_s > 0
    assert hardware.cpu_isa() in first.probe.machine and first.seconds > estimate.START_UP_SECONDS
    again = estimate.estimate(cfg)
    assert calls == ["speednet_xs"] and again == first     # cached: no second probe
    # The estimate is start-up plus 0.55 epoch of 50,000 images plus one view of 10,000 and a
    # second (the mirror) for the half that tta_gate 0.5 sends through it.
    p = first.probe
    assert (cfg.epochs, cfg.tta, cfg.tta_gate) == (0.55, "flip", 0.5)
    assert first.seconds == pytest.approx(estimate.START_UP_SECONDS + 0.55 * 50_000 / p.train_images_per_s
                                          + 1.5 * 10_000 / p.eval_images_per_s)
    monkeypatch.setattr(hardware, "cpu_isa", lambda: "DEFAULT")   # another machine: probed anew
    estimate.estimate(cfg)
    assert calls == ["speednet_xs", "speednet_xs"]
    estimate.cache_path().write_text("not json")                  # a damaged cache is probed again
    estimate.estimate(cfg)
    assert len(calls) == 3


def test_recipes_command_names_the_machine_of_each_measurement(monkeypatch, capsys):
    from cnnlab.cli import main
    assert main(["recipes", "--no-estimate"]) == 0
    out = capsys.readouterr().out
    from cnnlab.core.config import recipe_document
    m = recipe_document("speed85")["measured"][0]      # a 3-seed entry: mean and median say so
    assert m["seeds"] > 1
    assert (f"measured: {100 * m['test_accuracy']:.2f}% test accuracy (mean) in {m['wall_seconds']:,.0f} s "
            f"(median), {m['seeds']} seeds, on {m['machine']}, {m['precision']}") in out
    assert "estimate:" not in out
    for name in ("lesson", "speed70", "speed85", "speed90", "speed92"):
        for m in recipe_document(name)["measured"]:
            assert {"machine", "precision", "date", "test_accuracy", "wall_seconds", "seeds"} <= set(m)


def test_recipes_command_says_when_a_recipe_cannot_be_probed(monkeypatch, capsys):
    from cnnlab.cli import main
    from cnnlab.engine import estimate

    def refuse(cfg, **kw):
        raise CnnlabError("--precision fp16 needs a GPU (cuda or mps)")

    monkeypatch.setattr(estimate, "estimate", refuse)
    assert main(["recipes"]) == 0
    assert "estimate: unavailable here: --precision fp16 needs a GPU" in capsys.readouterr().out


# ----------------------------------------------------------------------------- bfloat16
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
