"""Property tests (hypothesis): every backend against the spec over generated inputs, for
values and gradients.

Generated: shapes (1 row, prime lengths, N = 1, 1-3 trailing dims; rows > 65,535 on the
non-interpreted backends), layouts (contiguous, sliced rows, sliced inner dims, transposed,
channels_last, zero-stride broadcasts of rows and of inner dims; each input its own), dtypes
(fp32, bf16, fp16; fp64 on the reference), sigma from 1e-4 to 1e3 (a float, one per row or a
0-dim tensor), D from 0.5 to 1e6 and inf, alpha, weights, reductions, NaN/Inf rows, which
inputs need a gradient. Values come from torch generators seeded by the drawn seed.

The spec: the float64 reference (ipfm_fast.reference) on the same rounded inputs, and for
the fused random numbers tests/philox_spec.py (Philox + the counter layout + the chi-square
draw, written independently), so perturb and sample_prior are checked value by value.
Bounds: the output dtype's rounding plus a small multiple of fp32 rounding of the terms
that are summed (condition-aware: the sum of |terms|, not of the result); field_target's
gradients (fp64 from the saved fp32 weights) within max(1e-5 of the gradient, 2x what plain
fp32 PyTorch gets, 1e-5 of the gradient's sum of |terms|) -- the last where it cancels to ~0.
Known bugs would be pinned by ``test_known_bug_*`` (strict xfail) and left out of the sweeps.

Profiles: ``ci`` (a fixed, derandomized set of examples per test and backend: the suite's
time stays bounded and a pass is reproducible) and ``deep`` (random examples, many more;
marked slow: ``make test-slow``). Set IPFM_FAST_DEEP_EXAMPLES to change the deep count.
"""

import math
import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ipfm_fast as ipf
import philox_spec as spec
from conftest import DEVICES, FUSED
from ipfm_fast import backends
from ipfm_fast import reference as ref
from ipfm_fast.ops import _launch

pytestmark = pytest.mark.usefixtures("one_thread")

INTERPRETED = backends.triton_interpreter()
BACKENDS = FUSED + [(d, "reference") for d in DEVICES]
BIG_BACKENDS = [(d, b) for d, b in FUSED if not (b == "triton" and INTERPRETED)]  # rows > 65,535
DEPTHS = ["ci", pytest.param("deep", marks=pytest.mark.slow)]
# a fused backend for CPU tensors: the C++ one when built, else the Triton interpreter
ONE_FUSED = next((b for d, b in FUSED if d == "cpu" and b == "cpu"), next((b for d, b in FUSED if d == "cpu"), None))
needs_fused = pytest.mark.skipif(ONE_FUSED is None, reason="no fused backend for CPU tensors here")
DEEP_EXAMPLES = int(os.environ.get("IPFM_FAST_DEEP_EXAMPLES", "300"))
LOW = (torch.float32, torch.bfloat16, torch.float16)
SIZES = (1, 2, 3, 5, 7, 11, 13, 31, 64, 127, 257, 1031, 2053, 4099)  # N = 1, primes, a chunk's 2048 +- a few
ROWS = (1, 2, 3, 5, 7, 13)
U32 = 2.0**-24  # fp32 unit roundoff


def run_property(depth, backend, strategy, check, ci_examples, deep_share=1.0):
    """Runs ``check(case)`` over examples of ``strategy`` with the depth's settings (fewer
    on the Triton interpreter, ~2 ms per program; ``deep_share`` of the deep count)."""
    n = ci_examples if depth == "ci" else max(ci_examples, int(DEEP_EXAMPLES * deep_share))
    if backend == "triton" and INTERPRETED:
        n = max(2, n // 3)
    decorated = settings(max_examples=n, deadline=None, derandomize=depth == "ci", database=None, print_blob=True,
                         suppress_health_check=list(HealthCheck))(given(strategy)(check))
    decorated()


# --------------------------------------------------------------------------------------
# inputs: layouts, sigma, D
# --------------------------------------------------------------------------------------

LAYOUTS = ("contiguous", "rows_sliced", "inner_sliced", "transposed", "channels_last", "broadcast_rows",
           "broadcast_inner")


def lay_out(t, layout):
    """``t`` (contiguous) in ``layout``: the same values (broadcasts: those of row 0, resp. of
    the first element of the last dim, repeated), another memory layout."""
    if layout == "rows_sliced":  # dense rows, row stride 2N
        big = torch.empty((2 * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
        big[::2] = t
        return big[::2]
    if layout == "inner_sliced":  # the last dim a slice of a wider one: rows not dense
        big = torch.empty((*t.shape[:-1], t.shape[-1] + 3), dtype=t.dtype, device=t.device)
        big[..., : t.shape[-1]] = t
        return big[..., : t.shape[-1]]
    if layout == "transposed":  # [B, N]: column-major; more dims: the last two swapped in memory
        if t.dim() == 2:
            return t.T.contiguous().T
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "broadcast_rows":
        return t[:1].expand(t.shape)
    if layout == "broadcast_inner":
        return t[..., :1].expand(t.shape)
    return t


def layouts_for(ndim):
    return st.sampled_from([lay for lay in LAYOUTS if lay != "channels_last" or ndim == 4])


def kernel_order(t):
    """In-row positions the fused kernels give each logical element of ``t`` (and of the
    outputs they allocate like it): the row's memory order when they walk it in place (rows
    dense), else the logical order (the launcher copies to contiguous)."""
    n = math.prod(t.shape[1:])
    if t.dim() < 2 or not _launch.rows_dense(t) or t.is_contiguous():
        return torch.arange(n)
    offsets = torch.zeros(t.shape[1:], dtype=torch.long)
    for k, (size, stride) in enumerate(zip(t.shape[1:], t.stride()[1:])):
        shape = [1] * (t.dim() - 1)
        shape[k] = size
        offsets += torch.arange(size).view(shape) * stride
    return torch.argsort(torch.argsort(offsets.reshape(-1)))  # rank of each element's offset


@st.composite
def shapes(draw, big_rows=False, max_n=8192):
    rows = draw(st.integers(65536, 70000)) if big_rows else draw(st.sampled_from(ROWS))
    sizes = (1, 2, 3, 5, 7) if big_rows else SIZES
    inner = draw(st.lists(st.sampled_from(sizes), min_size=1, max_size=3).filter(lambda s: math.prod(s) <= max_n))
    return (rows, *inner)


sigma_logs = st.floats(-4.0, 3.0)  # log10 sigma
Ds = st.one_of(st.just(math.inf), st.sampled_from([0.5, 1.0, 2.0, 128.0, 1e6]), st.floats(math.log10(0.5), 6.0).map(
    lambda e: float(10**e)))


def make_sigma(kind, log10, spread, rows, g, device):
    """sigma: a float, a [rows] tensor around 10^log10 (within a factor 10^spread, clipped to
    [1e-4, 1e3]) or a 0-dim tensor."""
    if kind == "float":
        return 10.0**log10
    if kind == "0-dim":
        return torch.tensor(10.0**log10, device=device)
    e = log10 + spread * (2 * torch.rand(rows, generator=g, dtype=torch.float64) - 1)
    return (10.0 ** e.clamp(-4, 3)).float().to(device)


def sigma_rows(sigma, rows, exact=False):
    """sigma as the kernels see it (fp32 values; ``exact``: as given), one per row, float64 [rows]."""
    if isinstance(sigma, torch.Tensor):
        return sigma.detach().float().double().cpu().expand(rows).clone()
    return torch.full((rows,), float(sigma) if exact else float(np.float32(sigma)), dtype=torch.float64)


def eps(dtype):
    return torch.finfo(dtype).eps


def floor(dtype):
    return torch.finfo(dtype).tiny * torch.finfo(dtype).eps  # the spacing of subnormals


def assert_close(name, out, want, bound, mask=None, any_nonfinite=False):
    """``out`` against the float64 ``want`` (same shape, logical layout): NaN where want is
    NaN; where want rounded to out's dtype overflows, that same infinity; elsewhere
    ``|out - want| <= bound`` (broadcast). ``mask`` selects the elements compared.
    ``any_nonfinite``: where want is NaN or Inf, out must only be NaN or Inf too (the
    reference's autograd turns inf - inf into NaN where the fused formula keeps the Inf)."""
    dtype = out.dtype
    out = out.detach().to("cpu", torch.float64)
    want = want.detach().to("cpu", torch.float64)
    assert out.shape == want.shape, (name, out.shape, want.shape)
    sel = torch.ones_like(want, dtype=torch.bool) if mask is None else mask.expand(want.shape)
    if any_nonfinite:
        bad = ~torch.isfinite(rounded_to(want, dtype))
        assert torch.equal(~torch.isfinite(out) & sel, bad & sel), f"{name}: non-finite where the spec is finite " \
                                                                    f"(or finite where it is not)"
        sel = sel & ~bad
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(out) & sel, nan & sel), f"{name}: NaN where the spec has none (or not where it has)"
    inf = torch.isinf(rounded_to(want, dtype)) & sel
    assert torch.equal(out[inf], rounded_to(want, dtype)[inf]), f"{name}: infinities differ"
    bound = torch.as_tensor(bound, dtype=torch.float64).expand(want.shape)
    ok = sel & ~nan & ~inf
    err = (out - want).abs()
    bad = ok & ~(err <= bound)
    if bad.any():
        i = tuple(int(v) for v in bad.nonzero()[0])
        ratio = (err[ok] / bound[ok].clamp_min(1e-300)).max().item()
        raise AssertionError(f"{name}: at {i} got {out[i].item()!r}, spec {want[i].item()!r}, |err| "
                             f"{err[i].item():.3e} > bound {bound[i].item():.3e} (worst err/bound {ratio:.2f}); "
                             f"{int(bad.sum())} of {int(ok.sum())} elements out of bounds")


def rounded_to(want, dtype):
    """``want`` (float64) as ``dtype`` represents it, back in float64 (overflow -> inf)."""
    return want.to(dtype).to(torch.float64)


# --------------------------------------------------------------------------------------
# perturb and sample_prior: value by value against the Philox spec
# --------------------------------------------------------------------------------------


@dataclass
class PerturbCase:
    shape: tuple
    dtype: torch.dtype
    layout: str
    sigma_kind: str
    sigma_log: float
    sigma_spread: float
    D: float
    scale_log: float
    return_noise: bool
    grad: bool
    seed: int


@st.composite
def perturb_cases(draw, backend, big_rows=False):
    shape = draw(shapes(big_rows))
    dtypes = (*LOW, torch.float64) if backend == "reference" else LOW
    return PerturbCase(shape=shape, dtype=draw(st.sampled_from(dtypes)),
                       layout=draw(layouts_for(len(shape)) if not big_rows else st.sampled_from(
                           ["contiguous", "rows_sliced", "broadcast_rows"])),
                       sigma_kind=draw(st.sampled_from(["float", "rows", "0-dim"])), sigma_log=draw(sigma_logs),
                       sigma_spread=draw(st.floats(0.0, 2.0)), D=draw(Ds), scale_log=draw(st.floats(-2.0, 2.0)),
                       return_noise=draw(st.booleans()), grad=draw(st.booleans()),
                       seed=draw(st.integers(0, 2**31 - 1)))


def check_perturb(device, backend, c):
    g = torch.Generator().manual_seed(c.seed)
    rows, n = c.shape[0], math.prod(c.shape[1:])
    x = lay_out((torch.randn(c.shape, generator=g, dtype=torch.float64) * 10**c.scale_log).to(c.dtype), c.layout)
    x = x.to(device)
    sigma = make_sigma(c.sigma_kind, c.sigma_log, c.sigma_spread, rows, g, device)
    sigma_grad = c.grad and isinstance(sigma, torch.Tensor)
    return_noise = c.return_noise
    x_in = x.detach().requires_grad_(c.grad)
    sigma_in = sigma.detach().requires_grad_() if sigma_grad else sigma
    rng = torch.Generator(device=device).manual_seed(c.seed + 1)
    key = spec.seed_of(rng, device) if backend != "reference" else None
    out = ipf.perturb(x_in, sigma_in, c.D, generator=rng, return_noise=return_noise, backend=backend)
    y, noise = out if return_noise else (out, None)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    x64 = x.detach().cpu().double().reshape(rows, n)
    sig = sigma_rows(sigma, rows, exact=backend == "reference")[:, None]
    e = eps(c.dtype)
    if backend == "reference":  # torch's generators: the identity y = x + sigma * noise, and its gradient
        # the same draws again, unrounded: x in the compute dtype (fp32 for fp16/bf16), whose
        # noise is the one y was computed from (the noise returned in fp16 is rounded, and
        # near fp16's overflow threshold that rounding decides whether y is finite)
        rng.manual_seed(c.seed + 1)
        _, unrounded = ref.perturb(x if c.dtype == torch.float64 else x.float(), sigma, c.D, generator=rng,
                                   return_noise=True)
        n64 = unrounded.detach().cpu().double().reshape(rows, n)
        if noise is not None:
            assert_close("noise", noise.reshape(rows, n), n64, e * n64.abs() + floor(c.dtype))
        y_want = x64 + sig * n64
        assert_close("y", y.reshape(rows, n), y_want, 4 * e * (x64.abs() + sig * n64.abs()) + floor(c.dtype))
        order_noise, noise_err = n64, 4 * e * n64.abs()
    else:
        order = kernel_order(y)
        gauss = torch.from_numpy(spec.normals(key, np.arange(rows), n))[:, order]
        scale, ambiguous = (torch.from_numpy(v)[:, None] for v in spec.chi2_scales(key, np.arange(rows), c.D))
        keep = ~ambiguous
        noise_want = scale * gauss
        y_want = x64 + sig * noise_want
        fp32 = 2 * U32 * x64.abs() + 1e-5 * sig * scale * (1 + gauss.abs())  # Box-Muller / fp32 rounding
        bound = e * rounded_to(y_want, c.dtype).abs() + fp32 + floor(c.dtype)
        assert_close("y", y.reshape(rows, n), y_want, bound, mask=keep)
        if noise is not None:
            assert_close("noise", noise.reshape(rows, n), noise_want,
                         e * noise_want.abs() + 1e-5 * scale * (1 + gauss.abs()) + floor(c.dtype), mask=keep)
        order_noise = noise_want
        noise_err = 1e-5 * scale * (1 + gauss.abs()) + (2 * e * noise_want.abs() if return_noise else 0)
    if not (c.grad or sigma_grad):
        return
    up = torch.randn(c.shape, generator=g).to(c.dtype).to(device)
    wanted = [t for t in (x_in, sigma_in) if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(y, wanted, up)
    if c.grad:
        assert torch.equal(grads[0], up)  # dy/dx = 1, in x's layout and dtype
    if sigma_grad:
        up64 = up.cpu().double().reshape(rows, n)
        terms = up64 * order_noise
        want = terms.sum(1)  # the noise's own error bound, carried through, plus fp32 summation
        err_scale = (up64.abs() * noise_err).sum(1) + 1e-5 * terms.abs().sum(1)
        mask = torch.ones(rows, dtype=torch.bool) if backend == "reference" else keep[:, 0].clone()
        if return_noise or backend == "reference":  # the backward reads the noise saved in x's dtype: KNOWN, a row
            mask &= torch.isfinite(rounded_to(order_noise, c.dtype)).all(1)  # whose noise overflowed (fp16) gets Inf
        if sigma.dim() == 0:
            if not bool(mask.all()):
                return
            want, err_scale, mask = want.sum(), err_scale.sum(), None
        assert_close("grad sigma", grads[-1], want, err_scale + 1e-300, mask=mask)


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("device,backend", BACKENDS, ids=[f"{d}-{b}" for d, b in BACKENDS])
def test_perturb_against_spec(depth, device, backend):
    run_property(depth, backend, perturb_cases(backend), lambda c: check_perturb(device, backend, c), 12)


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("device,backend", BIG_BACKENDS, ids=[f"{d}-{b}" for d, b in BIG_BACKENDS])
def test_perturb_more_than_65535_rows(depth, device, backend):
    run_property(depth, backend, perturb_cases(backend, big_rows=True), lambda c: check_perturb(device, backend, c), 2,
                 deep_share=0.2)


@st.composite
def prior_cases(draw, backend, big_rows=False):
    c = draw(perturb_cases(backend, big_rows))
    c.layout = "contiguous"
    return c


def check_prior(device, backend, c):
    g = torch.Generator().manual_seed(c.seed)
    rows, n = c.shape[0], math.prod(c.shape[1:])
    sigma = make_sigma(c.sigma_kind, c.sigma_log, c.sigma_spread, rows, g, device)
    sigma_in = sigma.detach().requires_grad_() if c.grad and isinstance(sigma, torch.Tensor) else sigma
    rng = torch.Generator(device=device).manual_seed(c.seed + 1)
    key = spec.seed_of(rng, device) if backend != "reference" else None
    y = ipf.sample_prior(c.shape, sigma_in, c.D, device=device, dtype=c.dtype, generator=rng, backend=backend)
    assert y.shape == c.shape and y.dtype == c.dtype and y.is_contiguous()
    sig = sigma_rows(sigma, rows)[:, None]
    e = eps(c.dtype)
    y64 = y.detach().cpu().double().reshape(rows, n)
    if backend == "reference":
        y_want, keep = y64, None  # the values come from torch's generators; the gradient is checked below
        y_err = 4 * e * y64.abs()
    else:
        gauss = torch.from_numpy(spec.normals(key, np.arange(rows), n))
        scale, ambiguous = (torch.from_numpy(v)[:, None] for v in spec.chi2_scales(key, np.arange(rows), c.D))
        keep = ~ambiguous
        y_want = sig * scale * gauss
        y_err = 1e-5 * sig * scale * (1 + gauss.abs())
        assert_close("y", y.reshape(rows, n), y_want, e * rounded_to(y_want, c.dtype).abs() + y_err + floor(c.dtype),
                     mask=keep)
        y_err = y_err + 2 * e * y_want.abs()  # the backward reads y in its dtype
    if not (isinstance(sigma_in, torch.Tensor) and sigma_in.requires_grad):
        return
    up = torch.randn(c.shape, generator=g).to(c.dtype).to(device)
    (grad,) = torch.autograd.grad(y, [sigma_in], up)
    up64 = up.cpu().double().reshape(rows, n)
    terms = up64 * y_want / sig  # dy/dsigma = y / sigma
    want, err_scale = terms.sum(1), (up64.abs() * y_err / sig).sum(1) + 1e-5 * terms.abs().sum(1)
    # KNOWN: the backward forms the noise as y / sigma from the stored y, so a row whose y overflowed
    # the dtype (fp16, heavy tails) gets a non-finite gradient; such rows are left out
    fits = torch.isfinite(rounded_to(y_want, c.dtype)).all(1, keepdim=True)
    keep = fits if keep is None else keep & fits
    if sigma.dim() == 0:
        if not bool(keep.all()):
            return
        want, err_scale, keep = want.sum(), err_scale.sum(), None
    assert_close("grad sigma", grad, want, err_scale + 1e-300, mask=None if keep is None else keep[:, 0])


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("device,backend", BACKENDS, ids=[f"{d}-{b}" for d, b in BACKENDS])
def test_sample_prior_against_spec(depth, device, backend):
    run_property(depth, backend, prior_cases(backend), lambda c: check_prior(device, backend, c), 8)


@needs_fused
def test_perturb_sigma_grad_of_broadcast_x():
    """The regenerating backward draws on y's layout: a zero-stride (expanded) x works, and
    the gradient is the noise the forward added."""
    x = torch.randn(1, 6).expand(4, 6)
    sigma = (torch.rand(4) + 0.5).requires_grad_()
    y = ipf.perturb(x, sigma, 8.0, generator=torch.Generator().manual_seed(0), backend=ONE_FUSED)
    y.sum().backward()
    torch.testing.assert_close(sigma.grad, ((y - x) / sigma[:, None]).detach().sum(1), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------
# the losses
# --------------------------------------------------------------------------------------


@dataclass
class LossCase:
    shape: tuple
    dtype: torch.dtype
    layouts: tuple
    scale_log: float
    spread_log: float
    alpha: float
    weight: str
    reduction: str
    needs: tuple
    bad_rows: tuple  # (row, input index, value) of injected NaN/Inf
    sigma_kind: str
    sigma_log: float
    sigma_spread: float
    sigma_data: float
    seed: int


@st.composite
def loss_cases(draw, backend, n_inputs, big_rows=False):
    shape = draw(shapes(big_rows))
    dtypes = (*LOW, torch.float64) if backend == "reference" else LOW
    lays = layouts_for(len(shape)) if not big_rows else st.sampled_from(["contiguous", "rows_sliced", "broadcast_rows"])
    names = ("a", "b", "x", "w") if n_inputs == 3 else ("b", "x", "sigma")
    bad = draw(st.lists(st.tuples(st.integers(0, shape[0] - 1), st.integers(0, n_inputs - 1),
                                  st.sampled_from([math.nan, math.inf, -math.inf])), max_size=2))
    return LossCase(shape=shape, dtype=draw(st.sampled_from(dtypes)),
                    layouts=tuple(draw(lays) for _ in range(n_inputs)), scale_log=draw(st.floats(-3.0, 3.0)),
                    spread_log=draw(st.floats(-3.0, 1.0)), alpha=draw(st.sampled_from([0.5, 1.0, 1.2]) | st.floats(
                        -1.0, 2.5)), weight=draw(st.sampled_from(["adaptive", "given"])),
                    reduction=draw(st.sampled_from(["mean", "sum", "none"])),
                    needs=tuple(sorted(draw(st.sets(st.sampled_from(names), min_size=1)))), bad_rows=tuple(bad),
                    sigma_kind=draw(st.sampled_from(["float", "rows", "0-dim"])), sigma_log=draw(sigma_logs),
                    sigma_spread=draw(st.floats(0.0, 2.0)), sigma_data=draw(st.floats(0.1, 2.0)),
                    seed=draw(st.integers(0, 2**31 - 1)))


def loss_inputs(c, n_inputs, device, g):
    """The inputs (in their layouts, on ``device``) and their logical float64 values [B, N]:
    a; b = a + spread * noise; x = a + noise (the shape of real batches), NaN/Inf injected."""
    rows, n = c.shape[0], math.prod(c.shape[1:])
    scale, spread = 10**c.scale_log, 10 ** (c.scale_log + c.spread_log)
    a = torch.randn(c.shape, generator=g, dtype=torch.float64) * scale
    vals = [a, a + spread * torch.randn(c.shape, generator=g, dtype=torch.float64),
            a + scale * torch.randn(c.shape, generator=g, dtype=torch.float64)][3 - n_inputs:]
    for row, which, v in c.bad_rows:
        vals[which].view(rows, n)[row, int(torch.randint(n, (1,), generator=g))] = v
    ins = [lay_out(v.to(c.dtype), lay).to(device) for v, lay in zip(vals, c.layouts)]
    return ins, [t.detach().cpu().double().reshape(rows, n) for t in ins]


def check_generator_loss(device, backend, c):
    g = torch.Generator().manual_seed(c.seed)
    rows, n = c.shape[0], math.prod(c.shape[1:])
    (a, b, x), (a64, b64, x64) = loss_inputs(c, 3, device, g)
    w = None
    if c.weight == "given":
        w = ((torch.rand(rows, generator=g) * 3 - 1)).to(device)  # any sign
    leaves = [t.detach().requires_grad_(name in c.needs) for t, name in zip((a, b, x), "abx")]
    weight = "adaptive" if w is None else w.detach().requires_grad_("w" in c.needs)
    loss, masked = ipf.ipfm_generator_loss(*leaves, alpha=c.alpha, weight=weight, reduction=c.reduction,
                                           backend=backend, return_masked=True)
    ref_leaves = [t.clone().requires_grad_(name in c.needs) for t, name in zip((a64, b64, x64), "abx")]
    ref_weight = "adaptive" if w is None else w.cpu().double().requires_grad_("w" in c.needs)
    # alpha as the computation sees it: a kernel argument (and a PyTorch scalar) in fp32, unless fp64
    alpha = c.alpha if c.dtype == torch.float64 else float(np.float32(c.alpha))
    loss64, masked64 = ref.ipfm_generator_loss(*ref_leaves, alpha=alpha, weight=ref_weight, reduction=c.reduction,
                                               return_masked=True)
    assert int(masked) == int(masked64)
    assert loss.dtype == (torch.float64 if c.dtype == torch.float64 else torch.float32)
    # condition-aware scales: the sums of |terms| of each row (0 on masked rows)
    keep = torch.isfinite(a64).all(1) & torch.isfinite(b64).all(1) & torch.isfinite(x64).all(1)
    z = [torch.where(keep[:, None], t, 0.0) for t in (a64, b64, x64)]
    d, e_ = z[0] - z[1], z[0] - z[2]
    w64 = (1.0 / e_.abs().mean(1).clamp_min(1e-5)) if w is None else torch.where(keep, w.cpu().double(), 0.0)
    term_rows = (d.abs() * (e_.abs() + abs(alpha) * d.abs())).sum(1)  # d (e - alpha d) cancels inside too
    rel = 1e-12 if c.dtype == torch.float64 else 2e-5
    per_row = w64.abs() * term_rows * rel
    bound = {"none": per_row, "sum": per_row.sum(), "mean": per_row.sum() / rows}[c.reduction]
    assert_close("loss", loss, loss64, bound + 1e-300)
    wanted = [t for t in (*leaves, weight) if isinstance(t, torch.Tensor) and t.requires_grad]
    if not wanted:
        return
    up = torch.rand(loss.shape, generator=g, dtype=torch.float64) + 0.5
    grads = torch.autograd.grad(loss, wanted, up.to(loss.dtype).to(device))
    grads64 = torch.autograd.grad(loss64, [t for t in (*ref_leaves, ref_weight) if isinstance(t, torch.Tensor)
                                           and t.requires_grad], up)
    coef = (w64 * (up if c.reduction == "none" else up.expand(rows)) / (rows if c.reduction == "mean" else 1))
    coef = coef.abs()[:, None]
    # the terms of each gradient, |.| each: e + d - 2 alpha d, 2 alpha d - e, -d (however a kernel groups them)
    terms = {"a": coef * (e_.abs() + (1 + 2 * abs(alpha)) * d.abs()), "b": coef * (2 * abs(alpha) * d.abs()
                                                                                   + e_.abs()), "x": coef * d.abs()}
    names = [nm for nm in ("a", "b", "x") if nm in c.needs] + (["w"] if "w" in c.needs and w is not None else [])
    ed = eps(c.dtype)
    for nm, gr, gr64 in zip(names, grads, grads64):
        if nm == "w":
            bound = (coef[:, 0] / w64.abs().clamp_min(1e-300)) * term_rows * rel + eps(gr.dtype) * gr64.abs()
            assert_close("grad w", gr, gr64, bound + 1e-300)
            continue
        assert gr.shape == c.shape and gr.dtype == c.dtype
        bound = ed * gr64.abs().reshape(rows, n) + terms[nm] * rel + floor(c.dtype)  # gr has the inputs' dtype
        assert_close(f"grad {nm}", gr.reshape(rows, n), gr64.reshape(rows, n), bound)


def check_fake_loss(device, backend, c):
    g = torch.Generator().manual_seed(c.seed)
    rows, n = c.shape[0], math.prod(c.shape[1:])
    (b, x), (b64, x64) = loss_inputs(c, 2, device, g)
    sigma = make_sigma(c.sigma_kind, c.sigma_log, c.sigma_spread, rows, g, device)
    sigma_grad = "sigma" in c.needs and isinstance(sigma, torch.Tensor)
    leaves = [t.detach().requires_grad_(name in c.needs) for t, name in zip((b, x), "bx")]
    sigma_in = sigma.detach().requires_grad_() if sigma_grad else sigma
    loss = ipf.ipfm_fake_loss(*leaves, sigma_in, sigma_data=c.sigma_data, reduction=c.reduction, backend=backend)
    ref_leaves = [t.clone().requires_grad_(name in c.needs) for t, name in zip((b64, x64), "bx")]
    sig64 = sigma_rows(sigma, rows) if isinstance(sigma, torch.Tensor) else float(sigma)
    if isinstance(sigma, torch.Tensor) and sigma.dim() == 0:
        sig64 = sigma.detach().cpu().double()
    ref_sigma = sig64.clone().requires_grad_() if sigma_grad else sig64
    loss64 = ref.ipfm_fake_loss(*ref_leaves, ref_sigma, sigma_data=c.sigma_data, reduction=c.reduction)
    rel = 1e-12 if c.dtype == torch.float64 else 2e-5
    nonfinite = bool(c.bad_rows)  # not masked: NaN/Inf propagate (as NaN or Inf)
    assert_close("loss", loss, loss64, loss64.abs() * rel + 1e-300, any_nonfinite=nonfinite)
    wanted = [t for t in (*leaves, sigma_in) if isinstance(t, torch.Tensor) and t.requires_grad]
    if not wanted:
        return
    up = torch.rand(loss.shape, generator=g, dtype=torch.float64) + 0.5
    grads = torch.autograd.grad(loss, wanted, up.to(loss.dtype).to(device))
    grads64 = torch.autograd.grad(loss64, [t for t in (*ref_leaves, ref_sigma) if isinstance(t, torch.Tensor)
                                           and t.requires_grad], up)
    names = [nm for nm in ("b", "x") if nm in c.needs] + (["sigma"] if sigma_grad else [])
    for nm, gr, gr64 in zip(names, grads, grads64):
        if nm == "sigma":
            # 4 ulp of sigma's dtype: an fp32 sigma's gradient is a chain of fp32 operations (-2 / sigma^3 * g),
            # also on the float64 reference (found by the deep run: 1.17 ulp)
            assert_close("grad sigma", gr, gr64, gr64.abs() * (rel + 4 * eps(gr.dtype)) + 1e-300,
                         any_nonfinite=nonfinite)
            continue
        assert gr.shape == c.shape and gr.dtype == c.dtype
        assert_close(f"grad {nm}", gr.reshape(rows, n), gr64.reshape(rows, n),
                     (eps(c.dtype) + rel) * gr64.abs().reshape(rows, n) + floor(c.dtype), any_nonfinite=nonfinite)


def test_reference_fake_loss_sigma_grad_in_fp32():
    """lambda = 1 / sd^2 + 1 / s^2: its sigma gradient keeps its digits in fp32 at s >> sd."""
    b, x = torch.randn(4, 10), torch.randn(4, 10)
    for s in (100.0, 1000.0):
        sigma = torch.full((4,), s, requires_grad=True)
        (grad,) = torch.autograd.grad(ref.ipfm_fake_loss(b, x, sigma, sigma_data=0.1), sigma)
        want = -2.0 / s**3 * (b.double() - x.double()).square().sum(1) / 4  # d/ds of lambda = -2 / s^3, mean over 4
        torch.testing.assert_close(grad.double(), want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("device,backend", BACKENDS, ids=[f"{d}-{b}" for d, b in BACKENDS])
def test_generator_loss_against_reference(depth, device, backend):
    run_property(depth, backend, loss_cases(backend, 3), lambda c: check_generator_loss(device, backend, c), 12)


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("device,backend", BACKENDS, ids=[f"{d}-{b}" for d, b in BACKENDS])
def test_fake_loss_against_reference(depth, device, backend):
    run_property(depth, backend, loss_cases(backend, 2), lambda c: check_fake_loss(device, backend, c), 12)


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("device,backend", BIG_BACKENDS, ids=[f"{d}-{b}" for d, b in BIG_BACKENDS])
def test_losses_more_than_65535_rows(depth, device, backend):
    run_property(depth, backend, loss_cases(backend, 3, big_rows=True),
                 lambda c: check_generator_loss(device, backend, c), 2, deep_share=0.2)
    run_property(depth, backend, loss_cases(backend, 2, big_rows=True),
                 lambda c: check_fake_loss(device, backend, c), 2, deep_share=0.2)


# --------------------------------------------------------------------------------------
# field_target
# --------------------------------------------------------------------------------------


@dataclass
class FieldCase:
    shape: tuple
    m: int
    dtype: torch.dtype
    layouts: tuple
    sigma_kind: str
    sigma_log: float
    sigma_spread: float
    D: float
    spread: float
    logz: bool
    needs: tuple
    seed: int


@st.composite
def field_cases(draw, backend, big_rows=False):
    max_n = 300 if backend == "triton" and INTERPRETED else 2100
    shape = draw(shapes(big_rows, max_n=max_n))
    dtypes = (*LOW, torch.float64) if backend == "reference" else LOW
    lays = layouts_for(len(shape)) if not big_rows else st.sampled_from(["contiguous", "rows_sliced"])
    return FieldCase(shape=shape, m=draw(st.integers(1, 8 if big_rows else 17)), dtype=draw(st.sampled_from(dtypes)),
                     layouts=(draw(lays), draw(lays)), sigma_kind=draw(st.sampled_from(["float", "rows", "0-dim"])),
                     sigma_log=draw(sigma_logs), sigma_spread=draw(st.floats(0.0, 2.0)), D=draw(Ds),
                     spread=draw(st.sampled_from([0.3, 1.0, 3.0])), logz=draw(st.booleans()),
                     needs=tuple(sorted(draw(st.sets(st.sampled_from(["y", "x_ref", "sigma"]))))),
                     seed=draw(st.integers(0, 2**31 - 1)))


def field_fp32(y, sigma, x, D):
    """The spec in plain fp32 PyTorch (exact pairwise differences): the baseline the fused
    gradients are bounded against."""
    rows, n = y.shape[0], math.prod(y.shape[1:])
    yf, xf = y.reshape(rows, n).float(), x.reshape(x.shape[0], n).float()
    sig = sigma.float().expand(rows) if isinstance(sigma, torch.Tensor) else torch.full((rows,), float(sigma))
    d2 = torch.cdist(yf, xf, compute_mode="donot_use_mm_for_euclid_dist").square()
    if math.isinf(D):
        s = -d2 / (2 * sig.square()[:, None])
    else:
        s = -0.5 * (n + D) * torch.log(d2 + D * sig.square()[:, None])
    return (torch.softmax(s, 1) @ xf).reshape(y.shape), torch.logsumexp(s, 1)


def field_grad_scales(y, sigma, x, D, gt, gz, spans):
    """Per input, the norm of the gradient with every cancelling sum replaced by the sum of
    |terms| (float64): what rounding errors of the fused backward are relative to. With
    w = softmax(s), kappa_ij = k / q_ij (D = inf: 1 / (2 sigma_i^2)) and
    A_ij = w_ij (|g_i| e_ij + |gz_i|) kappa_ij >= |c_ij| (module docstring of
    ipfm_fast.ops.field_target): dy_i ~ 2 sum_j A_ij d_ij, dx_j ~ sum_i w_ij |g_i| +
    2 sum_i A_ij d_ij, dsigma_i ~ 2 D sigma_i sum_j A_ij (D = inf: 2 / sigma_i sum_j
    w_ij (...) |s_ij|). spans "differences": d_ij = |y_i - x_j|, e_ij = |x_j - t_i|, what the
    fp32 weights' rounding (each relative) is relative to; "norms": d_ij = |y_i| + |x_j|,
    e_ij = |x_j| + |t_i|, what the rounding of the backward's GEMM forms
    (y_i sum_j c_ij - sum_j c_ij x_j, in fp64) is relative to; "logits" (D = inf, sigma
    only): |s_ij| replaced by |log w_ij| + |log Z_i|, the fp32 outputs the backward reads the
    absolute logits from (where y_i = x_j after rounding, s_ij = 0 but log Z = log M)."""
    rows, n = y.shape[0], math.prod(y.shape[1:])
    y, x, gt = y.reshape(rows, n), x.reshape(x.shape[0], n), gt.reshape(rows, n)
    if isinstance(sigma, torch.Tensor):
        sig = sigma.expand(rows)
    else:
        sig = torch.full((rows,), float(sigma), dtype=torch.float64)
    d2 = torch.cdist(y, x, compute_mode="donot_use_mm_for_euclid_dist").square()
    if math.isinf(D):
        s = -d2 / (2 * sig.square()[:, None])
        kappa = (0.5 / sig.square())[:, None].expand_as(d2)
    else:
        q = d2 + D * sig.square()[:, None]
        s = -0.5 * (n + D) * torch.log(q)
        kappa = 0.5 * (n + D) / q
    w = torch.softmax(s, 1)
    t = w @ x
    if spans in ("differences", "logits"):
        e, dist = torch.cdist(t, x), torch.cdist(y, x)
    else:
        e = x.norm(dim=1)[None, :] + t.norm(dim=1)[:, None]
        dist = y.norm(dim=1)[:, None] + x.norm(dim=1)[None, :]
    inner = gt.norm(dim=1)[:, None] * e + gz.abs()[:, None]
    A = w * inner * kappa
    scales = {"y": (2 * (A * dist).sum(1)).norm(),
              "x_ref": ((w * gt.norm(dim=1)[:, None]).sum(0) + 2 * (A * dist).sum(0)).norm()}
    if math.isinf(D):  # the backward sums b_ij s_ij with the absolute logits s_ij = log w_ij + log Z_i
        if spans == "logits":
            logits = torch.log(w).nan_to_num(neginf=0.0).abs() + torch.logsumexp(s, 1, keepdim=True).abs()
            scales = {"y": torch.zeros(()), "x_ref": torch.zeros(())}
        else:
            logits = s.abs()
        scales["sigma"] = (2 / sig * (w * inner * logits).sum(1)).norm()
    else:
        scales["sigma"] = (2 * D * sig * A.sum(1)).norm()
    if isinstance(sigma, torch.Tensor) and sigma.dim() == 0:
        scales["sigma"] = scales["sigma"] * math.sqrt(rows)
    return scales


def check_field_target(device, backend, c):
    g = torch.Generator().manual_seed(c.seed)
    rows, n, m = c.shape[0], math.prod(c.shape[1:]), c.m
    sigma = make_sigma(c.sigma_kind, c.sigma_log, c.sigma_spread, rows, g, device)
    s0 = 10**c.sigma_log
    centers = torch.randn(3, n, generator=g, dtype=torch.float64)
    x = centers[torch.randint(0, 3, (m,), generator=g)] + c.spread / math.sqrt(n) * s0 * torch.randn(m, n, generator=g)
    src = torch.randint(0, m, (rows,), generator=g)
    y = ref.perturb(x[src], s0, c.D, generator=g)
    big = min(1e6, torch.finfo(c.dtype).max / 8)  # heavy tails (D ~ 0.5) would overflow the dtype or fp32 norms,
    y = y.clamp(-big, big)  # which field_target refuses (InvalidInput): keep the inputs valid
    y = lay_out(y.reshape(c.shape).to(c.dtype), c.layouts[0]).to(device)
    x = lay_out(x.reshape((m, *c.shape[1:])).to(c.dtype), c.layouts[1]).to(device)
    need = {k: k in c.needs for k in ("y", "x_ref", "sigma")}
    need["sigma"] &= isinstance(sigma, torch.Tensor)
    leaves = {"y": y.detach().requires_grad_(need["y"]), "x_ref": x.detach().requires_grad_(need["x_ref"]),
              "sigma": sigma.detach().requires_grad_() if need["sigma"] else sigma}
    t, lz = ipf.field_target(leaves["y"], leaves["sigma"], leaves["x_ref"], c.D, return_logz=True, backend=backend)
    assert t.shape == y.shape and t.dtype == y.dtype
    y64, x64 = y.detach().cpu().double(), x.detach().cpu().double()
    sig64 = sigma.detach().cpu().double() if isinstance(sigma, torch.Tensor) else float(sigma)
    ref_leaves = {"y": y64.clone().requires_grad_(need["y"]), "x_ref": x64.clone().requires_grad_(need["x_ref"]),
                  "sigma": sig64.clone().requires_grad_() if need["sigma"] else sig64}
    t64, lz64 = ref.field_target(ref_leaves["y"], ref_leaves["sigma"], ref_leaves["x_ref"], c.D, return_logz=True)
    data_scale = x64.reshape(m, n).norm(dim=1).max().clamp_min(1e-300)
    e = eps(c.dtype)
    err = (t.detach().cpu().double() - t64.detach()).reshape(rows, n).norm(dim=1) / data_scale
    tol = (1e-12 if c.dtype == torch.float64 else 1e-5) + 2 * e * t64.detach().reshape(rows, n).norm(dim=1) / data_scale
    assert bool((err <= tol).all()), \
        f"target: row error {err.max().item():.3e} (relative to the data) > {tol.max().item():.3e}"
    assert_close("logz", lz, lz64.detach(), 1e-6 * lz64.detach().abs() + (1e-9 if c.dtype == torch.float64 else 1e-4))
    wanted = [k for k in ("y", "x_ref", "sigma") if need[k]]
    if not wanted:
        return
    gt = torch.randn(c.shape, generator=g, dtype=torch.float64)
    gz = torch.randn(rows, generator=g, dtype=torch.float64) if c.logz else torch.zeros(rows, dtype=torch.float64)
    acc = torch.float64 if c.dtype == torch.float64 else torch.float32
    grads = torch.autograd.grad((t.to(acc) * gt.to(acc).to(device)).sum() + (lz.to(acc) * gz.to(acc).to(device)).sum(),
                                [leaves[k] for k in wanted])
    grads64 = torch.autograd.grad((t64 * gt).sum() + (lz64 * gz).sum(), [ref_leaves[k] for k in wanted])
    sig32 = sigma.detach().cpu().float() if isinstance(sigma, torch.Tensor) else sigma
    base = {k: v.detach().requires_grad_() if k in wanted else v
            for k, v in (("y", y64.float()), ("x_ref", x64.float()), ("sigma", sig32))}
    tb, lzb = field_fp32(base["y"], base["sigma"], base["x_ref"], c.D)
    grads_b = torch.autograd.grad((tb * gt.float()).sum() + (lzb * gz.float()).sum(), [base[k] for k in wanted])
    diff_scales = field_grad_scales(y64, sig64, x64, c.D, gt, gz, "differences")
    norm_scales = field_grad_scales(y64, sig64, x64, c.D, gt, gz, "norms")
    logit_scales = field_grad_scales(y64, sig64, x64, c.D, gt, gz, "logits") if math.isinf(c.D) else None
    for k, gr, gr64, grb in zip(wanted, grads, grads64, grads_b):
        # normwise: the documented 1e-5 of the gradient, or 2x plain fp32's error, or the
        # rounding of the terms (where the gradient itself cancels to ~0, e.g. one reference row)
        got = gr.detach().cpu().double()
        over = torch.isinf(rounded_to(gr64, gr.dtype))  # past the dtype's range (fp16): the same infinity
        assert torch.equal(got[over], rounded_to(gr64, gr.dtype)[over]), f"grad {k}: overflows differ"
        got, gr64 = torch.where(over, 0.0, got), torch.where(over, 0.0, gr64)
        norm = gr64.norm().item()
        err = (got - gr64).norm().item()
        err_b = (grb.double() - gr64).norm().item()
        if c.dtype == torch.float64:
            rel, terms = 1e-9, 1e-12 * norm_scales[k].item()
        else:  # 4e: the incoming gradients are rounded to the input dtype (bf16: 2^-9 of each term)
            rel, terms = 1e-5, (1e-5 + 4 * e) * diff_scales[k].item() + 1e-12 * norm_scales[k].item()
            if logit_scales is not None:
                terms += 4 * eps(torch.float32) * logit_scales[k].item()
        # the gradient's own rounding: relative, and the subnormal spacing where it underflows (fp16)
        bound = max(rel * norm, 2 * err_b, terms) + 4 * (e + eps(gr.dtype)) * norm + floor(gr.dtype) * gr.numel()**0.5
        assert err <= bound, (f"grad {k}: error {err:.3e} > {bound:.3e} (|grad| {norm:.3e}, plain fp32's error "
                              f"{err_b:.3e}, rounding of the terms {terms:.3e})")


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("device,backend", BACKENDS, ids=[f"{d}-{b}" for d, b in BACKENDS])
def test_field_target_against_reference(depth, device, backend):
    run_property(depth, backend, field_cases(backend), lambda c: check_field_target(device, backend, c), 10)


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("device,backend", BIG_BACKENDS, ids=[f"{d}-{b}" for d, b in BIG_BACKENDS])
def test_field_target_more_than_65535_rows(depth, device, backend):
    run_property(depth, backend, field_cases(backend, big_rows=True),
                 lambda c: check_field_target(device, backend, c), 2, deep_share=0.2)
