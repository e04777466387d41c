"""data/dataset.py: stratified hold-outs, the validation split and subsets, all seeded."""
from __future__ import annotations

import numpy as np

from cnnlab.data.dataset import Dataset, Split, prepare_splits, stratified_indices


def test_stratified_indices_keep_class_proportions():
    labels = np.repeat(np.arange(4), [100, 50, 30, 20])
    idx = stratified_indices(labels, 0.1, np.random.default_rng(0))
    assert len(idx) == 20
    assert np.bincount(labels[idx]).tolist() == [10, 5, 3, 2]
    assert len(np.unique(idx)) == len(idx)


def _toy(n_train=200, n_test=50, classes=4) -> Dataset:
    rng = np.random.default_rng(0)
    def split(n):
        return Split(rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8), np.arange(n) % classes)
    return Dataset("toy", [f"c{i}" for i in range(classes)], split(n_train), split(n_test))


def test_validation_hold_out_is_seeded_disjoint_and_leaves_test_alone():
    ds = _toy()
    a = prepare_splits(ds, val_split=0.1, train_size=None, test_size=None, seed=1)
    b = prepare_splits(ds, val_split=0.1, train_size=None, test_size=None, seed=1)
    c = prepare_splits(ds, val_split=0.1, train_size=None, test_size=None, seed=2)
    assert len(a.train) == 180 and len(a.val) == 20
    assert np.array_equal(a.val.images, b.val.images)
    assert not np.array_equal(a.val.images, c.val.images)
    train_rows = {r.tobytes() for r in a.train.images}
    assert not any(r.tobytes() in train_rows for r in a.val.images)
    assert a.test is ds.test  # the test split is never touched without --test-size


def test_subsets_and_zero_val_split():
    ds = _toy()
    d = prepare_splits(ds, val_split=0.0, train_size=40, test_size=8, seed=0)
    assert d.val is None and len(d.train) == 40 and len(d.test) == 8
    assert np.bincount(d.train.labels).tolist() == [10, 10, 10, 10]
    # The test subset does not depend on how train was cut.
    e = prepare_splits(ds, val_split=0.2, train_size=100, test_size=8, seed=0)
    assert np.array_equal(d.test.images, e.test.images)
