"""IPFM distillation losses: eager PyTorch as the SiD / EDM training loops write it, its
torch.compile, and every built fused backend; forward, backward and forward+backward.

Timing: the providers of one (op, dtype, size, mode) in interleaved rounds
(benchmarks/conftest.py ``time_providers``: each row keeps the median and the minimum); the
torch.compile provider in its own test (compile_mode=on, timed against eager in the same
rounds), which gpu_check.sh runs last with the other compiled variants.

bytes = inputs read + gradients written (the fused kernels' traffic):
    generator loss  forward 3BN, backward 3BN + 3BN (a, b, x all need a gradient)
    fake loss       forward 2BN, backward 2BN + BN  (x is detached)
"""

import contextlib
import functools

import pytest
import baselines
import torch
from conftest import HAS_CUDA, add_row, loadavg, set_baseline, time_providers

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


def _fused_providers():
    out = []
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


def _timed(loss_fn, mode, a, b, x, sigma, wrt):
    """The call to time: forward, backward (replaying one graph) or both."""
    if mode == "forward":
        return lambda: loss_fn(a, b, x, sigma)
    if mode == "backward":
        loss = loss_fn(a, b, x, sigma)
        return lambda: torch.autograd.grad(loss, wrt, retain_graph=True)
    return lambda: torch.autograd.grad(loss_fn(a, b, x, sigma), wrt)


# `benchmark` is requested so that --benchmark-only keeps this test; the timing is time_providers'
@pytest.mark.filterwarnings("ignore:Benchmark fixture was not used")
@pytest.mark.parametrize("compile_mode", ["off", "on"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("op", OPS)
def test_losses(benchmark, op, dtype, size, mode, compile_mode):
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
    names = ["eager"] + (["compile"] if compile_mode == "on" else _fused_providers())
    # "backward" replays one graph (retain_graph=True), which compiled graphs allow only
    # without donated buffers
    retain = compile_mode == "on" and mode == "backward"
    load = loadavg()
    with torch._functorch.config.patch(donated_buffer=False) if retain else contextlib.nullcontext():
        fns = {p: _timed(_loss_fn(op, p, mode), mode, a, b, x, sigma, wrt) for p in names}
        times = time_providers(fns, DEVICE)
    extra = {"threads": torch.get_num_threads(), "load_1min": load} if DEVICE == "cpu" else {}
    if compile_mode == "on":  # eager's row is the eager test's; here only the same-rounds ratio
        base_med, base_min, _ = times.pop("eager")
        med, low, _ = times["compile"]
        extra.update(same_rounds_speedup_vs_eager=base_med / med, same_rounds_speedup_min_vs_eager=base_min / low)
    for provider, (med, low, rounds) in times.items():
        add_row(op=op, size=f"{size},{str(dtype).replace('torch.', '')}", provider=provider, mode=mode,
                median_s=med, min_s=low, rounds=rounds, nbytes=_nbytes(op, mode, a.numel(), a.element_size()),
                device=DEVICE, **extra)
