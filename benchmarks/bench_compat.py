"""ipfm_fast.compat at the call sites it replaces: each original restated as it is
(benchmarks/baselines.py: pfgmpp's host Beta draw and CPU Gaussian, its float64
[B, M, N + 1] reference-batch target, SiD / IPFM losses with their ``nan_mask.any()`` host
sync, generate.py's per-seed prior) against its drop-in, at the codebases' sizes
(CIFAR-10 B = 64..256, FFHQ-64 B = 64).

Timing: the original and the drop-in run in interleaved rounds (ABAB..., the order flipped
every round) so that a busy machine slows both alike; each row keeps the median and the
minimum over the rounds (``IPFM_BENCH_ROUNDS``, default 10), wall clock around a CUDA
synchronize on a GPU (the originals' host syncs are part of what is measured). The
networks are a per-channel affine map, the same on both sides, so the time is the call
site's own. On a CPU both sides run on ``IPFM_BENCH_COMPAT_THREADS`` threads (default 1:
on the development machines' two cores, shared with other jobs, two OpenMP threads stall at
every barrier and the rounds measure the neighbours). ``scripts/update_readme.py`` puts the
table into docs/compat.md.
"""

import math
import os
import statistics

import numpy as np
import pytest
import torch

import baselines
from conftest import HAS_CUDA, _rows, interleaved, set_baseline

import ipfm_fast as ipf
from ipfm_fast import backends
from ipfm_fast.compat import CLIP_BETA, pfgmpp, sid

DEVICE = "cuda" if HAS_CUDA else "cpu"
ROUNDS = int(os.environ.get("IPFM_BENCH_ROUNDS", 10))
SIZES = {"cifar10 B=64": (64, 3, 32, 32), "cifar10 B=128": (128, 3, 32, 32), "cifar10 B=256": (256, 3, 32, 32),
         "ffhq64 B=64": (64, 3, 64, 64)}
D = 128
OPS = ["compat_pfgmpp_perturb", "compat_sample_noise", "compat_pfgmpp_target", "compat_pfgmpp_edm_loss",
       "compat_sid_generator_loss", "compat_sid_fake_loss", "compat_rand_beta_prime"]
for _op in OPS:
    set_baseline(_op, "original")

# `benchmark` is requested so that --benchmark-only keeps these tests; the timing is our own
pytestmark = pytest.mark.filterwarnings("ignore:Benchmark fixture was not used")
THREADS = None if HAS_CUDA else int(os.environ.get("IPFM_BENCH_COMPAT_THREADS", 1))


@pytest.fixture(autouse=True)
def _threads():
    """CPU threads of both sides (the fused kernels use torch's count) during each test only."""
    if THREADS is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(old)


class AffineNet(torch.nn.Module):
    """net(x, sigma, labels, augment_labels=None): a per-channel affine map (cheap, so that the
    call site's own cost is what is measured; gradients flow to x and the parameters)."""

    def __init__(self, channels, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.scale = torch.nn.Parameter(1 + 0.1 * torch.randn(1, channels, 1, 1, generator=g))
        self.shift = torch.nn.Parameter(0.1 * torch.randn(1, channels, 1, 1, generator=g))

    def forward(self, x, sigma, labels=None, augment_labels=None):
        return x * self.scale + self.shift


def record(op, size, mode, times, **extra):
    """One row per provider (median and min over the rounds); the drop-in's row also gets
    its speedups over the original by both statistics."""
    base = times["original"]
    for provider, ts in times.items():
        row = {"op": op, "size": size, "provider": provider, "mode": mode, "median_ms": 1e3 * statistics.median(ts),
               "min_ms": 1e3 * min(ts), "rounds": len(ts), **extra}
        if THREADS is not None:
            row["threads"] = THREADS
        if provider != "original":
            row["speedup_median"] = statistics.median(base) / statistics.median(ts)
            row["speedup_min"] = min(base) / min(ts)
        _rows[op].append(row)


def _fused():
    return backends.resolve("compat", "auto", torch.device(DEVICE), torch.float32)


def _images(shape, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) * 2 - 1).to(DEVICE).requires_grad_(requires_grad)


@pytest.mark.parametrize("size", list(SIZES))
def test_compat_perturbation(benchmark, size):
    """pfgmpp EDMLoss's perturbation (pfgmpp=True): host Beta + CPU Gaussian + copy vs
    ipf.perturb with the same clip; and pfgmpp-idmd's sample_noise vs its drop-in."""
    shape = SIZES[size]
    rows, n = shape[0], math.prod(shape[1:])
    images = _images(shape)
    sigma = (torch.randn(rows, device=DEVICE) * 1.2 - 1.2).exp()
    np.random.seed(0)
    times = interleaved({
        "original": lambda: baselines.pfgmpp_perturbation(images, sigma, n, D),
        "ipfm_fast.compat": lambda: ipf.perturb(images, sigma, float(D), clip_beta=CLIP_BETA),  # y + n
    })
    record("compat_pfgmpp_perturb", size, f"forward D={D}", times, backend=_fused(), N=n)
    latents = torch.randn(shape, device=DEVICE)
    sigma4 = sigma.reshape(rows, 1, 1, 1)
    times = interleaved({
        "original": lambda: baselines.sample_noise_idmd(latents, sigma4, D),
        "ipfm_fast.compat": lambda: sid.sample_noise(latents=latents, sigma=sigma4, D=D),
    })
    record("compat_sample_noise", size, f"forward D={D}", times, backend=_fused(), N=n)


def _ref_batch(rows, n):
    """The largest of pfgmpp's reference batches (4096 = its --rbatch default, then halves)
    whose float64 original fits: its peak is two [B, M, N + 1] float64 tensors, kept within 40%
    of the free memory."""
    if HAS_CUDA:
        free = torch.cuda.mem_get_info()[0]
    else:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    for m in (4096, 2048, 1024, 512):
        if 2 * rows * m * (n + 1) * 8 <= 0.4 * free:
            return m
    return 256


@pytest.mark.parametrize("size", ["cifar10 B=64"])
def test_compat_reference_batch_target(benchmark, size):
    """pfgmpp_target (D = 128) and stf_scores (D = inf) on a reference batch: the float64
    [B, M, N + 1] original against ipf.field_target (O(B M) scratch)."""
    shape = SIZES[size]
    rows, n = shape[0], math.prod(shape[1:])
    m = _ref_batch(rows, n)
    x = _images((m, *shape[1:]), seed=1)
    sigma = (torch.randn(rows, device=DEVICE) * 1.2 - 1.2).exp()
    y = x[:rows] + sigma.reshape(-1, 1, 1, 1) * torch.randn(shape, device=DEVICE)
    loss_fn = pfgmpp.EDMLoss(D=D, N=n)
    r = sigma.double() * np.sqrt(D)
    rounds = ROUNDS if HAS_CUDA else min(ROUNDS, 3)  # the CPU original takes seconds per call
    peak_mb = 2 * rows * m * (n + 1) * 8 / 2**20
    times = interleaved({"original": lambda: baselines.pfgmpp_target_float64(r, y, x, n, D),
                         "ipfm_fast.compat": lambda: loss_fn.pfgmpp_target(r, y, x)}, rounds, warmup=1)
    record("compat_pfgmpp_target", f"{size} M={m}", f"pfgmpp_target D={D}", times, backend=_fused(),
           original_scratch_MB=peak_mb, compat_scratch_MB=rows * m * 4 / 2**20)
    times = interleaved({"original": lambda: baselines.stf_scores_float64(sigma, y, x),
                         "ipfm_fast.compat": lambda: loss_fn.stf_scores(sigma, y, x)}, rounds, warmup=1)
    record("compat_pfgmpp_target", f"{size} M={m}", "stf_scores D=inf", times, backend=_fused(),
           original_scratch_MB=peak_mb / 2, compat_scratch_MB=rows * m * 4 / 2**20)


def _backward(loss, rows):
    loss.sum().mul(1.0 / rows).backward()  # the training loops' reduction


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("Dname", ["inf", str(D)])
def test_compat_sid_losses(benchmark, size, Dname):
    """training/sid_loss.py: the generator loss (sid with SiD's alpha = 1.2 at D = inf; idmd at
    finite D) and the fake loss, forward + backward, the images requiring grad (they are the
    generator's output in both loops)."""
    shape = SIZES[size]
    rows = shape[0]
    Dv = "inf" if Dname == "inf" else int(Dname)
    mode = "sid" if Dname == "inf" else "idmd"
    images = _images(shape, requires_grad=True)
    a, b = AffineNet(shape[1], 1).to(DEVICE), AffineNet(shape[1], 2).to(DEVICE)
    original, compat = baselines.SidLossOriginal(sid_or_idmd=mode), sid.SID_EDMLoss(sid_or_idmd=mode)
    times = interleaved({
        "original": lambda: _backward(original.generator_loss(a, b, images, alpha=1.2, D=Dv), rows),
        "ipfm_fast.compat": lambda: _backward(compat.generator_loss(a, b, images, alpha=1.2, D=Dv), rows),
    })
    record("compat_sid_generator_loss", size, f"forward+backward {mode} D={Dname}", times, backend=_fused())
    times = interleaved({
        "original": lambda: _backward(original(b, images, D=Dv), rows),
        "ipfm_fast.compat": lambda: _backward(compat(b, images, D=Dv), rows),
    })
    record("compat_sid_fake_loss", size, f"forward+backward D={Dname}", times, backend=_fused())


@pytest.mark.parametrize("size", list(SIZES))
def test_compat_pfgmpp_edm_loss(benchmark, size):
    """pfgmpp EDMLoss.__call__(pfgmpp=True) forward + backward (no STF: its target is timed
    above), with its host Beta draw and CPU Gaussian."""
    shape = SIZES[size]
    rows, n = shape[0], math.prod(shape[1:])
    images = _images(shape)
    net = AffineNet(shape[1], 3).to(DEVICE)
    compat = pfgmpp.EDMLoss(D=D, N=n)
    np.random.seed(0)
    times = interleaved({
        "original": lambda: _backward(baselines.pfgmpp_edm_loss(net, images, N=n, D=D), rows),
        "ipfm_fast.compat": lambda: _backward(compat(net, images, pfgmpp=True), rows),
    })
    record("compat_pfgmpp_edm_loss", size, f"forward+backward D={D}", times, backend=_fused())


@pytest.mark.parametrize("size", ["cifar10 B=64", "ffhq64 B=64"])
def test_compat_rand_beta_prime(benchmark, size):
    """generate.py's prior for a batch of seeds: per seed a global reseed, a CPU Beta draw and a
    CPU Gaussian (original) vs one fused draw per seed on the device."""
    shape = SIZES[size]
    n = math.prod(shape[1:])
    seeds = list(range(shape[0]))
    times = interleaved({
        "original": lambda: baselines.rand_beta_prime_seeded(list(shape), n, D, seeds, DEVICE),
        "ipfm_fast.compat": lambda: pfgmpp.rand_beta_prime(list(shape), N=n, D=D, seeds=seeds, device=DEVICE),
    })
    record("compat_rand_beta_prime", size, f"forward D={D}", times, backend=_fused())
