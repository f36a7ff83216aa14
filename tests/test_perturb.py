"""ipf.perturb / ipf.sample_prior: distribution, cross-backend randomness, autograd,
torch.library registration, layouts, dtypes and bad input, on every available backend."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

import ipfm_fast as ipf
from ipfm_fast import _ext, backends
from ipfm_fast.errors import InvalidInput, InvalidType
from ipfm_fast.ops import _launch
from ipfm_fast.ops.perturb import noise_from_gaussian

from conftest import DEVICES, HAS_CUDA, fused_backends

ALL = [(d, b) for d in DEVICES for b in fused_backends(d) + ["reference"]]
KS_P = 1e-3  # seeds are fixed, so a pass is reproducible; the threshold only guards power


def _radius_ratio(x, y, sigma, D):
    """||y - x||^2 / r^2 per row (r = sigma * sqrt(D)), or / sigma^2 for D = inf."""
    d2 = (y.double() - x.double()).reshape(x.shape[0], -1).square().sum(1)
    return (d2 / (sigma**2 * (1.0 if math.isinf(D) else D))).cpu().numpy()


# ---------------------------------------------------------------------------------------
# distribution
# ---------------------------------------------------------------------------------------


def _rows_for(backend):
    return 512 if backend == "triton" and backends.triton_interpreter() else 4000


@pytest.mark.parametrize("device,backend", ALL)
@pytest.mark.parametrize("D,n", [(1.0, 3), (1.0, 64), (128.0, 5), (128.0, 3072), (2048.0, 64)])
def test_radius_follows_beta_prime(device, backend, D, n):
    """R^2 / r^2 = chi2_N / chi2_D ~ BetaPrime(N/2, D/2), the PFGM++ radius law."""
    if backend == "triton" and backends.triton_interpreter() and n > 64:
        pytest.skip("interpreter: wide rows covered by the cpu/triton equality test")
    torch.manual_seed(1234)
    rows = _rows_for(backend)
    x = torch.randn(rows, n, device=device)
    sigma = 0.7
    y = ipf.perturb(x, sigma, D, backend=backend)
    ratio = _radius_ratio(x, y, sigma, D)
    assert stats.kstest(ratio, stats.betaprime(n / 2, D / 2).cdf).pvalue > KS_P


@pytest.mark.parametrize("device,backend", ALL)
@pytest.mark.parametrize("n", [2, 50])
def test_infinite_D_is_gaussian(device, backend, n):
    torch.manual_seed(99)
    x = torch.randn(_rows_for(backend), n, device=device)
    y = ipf.perturb(x, 2.5, math.inf, backend=backend)
    ratio = _radius_ratio(x, y, 2.5, math.inf)
    assert stats.kstest(ratio, stats.chi2(n).cdf).pvalue > KS_P
    z = ((y.double() - x.double()) / 2.5).flatten().cpu().numpy()
    assert stats.kstest(z, "norm").pvalue > KS_P


@pytest.mark.parametrize("device,backend", ALL)
@pytest.mark.parametrize("D", [1.0, 128.0])
def test_direction_is_uniform(device, backend, D):
    """(y - x)/|y - x| projected on a fixed unit vector v: (t + 1)/2 ~ Beta((N-1)/2, (N-1)/2)."""
    torch.manual_seed(7)
    n = 6
    x = torch.randn(_rows_for(backend), n, device=device)
    y = ipf.perturb(x, 1.3, D, backend=backend)
    u = (y.double() - x.double())
    u = u / u.norm(dim=1, keepdim=True)
    for seed in range(2):
        v = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device)
        t = (u @ (v / v.norm())).cpu().numpy()
        assert stats.kstest((t + 1) / 2, stats.beta((n - 1) / 2, (n - 1) / 2).cdf).pvalue > KS_P


@pytest.mark.parametrize("device,backend", ALL)
def test_prior_scale(device, backend):
    """sample_prior at sigma_max: E|y|^2 = sigma^2 N D / (D - 2)."""
    torch.manual_seed(3)
    rows, n, D, sigma = _rows_for(backend), 16, 128.0, 80.0
    y = ipf.sample_prior((rows, n), sigma, D, device=device, backend=backend)
    assert y.shape == (rows, n) and y.dtype == torch.float32
    ratio = _radius_ratio(torch.zeros_like(y), y, sigma, D)
    assert stats.kstest(ratio, stats.betaprime(n / 2, D / 2).cdf).pvalue > KS_P


# ---------------------------------------------------------------------------------------
# random numbers: Philox, cross-backend equality, determinism
# ---------------------------------------------------------------------------------------

# Known-answer vectors of Philox4x32-10 (Random123): (counter, key) -> output.
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.skipif(_ext._C is None, reason="extension not built")
@pytest.mark.parametrize("ctr,key,expected", PHILOX_KAT)
def test_philox_known_answers(ctr, key, expected):
    seed = key[0] | (key[1] << 32)
    assert tuple(_ext._C.philox4x32_10(*ctr, seed)) == expected


if backends.triton_import_error() is None:
    import triton
    import triton.language as tl
    from triton.language.random import philox

    @triton.jit
    def _philox_kat_kernel(ctr_ptr, out_ptr, seed):
        i = tl.arange(0, 4)
        z = tl.zeros([4], dtype=tl.uint32)
        c0 = z + tl.load(ctr_ptr + 0).to(tl.uint32)
        c1 = z + tl.load(ctr_ptr + 1).to(tl.uint32)
        c2 = z + tl.load(ctr_ptr + 2).to(tl.uint32)
        c3 = z + tl.load(ctr_ptr + 3).to(tl.uint32)
        r0, r1, r2, r3 = philox(seed, c0, c1, c2, c3)
        out = tl.where(i == 0, r0, tl.where(i == 1, r1, tl.where(i == 2, r2, r3)))
        tl.store(out_ptr + i, out.to(tl.int64))


@pytest.mark.skipif(backends.why_not("triton", "cpu", torch.float32) is not None, reason="no triton here")
def test_triton_philox_known_answers():
    """The Philox that tl.randn4x uses is the standard one (the C++ kernels mirror it)."""
    for ctr, key, expected in PHILOX_KAT:
        out = torch.empty(4, dtype=torch.int64)
        _philox_kat_kernel[(1,)](torch.tensor(ctr, dtype=torch.int64), out, key[0] | (key[1] << 32))
        assert tuple(out.tolist()) == expected


def _same_noise_case(device, backend, shape, D, sigma, dtype=torch.float32):
    x = torch.randn(shape, device=device).to(dtype)
    torch.manual_seed(2024)
    y, noise = ipf.perturb(x, sigma, D, backend=backend, return_noise=True)
    return y, noise


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 4103), (37, 9), (1, 1)])
@pytest.mark.parametrize("D", [1.0, 3.5, 128.0, 2048.0, math.inf])
def test_fused_backends_draw_the_same_noise(device, shape, D):
    names = fused_backends(device)
    if len(names) < 2:
        pytest.skip(f"one fused backend on {device}: {names}")
    torch.manual_seed(0)
    x = torch.randn(shape, device=device)
    sigma = torch.rand(shape[0], device=device) + 0.05
    results = {}
    for b in names:
        torch.manual_seed(2024)
        results[b] = ipf.perturb(x, sigma, D, backend=b, return_noise=True)
    first = names[0]
    for b in names[1:]:
        for got, want in zip(results[b], results[first]):
            # float rounding of log/sqrt/sin/cos differs between backends, nothing else
            torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("device,backend", ALL)
def test_same_seed_same_result(device, backend):
    x = torch.randn(5, 3, 11, device=device)
    torch.manual_seed(5)
    a = ipf.perturb(x, 0.3, 128.0, backend=backend)
    torch.manual_seed(5)
    b = ipf.perturb(x, 0.3, 128.0, backend=backend)
    g = torch.Generator(device=device).manual_seed(5)
    c = ipf.perturb(x, 0.3, 128.0, backend=backend, generator=g)
    d = ipf.perturb(x, 0.3, 128.0, backend=backend, generator=g)
    assert torch.equal(a, b)
    assert not torch.equal(c, d)  # the generator advanced
    g.manual_seed(5)
    assert torch.equal(c, ipf.perturb(x, 0.3, 128.0, backend=backend, generator=g))


@pytest.mark.skipif(_ext._C is None, reason="extension not built")
def test_chi2_scale_matches_noise():
    """The C++ chi-square draw is what the kernels apply: |noise|^2 / |g|^2 per row."""
    x = torch.randn(16, 8)
    seed = ipf.ops.perturb._launch.draw_seed(None, "cpu")
    y, noise = torch.ops.ipfm_fast.perturb(x, None, 1.0, 64.0, seed, True, 0.0, math.inf, "cpu")
    _, g = torch.ops.ipfm_fast.perturb(x, None, 1.0, math.inf, seed, True, 0.0, math.inf, "cpu")
    s = int(seed.item()) & (2**64 - 1)
    want = torch.tensor([_ext._C.chi2_scale(s, r, 32.0) for r in range(16)])
    torch.testing.assert_close(noise[:, 0] / g[:, 0], want, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------
# autograd and torch.library
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", ALL)
@pytest.mark.parametrize("return_noise", [False, True])
def test_gradients(device, backend, return_noise):
    x = torch.randn(4, 3, 5, device=device, requires_grad=True)
    sigma = (torch.rand(4, device=device) + 0.1).requires_grad_()
    out = ipf.perturb(x, sigma, 128.0, backend=backend, return_noise=return_noise)
    y = out[0] if return_noise else out
    w = torch.randn_like(y)
    (y * w).sum().backward()
    torch.testing.assert_close(x.grad, w)
    # dy/dsigma = (y - x) / sigma, summed against the upstream gradient
    want = (w.double() * (y.double() - x.double()) / sigma.double()[:, None, None]).sum((1, 2))
    torch.testing.assert_close(sigma.grad.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device,backend", ALL)
def test_prior_gradient(device, backend):
    sigma = (torch.rand(3, device=device) + 0.5).requires_grad_()
    y = ipf.sample_prior((3, 10), sigma, 64.0, device=device, backend=backend)
    y.sum().backward()
    torch.testing.assert_close(sigma.grad.double(), (y.double() / sigma.double()[:, None]).sum(1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device,backend", [(d, b) for d, b in ALL if b != "reference"])
def test_opcheck(device, backend):
    """The leaves (autograd is the Functions': test_gradients above, torch.compile below and
    test_op_shape.py)."""
    x = torch.randn(3, 2, 5, device=device)
    sigma = torch.rand(3, device=device) + 0.1
    seed = torch.tensor([123], dtype=torch.int64, device=device)
    inf = math.inf
    for args in [(x, sigma, 0.0, 128.0, seed, True, 0.0, inf, backend),
                 (x, None, 0.5, inf, seed, False, 0.0, inf, backend),
                 (x, sigma, 0.0, 4.0, seed, True, 0.5, 2.0, backend)]:  # the Beta clip
        torch.library.opcheck(torch.ops.ipfm_fast.perturb, args)
    g = torch.randn(3, 7, device=device)
    for args in [([3, 7], [7, 1], torch.float32, sigma, 0.0, 8.0, seed, None, 0.0, inf, backend),
                 ([3, 7], [7, 1], torch.float32, None, 0.5, 8.0, seed, g, 0.0, inf, backend),  # given gaussian
                 ([3, 7], [7, 1], torch.float32, sigma, 0.0, 8.0, seed, g, 0.2, 0.9, backend)]:
        torch.library.opcheck(torch.ops.ipfm_fast.perturb_noise, args)


@pytest.mark.skipif(_ext._C is None, reason="extension not built")
def test_torch_compile_fullgraph():
    def step(x, sigma):
        y = ipf.perturb(x, sigma, 128.0, backend="cpu")
        z = ipf.sample_prior(x.shape, 80.0, 128.0, backend="cpu")
        return (y * 2).sum() + z.mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 6, requires_grad=True)
    sigma = torch.full((4,), 0.5, requires_grad=True)
    out = compiled(x, sigma)
    out.backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))
    assert sigma.grad.shape == (4,) and torch.isfinite(sigma.grad).all()


# ---------------------------------------------------------------------------------------
# layouts, dtypes, shapes
# ---------------------------------------------------------------------------------------


def _layouts(device):
    base = torch.randn(6, 3, 5, 4, device=device)
    return {
        "contiguous": base,
        "channels_last": base.to(memory_format=torch.channels_last),
        "row_slice": torch.randn(12, 3, 5, 4, device=device)[::2],
        "inner_slice": torch.randn(6, 3, 5, 9, device=device)[..., :4],
        "transposed": torch.randn(6, 4, 5, 3, device=device).transpose(1, 3),
        "batch_not_outer": torch.randn(3, 6, 5, 4, device=device).transpose(0, 1),
    }


@pytest.mark.parametrize("device,backend", ALL)
@pytest.mark.parametrize("layout", list(_layouts("cpu")))
def test_layouts(device, backend, layout):
    x = _layouts(device)[layout]
    sigma = torch.rand(6, device=device) + 0.1
    y, noise = ipf.perturb(x, sigma, 32.0, backend=backend, return_noise=True)
    assert y.shape == x.shape and noise.shape == x.shape
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, x + sigma.view(-1, 1, 1, 1) * noise, rtol=1e-5, atol=1e-5)
    if backend != "reference" and layout in ("row_slice", "inner_slice"):
        # rows walked in logical order: same numbers as the contiguous copy
        torch.manual_seed(11)
        a = ipf.perturb(x, sigma, 32.0, backend=backend)
        torch.manual_seed(11)
        b = ipf.perturb(x.contiguous(), sigma, 32.0, backend=backend)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", ALL)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(device, backend, dtype):
    x = torch.randn(7, 33, device=device).to(dtype)
    y, noise = ipf.perturb(x, 0.25, 128.0, backend=backend, return_noise=True)
    assert y.dtype == dtype and noise.dtype == dtype
    want = x.float() + 0.25 * noise.float()
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(y.float(), want, rtol=2 * eps, atol=2 * eps)


@pytest.mark.parametrize("device", DEVICES)
def test_float64_goes_to_reference(device):
    x = torch.randn(4, 3, dtype=torch.float64, device=device)
    y = ipf.perturb(x, 0.5, 128.0)
    assert y.dtype == torch.float64
    with pytest.raises(ipf.BackendUnavailable, match="float64 not supported"):
        ipf.perturb(x, 0.5, 128.0, backend=fused_backends(device)[0])


@pytest.mark.parametrize("device,backend", ALL)
def test_empty_and_tiny(device, backend):
    for shape in [(0, 5), (0,), (3, 0), (1,), (5,), (1, 1, 1)]:
        x = torch.randn(shape, device=device)
        y = ipf.perturb(x, 1.0, 16.0, backend=backend)
        assert y.shape == x.shape and torch.isfinite(y).all()
    assert ipf.sample_prior((0, 3), 1.0, 16.0, device=device, backend=backend).shape == (0, 3)


@pytest.mark.parametrize("device,backend", ALL)
def test_infinite_D_is_exact(device, backend):
    """D = inf: y = x + sigma * g with no chi-square factor (noise is a plain normal)."""
    x = torch.randn(64, 40, device=device)
    y, noise = ipf.perturb(x, 0.5, math.inf, backend=backend, return_noise=True)
    torch.testing.assert_close(y, x + 0.5 * noise)
    if backend != "reference":
        torch.manual_seed(1)
        a = ipf.sample_prior((64, 40), 1.0, math.inf, device=device, backend=backend)
        torch.manual_seed(1)
        b = ipf.sample_prior((64, 40), 1.0, 1e30, device=device, backend=backend)
        torch.testing.assert_close(a, b)  # the D -> inf limit


# ---------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "reference"] + fused_backends("cpu"))
def test_bad_input(backend):
    x = torch.randn(4, 3)
    cases = [
        (dict(D=0.0), InvalidInput, "D must be > 0"),
        (dict(D=-1.0), InvalidInput, "D must be > 0"),
        (dict(D=float("nan")), InvalidInput, "D must be > 0"),
        (dict(D=torch.tensor(2.0)), InvalidType, "D must be a positive Python float"),
        (dict(sigma=0.0), InvalidInput, "sigma must be positive and finite"),
        (dict(sigma=float("inf")), InvalidInput, "sigma must be positive and finite"),
        (dict(sigma=torch.tensor([1.0, -1.0, 1.0, 1.0])), InvalidInput,
         "sigma must be positive and finite, got -1.0 in row 1"),
        (dict(sigma=torch.tensor([1.0, float("nan"), 1.0, 1.0])), InvalidInput, "sigma must be positive and finite"),
        (dict(sigma=torch.ones(3)), InvalidInput, r"sigma must be a float or a tensor of shape \[4\]"),
        (dict(sigma=torch.ones(4, 2)), InvalidInput, r"sigma must be a float or a tensor of shape \[4\]"),
        (dict(sigma=torch.ones(4, device="meta")), InvalidInput, "sigma is on meta"),
        (dict(sigma=torch.ones(4, dtype=torch.int64)), InvalidType, "sigma must be a floating-point tensor"),
        (dict(sigma="1"), InvalidType, "sigma must be a float or a tensor"),
        (dict(x=torch.ones(4, 3, dtype=torch.int32)), InvalidType, "x must be floating point"),
        (dict(x=torch.tensor(1.0)), InvalidInput, "leading batch dimension"),
        (dict(x=[1.0, 2.0]), InvalidType, "x must be a torch.Tensor"),
        (dict(generator="seed"), InvalidType, "generator must be a torch.Generator"),
    ]
    for change, error, match in cases:
        kwargs = dict(x=x, sigma=0.5, D=128.0, backend=backend)
        kwargs.update(change)
        with pytest.raises(error, match=match):
            ipf.perturb(kwargs.pop("x"), kwargs.pop("sigma"), kwargs.pop("D"), **kwargs)


@pytest.mark.skipif(_ext._C is None, reason="extension not built")
def test_bad_sigma_on_the_cpu_backend_is_invalid_input():
    x = torch.randn(4, 3)
    with pytest.raises(InvalidInput, match="sigma must be positive and finite, got nan in row 2") as caught:
        ipf.perturb(x, torch.tensor([1.0, 1.0, float("nan"), 1.0]), 8.0, backend="cpu")
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, ipf.errors.IpfmError)


def test_backend_errors_say_why():
    x = torch.randn(2, 3)
    with pytest.raises(ipf.BackendUnavailable, match="cuda: .*(serves CUDA tensors|built without CUDA)"):
        ipf.perturb(x, 1.0, 4.0, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        ipf.perturb(x, 1.0, 4.0, backend="numba")
    with pytest.raises(ValueError, match="shape must be"):
        ipf.sample_prior((), 1.0, 4.0)
    with pytest.raises(TypeError, match="dtype must be floating point"):
        ipf.sample_prior((2, 3), 1.0, 4.0, dtype=torch.int64)


@pytest.mark.gpu
def test_generator_on_another_device():
    x = torch.randn(2, 3, device="cuda")
    with pytest.raises(ValueError, match="generator is on cpu but the input is on cuda"):
        ipf.perturb(x, 1.0, 4.0, generator=torch.Generator())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_bad_sigma_on_gpu_makes_nan_rows(backend):
    if backends.why_not(backend, "cuda", torch.float32):
        pytest.skip(backends.why_not(backend, "cuda", torch.float32))
    x = torch.randn(3, 8, device="cuda")
    sigma = torch.tensor([1.0, -1.0, float("inf")], device="cuda")
    y = ipf.perturb(x, sigma, 16.0, backend=backend)
    assert torch.isfinite(y[0]).all() and torch.isnan(y[1:]).all()


@pytest.mark.gpu
def test_no_host_sync_on_gpu():
    x = torch.randn(64, 3, 8, 8, device="cuda")
    sigma = torch.rand(64, device="cuda") + 0.1
    ipf.perturb(x, sigma, 128.0)  # warm up (kernel load, Triton compile)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for b in fused_backends("cuda"):
            ipf.perturb(x, sigma, 128.0, backend=b)
            ipf.sample_prior(x.shape, 80.0, 128.0, device="cuda", backend=b)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_large_rows_on_gpu_match_distribution():
    torch.manual_seed(0)
    x = torch.zeros(2048, 3 * 64 * 64, device="cuda")
    for b in fused_backends("cuda"):
        y = ipf.perturb(x, 1.0, 128.0, backend=b)
        ratio = _radius_ratio(x, y, 1.0, 128.0)
        assert stats.kstest(ratio, stats.betaprime(x.shape[1] / 2, 64.0).cdf).pvalue > KS_P


# ---------------------------------------------------------------------------------------
# opt-in variants: the Beta clip (clip_beta) and a given gaussian (noise_from_gaussian)
# ---------------------------------------------------------------------------------------

CLIP = (1e-3, 1 - 1e-3)  # pfgmpp's and the IPFM authors' clip of B ~ Beta(N/2, D/2)


def _beta(noise, D):
    """B = t / (1 + t) per row, t = |noise|^2 / D = |g|^2 / W (the recipe's Beta draw)."""
    t = noise.double().reshape(noise.shape[0], -1).square().sum(1) / D
    return (t / (1 + t)).cpu().numpy()


def _check_clipped_beta(b, n, D, lo, hi):
    """b: clipped Beta(N/2, D/2) draws. The mass at each bound is binomial with the Beta's
    tail probability; the values strictly inside follow the Beta truncated to (lo, hi)."""
    law = stats.beta(n / 2, D / 2)
    at_lo = np.isclose(b, lo, rtol=1e-5, atol=0) & (lo > 0)  # a bound at 0 or 1 is no clip
    at_hi = np.isclose(b, hi, rtol=1e-5, atol=0) & (hi < 1)
    assert b.min() >= lo * (1 - 1e-5) and b.max() <= hi * (1 + 1e-5)
    assert stats.binomtest(int(at_lo.sum()), len(b), law.cdf(lo)).pvalue > KS_P
    assert stats.binomtest(int(at_hi.sum()), len(b), law.sf(hi)).pvalue > KS_P
    inner = b[~at_lo & ~at_hi]
    f_lo, f_hi = law.cdf(lo), law.cdf(hi)
    if len(inner) > 20:
        assert stats.kstest(inner, lambda v: (law.cdf(v) - f_lo) / (f_hi - f_lo)).pvalue > KS_P
    return at_lo.mean(), at_hi.mean()


@pytest.mark.parametrize("device,backend", ALL)
@pytest.mark.parametrize("D,n,clip", [(4.0, 3072, CLIP), (128.0, 64, (0.2, 0.45)), (1.0, 5, (0.3, 0.95)),
                                      (4.0, 3072, (0.0, 1.0))])
def test_clipped_radius_follows_the_clipped_beta(device, backend, D, n, clip):
    """With clip_beta the law is the recipe's clipped one: at N = 3072, D = 4 the clip at
    1 - 1e-3 binds for about 46% of rows; (0, 1) is no clip at all."""
    rows = _rows_for(backend)
    x = torch.randn(rows, n, device=device)
    torch.manual_seed(4321)
    y, noise = ipf.perturb(x, 0.6, D, clip_beta=clip, return_noise=True, backend=backend)
    torch.testing.assert_close(y, x + 0.6 * noise, rtol=1e-5, atol=1e-5)
    frac_lo, frac_hi = _check_clipped_beta(_beta(noise, D), n, D, *clip)
    if (D, n, clip) == (4.0, 3072, CLIP):
        assert 0.38 < frac_hi < 0.54 and frac_lo == 0
    if clip == (0.0, 1.0):
        torch.manual_seed(4321)
        assert torch.equal(y, ipf.perturb(x, 0.6, D, backend=backend))  # the unclipped path


@pytest.mark.parametrize("device,backend", ALL)
def test_clipped_direction_is_uniform(device, backend):
    torch.manual_seed(8)
    n = 6
    x = torch.randn(_rows_for(backend), n, device=device)
    u = ipf.perturb(x, 1.0, 3.0, clip_beta=(0.3, 0.6), backend=backend).double() - x.double()
    u = u / u.norm(dim=1, keepdim=True)
    t = u[:, 0].cpu().numpy()  # one coordinate of a uniform direction
    assert stats.kstest((t + 1) / 2, stats.beta((n - 1) / 2, (n - 1) / 2).cdf).pvalue > KS_P


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 4103), (37, 9), (1, 1)])
@pytest.mark.parametrize("D", [1.0, 128.0])
def test_fused_backends_clip_the_same(device, shape, D):
    names = fused_backends(device)
    if len(names) < 2:
        pytest.skip(f"one fused backend on {device}: {names}")
    x = torch.randn(shape, device=device)
    sigma = torch.rand(shape[0], device=device) + 0.05
    results = {}
    for b in names:
        torch.manual_seed(77)
        results[b] = ipf.perturb(x, sigma, D, clip_beta=(0.2, 0.5), backend=b, return_noise=True)
    for b in names[1:]:
        for got, want in zip(results[b], results[names[0]]):
            torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.skipif(_ext._C is None, reason="extension not built")
@pytest.mark.parametrize("shape", [(1, 3, 256, 256), (3, 3, 64, 65), (4, 9)])
def test_cpu_clip_does_not_depend_on_the_thread_count(shape):
    """One or two threads, and whole rows per thread or the (row, chunk) pre-pass: the
    same floats summed in the same order."""
    x = torch.randn(shape)
    old = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            torch.manual_seed(3)
            outs.append(ipf.perturb(x, 0.9, 128.0, clip_beta=CLIP, return_noise=True, backend="cpu"))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device,backend", ALL)
def test_clipped_gradients(device, backend):
    """The clip factor does not depend on sigma: dy/dsigma = (y - x) / sigma still."""
    x = torch.randn(5, 3, 7, device=device, requires_grad=True)
    sigma = (torch.rand(5, device=device) + 0.1).requires_grad_()
    torch.manual_seed(12)
    y = ipf.perturb(x, sigma, 2.0, clip_beta=(0.3, 0.6), backend=backend)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    torch.testing.assert_close(x.grad, w)
    want = (w.double() * (y.double() - x.double()) / sigma.double()[:, None, None]).sum((1, 2))
    torch.testing.assert_close(sigma.grad.double(), want, rtol=1e-4, atol=1e-5)
    b = _beta((y - x).detach() / sigma.detach()[:, None, None], 2.0)
    assert (b > 0.3 - 1e-5).all() and (b < 0.6 + 1e-5).all()


@pytest.mark.parametrize("device,backend", ALL)
def test_clipped_prior(device, backend):
    torch.manual_seed(21)
    y = ipf.sample_prior((_rows_for(backend), 3072), 80.0, 4.0, device=device, clip_beta=CLIP, backend=backend)
    _check_clipped_beta(_beta(y / 80.0, 4.0), 3072, 4.0, *CLIP)


@pytest.mark.parametrize("device,backend", ALL)
@pytest.mark.parametrize("clip", [None, (0.3, 0.7)])
def test_noise_from_gaussian(device, backend, clip):
    """sigma * g * sqrt(D / W): one factor per row (the direction is g's), a pure function of
    g and the generator; D = inf is exactly sigma * g."""
    g = torch.randn(_rows_for(backend), 10, device=device)
    sigma = torch.rand(g.shape[0], device=device) + 0.2
    gen = torch.Generator(device=device).manual_seed(9)
    noise = noise_from_gaussian(g, sigma, 6.0, generator=gen, clip_beta=clip, backend=backend)
    gen.manual_seed(9)
    assert torch.equal(noise, noise_from_gaussian(g, sigma, 6.0, generator=gen, clip_beta=clip, backend=backend))
    factor = noise.double() / g.double()
    torch.testing.assert_close(factor, factor[:, :1].expand_as(factor), rtol=1e-5, atol=0)
    b = _beta(noise / sigma[:, None], 6.0)
    if clip is None:  # |g|^2 ~ chi2_N: the radius law of the kernel
        assert stats.kstest(b, stats.beta(5.0, 3.0).cdf).pvalue > KS_P
    else:
        _check_clipped_beta(b, 10, 6.0, *clip)
    assert torch.equal(noise_from_gaussian(g, sigma, math.inf, backend=backend), g * sigma[:, None])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("clip", [None, (0.2, 0.5)])
def test_fused_backends_scale_a_given_gaussian_the_same(device, clip):
    names = fused_backends(device)
    if len(names) < 2:
        pytest.skip(f"one fused backend on {device}: {names}")
    g = torch.randn(6, 3, 5, 7, device=device).to(memory_format=torch.channels_last)
    outs = {}
    for b in names:
        torch.manual_seed(5)
        outs[b] = noise_from_gaussian(g, 0.7, 16.0, clip_beta=clip, backend=b)
    for b in names[1:]:
        torch.testing.assert_close(outs[b], outs[names[0]], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("device,backend", ALL)
def test_noise_from_gaussian_gradient_and_layouts(device, backend):
    g = torch.randn(12, 3, 5, 4, device=device)[::2]  # sliced rows
    sigma = (torch.rand(6, device=device) + 0.5).requires_grad_()
    noise = noise_from_gaussian(g, sigma, 32.0, clip_beta=(0.1, 0.5), backend=backend)
    assert noise.shape == g.shape
    noise.sum().backward()
    want = (noise.double() / sigma.double()[:, None, None, None]).sum((1, 2, 3))
    torch.testing.assert_close(sigma.grad.double(), want, rtol=1e-4, atol=1e-5)
    half = noise_from_gaussian(g.to(torch.bfloat16), 0.5, 32.0, backend=backend)
    assert half.dtype == torch.bfloat16 and half.shape == g.shape


@pytest.mark.skipif(backends.why_not("triton", "cpu", torch.float32) is not None or not backends.triton_interpreter(),
                    reason="runs the Triton interpreter on CPU tensors")
@pytest.mark.skipif(_ext._C is None, reason="extension not built")
@pytest.mark.parametrize("shape", [(4, 3000), (300, 9), (1, 1), (2, 5000)])
def test_clip_and_given_gaussian_gpu_tiles(shape):
    """The GPU tile sizes (several programs per row: the row's partial sums read by every
    program of the row; several rows per program) give the cpu backend's numbers."""
    x = torch.randn(shape)
    sigma = torch.rand(shape[0]) + 0.1
    assert perturb_op_tiles(shape, gpu=True) != perturb_op_tiles(shape, gpu=False) or shape == (1, 1)
    torch.manual_seed(7)
    want = ipf.perturb(x, sigma, 4.0, clip_beta=CLIP, return_noise=True, backend="cpu")
    torch.manual_seed(7)
    with _launch.gpu_tiles(True):
        got = ipf.perturb(x, sigma, 4.0, clip_beta=CLIP, return_noise=True, backend="triton")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
    torch.manual_seed(8)
    want = noise_from_gaussian(x, sigma, 4.0, clip_beta=(0.99, 0.9995), backend="cpu")
    torch.manual_seed(8)
    with _launch.gpu_tiles(True):
        got = noise_from_gaussian(x, sigma, 4.0, clip_beta=(0.99, 0.9995), backend="triton")
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def perturb_op_tiles(shape, gpu):
    from ipfm_fast.ops.perturb import triton_tiles

    return triton_tiles(shape[0], math.prod(shape[1:]), gpu=gpu)


@pytest.mark.parametrize("backend", ["auto", "reference"] + fused_backends("cpu"))
def test_bad_clip_and_gaussian(backend):
    x = torch.randn(4, 3)
    for clip, error, match in [
        ((0.5, 0.2), InvalidInput, "0 <= lo < hi <= 1"),
        ((-0.1, 0.5), InvalidInput, "0 <= lo < hi <= 1"),
        ((0.1, 1.5), InvalidInput, "0 <= lo < hi <= 1"),
        ((0.1, float("nan")), InvalidInput, "clip_beta must be finite"),
        (0.5, InvalidType, "clip_beta must be None or a pair"),
        ((0.1, 0.2, 0.3), InvalidType, "clip_beta must be None or a pair"),
        ("ab", InvalidType, "clip_beta must be None or a pair"),
    ]:
        with pytest.raises(error, match=match):
            ipf.perturb(x, 0.5, 8.0, clip_beta=clip, backend=backend)
    with pytest.raises(InvalidInput, match="clip_beta needs a finite D"):
        ipf.perturb(x, 0.5, math.inf, clip_beta=CLIP, backend=backend)
    with pytest.raises(InvalidInput, match="clip_beta needs a finite D"):
        ipf.sample_prior((4, 3), 0.5, math.inf, clip_beta=CLIP, backend=backend)
    with pytest.raises(InvalidInput, match="g requires grad"):
        noise_from_gaussian(x.requires_grad_(), 0.5, 8.0, backend=backend)
    with pytest.raises(InvalidType, match="g must be floating point"):
        noise_from_gaussian(torch.ones(4, 3, dtype=torch.int64), 0.5, 8.0, backend=backend)
    with pytest.raises(InvalidInput, match=r"sigma must be a float or a tensor of shape \[4\]"):
        noise_from_gaussian(torch.randn(4, 3), torch.ones(3), 8.0, backend=backend)


def test_sigma_r_conversions():
    assert ipf.sigma_to_r(2.0, 16.0) == 8.0
    assert ipf.r_to_sigma(8.0, 16.0) == 2.0
    with pytest.raises(ValueError, match="infinite"):
        ipf.sigma_to_r(1.0, math.inf)
    np.testing.assert_allclose(ipf.sigma_to_r(torch.tensor([1.0, 2.0]), 4.0).numpy(), [2.0, 4.0])
