"""apps/evaluate.py: `cnnlab evaluate` loads the data as training did and scores a run to the same
figures; another dataset in memory or streamed."""
from __future__ import annotations

import pytest

from cnnlab.core.config import Config


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
