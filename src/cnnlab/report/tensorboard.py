"""TensorBoard event files rebuilt from a run's history (``cnnlab report RUN --tensorboard``),
for a run trained without ``--tensorboard`` or whose event files were lost. Training with
``--tensorboard`` writes them live, epoch by epoch (``cnnlab.engine.callbacks.TensorBoard``);
both write the same tags the same way.

    tensorboard --logdir runs/      # every such run shows up as RUN/tensorboard
"""
from __future__ import annotations

from pathlib import Path

from cnnlab.core.run_folder import read_run
from cnnlab.engine.callbacks import (
    add_config_text,
    add_epoch_scalars,
    add_test_scalars,
    summary_writer,
)

EVENTS_PREFIX = "events.out.tfevents."


def write_tensorboard(run_path: str | Path) -> Path:
    """Write RUN/tensorboard/events.* from history.json (one step per epoch); returns the folder.

    Rebuilding replaces the previous event files, so curves are never drawn twice.
    """
    rec = read_run(run_path)
    folder = rec.tensorboard_dir
    if folder.exists():
        for old in folder.glob(EVENTS_PREFIX + "*"):
            old.unlink()
    writer = summary_writer(folder)
    try:
        for epoch in range(1, rec.epochs + 1):
            add_epoch_scalars(writer, rec.history, epoch)
        add_test_scalars(writer, rec.metrics, max(rec.epochs, 1))
        add_config_text(writer, rec.saved_config)
    finally:
        writer.close()
    return folder
