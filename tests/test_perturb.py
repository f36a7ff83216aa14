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
    y, noise = torch.ops.ipfm_fast.perturb(x, None, 1.0, 64.0, seed, True, "cpu")
    _, g = torch.ops.ipfm_fast.perturb(x, None, 1.0, math.inf, seed, True, "cpu")
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
    for args in [(x, sigma, 0.0, 128.0, seed, True, backend), (x, None, 0.5, math.inf, seed, False, backend)]:
        torch.library.opcheck(torch.ops.ipfm_fast.perturb, args)
    torch.library.opcheck(torch.ops.ipfm_fast.perturb_noise, ([3, 7], [7, 1], torch.float32, sigma, 0.0, 8.0, seed, backend))


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


def test_sigma_r_conversions():
    assert ipf.sigma_to_r(2.0, 16.0) == 8.0
    assert ipf.r_to_sigma(8.0, 16.0) == 2.0
    with pytest.raises(ValueError, match="infinite"):
        ipf.sigma_to_r(1.0, math.inf)
    np.testing.assert_allclose(ipf.sigma_to_r(torch.tensor([1.0, 2.0]), 4.0).numpy(), [2.0, 4.0])
