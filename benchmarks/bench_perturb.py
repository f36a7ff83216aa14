"""Perturbation benchmarks: pfgmpp-style reference, eager chi-square form, torch.compile of
it, and each built fused backend; CIFAR-10-like and FFHQ-64-like batches, plus a large
batch (>= 256 MB moved per call) on CUDA for the fraction of copy bandwidth.

bytes = read x + write y (the minimum any implementation must move).
"""

import math

import numpy as np
import pytest
import torch

import baselines
import ipfm_fast as ipf
from ipfm_fast import backends

from conftest import HAS_CUDA, set_baseline

D = 128.0
SIZES = {"cifar10 B=256 N=3x32x32": (256, 3, 32, 32), "ffhq64 B=64 N=3x64x64": (64, 3, 64, 64)}
if HAS_CUDA:
    SIZES["large B=4096 N=3x64x64 (403 MB)"] = (4096, 3, 64, 64)
DEVICE = "cuda" if HAS_CUDA else "cpu"
set_baseline("perturb", "pfgmpp_reference")


_chi2_compiled = None


def chi2_compiled(x, sigma, D):
    global _chi2_compiled
    if _chi2_compiled is None:
        _chi2_compiled = torch.compile(baselines.perturb_chi2_eager)
    return _chi2_compiled(x, sigma, D)


def providers():
    out = ["pfgmpp_reference", "chi2_eager", "chi2_compile"]
    for b in ("cuda", "triton", "cpu"):
        if backends.why_not(b, DEVICE, torch.float32) is None and not (b == "triton" and DEVICE == "cpu"):
            out.append(b)  # the interpreter is not a speed measurement
    return out


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("provider", providers())
def test_perturb(bench, size, provider):
    shape = SIZES[size]
    x = torch.randn(shape, device=DEVICE)
    sigma = torch.rand(shape[0], device=DEVICE) * 10 + 0.01
    rng = np.random.default_rng(0)
    if provider == "pfgmpp_reference":
        fn = lambda: baselines.perturb_pfgmpp_style(x, sigma, D, rng=rng)  # noqa: E731
    elif provider == "chi2_eager":
        fn = lambda: baselines.perturb_chi2_eager(x, sigma, D)  # noqa: E731
    elif provider == "chi2_compile":
        fn = lambda: chi2_compiled(x, sigma, D)  # noqa: E731
    else:
        fn = lambda: ipf.perturb(x, sigma, D, backend=provider)  # noqa: E731
    nbytes = 2 * x.numel() * x.element_size()
    bench(fn, op="perturb", size=size, provider=provider, nbytes=nbytes, device=DEVICE,
          elements=x.numel(), D=D if math.isfinite(D) else "inf")
