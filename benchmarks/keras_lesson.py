"""The Keras lesson itself, as a peer: its network and fit on all of CIFAR-10, timed.

    <a python with tensorflow-cpu> benchmarks/keras_lesson.py [--data ../shared/data/cifar10] [--epochs 10]

Runs in a Python of its own that has TensorFlow (``benchmarks/finetune.py --keras-python``
makes one): TensorFlow is a peer to measure against, never a dependency of cnnlab, so this
script imports nothing from cnnlab. The lesson: pixels scaled to [0, 1]; three 3x3
convolutions (32, 64, 64 filters, ReLU) with 2x2 max-pooling between them, a dense layer of
64 and one of 10 logits; Adam at Keras's defaults, batch 32, 10 epochs, the test split as
its validation data. Prints one JSON line: the fit's seconds (what the lesson's clock
covers), test accuracy, and the TensorFlow version.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image


def read_split(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 32, 32, 3) and int labels from ``<class>/<image>`` folders, classes sorted."""
    images, labels = [], []
    for label, cls in enumerate(sorted(p.name for p in folder.iterdir() if p.is_dir())):
        for path in sorted((folder / cls).iterdir()):
            with Image.open(path) as im:
                images.append(np.asarray(im.convert("RGB")))
            labels.append(label)
    return np.stack(images), np.asarray(labels)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"))
    p.add_argument("--epochs", type=int, default=10)
    args = p.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    from tensorflow.keras import layers, models

    tf.keras.utils.set_random_seed(0)
    data = Path(args.data)
    train_x, train_y = read_split(data / "train")
    test_x, test_y = read_split(data / "test")
    train_x, test_x = train_x / 255.0, test_x / 255.0
    model = models.Sequential([
        layers.Input((32, 32, 3)),
        layers.Conv2D(32, (3, 3), activation="relu"), layers.MaxPooling2D((2, 2)),
        layers.Conv2D(64, (3, 3), activation="relu"), layers.MaxPooling2D((2, 2)),
        layers.Conv2D(64, (3, 3), activation="relu"),
        layers.Flatten(), layers.Dense(64, activation="relu"), layers.Dense(10),
    ])
    model.compile(optimizer="adam", loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    start = time.perf_counter()
    model.fit(train_x, train_y, epochs=args.epochs, validation_data=(test_x, test_y), verbose=2)
    fit_seconds = time.perf_counter() - start
    _, accuracy = model.evaluate(test_x, test_y, verbose=0)
    print(json.dumps({"fit_seconds": round(fit_seconds, 1), "test_accuracy": round(float(accuracy), 4),
                      "train_images": len(train_y), "tensorflow": tf.__version__}), flush=True)


if __name__ == "__main__":
    main()
