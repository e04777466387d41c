"""The augmentation table: config fields in, one batch transform out, in a fixed order."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from cnnlab.core.config import Config
from cnnlab.data.augment import AUGMENTATIONS, Augmentation, Draw


def test_every_row_is_a_config_field_that_defaults_to_off():
    fields = {f.name for f in dataclasses.fields(Config)}
    assert set(AUGMENTATIONS) <= fields
    assert not Augmentation.from_config(Config()).active


def test_from_config_reads_the_table_and_refuses_unknown_names():
    aug = Augmentation.from_config(Config(flip="random", translate=2, cutout=0))
    assert aug.settings == {"flip": "random", "translate": 2, "cutout": 0}
    assert aug.active
    with pytest.raises(ValueError, match="unknown augmentation blur"):
        Augmentation(blur=3)


def test_the_table_applies_its_rows_in_order_with_one_generator():
    """Same seed, same rows: the batch equals the functions called by hand in table order."""
    from cnnlab.data import augment
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    draw = Draw(torch.Generator().manual_seed(7), 0, torch.tensor([True, False]), torch.arange(2))
    out = Augmentation(flip="random", translate=2, cutout=3)(x, draw)
    g = torch.Generator().manual_seed(7)
    expected = augment.cutout(augment.random_translate(augment.random_flip(x, g), 2, g), 3, g)
    assert torch.equal(out, expected)
    assert not torch.equal(out, x)
