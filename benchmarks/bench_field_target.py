"""field_target: time, TFLOP/s (4 B M N flops: two B x M x N products), memory and accuracy
of every provider side by side.

Providers: ``float64-pfgmpp`` (the public reference codes' recipe in float64, baseline),
``fp32-eager`` (cdist + log + logsumexp/softmax + matmul), ``fp32-eager-compiled``
(torch.compile of it), and each built fused backend (Triton only on a GPU: the interpreter
is not a speed measurement). Inputs as in training: x_ref uniform in [-1, 1] (image-like),
the minibatch's own sources are its first B rows, y their PFGM++ perturbation (D = 128), and
sigma either per row from the teacher-training schedule (ln sigma ~ N(-1.2, 1.2^2): mostly
concentrated posteriors) or 80 for every row (dense posteriors: the hard case for the
selection, every weight is nonzero).

``rel_err`` is max_i ||t_i - t64_i|| / ||t64_i|| against the exact float64 reference.
``scratch_MB`` on the CPU is the size of what each provider materializes beyond its inputs
and output (a model, not a measurement; the CPU allocator keeps no peak statistics); on CUDA
``peak_memory_mb`` is torch.cuda.max_memory_allocated.
"""

import functools
import os

import baselines
import pytest
import torch

from conftest import HAS_CUDA, set_baseline

import ipfm_fast as ipf
from ipfm_fast import backends
from ipfm_fast import reference as ref
from ipfm_fast.schedules import sample_sigma_train

OP = "field_target"
D = 128.0
DEVICE = "cuda" if HAS_CUDA else "cpu"
if HAS_CUDA:
    SIZES = [(256, 1024, 3072), (256, 4096, 3072), (64, 1024, 12288)]
else:
    SIZES = [(128, 512, 3072)] + ([(64, 1024, 12288)] if os.environ.get("IPFM_BENCH_LARGE") else [])
REGIMES = ["sigma~train", "sigma=80"]
PROVIDERS = ["float64-pfgmpp", "fp32-eager", "fp32-eager-compiled", "cpu", "cuda", "triton"]

set_baseline(OP, "float64-pfgmpp")


@functools.lru_cache(maxsize=None)
def inputs(size, regime):
    rows, m, n = size
    g = torch.Generator().manual_seed(0)
    x = torch.rand(m, n, generator=g) * 2 - 1
    if regime == "sigma=80":
        sigma = torch.full((rows,), 80.0)
    else:
        sigma = sample_sigma_train(rows, generator=g)
    y = ref.perturb(x[:rows], sigma, D, generator=g)
    exact = ref.field_target(y.double(), sigma.double(), x.double(), D)
    return y.to(DEVICE), sigma.to(DEVICE), x.to(DEVICE), exact


def rel_err(t, exact):
    a = t.detach().double().cpu().reshape(t.shape[0], -1)
    b = exact.reshape(exact.shape[0], -1)
    return ((a - b).norm(dim=1) / b.norm(dim=1)).max().item()


_compiled = {}


def provider_fn(provider, y, sigma, x):
    if provider == "float64-pfgmpp":
        return lambda: baselines.field_target_pfgmpp_style(y, sigma, x, D)
    if provider == "fp32-eager":
        return lambda: baselines.field_target_eager(y, sigma, x, D)
    if provider == "fp32-eager-compiled":
        if "fn" not in _compiled:
            _compiled["fn"] = torch.compile(baselines.field_target_eager, dynamic=False)
        return lambda: _compiled["fn"](y, sigma, x, D)
    return lambda: ipf.field_target(y, sigma, x, D, backend=provider)


def scratch_mb(provider, rows, m, n):
    """What each provider materializes beyond inputs and output (model)."""
    bm = rows * m
    if provider == "float64-pfgmpp":
        chunk = max(1, 2**28 // (m * (n + 1) * 8))
        return (2 * min(rows, chunk) * m * (n + 1) * 8 + 6 * bm * 8 + rows * n * 8 * 2 + m * (n + 1) * 8) / 2**20
    if provider.startswith("fp32-eager"):
        return 6 * bm * 4 / 2**20  # cdist, square, log, logits, softmax, ...
    return (bm * 4 + (rows + m) * 8) / 2**20  # the [B, M] weights + fp64 norms


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_field_target(bench, benchmark, provider, size, regime):  # benchmark: keeps --benchmark-only from skipping
    if provider in ("cpu", "cuda", "triton"):
        reason = backends.why_not(provider, DEVICE, torch.float32)
        if reason:
            pytest.skip(reason)
        if provider == "triton" and backends.triton_interpreter():
            pytest.skip("triton: interpreter, not a speed measurement")
    if provider == "fp32-eager-compiled" and not HAS_CUDA and size != SIZES[0]:
        pytest.skip("compiled eager on CPU: target size only")
    rows, m, n = size
    y, sigma, x, exact = inputs(size, regime)
    fn = provider_fn(provider, y, sigma, x)
    try:
        out = fn()
    except Exception as err:  # e.g. inductor without a working C++ toolchain
        pytest.skip(f"{provider}: {type(err).__name__}: {err}")
    err = rel_err(out, exact)
    extra = {"rel_err": err, "threads": torch.get_num_threads()}
    if DEVICE == "cpu":
        extra["scratch_MB"] = scratch_mb(provider, rows, m, n)
    bench(fn, op=OP, size=f"B={rows},M={m},N={n}", provider=provider, mode=f"forward {regime}",
          flops=4 * rows * m * n, device=DEVICE, **extra)
    if provider in ("cpu", "cuda", "triton"):
        assert err <= 1e-4, err
