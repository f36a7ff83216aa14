"""Perturbation benchmarks: pfgmpp-style reference, eager chi-square form, torch.compile of
it, and each built fused backend; CIFAR-10-like and FFHQ-64-like batches, plus a large
batch (>= 256 MB moved per call) on CUDA for the fraction of copy bandwidth.

bytes = read x + write y (the minimum any implementation must move).

Timing: every provider of a size in interleaved rounds (benchmarks/conftest.py
time_providers: each round calls each once, the order reversed every other round), rows with
the median and the minimum, and the speedups over the PFGM++-style reference by both; the
CPU rows name the CPU kernels' instruction-set path and the 1-minute load average.
"""

import math

import numpy as np
import pytest
import torch

import baselines
import ipfm_fast as ipf
from ipfm_fast import _ext, backends
from ipfm_fast.compat import CLIP_BETA  # pfgmpp's and pfgmpp-idmd's clip of the Beta draw
from ipfm_fast.ops.perturb import noise_from_gaussian
from ipfm_fast.testing import cpu_isa, cpu_isa_paths

from conftest import HAS_CUDA, add_row, loadavg, set_baseline, time_providers

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
    if "cpu" in out:  # the narrower instruction-set paths of the CPU kernels, in the same rounds
        out += [f"cpu-{p}" for p in cpu_isa_paths()[1:]]
    return out


def provider_fn(provider, x, sigma, rng):
    if provider == "pfgmpp_reference":
        return lambda: baselines.perturb_pfgmpp_style(x, sigma, D, rng=rng)
    if provider == "chi2_eager":
        return lambda: baselines.perturb_chi2_eager(x, sigma, D)
    if provider == "chi2_compile":
        return lambda: chi2_compiled(x, sigma, D)
    if provider.startswith("cpu-"):
        def on_path():
            with cpu_isa(provider[4:]):
                return ipf.perturb(x, sigma, D, backend="cpu")
        return on_path
    return lambda: ipf.perturb(x, sigma, D, backend=provider)


# `benchmark` is requested so that --benchmark-only keeps this test; the timing is time_providers'
@pytest.mark.filterwarnings("ignore:Benchmark fixture was not used")
# compile_mode: the torch.compile provider runs in its own test (gpu_check.sh times compiled
# variants last, in their own stage), in rounds interleaved with the baseline's
@pytest.mark.parametrize("compile_mode", ["off", "on"])
@pytest.mark.parametrize("size", list(SIZES))
def test_perturb(benchmark, size, compile_mode):
    shape = SIZES[size]
    x = torch.randn(shape, device=DEVICE)
    sigma = torch.rand(shape[0], device=DEVICE) * 10 + 0.01
    rng = np.random.default_rng(0)
    names = [p for p in providers() if ("compile" in p) == (compile_mode == "on")]
    if compile_mode == "on":
        names = ["pfgmpp_reference"] + names
    fns = {p: provider_fn(p, x, sigma, rng) for p in names}
    load = loadavg()
    times = time_providers(fns, DEVICE)
    if compile_mode == "on":  # the baseline's row is the eager test's; here only the same-rounds ratio
        base_med, base_min, _ = times.pop("pfgmpp_reference")
    extra = {"elements": x.numel(), "D": D if math.isfinite(D) else "inf"}
    if DEVICE == "cpu":
        extra.update(threads=torch.get_num_threads(), load_1min=load)
    for provider, (med, low, rounds) in times.items():
        if provider.startswith("cpu"):
            extra["cpu_isa"] = provider[4:] or _ext._C.cpu_isa()
        if compile_mode == "on":
            extra.update(same_rounds_speedup_vs_pfgmpp_reference=base_med / med,
                         same_rounds_speedup_min_vs_pfgmpp_reference=base_min / low)
        add_row(op="perturb", size=size, provider=provider, median_s=med, min_s=low, rounds=rounds,
                nbytes=2 * x.numel() * x.element_size(), device=DEVICE, **{**extra})
        extra.pop("cpu_isa", None)


set_baseline("perturb_clip", "unclipped")


@pytest.mark.filterwarnings("ignore:Benchmark fixture was not used")
@pytest.mark.parametrize("size", [s for s in SIZES if not s.startswith("large")])
def test_perturb_clip_cost(benchmark, size):
    """What the opt-in Beta clip (ipfm_fast.compat's default) costs: perturb and the given-
    gaussian form (compat.sid.sample_noise) with and without it, in the same rounds; the
    ratios docs/compat.md quotes. Not in the README's table (no other codebase's op here)."""
    backend = "cuda" if HAS_CUDA else "cpu"
    if backends.why_not(backend, DEVICE, torch.float32) is not None:
        pytest.skip(f"no {backend} backend here")
    shape = SIZES[size]
    x, g = torch.randn(shape, device=DEVICE), torch.randn(shape, device=DEVICE)
    sigma = torch.rand(shape[0], device=DEVICE) * 10 + 0.01
    fns = {
        "unclipped": lambda: ipf.perturb(x, sigma, D, backend=backend),
        "clipped": lambda: ipf.perturb(x, sigma, D, clip_beta=CLIP_BETA, backend=backend),
        "given_g unclipped": lambda: noise_from_gaussian(g, sigma, D, backend=backend),
        "given_g clipped": lambda: noise_from_gaussian(g, sigma, D, clip_beta=CLIP_BETA, backend=backend),
    }
    load = loadavg()
    times = time_providers(fns, DEVICE)
    extra = {"backend": backend, "D": D}
    if DEVICE == "cpu":
        extra.update(threads=torch.get_num_threads(), load_1min=load, cpu_isa=_ext._C.cpu_isa())
    for provider, (med, low, rounds) in times.items():
        add_row(op="perturb_clip", size=size, provider=provider, median_s=med, min_s=low, rounds=rounds,
                nbytes=2 * x.numel() * x.element_size(), device=DEVICE, **extra)
