"""data/augment.py: the augmentation table (config fields in, one batch transform out, in a fixed
order), the alternating flip, translation and cutout, and the ``--augment`` presets."""
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
    assert not Augmentation.from_config(Config(augment="none")).active
    with pytest.raises(ValueError, match="auto is decided by cnnlab.engine.prepare.plan_run"):
        Augmentation.from_config(Config())   # the default, auto, is the plan's to decide


def test_from_config_reads_the_table_and_refuses_unknown_names():
    aug = Augmentation.from_config(Config(augment="none", flip="random", translate=2, cutout=0))
    assert aug.settings == {"augment": "none", "flip": "random", "translate": 2, "cutout": 0}
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
        x, _ = stream.finish(stream.images[idx], stream.labels[idx], idx, epoch, 0)
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


# ----------------------------------------------------------------------------- presets
def _batch(n: int = 6, size: int = 32) -> torch.Tensor:
    """uint8 (N, 3, H, W) images with structure (a gradient and a bright square): crops and
    colour operations all change some pixel of them."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    base = torch.stack([xx * 255 // size, yy * 255 // size, (xx + yy) * 127 // size]).to(torch.uint8)
    x = base.repeat(n, 1, 1, 1)
    for i in range(n):
        x[i, :, 4 + i:12 + i, 8:16] = 250
    return x


def _draw(seed: int, n: int) -> Draw:
    return Draw(torch.Generator().manual_seed(seed), 0, torch.zeros(n, dtype=torch.bool), torch.arange(n))


def test_none_leaves_pixels_and_light_is_a_seeded_mirror_and_shift():
    from cnnlab.data import augment
    x = _batch()
    assert not Augmentation(augment="none").active
    light = Augmentation(augment="light")(x, _draw(3, len(x)))
    g = torch.Generator().manual_seed(3)   # by hand: mirror, then a shift of up to 32/8 = 4 px
    assert torch.equal(light, augment.random_translate(augment.random_flip(x, g), 4, g))
    assert not torch.equal(light, x) and light.dtype == torch.uint8


@pytest.mark.parametrize("preset", ["standard", "strong"])
def test_photo_presets_are_seeded_change_every_batch_and_leave_torchs_generator_alone(preset):
    x = _batch()
    aug = Augmentation(augment=preset)
    state = torch.get_rng_state()
    a = aug(x, _draw(5, len(x)))
    assert torch.equal(torch.get_rng_state(), state)        # fork_rng: the caller's random state untouched
    assert torch.equal(a, aug(x, _draw(5, len(x))))          # the same step draws the same batch (resume)
    assert not torch.equal(a, aug(x, _draw(6, len(x))))      # another step, another batch
    assert a.shape == x.shape and a.dtype == torch.uint8
    changed = (a != x).flatten(1).any(1)
    assert changed.all(), "a crop and a photometric op change every image"


def test_a_crop_only_preset_resizes_a_box_of_the_documented_area():
    """RandomResizedCrop at 100% of the area with aspect 1 is the identity; 25% is a 2x zoom,
    so a bright square grows to about twice its side."""
    from cnnlab.data.augment import Preset, apply_preset
    x = _batch(1)
    whole = apply_preset(x, Preset("whole", crop=(1.0, 1.0)), _draw(0, 1))
    bright = (x[0, 0] >= 250).sum().item()
    assert abs((whole[0, 0] >= 250).sum().item() - bright) <= 0.1 * bright + 8   # aspect 3/4-4/3 only reshapes
    quarter = apply_preset(x, Preset("quarter", crop=(0.25, 0.25)), _draw(0, 1))
    grown = (quarter[0, 0] >= 240).sum().item()
    assert grown == 0 or grown > 2.5 * bright   # cropped off, or zoomed 2x in each side


def test_strong_mixes_two_images_and_their_labels():
    from cnnlab.data.batches import model_input
    x = model_input(torch.randint(0, 256, (8, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8))
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    aug = Augmentation(4, augment="strong")
    for seed in range(4):   # MixUp or CutMix, half each
        mixed, soft = aug.mix(x, y, _draw(seed, len(x)))
        assert soft.shape == (8, 4) and torch.allclose(soft.sum(1), torch.ones(8))
        assert ((soft > 0).sum(1) <= 2).all()                 # at most the two classes mixed
        assert soft[torch.arange(8), y].min() >= 0.5 - 1e-6 or soft.max(1).values.min() >= 0.5 - 1e-6
        assert not torch.equal(mixed, x)
    plain = Augmentation(4, augment="standard")
    assert plain.mix(x, y, _draw(0, 8))[1] is y   # only strong mixes


def test_presets_refuse_images_and_classes_they_cannot_take():
    from cnnlab.core.errors import CnnlabError
    from cnnlab.data.augment import check_preset
    with pytest.raises(CnnlabError, match="--augment strong crops and distorts images of at least 32 px; these are 28x28"):
        check_preset("strong", (28, 28), 10)
    with pytest.raises(CnnlabError, match="mixes images of two classes .* this data has 1"):
        check_preset("strong", (64, 64), 1)
    check_preset("light", (8, 8), 1)
