"""TensorBoard event files from a run's history, for those who browse runs with TensorBoard.

    tensorboard --logdir runs/      # every run with --tensorboard shows up as RUN/tensorboard
"""
from __future__ import annotations

from pathlib import Path

from cnnlab.core.errors import CnnlabError
from cnnlab.core.run_folder import finite, read_run

TAGS = {  # history key -> TensorBoard tag (train and validation of one quantity share a section)
    "loss": "loss/train", "val_loss": "loss/validation",
    "accuracy": "accuracy/train", "val_accuracy": "accuracy/validation",
    "lr": "learning_rate", "seconds": "seconds_per_epoch",
}
EVENTS_PREFIX = "events.out.tfevents."


def write_tensorboard(run_path: str | Path) -> Path:
    """Write RUN/tensorboard/events.* from history.json (one step per epoch); returns the folder.

    Rebuilding replaces the previous event files, so curves are never drawn twice.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise CnnlabError(f"--tensorboard needs the tensorboard package ({e}): pip install tensorboard") from None
    rec = read_run(run_path)
    folder = rec.tensorboard_dir
    if folder.exists():
        for old in folder.glob(EVENTS_PREFIX + "*"):
            old.unlink()
    writer = SummaryWriter(log_dir=str(folder))
    try:
        for key, tag in TAGS.items():
            for epoch, value in enumerate(rec.history.get(key) or [], start=1):
                if value is not None:
                    writer.add_scalar(tag, float(value), epoch)
        last = max(rec.epochs, 1)
        for key in ("test_accuracy", "test_loss"):
            value = rec.metrics.get(key)
            if finite(value):
                writer.add_scalar(f"test/{key[5:]}", float(value), last)
        text = "  \n".join(f"**{k}**: {v}" for k, v in rec.saved_config.items())
        if text:
            writer.add_text("config", text, 0)
    finally:
        writer.close()
    return folder
