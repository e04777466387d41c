"""Beyond one machine: the streaming loader and data-parallel training (gloo on the CPU).

The 2-process runs go through the real CLI (``cnnlab train --nproc 2``), so the launcher,
the process group, rank-0-only writing and signal agreement are all exercised.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cnnlab.core.config import Config, recipe_values, resolve, validate
from cnnlab.core.errors import CnnlabError
from cnnlab.data import stream
from cnnlab.data.batches import BatchStream
from cnnlab.data.stream import FileSplit, StreamingDataset, choose_loader, random_resized_box
from cnnlab.engine.distributed import training_batches
from cnnlab.engine.loop import fit
from cnnlab.engine.prepare import check_config, load_data, plan_run
from conftest import IMAGENET_SAMPLE, checkpoint_step, start_and_wait_for_checkpoint

CPU = torch.device("cpu")
# The DDP comparison: 270 training images (tiny_cifar less a 10% hold-out) in global batches
# of 54 = 2 processes x 27, 5 steps an epoch, 40 steps; SGD with the lr and decay stated per
# 1024, so the test also checks that both scale with the global batch (the decay is strong
# enough to matter: halving it moves some layer by half its training displacement). One
# thread per process on both sides. The rate keeps training out of the chaotic regime (at
# lr 1 per 1024 the runs drift 0.06 apart from a 1e-7 start).
# No augmentation: each process draws its own, so only unaugmented runs match one process's.
DDP = dict(model="tutorial", optimizer="sgd", lr=0.03, lr_per_1024=True, weight_decay=0.05, seed=5, threads=1,
           epochs=8, augment="none")
PER_PROCESS = 27
# How close two runs that differ only in float rounding end up. The two layouts compute
# each step's mean gradient in another order (one batch of 54, or two of 27 averaged by the
# all-reduce): float32 rounding, measured at 1e-7 to 1.5e-6 of each layer's gradient. Over
# 40 steps the network amplifies that by a factor that depends on the kernels (ReLU and max-
# pool choices flip): measured at 1e-7 absolute on an AMX Xeon and up to 0.4% (AVX2) or 0.06%
# (ATEN_CPU_CAPABILITY=default) of each layer's training displacement on a Zen 3 EPYC. Any
# real fault (a shard dropped, gradients summed instead of averaged, lr or decay scaled by the
# per-process batch) changes every step by a constant factor: measured at 47-53% of the
# displacement for a halved lr or decay. 5% of the displacement sits an order of magnitude
# from both.
ROUNDING_DRIFT = 0.05


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnlab", *args], capture_output=True, text=True,
                          timeout=300, **kw)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model.safetensors")


def assert_identical_weights(a: Path, b: Path) -> None:
    """Bit for bit: for runs in one process layout with the same kernels."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst == 0, f"largest weight difference {worst:.3g}"


def assert_same_training(run: Path, reference: Path, initial: dict[str, torch.Tensor]) -> None:
    """``run`` trained as ``reference`` did, up to float rounding (see ROUNDING_DRIFT): per
    layer, the runs differ by a small fraction of how far training moved that layer."""
    got, ref = weights(run), weights(reference)
    assert got.keys() == ref.keys()
    for k, w0 in initial.items():
        moved = float((ref[k] - w0).norm())
        if moved == 0:      # buffers fixed at build time (normalisation): equal exactly
            assert torch.equal(got[k], ref[k]), k
            continue
        drift = float((got[k] - ref[k]).norm()) / moved
        assert drift <= ROUNDING_DRIFT, f"{k}: the runs differ by {drift:.2%} of its training displacement"


def assert_same_history(run: Path, reference: Path, images: int) -> None:
    """Epoch losses within the rounding drift of the loss's change over training (the loss
    moves with the weights, to first order); accuracies, counts of images, within one image
    (an image flips only when its top-2 logit margin is below the drift)."""
    got, ref = (json.loads((r / "history.json").read_text()) for r in (run, reference))
    span = abs(ref["loss"][0] - ref["loss"][-1])
    assert got["loss"] == pytest.approx(ref["loss"], abs=ROUNDING_DRIFT * span)
    assert got["accuracy"] == pytest.approx(ref["accuracy"], abs=1.01 / images)


@pytest.fixture(scope="module")
def initial_weights(tiny_cifar, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The weights both layouts start from (the seed's initialisation)."""
    from cnnlab.engine.build import build_training
    cfg = Config(data=str(tiny_cifar), batch_size=2 * PER_PROCESS, **DDP)
    plan = plan_run(cfg)
    parts = build_training(plan.cfg, load_data(plan), CPU, start=None)
    return {k: v.detach().clone() for k, v in parts.model.state_dict().items()}


@pytest.fixture(scope="module")
def one_process_run(tiny_cifar, tmp_path_factory) -> Path:
    """The reference: one process with the global batch (2 x 27)."""
    out = tmp_path_factory.mktemp("one") / "run"
    fit(Config(data=str(tiny_cifar), batch_size=2 * PER_PROCESS, **DDP), out=out, progress=False)
    return out


def ddp_args(values: dict = DDP) -> list[str]:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in values.items()]
    return [*flags, "--batch-size", str(PER_PROCESS), "--nproc", "2"]


# ----------------------------------------------------------------------------- sharding
def test_shards_of_a_global_batch_are_the_one_process_batch(tiny_cifar):
    data = load_data(plan_run(Config(data=str(tiny_cifar), image_size=32, loader="memory")))
    one = BatchStream(data.train, 54, CPU, seed=1)
    parts = [BatchStream(data.train, 27, CPU, seed=1, shard=(r, 2), drop_last=True) for r in (0, 1)]
    assert len(one) == len(parts[0]) == 5
    for (x, y), (x0, y0), (x1, y1) in zip(one.epoch(3), parts[0].epoch(3), parts[1].epoch(3)):
        assert torch.equal(x[0::2], x0) and torch.equal(x[1::2], x1)
        assert torch.equal(y[0::2], y0) and torch.equal(y[1::2], y1)
    # An incomplete last global batch is dropped, so every process averages as many images.
    assert len(BatchStream(data.train, 20, CPU, seed=1, shard=(1, 2), drop_last=True)) == 270 // 40


# ----------------------------------------------------------------------------- streaming
def test_streaming_loader_yields_the_in_memory_batches(tiny_cifar, tmp_path):
    """Same order, same pixels (the same Pillow decode and resize), same labels, same
    batch augmentation, same evaluation batches; a resumed epoch gives the same tail."""
    base = Config(data=str(tiny_cifar), image_size=32, batch_size=32, seed=3, augment="none", flip="random",
                  translate=2, crop="center", center_crop=1.0)
    mem = load_data(plan_run(base.replace(loader="memory")))
    streamed = load_data(plan_run(base.replace(loader="stream", workers=1)))
    assert isinstance(streamed, StreamingDataset) and streamed.image_shape == mem.image_shape == (32, 32, 3)
    assert streamed.class_names == mem.class_names
    for split in ("train", "val", "test"):
        assert np.array_equal(getattr(mem, split).labels, getattr(streamed, split).labels)
    bm, bs = training_batches(base, mem, CPU), training_batches(base, streamed, CPU)
    assert len(bm) == len(bs) == 9
    for epoch in (0, 1):
        pairs = list(zip(bm.epoch(epoch), bs.epoch(epoch)))
        assert len(pairs) == 9
        for (xm, ym), (xs, ys) in pairs:
            assert xs.dtype == torch.float32 and xs.shape == xm.shape
            assert torch.equal(xm, xs) and torch.equal(ym, ys)
    tail = [x for x, _ in bs.epoch(1, start_step=6)]
    assert all(torch.equal(a, b) for a, b in zip(tail, [x for x, _ in bm.epoch(1)][6:]))
    for (xm, ym), (xs, ys) in zip(mem.test.eval_batches(40, CPU), streamed.test.eval_batches(40, CPU)):
        assert torch.equal(xm, xs) and torch.equal(ym, ys)
    # One loop serves both: whole runs agree.
    a = fit(base.replace(loader="memory", epochs=1, threads=1), out=tmp_path / "mem", progress=False)
    b = fit(base.replace(loader="stream", epochs=1, threads=1, workers=0), out=tmp_path / "stream",
            progress=False)
    assert_identical_weights(a.path, b.path)
    assert a.metrics["test_accuracy"] == b.metrics["test_accuracy"]


def test_random_resized_crops_are_in_bounds():
    rng = np.random.default_rng(0)
    for w, h in [(500, 375), (64, 640), (33, 20), (1000, 10)]:
        for _ in range(50):
            l, t, r, b = random_resized_box(w, h, rng)
            assert 0 <= l < r <= w and 0 <= t < b <= h


@pytest.mark.shared_data(IMAGENET_SAMPLE)
def test_random_resized_crops_of_real_photos_are_seeded_per_image():
    split = FileSplit([str(p) for p in sorted(IMAGENET_SAMPLE.glob("*.JPEG"))[:4]], np.zeros(4),
                      stream.Decoding(48, 3, workers=0))
    assert len(split) == 4
    files = stream._Files(split.paths, split.decoding, crop_seed=7)
    assert torch.equal(files[(2, 5)], files[(2, 5)])                      # reproducible
    assert not torch.equal(files[(2, 5)], files[(2, 6)])                   # new epoch, new crop
    assert files[(2, 5)].shape == (3, 48, 48) and files[(2, -1)].shape == (3, 48, 48)


def test_loader_choice_by_size_and_refusals(tiny_cifar, monkeypatch):
    cfg = Config(data=str(tiny_cifar))
    assert choose_loader(cfg) == "memory"                                  # 400 x 32 x 32 x 3 bytes
    assert choose_loader(cfg.replace(crop="random_resized")) == "stream"
    monkeypatch.setattr(stream, "MEMORY_BUDGET", 100_000)
    assert choose_loader(cfg) == "stream"
    with pytest.raises(CnnlabError, match="reads image folders"):
        check_config(Config(data="cifar10", loader="stream"))
    with pytest.raises(CnnlabError, match="only the streaming"):
        validate(cfg.replace(loader="memory", crop="random_resized"))


def make_imagenet_style(root: Path, classes: int = 3, train: int = 6, test: int = 2) -> Path:
    """train/<class>/ and test/<class>/ from real ImageNet photos, made to vary: original
    JPEGs, wide and tall crops, small and large resizes, PNGs (RGBA, greyscale, palette)."""
    photos = sorted(IMAGENET_SAMPLE.glob("*.JPEG"))
    assert len(photos) >= classes * (train + test), f"{IMAGENET_SAMPLE} holds too few photos"
    k = 0
    for c in range(classes):
        for split, n in (("train", train), ("test", test)):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True)
            for i in range(n):
                src = photos[k]
                k += 1
                variant = k % 6
                if variant == 0:
                    (d / src.name).write_bytes(src.read_bytes())            # as downloaded
                    continue
                img = Image.open(src).convert("RGB")
                w, h = img.size
                if variant == 1:
                    img.crop((0, 0, w, max(8, h // 3))).save(d / f"{i}_wide.jpg", quality=90)
                elif variant == 2:
                    img.crop((0, 0, max(8, w // 4), h)).save(d / f"{i}_tall.jpg", quality=90)
                elif variant == 3:
                    img.resize((41, 57)).convert("RGBA").save(d / f"{i}_small.png")
                elif variant == 4:
                    img.resize((w * 2, h * 2)).convert("L").save(d / f"{i}_grey.png")
                else:
                    img.convert("P").save(d / f"{i}_palette.png")
    return root


@pytest.mark.shared_data(IMAGENET_SAMPLE)
def test_imagenet_style_folder_trains_through_the_streaming_path(tmp_path):
    data = make_imagenet_style(tmp_path / "imagenet")
    cfg = Config(data=str(data), image_size=64, crop="random_resized", flip="random", workers=1,
                 epochs=2, batch_size=8, val_split=0.0, lr=3e-3, threads=1, seed=2)
    run = fit(cfg, out=tmp_path / "run", progress=False)
    assert run.card["input_size"] == [64, 64] and run.card["in_channels"] == 3
    assert len(run.history["loss"]) == 2 and all(np.isfinite(run.history["loss"]))
    assert run.metrics["test_images"] == 6
    ev = np.load(run.path / "evaluation.npz")
    assert ev["sample_images"].shape[1:] == (64, 64, 3) and len(ev["sample_images"]) == 18
    again = fit(cfg, out=tmp_path / "again", progress=False)
    assert_identical_weights(run.path, again.path)                     # seeded crops: reproducible


# ----------------------------------------------------------------------------- data-parallel
@pytest.mark.slow
def test_two_processes_train_as_one_with_the_global_batch(tiny_cifar, tmp_path, one_process_run, initial_weights):
    out = tmp_path / "ddp"
    r = cli("train", "--data", str(tiny_cifar), *ddp_args(), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "2 processes (gloo), batch 27 per process = effective batch 54" in r.stdout
    assert r.stdout.count("test accuracy") == 1                             # rank 0 alone prints
    assert_same_training(out, one_process_run, initial_weights)
    assert_same_history(out, one_process_run, images=270)                   # gathered over both shards
    one = json.loads((one_process_run / "history.json").read_text())
    two = json.loads((out / "history.json").read_text())
    # Sharded evaluation, gathered: 30 validation and 100 test images, within one image.
    assert two["val_accuracy"] == pytest.approx(one["val_accuracy"], abs=1.01 / 30)
    assert json.loads((out / "metrics.json").read_text())["test_accuracy"] == pytest.approx(
        json.loads((one_process_run / "metrics.json").read_text())["test_accuracy"], abs=1.01 / 100)



@pytest.mark.slow
def test_two_processes_train_muon_as_one_process(tiny_cifar, tmp_path, initial_weights):
    # Muon orthogonalises each weight's momentum of the gradient the all-reduce averaged: both
    # ranks take the one process's step (Newton-Schulz is smooth in its input, so the rounding
    # of the two gradient orders stays within ROUNDING_DRIFT as it does for SGD).
    muon = {**DDP, "optimizer": "muon", "muon_lr_scale": 0.5}
    one = tmp_path / "one"
    fit(Config(data=str(tiny_cifar), batch_size=2 * PER_PROCESS, **muon), out=one, progress=False)
    out = tmp_path / "ddp"
    r = cli("train", "--data", str(tiny_cifar), *ddp_args(muon), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "config.json").read_text())["config"]["optimizer"] == "muon"
    assert_same_training(out, one, initial_weights)


@pytest.mark.slow
def test_two_processes_fit_a_head_on_cached_features_as_one_process(tiny_cifar, tmp_path, one_process_run):
    # Head-only epochs run the head alone on gathered features, outside DDP: the policy averages
    # its gradients itself. A linear head on fixed features has no kernel choices to flip, so
    # the two layouts differ only in the order each step's gradient is summed (about 1e-7 of
    # it): 1e-3 of the head's displacement is far above that, and far below what skipping the
    # average gives (each process stepping on its own half batch: measured 7%).
    tuned = {**DDP, "epochs": 3, "init_from": str(one_process_run), "freeze_epochs": 3}
    one = tmp_path / "one"
    fit(Config(data=str(tiny_cifar), batch_size=2 * PER_PROCESS, **tuned), out=one, progress=False)
    out = tmp_path / "ddp"
    r = cli("train", "--data", str(tiny_cifar), *ddp_args(tuned), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "only the head (11) trains for 3 epochs, on the frozen body's features" in r.stdout
    got, ref, start = weights(out), weights(one), weights(one_process_run)
    for k in got:
        if not k.startswith("net.11."):
            assert torch.equal(got[k], ref[k]) and torch.equal(got[k], start[k]), k   # the body never moved
    for k in ("net.11.weight", "net.11.bias"):
        drift = float((got[k] - ref[k]).norm()) / float((ref[k] - start[k]).norm())
        assert drift <= 1e-3, f"{k}: the runs differ by {drift:.2%} of its training displacement"


@pytest.mark.slow
def test_two_processes_leave_a_frozen_whitening_bias_alone(tiny_cifar, tmp_path):
    # A parameter that stops taking gradients: DDP must not wait for it, nor hand it a zero
    # gradient that momentum would turn into a step.
    out = tmp_path / "ddp"
    r = cli("train", "--data", str(tiny_cifar), "--model", "speednet_xs", "--whiten", "--whiten-bias-epochs", "0",
            "--optimizer", "nesterov", "--lr", "0.05", "--weight-decay", "5e-3", "--epochs", "2",
            "--batch-size", str(PER_PROCESS), "--nproc", "2", "--threads", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    trained = weights(out)
    assert torch.equal(trained["net.whiten.bias"], torch.zeros_like(trained["net.whiten.bias"]))   # as initialised

def _children(pid: int) -> dict[int, int]:
    """rank -> pid of the processes ``pid`` started."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) != pid:
                continue
            env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        for kv in env:
            if kv.startswith(b"RANK="):
                out[int(kv[5:])] = int(entry)
    return out


@pytest.mark.slow
def test_data_parallel_run_killed_then_resumed_matches_one_process(tiny_cifar, tmp_path, one_process_run,
                                                                   initial_weights):
    total = DDP["epochs"] * 5
    out = tmp_path / "ddp"
    # 1. SIGTERM to the launcher: forwarded, agreed, checkpointed by rank 0, exit 128 + 15.
    proc = start_and_wait_for_checkpoint(["train", "--data", str(tiny_cifar), *ddp_args(), "--out", str(out),
                                           "--checkpoint-every", "1"], out, after_step=0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    stopped = checkpoint_step(out)
    assert 0 < stopped < total, "the run finished before the signal arrived"
    # 2. Resume (the launcher starts 2 processes again), then kill -9 rank 0 mid-way.
    proc = start_and_wait_for_checkpoint(["train", "--resume", str(out)], out, after_step=stopped)
    ranks = _children(proc.pid)
    assert set(ranks) == {0, 1}
    os.kill(ranks[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert all(not Path(f"/proc/{pid}").exists() for pid in ranks.values())   # rank 1 was stopped too
    killed = checkpoint_step(out)
    assert stopped < killed <= total
    # 3. Resume to the end: the same weights as one uninterrupted process with the global batch.
    r = cli("train", "--resume", str(out))
    assert r.returncode == 0, r.stderr
    assert_same_training(out, one_process_run, initial_weights)
    # Epochs cut mid-way report the figures of the whole epoch, summed over both processes.
    assert_same_history(out, one_process_run, images=270)


def test_resume_refuses_another_process_count(tmp_path):
    from cnnlab.engine import distributed
    with pytest.raises(CnnlabError, match="trained by 2 process"):
        distributed.check_resume_world(2, tmp_path)


# ----------------------------------------------------------------------------- recipe
def test_imagenet_recipe_is_the_standard_schedule():
    from cnnlab.engine.optim import effective_lr
    cfg = resolve(overrides={"recipe": "imagenet"})
    assert (cfg.model, cfg.optimizer, cfg.epochs, cfg.warmup, cfg.schedule) == ("resnet50", "sgd", 90, 5, "cosine")
    assert (cfg.loader, cfg.image_size, cfg.label_smoothing, cfg.batch_size) == ("stream", 224, 0.1, 32)
    assert cfg.momentum == 0.9 and cfg.channels_last and cfg.precision == "auto"
    global_cfg = cfg.replace(batch_size=8 * cfg.batch_size)                # 8 GPUs x 32
    assert effective_lr(global_cfg) == pytest.approx(0.1)                  # 0.1 per 256
    # Decoupled decay per step = coupled L2 1e-4 through momentum: lr * 1e-4 / (1 - momentum).
    per_step = global_cfg.weight_decay * global_cfg.batch_size / 1024
    assert per_step == pytest.approx(0.1 * 1e-4 / (1 - 0.9))
    assert "measured" not in recipe_values("imagenet")
