"""engine/evaluation.py: test-time augmentation: its views, and the gate that gives them to the
least confident images only."""
from __future__ import annotations

import pytest
import torch

from cnnlab.core.config import Config
from cnnlab.core.errors import CnnlabError


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
