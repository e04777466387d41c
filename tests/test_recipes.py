"""The recipes (cnnlab/recipes/*.yaml): each resolves and names a real model, and a speed recipe
trains end to end."""
from __future__ import annotations

import math

import pytest

from cnnlab.core.config import list_recipes, resolve


@pytest.mark.parametrize("recipe", list_recipes())
def test_every_recipe_resolves_and_names_a_real_model(recipe):
    from cnnlab.models import list_models
    cfg = resolve(recipe=recipe, overrides={"data": "somewhere"})
    assert cfg.recipe == recipe and cfg.model in list_models()
    assert math.isfinite(cfg.lr) and cfg.epochs > 0


def test_speed_recipe_trains_end_to_end_on_a_subset(tiny_cifar, tmp_path):
    from cnnlab.engine.loop import fit
    cfg = resolve(recipe="speed70", overrides={"data": str(tiny_cifar), "batch_size": 32, "epochs": 10})
    run = fit(cfg, out=tmp_path / "run", progress=False)
    assert run.metrics["test_accuracy"] > 0.2 and run.config.whiten   # chance: 0.1
