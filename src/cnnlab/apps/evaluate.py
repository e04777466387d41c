"""``cnnlab evaluate``: a run's model on the test split of its data (or of another dataset).

The data loads as training loaded it (``cnnlab.engine.prepare.load_data``: in memory or streamed
from disk, the same test subset) and is scored by the loop's own ``evaluate``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from cnnlab.core.errors import CnnlabError
from cnnlab.core.hardware import choose_precision, pick_device
from cnnlab.core.metrics import per_class_accuracy
from cnnlab.engine.runs import load_run


def evaluate_run(run_path: str | Path, *, data: str | None = None, data_dir: str | None = None,
                 device: str = "auto", bad_images: str | None = None) -> dict[str, Any]:
    """``bad_images``: "skip" leaves out unusable files of an image folder (default: the run's)."""
    from cnnlab.engine.evaluation import evaluate
    from cnnlab.engine.prepare import load_data, plan_run
    run = load_run(run_path)
    cfg = run.config
    spec = data or cfg.data
    # The run's own data: its config, so the same loader and the same test subset it was scored on.
    changes: dict[str, Any] = {"data_dir": data_dir or cfg.data_dir, "bad_images": bad_images or cfg.bad_images}
    if data:
        # All of its test split. An image folder is decoded at the model's size, streamed when that
        # is too large for memory (load_data's one walk of the folder decides); an official dataset
        # comes at its own size (a mismatch is refused below).
        h, w = run.input_size
        folder = Path(data).expanduser().is_dir()
        changes.update(data=data, test_size=None, crop="center", loader="auto",
                       image_size=(h if h == w else (h, w)) if folder else None)
    # Its own image folder splits as it did in training (a flat folder's split is saved with the run).
    saved = run.splits_file if not data and run.splits_file.is_file() else None
    ds = load_data(plan_run(cfg.replace(**changes), saved_split=saved), splits=("test",))
    if ds.class_names != run.class_names:
        raise CnnlabError(f"{spec} has classes {ds.class_names[:5]}... but the run was trained on "
                          f"{run.class_names[:5]}...: evaluate on data with the same classes")
    h, w, c = ds.image_shape
    if (h, w) != tuple(run.input_size) or c != run.in_channels:
        raise CnnlabError(f"{spec} holds {w}x{h}x{c} images but the model takes "
                          f"{run.input_size[1]}x{run.input_size[0]}x{run.in_channels}")
    dev = pick_device(device)
    result = evaluate(run.model(dev), ds.test, dev, dtype=choose_precision(cfg.precision, dev, strict=False).dtype,
                      tta=cfg.tta, tta_gate=cfg.tta_gate)
    per_class = per_class_accuracy(result.labels.numpy(), result.predictions.numpy(), run.class_names)
    return {"run": str(run.path), "data": spec, "test_accuracy": result.accuracy, "test_loss": result.loss,
            "test_images": len(result.labels), "per_class_accuracy": per_class}
