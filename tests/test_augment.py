"""data/augment.py: the augmentation table (config fields in, one batch transform out, in a fixed
order), the alternating flip, translation and cutout."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cnnlab.core.config import Config
from cnnlab.data import augment
from cnnlab.data.augment import AUGMENTATIONS, Augmentation, Draw
from cnnlab.data.batches import BatchStream
from cnnlab.data.dataset import Split


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


def test_alternating_flip_flips_each_image_on_alternate_epochs():
    images = np.arange(6 * 4 * 4 * 1, dtype=np.uint8).reshape(6, 4, 4, 1)
    stream = BatchStream(Split(images, np.zeros(6)), batch_size=6, device=torch.device("cpu"), seed=0,
                         aug=Augmentation(flip="alternating"))
    seen = []
    for epoch in range(4):
        idx = torch.arange(6)   # fixed order so images line up across epochs
        x = stream.augmented(idx, epoch, 0)
        original = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255
        seen.append([bool(torch.equal(x[i], original[i].flip(-1))) for i in range(6)])
    for i in range(6):
        assert [seen[e][i] for e in range(4)] in ([True, False, True, False], [False, True, False, True])
    assert any(seen[0]) and not all(seen[0])   # epoch 0 is a random half


def test_translate_is_a_reflect_padded_shift_and_cutout_a_square():
    x = torch.rand(64, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    y = augment.random_translate(x, 2, g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for i in range(64):
        assert any(torch.equal(y[i], padded[i, :, a:a + 8, b:b + 8]) for a in range(5) for b in range(5))
    z = augment.cutout(torch.ones(32, 3, 16, 16), 4, torch.Generator().manual_seed(1))
    zeros = (z[:, 0] == 0).sum(dim=(1, 2))
    assert zeros.max() == 16 and zeros.min() >= 4        # clipped at the border at most to 2x2
    assert torch.equal(z[:, 0] == 0, z[:, 2] == 0)        # the same hole in every channel
