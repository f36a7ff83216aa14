"""Metrics: the Frechet distance against scipy's formula, known distributions, the
sliced Wasserstein distance, the deterministic cached classifier and the data baseline."""

import numpy as np
import pytest
import scipy.linalg
import torch

from ipfm_fast.data import load_dataset
from ipfm_fast.metrics import (Evaluator, frechet_distance, frechet_distance_features, gaussian_stats,
                               sliced_wasserstein, summarize, train_classifier)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one thread is faster



def _scipy_fd(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _random_cov(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / d


@pytest.mark.parametrize("d", [1, 5, 32])
def test_fd_matches_scipy_sqrtm(d):
    rng = np.random.default_rng(d)
    for _ in range(3):
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
        ours, ref = frechet_distance(mu1, s1, mu2, s2), _scipy_fd(mu1, s1, mu2, s2)
        assert ours == pytest.approx(ref, rel=1e-6, abs=1e-8)


def test_fd_singular_covariances_and_identity():
    rng = np.random.default_rng(1)
    s = _random_cov(rng, 16, rank=4)
    mu = rng.standard_normal(16)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-6
    s2 = _random_cov(rng, 16, rank=3)
    assert frechet_distance(mu, s, mu, s2) == pytest.approx(_scipy_fd(mu, s, mu, s2), rel=1e-4, abs=1e-6)
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(mu, s, mu[:3], s)


def test_fd_on_known_gaussians():
    """Samples of N(m1, S1) and N(m2, S2): the FD of the fitted Gaussians approaches the
    closed form (isotropic covariances: |m1 - m2|^2 + d (s1 - s2)^2)."""
    rng = np.random.default_rng(2)
    d, n = 4, 200_000
    a = rng.standard_normal((n, d)) * 1.0
    b = rng.standard_normal((n, d)) * 2.0 + 0.5
    expected = d * 0.5**2 + d * (1.0 - 2.0) ** 2
    assert frechet_distance_features(a, b) == pytest.approx(expected, rel=0.02)
    mu, cov = gaussian_stats(a)
    assert np.allclose(mu, 0, atol=0.02) and np.allclose(cov, np.eye(d), atol=0.02)


def test_sliced_wasserstein_shift_is_exact():
    torch.manual_seed(0)
    x = torch.randn(300, 2, 3, 3)
    m = torch.randn(1, 2, 3, 3)
    g = torch.Generator().manual_seed(7)
    theta = torch.randn(18, 64, generator=g, dtype=torch.float64)
    theta /= theta.norm(dim=0, keepdim=True)
    expected = float((m.reshape(1, -1).double() @ theta).square().mean().sqrt())
    assert sliced_wasserstein(x, x + m, projections=64, seed=7) == pytest.approx(expected, rel=1e-9)
    assert sliced_wasserstein(x, x, projections=64) == 0.0
    # different sample sizes: a shuffled subset of the same set is close
    assert sliced_wasserstein(x, x[::3]) < 0.3 * sliced_wasserstein(x, x + m)


def test_sliced_wasserstein_gaussians():
    """N(0, I) vs N(m, I) in d dims: SW2^2 = E_theta (theta . m)^2 = |m|^2 / d."""
    torch.manual_seed(1)
    d = 8
    m = torch.full((d,), 0.7)
    a, b = torch.randn(4000, d), torch.randn(4000, d) + m
    assert sliced_wasserstein(a, b, projections=500) == pytest.approx(float(m.norm()) / d**0.5, rel=0.1)
    with pytest.raises(ValueError, match="features"):
        sliced_wasserstein(a, b[:, :3])


def test_summarize():
    s = summarize([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == pytest.approx(1.0) and (s["min"], s["max"]) == (1.0, 3.0)


def test_classifier_is_deterministic():
    data = load_dataset("digits")
    with torch.random.fork_rng():
        a, _ = train_classifier(data, steps=30)
        torch.manual_seed(123)  # the global RNG must not matter
        b, _ = train_classifier(data, steps=30)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_evaluator_baseline_and_cache(tmp_path):
    data = load_dataset("digits")
    ev = Evaluator(data, tmp_path)
    assert ev.info["test_accuracy"] > 0.93
    cached = list(tmp_path.glob("fd_classifier-*.safetensors"))
    assert len(cached) == 1
    ev2 = Evaluator(data, tmp_path)  # loads the cache: identical baseline
    assert ev2.info["cached"] == str(cached[0]) and ev2.baseline == ev.baseline
    assert 0 < ev.baseline["baseline_fd"] < 50 and ev.default_num_samples == 1437
    real = ev.score(data.train.floats())
    noise = ev.score(torch.rand(1437, 1, 8, 8) * 2 - 1)
    assert real["fd"] == pytest.approx(ev.baseline["baseline_fd"])  # the same sets
    assert noise["fd"] > 20 * real["fd"] and noise["sw"] > 2 * real["sw"]
    assert real["nn_ratio"] == 0.0  # copies of the training set
    assert ev.score(data.test.floats())["nn_ratio"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shape"):
        ev.score(torch.zeros(10, 1, 4, 4))


def test_a_damaged_classifier_cache_is_retrained_not_used(tmp_path):
    data = load_dataset("digits")
    ev = Evaluator(data, tmp_path)
    (cached,) = tmp_path.glob("fd_classifier-*.safetensors")
    raw = bytearray(cached.read_bytes())
    raw[-3] ^= 0x40  # one flipped bit in the last weight: still a valid safetensors file
    cached.write_bytes(bytes(raw))
    said = []
    ev2 = Evaluator(data, tmp_path, log=said.append)
    assert any("unreadable" in m and "digest" in m for m in said), said
    assert ev2.baseline == ev.baseline  # retrained (deterministically), not scored with the damaged weights
