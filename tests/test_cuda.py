"""The CUDA paths, run where a CUDA GPU is (``benchmarks/gpu_check.sh`` runs this file there):
float16 with its loss scaler, bfloat16, channels_last, pinned memory and the weights' round trip.
Elsewhere every test here is skipped with the reason, and counted."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab.cli import main
from cnnlab.engine.runs import load_run

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")]


def _folder(root, size=32, per_class=24):
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", 8)):
        for c, level in (("dark", 50), ("bright", 200)):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(rng.normal(level, 25, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_training_on_the_gpu_learns_in_every_precision(precision, tmp_path, capsys):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    out = tmp_path / "run"
    assert main(["train", "--data", str(_folder(tmp_path / "data")), "--model", "resnet20", "--device", "cuda",
                 "--precision", precision, "--epochs", "3", "--batch-size", "16", "--optimizer", "adam",
                 "--out", str(out)]) == 0
    header = capsys.readouterr().out
    assert "device cuda" in header
    run = load_run(out)
    assert run.metrics["test_accuracy"] >= 0.9          # two classes a child could tell apart
    assert run.config.precision == precision


def test_a_gpu_run_predicts_the_same_on_the_cpu(tmp_path):
    out = tmp_path / "run"
    data = _folder(tmp_path / "data")
    assert main(["train", "--data", str(data), "--model", "tutorial", "--device", "cuda", "--epochs", "1",
                 "--out", str(out)]) == 0
    run = load_run(out)
    files = sorted((data / "test").rglob("*.png"))[:6]
    on_gpu = run.predict(files, device="cuda")
    on_cpu = run.predict(files, device="cpu")
    assert [r["top"][0]["class"] for r in on_gpu] == [r["top"][0]["class"] for r in on_cpu]
    for g, c in zip(on_gpu, on_cpu):
        assert g["top"][0]["probability"] == pytest.approx(c["top"][0]["probability"], abs=1e-4)
