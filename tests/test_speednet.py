"""models/speednet.py: the frozen patch-whitening first layer, and its bias trained for
--whiten-bias-epochs, then left alone."""
from __future__ import annotations

import pytest
import torch

from cnnlab.core.config import Config
from cnnlab.models import create_model


@pytest.mark.parametrize("model", ["speednet_xs", "speednet"])   # linear, and in +/- pairs
def test_whitening_makes_patch_covariance_near_identity(model):
    torch.manual_seed(0)
    # Correlated "images": smooth noise, so neighbouring pixels and channels covary strongly.
    base = torch.randn(400, 1, 33, 33)
    images = (base[..., 1:, 1:] + base[..., :-1, :-1] + base[..., 1:, :-1]).repeat(1, 3, 1, 1)
    images = images + 0.3 * torch.randn_like(images)
    net = create_model(model)
    net.init_whitening(images, eps=1e-6)
    with torch.no_grad():
        out = net.whiten(images) - net.whiten.bias[None, :, None, None]      # (N, 12 or 24, H', W')
    half = out[:, :12].permute(0, 2, 3, 1).reshape(-1, 12)                    # the + filters
    cov = torch.cov(half.T)
    # Sampling noise of a covariance over some 400,000 (correlated) patches, well under 0.01;
    # the unwhitened input's neighbouring pixels covary at ~0.6.
    assert torch.allclose(cov, torch.eye(12), atol=0.05)
    assert out.shape[1] == (24 if net.whiten_pairs else 12)
    if net.whiten_pairs:
        assert torch.allclose(out[:, 12:], -out[:, :12])                      # the - twins
    assert not net.whiten.weight.requires_grad                                # kept frozen


def test_whitening_bias_trains_for_its_epochs_then_stays_put(tiny_cifar, tmp_path):
    from safetensors.torch import load_file

    from cnnlab.engine.loop import fit
    base = dict(data=str(tiny_cifar), model="speednet_xs", whiten=True, optimizer="nesterov", lr=0.05,
                weight_decay=5e-3, batch_size=50, seed=3)

    def trained(name: str, **changes) -> dict[str, torch.Tensor]:
        fit(Config(**base, **changes), out=tmp_path / name, progress=False)
        return load_file(tmp_path / name / "model.safetensors")

    one = trained("one", epochs=1)
    frozen = trained("frozen", epochs=3, whiten_bias_epochs=1)
    free = trained("free", epochs=3)
    bias, conv = "net.whiten.bias", "net.blocks.0.0.weight"
    assert not torch.equal(one[bias], torch.zeros_like(one[bias]))    # it did train in epoch 1
    assert torch.equal(frozen[bias], one[bias])                       # then neither steps nor decay moved it
    assert not torch.equal(free[bias], one[bias])
    assert not torch.equal(frozen[conv], one[conv])                   # while the rest trained on
