"""The benchmark scripts, small: speedrun's harness around the peer (--peer) and profile_steps on real steps."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import PEERS, load_benchmark

ROOT = Path(__file__).resolve().parents[1]
PEER = PEERS / "airbench94_muon_cpu.py"


@pytest.mark.shared_data(PEER)
def test_the_peer_reads_the_data_speedrun_writes_and_its_result_is_parsed(tiny_cifar, tmp_path):
    bench = load_benchmark("speedrun")
    folder = bench.write_peer_data(str(tiny_cifar), tmp_path / "peer-data")
    train, test = (torch.load(folder / f"{n}.pt") for n in ("train", "test"))
    assert train["images"].dtype == torch.uint8 and tuple(train["images"].shape) == (300, 32, 32, 3)
    assert train["labels"].dtype == torch.int64 and sorted(set(train["labels"].tolist())) == list(range(10))
    assert len(test["images"]) == 100 and train["classes"][:2] == ["airplane", "automobile"]
    # A stand-in with the real peer's data reader and table printer: it loads the files as the
    # peer does (CifarLoader) and prints its rows and last line in the peer's own format.
    fake = tmp_path / "peer.py"
    fake.write_text(textwrap.dedent(f"""
        import os, sys
        sys.argv[0] = {str(PEER)!r}
        import runpy
        peer = runpy.run_path({str(PEER)!r})
        loader = peer["CifarLoader"](os.environ["PEER_DATA"], train=True, batch_size=100)
        assert loader.images.shape == (300, 3, 32, 32) and float(loader.images.max()) <= 1.0
        assert os.environ["PEER_SEED"] == "4" and os.environ["PEER_MAX_STEPS"] == "3"
        peer["print_columns"](peer["logging_columns_list"], is_head=True)
        for epoch in range(2):
            peer["print_training_details"](dict(run=0 if epoch == 0 else None, epoch=epoch, train_acc=0.5,
                                                val_acc=0.4, time_seconds=12.5 * (epoch + 1)), is_final_entry=False)
        peer["print_training_details"](dict(epoch="eval", tta_val_acc=0.4321, time_seconds=30.0), is_final_entry=True)
        print("PEER airbench94_muon tta_test_accuracy=0.4321 wall_seconds=31.0")
    """))
    row = bench.run_peer(fake, 4, folder, bf16=False, steps=3)
    assert row["test_accuracy"] == pytest.approx(0.4321) and row["train_s"] == pytest.approx(25.0)
    assert row["images"] == 3 * bench.PEER_BATCH and row["wall_s"] > 0 and row["peak_mib"] > 0
    fake.write_text("import sys; print('Traceback: out of memory'); sys.exit(1)")
    with pytest.raises(SystemExit, match="the peer \\(seed 0\\) failed \\(1\\)"):
        bench.run_peer(fake, 0, folder, bf16=False, steps=None)


def test_the_profile_sorts_real_steps_into_kinds_of_work_and_puts_the_loop_back(tiny_cifar, tmp_path):
    from cnnlab.engine import loop, trainer
    bench = load_benchmark("profile_steps")
    real = loop.evaluate, trainer.decay_weights
    recipe = tmp_path / "small.yaml"   # a YAML file, as speedrun takes a baseline or a candidate
    recipe.write_text("model: speednet_xs\nbatch_size: 30\noptimizer: muon\nweight_decay: 0.01\nema: 0.9\n"
                      "whiten: true\ntta: flip\nval_split: 0.0\nepochs: 2\n")
    result = bench.profile_recipe(str(recipe), str(tiny_cifar), steps=3, warmup=1)
    assert (loop.evaluate, trainer.decay_weights) == real
    rows = {category: (ms, share, seconds) for category, ms, share, seconds in result["rows"]}
    assert list(rows) == bench.TRAINING and result["steps"] == 3
    assert result["total_steps"] == 2 * (300 // 30)   # the recipe's own schedule, not the profiled stub
    for kind in ("conv forward", "conv input gradient", "conv weight gradient", "optimizer", "weight averaging (EMA, lookahead)"):
        assert rows[kind][0] > 0, kind
    assert 0.95 < sum(share for _, share, _ in rows.values()) < 1.05   # Python time fills the rest, nothing twice
    assert result["evaluation_s"] > 0


@pytest.mark.slow
def test_speedrun_goes_on_from_a_later_seed_and_reports_the_seed_each_run_used(tiny_cifar, tmp_path):
    # A run too long for one sitting goes on later: --first-seed 3 runs seed 3, not seed 0 again.
    recipe = tmp_path / "small.yaml"
    recipe.write_text("model: speednet_xs\nbatch_size: 50\nepochs: 1\nval_split: 0.0\n")
    out = tmp_path / "results.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speedrun.py"), "--data", str(tiny_cifar),
                           "--recipes", str(recipe), "--seeds", "1", "--first-seed", "3", "--baseline-seeds", "0",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(out.read_text())
    assert list(results) == [str(recipe)]
    (run,) = results[str(recipe)]["runs"]
    assert run["seed"] == 3 and 0.0 <= run["test_accuracy"] <= 1.0 and run["wall_s"] >= run["train_s"] > 0
    assert results[str(recipe)]["seeds"] == 1
