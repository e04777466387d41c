"""``cnnlab evaluate``: a run's model on the test split of its data (or of another dataset)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from cnnlab.core.errors import CnnlabError
from cnnlab.core.hardware import choose_precision, pick_device
from cnnlab.core.metrics import per_class_accuracy
from cnnlab.data.dataset import prepare_splits
from cnnlab.data.sources import load_dataset
from cnnlab.engine.runs import load_run


def evaluate_run(run_path: str | Path, *, data: str | None = None, data_dir: str | None = None,
                 device: str = "auto") -> dict[str, Any]:
    from cnnlab.engine.evaluation import evaluate
    run = load_run(run_path)
    cfg = run.config
    spec = data or cfg.data
    ds = load_dataset(spec, data_dir=data_dir or cfg.data_dir, image_size=cfg.image_size if not data else None,
                      bad_images=cfg.bad_images)
    if ds.class_names != run.class_names:
        raise CnnlabError(f"{spec} has classes {ds.class_names[:5]}... but the run was trained on "
                          f"{run.class_names[:5]}...: evaluate on data with the same classes")
    h, w, c = ds.image_shape
    if (h, w) != tuple(run.input_size) or c != run.in_channels:
        raise CnnlabError(f"{spec} holds {w}x{h}x{c} images but the model takes "
                          f"{run.input_size[1]}x{run.input_size[0]}x{run.in_channels}")
    # The same test subset the run was scored on, unless another dataset was named.
    ds = prepare_splits(ds, val_split=0.0, train_size=None, test_size=None if data else cfg.test_size,
                        seed=cfg.seed)
    dev = pick_device(device)
    result = evaluate(run.model(dev), ds.test, dev, dtype=choose_precision(cfg.precision, dev, strict=False).dtype, tta=cfg.tta)
    per_class = per_class_accuracy(result.labels.numpy(), result.predictions.numpy(), run.class_names)
    return {"run": str(run.path), "data": spec, "test_accuracy": result.accuracy, "test_loss": result.loss,
            "test_images": len(result.labels), "per_class_accuracy": per_class}
