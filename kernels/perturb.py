"""Triton kernel for the PFGM++ perturbation.

.. math::
    y = x + \\sigma \\, g \\, \\sqrt{D / W}, \\quad g \\sim \\mathcal N(0, I_N), \\quad W \\sim \\chi^2_D

One program owns ``4 * BLOCK_G`` consecutive elements of one row: it reads them once and
writes ``y`` (and the noise when asked) once, so a call moves ``2 * B * N`` elements
(``3 * B * N`` with the noise) and nothing else. The random numbers are the same as the
C++ kernels' (``csrc/include/ipfm/perturb_math.h``):

* noise: element ``n`` of row ``b`` is normal ``n % 4`` of ``tl.randn4x(seed, b * G + n // 4)``
  with ``G = ceil(N / 4)``, so one Philox call feeds four elements;
* chi-square: Marsaglia-Tsang candidates on counters ``(t, b, 1, 0)``, evaluated
  ``CAND`` at a time, the first accepted in counter order wins. Every program of a row
  redraws the same W (a few Philox calls) instead of launching a second kernel.
"""

import triton
import triton.language as tl
from triton.language.random import pair_uniform_to_normal, philox, uint_to_uniform_float

CAND = 8  # Marsaglia-Tsang candidates tested together; P(all 8 rejected) < 1e-9


@triton.jit
def chi2_scale(seed, row, alpha, CAND: tl.constexpr):
    """sqrt(alpha / Gamma(alpha)) = sqrt(D / W) for one row, alpha = D / 2, in fp64."""
    lane = tl.arange(0, CAND)
    boost = alpha < 1.0  # Gamma(alpha) = Gamma(alpha + 1) * U^(1 / alpha)
    a = tl.where(boost, alpha + 1.0, alpha)
    d = a - 1.0 / 3.0
    c = 1.0 / tl.sqrt(9.0 * d)
    zeros = tl.zeros([CAND], dtype=tl.uint32)
    row_ctr = zeros + row.to(tl.uint32)
    domain = zeros + 1
    gamma = alpha * 0.0 - 1.0
    attempt = 0
    while gamma < 0.0:
        ctr = (attempt * CAND + lane).to(tl.uint32)
        r0, r1, r2, r3 = philox(seed, ctr, row_ctr, domain, zeros)
        normal, _ = pair_uniform_to_normal(uint_to_uniform_float(r0), uint_to_uniform_float(r1))
        n = normal.to(tl.float64)
        base = 1.0 + c * n
        v = base * base * base
        u = uint_to_uniform_float(r2).to(tl.float64)
        ok = (base > 0.0) & (tl.log(u) < 0.5 * n * n + d - d * v + d * tl.log(v))
        boost_factor = tl.exp(tl.log(1.0 - uint_to_uniform_float(r3).to(tl.float64)) / alpha)
        candidate = d * v * tl.where(boost, boost_factor, 1.0)
        first = tl.min(tl.where(ok, lane, CAND), axis=0)
        picked = tl.sum(tl.where(lane == first, candidate, 0.0), axis=0)
        gamma = tl.where(first < CAND, picked, -1.0)
        attempt += 1
    return tl.sqrt(alpha / gamma)


@triton.jit
def perturb_kernel(
    x_ptr, x_row_stride, y_ptr, y_row_stride, noise_ptr, noise_row_stride,
    sigma_ptr, sigma_scalar, alpha: tl.float64, seed_ptr,
    n, groups, blocks_per_row,
    HAS_X: tl.constexpr, SIGMA_PER_ROW: tl.constexpr, WRITE_NOISE: tl.constexpr,
    FINITE_D: tl.constexpr, BLOCK_G: tl.constexpr, CAND: tl.constexpr,
):
    pid = tl.program_id(0)
    row = pid // blocks_per_row
    chunk = pid % blocks_per_row
    seed = tl.load(seed_ptr)
    if FINITE_D:
        scale = chi2_scale(seed, row, alpha, CAND).to(tl.float32)
    else:
        scale = 1.0
    if SIGMA_PER_ROW:
        sigma = tl.load(sigma_ptr + row)
    else:
        sigma = sigma_scalar
    # A bad sigma in a device tensor cannot raise without a host sync: make the row NaN.
    factor = tl.where((sigma > 0.0) & (sigma < float("inf")), sigma * scale, float("nan"))

    group = chunk * BLOCK_G + tl.arange(0, BLOCK_G)
    n1, n2, n3, n4 = tl.randn4x(seed, row.to(tl.int64) * groups + group)
    g = tl.reshape(tl.join(tl.join(n1, n3), tl.join(n2, n4)), [4 * BLOCK_G])
    cols = chunk * (4 * BLOCK_G) + tl.arange(0, 4 * BLOCK_G)
    mask = cols < n
    row64 = row.to(tl.int64)
    if HAS_X:
        x = tl.load(x_ptr + row64 * x_row_stride + cols, mask=mask).to(tl.float32)
        y = x + factor * g
    else:
        y = factor * g
    tl.store(y_ptr + row64 * y_row_stride + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    if WRITE_NOISE:
        tl.store(noise_ptr + row64 * noise_row_stride + cols, (scale * g).to(noise_ptr.dtype.element_ty), mask=mask)
