"""IPFM distillation losses: eager PyTorch as the SiD / EDM training loops write it, its
torch.compile, and every built fused backend; forward, backward and forward+backward.

bytes = inputs read + gradients written (the fused kernels' traffic):
    generator loss  forward 3BN, backward 3BN + 3BN (a, b, x all need a gradient)
    fake loss       forward 2BN, backward 2BN + BN  (x is detached)
"""

import contextlib
import functools
import os

import pytest
import baselines
import torch
from conftest import HAS_CUDA, set_baseline

import ipfm_fast as ipf
from ipfm_fast import backends

DEVICE = "cuda" if HAS_CUDA else "cpu"
SIZES = {"B=256,N=3*32*32": (256, 3, 32, 32), "B=64,N=3*64*64": (64, 3, 64, 64)}
MODES = ["forward", "backward", "forward+backward"]
DTYPES = [torch.float32] + ([torch.bfloat16] if HAS_CUDA else [])
OPS = ["ipfm_generator_loss", "ipfm_fake_loss"]
ALPHA = 1.2  # SiD's

for _op in OPS:
    set_baseline(_op, "eager")

# test_losses asks for pytest-benchmark's fixture (see there); on CUDA it stays unused
pytestmark = pytest.mark.filterwarnings("ignore:Benchmark fixture was not used")


def _eager(op):
    if op == "ipfm_generator_loss":
        return lambda a, b, x, sigma: baselines.ipfm_generator_loss_sid_style(a, b, x, alpha=ALPHA)
    return lambda a, b, x, sigma: baselines.ipfm_fake_loss_edm_style(b, x, sigma)


@functools.cache
def _compiled(op, retain_graph):
    # a fresh function object per key: its own dynamo cache (and compile settings)
    return torch.compile(_eager(op))


def _fused(op, backend):
    if op == "ipfm_generator_loss":
        return lambda a, b, x, sigma: ipf.ipfm_generator_loss(a, b, x, alpha=ALPHA, backend=backend)
    return lambda a, b, x, sigma: ipf.ipfm_fake_loss(b, x, sigma, backend=backend)


def _providers():
    out = ["eager", "compile"]
    for b in ("cuda", "triton", "cpu"):
        if backends.why_not(b, DEVICE, torch.float32) is None and not (b == "triton" and DEVICE == "cpu"):
            out.append(b)
    return out


def _loss_fn(op, provider, mode):
    if provider == "eager":
        return _eager(op)
    if provider == "compile":
        return _compiled(op, mode == "backward")
    return _fused(op, provider)


def _nbytes(op, mode, numel, itemsize):
    reads, grads = (3, 3) if op == "ipfm_generator_loss" else (2, 1)
    elems = {"forward": reads, "backward": reads + grads, "forward+backward": 2 * reads + grads}[mode]
    return elems * numel * itemsize


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", _providers())
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("op", OPS)
def test_losses(bench, benchmark, op, dtype, size, provider, mode):
    # `benchmark` is requested so that --benchmark-only keeps this test (the bench
    # fixture only asks for it lazily, which pytest-benchmark does not see)
    if provider == "compile" and DEVICE == "cpu" and os.environ.get("IPFM_BENCH_SKIP_COMPILE"):
        pytest.skip("IPFM_BENCH_SKIP_COMPILE is set")
    shape = SIZES[size]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    a = torch.randn(shape, device=DEVICE, generator=g).to(dtype)
    b = (a.float() + 0.3 * torch.randn(shape, device=DEVICE, generator=g)).to(dtype)
    x = (a.float() + torch.randn(shape, device=DEVICE, generator=g)).to(dtype)
    sigma = 0.002 + 80 * torch.rand(shape[0], device=DEVICE, generator=g) ** 7
    if op == "ipfm_generator_loss":
        a, b, x = (t.requires_grad_() for t in (a, b, x))
        wrt = [a, b, x]
    else:
        b.requires_grad_()
        wrt = [b]
    loss_fn = _loss_fn(op, provider, mode)
    # "backward" replays one graph (retain_graph=True), which compiled graphs allow only
    # without donated buffers
    retain = provider == "compile" and mode == "backward"
    with torch._functorch.config.patch(donated_buffer=False) if retain else contextlib.nullcontext():
        _run(bench, loss_fn, op, dtype, size, provider, mode, a, b, x, sigma, wrt)


def _run(bench, loss_fn, op, dtype, size, provider, mode, a, b, x, sigma, wrt):
    loss_fn(a, b, x, sigma)  # compile / first-call work outside the timing

    if mode == "forward":
        def fn():
            return loss_fn(a, b, x, sigma)
    elif mode == "backward":
        loss = loss_fn(a, b, x, sigma)

        def fn():
            return torch.autograd.grad(loss, wrt, retain_graph=True)
    else:
        def fn():
            return torch.autograd.grad(loss_fn(a, b, x, sigma), wrt)

    bench(fn, op=op, size=f"{size},{str(dtype).replace('torch.', '')}", provider=provider, mode=mode,
          nbytes=_nbytes(op, mode, a.numel(), a.element_size()), device=DEVICE)
