"""Heun sampler: shapes, NFE, determinism, prior scale, exactness on a known field."""

import math

import pytest
import torch

from ipfm_fast.models import build_denoiser, model_config
from ipfm_fast.sampling import heun_sample, nfe, sample, save_npz


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one thread is faster


class Const(torch.nn.Module):
    """D(y, sigma) = c: the ODE dy/dsigma = (y - c)/sigma has y(sigma) = c + (y0 - c) sigma / sigma_max."""

    def __init__(self, c=0.25):
        super().__init__()
        self.c, self.calls, self.first = c, 0, None

    def forward(self, y, sigma):
        if self.first is None:
            self.first = (y.clone(), sigma.clone())
        self.calls += 1
        return torch.full_like(y, self.c)


def _net():
    torch.manual_seed(0)
    return build_denoiser(model_config("mlp", [1, 8, 8], width=16, depth=1)).eval()


def test_shapes_nfe_and_exact_solution():
    m = Const(0.25)
    out = sample(m, 7, [1, 8, 8], 128.0, seed=1)
    assert out.shape == (7, 1, 8, 8) and out.dtype == torch.float32
    assert m.calls == nfe(18) == 35
    torch.testing.assert_close(out, torch.full_like(out, 0.25), atol=1e-5, rtol=0)
    m2 = Const()
    heun_sample(m2, torch.randn(2, 3), steps=4)
    assert m2.calls == 7


@pytest.mark.parametrize("D", [128.0, math.inf])
def test_prior_scale(D):
    m = Const()
    sample(m, 4000, [1, 8, 8], D, seed=0, steps=1)
    y, sigma = m.first
    assert torch.all(sigma == 80.0)
    expected = 80.0 * math.sqrt(D / (D - 2)) if math.isfinite(D) else 80.0  # Student-t variance
    assert y.std().item() == pytest.approx(expected, rel=0.02)


def test_deterministic_per_seed_and_batch_invariant():
    net = _net()
    a = sample(net, 10, [1, 8, 8], 128.0, seed=3, steps=3)
    b = sample(net, 10, [1, 8, 8], 128.0, seed=3, steps=3, batch=4)
    c = sample(net, 10, [1, 8, 8], 128.0, seed=4, steps=3)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.isfinite(a).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="steps"):
        sample(Const(), 2, [1, 8, 8], 128.0, steps=0)
    with pytest.raises(ValueError, match="number of samples"):
        sample(Const(), 0, [1, 8, 8], 128.0)
    with pytest.raises(ValueError, match="D must be"):
        sample(Const(), 2, [1, 8, 8], 0.0)


def test_npz_roundtrip(tmp_path):
    from ipfm_fast.data import load_images

    x = torch.rand(5, 1, 8, 8) * 2 - 1
    save_npz(tmp_path / "s.npz", x, seed=0, D=math.inf)
    back = load_images(tmp_path / "s.npz")
    assert back.shape == x.shape and (back - x).abs().max() <= 1 / 255 + 1e-6


def test_npz_records_what_made_the_samples(tmp_path):
    from ipfm_fast.sampling import read_npz_meta

    save_npz(tmp_path / "s.npz", torch.zeros(2, 1, 4, 4), seed=3, D=math.inf, role="generator", data="digits")
    assert read_npz_meta(tmp_path / "s.npz") == {"seed": 3, "D": "inf", "role": "generator", "data": "digits"}
    np_path = tmp_path / "plain.npz"
    import numpy as np

    np.savez(np_path, x=np.zeros((2, 4, 4), np.uint8))
    assert read_npz_meta(np_path) == {}
