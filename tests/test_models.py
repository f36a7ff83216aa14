"""Denoisers: EDM preconditioning, shapes, configs, parameter counts."""

import math

import pytest
import torch

from ipfm_fast.models import (EDMPrecond, MLPNet, UNet, build_denoiser, count_params, describe, model_config)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one thread is faster



class _Recorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = None

    def forward(self, x, c_noise):
        self.seen = (x.clone(), c_noise.clone())
        return torch.full_like(x, 0.3)


def test_edm_preconditioning_coefficients():
    net = _Recorder()
    model = EDMPrecond(net)
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    sigma = torch.tensor([0.002, 0.1, 0.5, 2.0, 80.0])
    out = model(x, sigma)
    sd = 0.5
    s = sigma.double().view(-1, 1, 1, 1)
    c_skip = sd**2 / (s**2 + sd**2)
    c_out = s * sd / (s**2 + sd**2).sqrt()
    c_in = 1 / (s**2 + sd**2).sqrt()
    torch.testing.assert_close(out, c_skip * x + c_out * 0.3, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(net.seen[0].double(), c_in * x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(net.seen[1], sigma.log() / 4)
    assert out.dtype == x.dtype


@pytest.mark.parametrize("arch,shape", [("mlp", [1, 8, 8]), ("mlp", [7]), ("unet", [1, 8, 8]), ("unet", [3, 4, 4])])
def test_shapes_and_sigma_forms(arch, shape):
    torch.manual_seed(0)
    cfg = model_config(arch, shape, width=8 if arch == "unet" else 16, depth=1)
    model = build_denoiser(cfg)
    x = torch.randn(3, *shape)
    assert model(x, torch.rand(3) + 0.1).shape == x.shape
    assert model(x, 0.7).shape == x.shape
    assert model(x, torch.tensor(0.7)).shape == x.shape
    with pytest.raises(ValueError, match="sigma"):
        model(x, torch.ones(2))


def test_small_sigma_is_identity():
    torch.manual_seed(0)
    model = build_denoiser(model_config("mlp", [1, 8, 8], width=16, depth=1))
    for p in model.parameters():  # a trained-looking (non-zero) output layer
        p.data.normal_(0, 0.1)
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(model(x, 1e-6), x, atol=1e-4, rtol=0)


def test_config_roundtrip_and_counts():
    cfg = model_config("unet", [1, 8, 8], width=8, depth=2, mults=[1, 2])
    a, b = build_denoiser(cfg), build_denoiser(dict(cfg))
    b.load_state_dict(a.state_dict())
    assert count_params(a) == sum(p.numel() for p in a.parameters()) > 0
    assert f"{count_params(a):,} parameters" in describe(a, cfg)
    mlp = build_denoiser(model_config("mlp", [1, 8, 8]))
    assert isinstance(mlp.net, MLPNet) and count_params(mlp) > count_params(build_denoiser(model_config("mlp", [1, 8, 8], width=16)))


def test_auto_arch_and_default_mults():
    assert model_config("auto", [1, 8, 8])["arch"] == "mlp"
    big = model_config("auto", [3, 32, 32])
    assert big["arch"] == "unet" and big["mults"] == [1, 2, 2, 2]
    assert model_config("unet", [3, 12, 12])["mults"] == [1, 2, 2]
    assert model_config("unet", [1, 6, 6])["mults"] == [1, 2]
    assert model_config("unet", [1, 5, 5])["mults"] == [1]
    build_denoiser(model_config("unet", [1, 5, 5], width=4))(torch.randn(2, 1, 5, 5), 1.0)


def test_bad_configs():
    with pytest.raises(ValueError, match="arch"):
        model_config("resnet", [1, 8, 8])
    with pytest.raises(ValueError, match="U-Net needs image rows"):
        model_config("unet", [64])
    with pytest.raises(ValueError, match="width"):
        model_config("mlp", [64], width=0)
    net = UNet(1, width=8, mults=(1, 2, 2))
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.randn(2, 1, 6, 6), torch.zeros(2))


def test_gradients_flow():
    torch.manual_seed(0)
    model = build_denoiser(model_config("unet", [1, 8, 8], width=8, depth=1))
    x = torch.randn(2, 1, 8, 8)
    model(x, torch.tensor([0.5, 3.0])).square().sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and math.isfinite(float(g.abs().sum())) for g in grads)
