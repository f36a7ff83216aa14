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

Timing: every provider of a (size, regime) in interleaved rounds (conftest.time_providers),
median and minimum; on a CPU also the CPU backend on each narrower instruction-set path
(``cpu-avx2``, ``cpu-generic``) in the same rounds. ``field_gemm`` times the CPU kernel's two
dense steps alone (the screen S = y x^T and the combine W x, every weight nonzero) against
torch.mm on the same shapes and threads, in the same rounds: speedup_vs_torch.mm is the
fraction of the BLAS speed they reach.
"""

import functools
import os

import baselines
import pytest
import torch

from conftest import HAS_CUDA, ROUNDS, add_row, loadavg, set_baseline, time_providers

import ipfm_fast as ipf
from ipfm_fast import _ext, backends
from ipfm_fast import reference as ref
from ipfm_fast.schedules import sample_sigma_train
from ipfm_fast.testing import cpu_isa, cpu_isa_paths

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
    if provider.startswith("cpu-"):
        def on_path():
            with cpu_isa(provider[4:]):
                return ipf.field_target(y, sigma, x, D, backend="cpu")
        return on_path
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


def providers(size):
    out = []
    for provider in PROVIDERS:
        if provider in ("cpu", "cuda", "triton") and backends.why_not(provider, DEVICE, torch.float32):
            continue
        if provider == "triton" and backends.triton_interpreter():
            continue  # the interpreter is not a speed measurement
        if provider == "fp32-eager-compiled" and not HAS_CUDA and size != SIZES[0]:
            continue  # compiled eager on CPU: target size only
        out.append(provider)
    if "cpu" in out:
        out += [f"cpu-{p}" for p in cpu_isa_paths()[1:]]
    return out


# `benchmark` is requested so that --benchmark-only keeps these tests; the timing is time_providers'
@pytest.mark.filterwarnings("ignore:Benchmark fixture was not used")
# compile_mode: the compiled eager provider runs in its own test (gpu_check.sh times compiled
# variants last, in their own stage), in rounds interleaved with fp32-eager
@pytest.mark.parametrize("compile_mode", ["off", "on"])
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_field_target(benchmark, size, regime, compile_mode):
    rows, m, n = size
    y, sigma, x, exact = inputs(size, regime)
    fns, errs = {}, {}
    names = [p for p in providers(size) if ("compile" in p) == (compile_mode == "on")]
    if compile_mode == "on":
        if not names:
            pytest.skip("compiled eager on CPU: target size only")
        names = ["fp32-eager"] + names
    for provider in names:
        fn = provider_fn(provider, y, sigma, x)
        try:
            out = fn()  # compiles / first-call work outside the timing, and the accuracy
        except Exception as err:  # e.g. inductor without a working C++ toolchain
            print(f"{provider}: skipped ({type(err).__name__}: {err})")
            continue
        fns[provider], errs[provider] = fn, rel_err(out, exact)
    load = loadavg()
    times = time_providers(fns, DEVICE, rounds=None)
    if compile_mode == "on":  # fp32-eager's row is the eager test's; here only the same-rounds ratio
        base_med, base_min, _ = times.pop("fp32-eager")
    for provider, (med, low, rounds) in times.items():
        extra = {"rel_err": errs[provider], "threads": torch.get_num_threads()}
        if compile_mode == "on":
            extra.update(same_rounds_speedup_vs_fp32_eager=base_med / med,
                         same_rounds_speedup_min_vs_fp32_eager=base_min / low)
        if DEVICE == "cpu":
            extra.update(scratch_MB=scratch_mb(provider.split("-")[0] if provider.startswith("cpu-") else provider,
                                               rows, m, n), load_1min=load)
            if provider.startswith("cpu"):
                extra["cpu_isa"] = provider[4:] or _ext._C.cpu_isa()
        add_row(op=OP, size=f"B={rows},M={m},N={n}", provider=provider, mode=f"forward {regime}", median_s=med,
                min_s=low, rounds=rounds, flops=4 * rows * m * n, device=DEVICE, **extra)
    for provider, err in errs.items():
        if provider.startswith(("cpu", "cuda", "triton")):
            assert err <= 1e-4, (provider, err)


GEMM_OP = "field_gemm"
set_baseline(GEMM_OP, "torch.mm")


@pytest.mark.filterwarnings("ignore:Benchmark fixture was not used")
@pytest.mark.skipif(DEVICE != "cpu" or _ext._C is None, reason="the CPU kernel's steps")
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_field_gemm(benchmark, size):
    """The screen (y x^T) and the combine (W x) of the CPU kernel against torch.mm, same rounds."""
    rows, m, n = size
    y, _, x, _ = inputs(size, "sigma=80")
    w = torch.softmax(torch.randn(rows, m, generator=torch.Generator().manual_seed(1)), 1)  # every weight nonzero
    threads = torch.get_num_threads()
    s_out, t_out = torch.empty(rows, m), torch.empty(rows, n)

    def step(which, path):
        a, ld, out, ldo = (y, n, s_out, m) if which == 0 else (w, m, t_out, n)

        def run():
            with cpu_isa(path):
                _ext._C.field_gemm_cpu(which, a.data_ptr(), ld, x.data_ptr(), n, out.data_ptr(), ldo, rows, m, n,
                                       threads)
        return run

    paths = cpu_isa_paths()
    for which, mode, mm in ((0, "screen y x^T", lambda: torch.mm(y, x.T)), (1, "combine W x", lambda: torch.mm(w, x))):
        fns = {"torch.mm": mm}
        fns.update({"cpu" if p == paths[0] else f"cpu-{p}": step(which, p) for p in paths})
        load = loadavg()
        times = time_providers(fns, DEVICE, rounds=max(ROUNDS, 30))  # ~1 ms each: more rounds
        want = mm()
        fns["cpu"]()
        got = s_out if which == 0 else t_out
        err = ((got.double() - want.double()).norm() / want.double().norm()).item()
        assert err < 1e-5, (mode, err)
        for provider, (med, low, rounds) in times.items():
            add_row(op=GEMM_OP, size=f"B={rows},M={m},N={n}", provider=provider, mode=mode, median_s=med, min_s=low,
                    rounds=rounds, flops=2 * rows * m * n, device=DEVICE, threads=threads, load_1min=load,
                    cpu_isa=(provider[4:] or paths[0]) if provider.startswith("cpu") else None)
