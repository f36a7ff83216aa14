"""Triton kernel for the PFGM++ perturbation.

.. math::
    y = x + \\sigma \\, g \\, \\sqrt{D / W}, \\quad g \\sim \\mathcal N(0, I_N), \\quad W \\sim \\chi^2_D

One program owns a tile of ``ROWS`` rows by ``4 * BLOCK_G`` consecutive elements (ROWS > 1
only for short rows): it reads x once and writes ``y`` (and the noise when asked) once, so a call moves ``2 * B * N`` elements
(``3 * B * N`` with the noise) and nothing else. The random numbers are the same as the
C++ kernels' (``csrc/include/ipfm/perturb_math.h``):

* noise: element ``n`` of row ``b`` is normal ``n % 4`` of ``tl.randn4x(seed, b * G + n // 4)``
  with ``G = ceil(N / 4)``, so one Philox call feeds four elements;
* chi-square: Marsaglia-Tsang candidates on counters ``(t, b, 1, 0)``, evaluated
  ``CAND`` at a time, the first accepted in counter order wins. Every program of a row
  redraws the same W (a few Philox calls) instead of launching a second kernel.

Tile sizes are chosen by the launcher (ipfm_fast.ops.perturb.triton_tiles): about 1024
elements per program on a GPU; far larger tiles in the interpreter, where each program
costs milliseconds (``ipfm_fast.ops._launch.gpu_tiles()`` forces the GPU ones there).

Variants behind constexprs (off: the code above, unchanged): ``GIVEN_G`` reads the gaussian
from ``g_ptr`` instead of drawing it; ``CLIP`` scales each row's radius by
``sqrt(clip(t) / t)``, ``t = |g|^2 / W`` (the PFGM++ recipe's Beta clip, see
csrc/include/ipfm/perturb_math.h clip_factor), reading the row's ``|g|^2`` from the
per-program partial sums that ``perturb_norm_kernel`` (same tiles) wrote first.
"""

import triton
import triton.language as tl
from triton.language.random import pair_uniform_to_normal, philox, uint_to_uniform_float

CAND = 8  # Marsaglia-Tsang candidates tested together; P(all 8 rejected) < 1e-9


@triton.jit
def chi2_scale(seed, rows, alpha, CAND: tl.constexpr):
    """sqrt(alpha / Gamma(alpha)) = sqrt(D / W) for a block of rows, alpha = D / 2, fp64.

    Candidates form a [ROWS, CAND] tile; the loop runs until every row has accepted one
    (P(one row needs a second round) < 1e-9 for CAND = 8)."""
    lane = tl.arange(0, CAND)[None, :]
    boost = alpha < 1.0  # Gamma(alpha) = Gamma(alpha + 1) * U^(1 / alpha)
    a = tl.where(boost, alpha + 1.0, alpha)
    d = a - 1.0 / 3.0
    c = 1.0 / tl.sqrt(9.0 * d)
    zeros = tl.zeros([rows.shape[0], CAND], dtype=tl.uint32)
    row_ctr = zeros + rows.to(tl.uint32)[:, None]
    domain = zeros + 1
    gamma = tl.zeros([rows.shape[0]], dtype=tl.float64) - 1.0
    attempt = 0
    while tl.min(gamma, axis=0) < 0.0:
        ctr = zeros + (attempt * CAND + lane).to(tl.uint32)
        r0, r1, r2, r3 = philox(seed, ctr, row_ctr, domain, zeros)
        normal, _ = pair_uniform_to_normal(uint_to_uniform_float(r0), uint_to_uniform_float(r1))
        n = normal.to(tl.float64)
        base = 1.0 + c * n
        v = base * base * base
        u = uint_to_uniform_float(r2).to(tl.float64)
        # v > 0 is required; max() only keeps log() quiet on rejected lanes.
        ok = (base > 0.0) & (tl.log(u) < 0.5 * n * n + d - d * v + d * tl.log(tl.maximum(v, 1e-300)))
        boost_factor = tl.exp(tl.log(1.0 - uint_to_uniform_float(r3).to(tl.float64)) / alpha)
        candidate = d * v * tl.where(boost, boost_factor, 1.0)
        first = tl.min(tl.where(ok, lane, CAND), axis=1)
        picked = tl.sum(tl.where(lane == first[:, None], candidate, 0.0), axis=1)
        gamma = tl.where((gamma < 0.0) & (first < CAND), picked, gamma)
        attempt += 1
    return tl.sqrt(alpha / gamma)


@triton.jit
def clip_factor(q, scale, alpha, t_lo, t_hi):
    """sqrt(clip(t) / t), t = q * scale^2 / D = |g|^2 / W, in fp64 (1 where q = 0)."""
    t = q * scale * scale / (2.0 * alpha)
    clipped = tl.minimum(tl.maximum(t, t_lo), t_hi)
    return tl.where(q > 0.0, tl.sqrt(clipped / tl.where(q > 0.0, t, 1.0)), 1.0)


@triton.jit
def perturb_norm_kernel(
    g_ptr, g_row_stride, partial_ptr, seed_ptr, n_rows, n, groups, blocks_per_row,
    GIVEN_G: tl.constexpr, ROWS: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """|g|^2 of each row's part in one perturb_kernel tile -> partial[row, chunk] (fp32).
    Drawn g: a full group of four normals adds -2 (ln u1 + ln u3) (Box-Muller: n1^2 + n2^2
    = r^2), no sines or cosines; only the row's last tile evaluates its normals."""
    pid = tl.program_id(0)
    rows = (pid // blocks_per_row).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    chunk = pid % blocks_per_row
    row_mask = rows < n_rows
    rows64 = rows[:, None]
    if GIVEN_G:
        cols = chunk * (4 * BLOCK_G) + tl.arange(0, 4 * BLOCK_G)[None, :]
        mask = row_mask[:, None] & (cols < n)
        g = tl.load(g_ptr + rows64 * g_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        sq = tl.sum(g * g, axis=1)
    else:
        seed = tl.load(seed_ptr)
        group = chunk * BLOCK_G + tl.arange(0, BLOCK_G)[None, :]
        if (chunk + 1) * (4 * BLOCK_G) <= n:  # every group of the tile is full
            i1, _, i3, _ = tl.randint4x(seed, rows64 * groups + group)
            u1 = tl.maximum(uint_to_uniform_float(i1), 1.0e-7)
            u3 = tl.maximum(uint_to_uniform_float(i3), 1.0e-7)
            sq = tl.sum(tl.where(row_mask[:, None], -2.0 * (tl.log(u1) + tl.log(u3)), 0.0), axis=1)
        else:
            n1, n2, n3, n4 = tl.randn4x(seed, rows64 * groups + group)
            g = tl.reshape(tl.join(tl.join(n1, n3), tl.join(n2, n4)), [ROWS, 4 * BLOCK_G])
            cols = chunk * (4 * BLOCK_G) + tl.arange(0, 4 * BLOCK_G)[None, :]
            sq = tl.sum(tl.where(row_mask[:, None] & (cols < n), g * g, 0.0), axis=1)
    tl.store(partial_ptr + rows * blocks_per_row + chunk, sq, mask=row_mask)


@triton.jit
def perturb_kernel(
    x_ptr, x_row_stride, y_ptr, y_row_stride, noise_ptr, noise_row_stride, g_ptr, g_row_stride,
    sigma_ptr, sigma_scalar, alpha: tl.float64, seed_ptr, partial_ptr, t_lo: tl.float64, t_hi: tl.float64,
    n_rows, n, groups, blocks_per_row,
    HAS_X: tl.constexpr, SIGMA_PER_ROW: tl.constexpr, WRITE_NOISE: tl.constexpr,
    FINITE_D: tl.constexpr, ROWS: tl.constexpr, BLOCK_G: tl.constexpr, CAND: tl.constexpr,
    GIVEN_G: tl.constexpr, CLIP: tl.constexpr, NB: tl.constexpr, P_LOOP: tl.constexpr,
):
    """One program: a [ROWS, 4 * BLOCK_G] tile (ROWS > 1 only when rows are short)."""
    pid = tl.program_id(0)
    # int64: with ROWS > 1 the row index passes 2^31 for n_rows up to the 2^32 - 1 allowed
    rows = (pid // blocks_per_row).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    chunk = pid % blocks_per_row
    row_mask = rows < n_rows
    seed = tl.load(seed_ptr)
    if CLIP:  # FINITE_D (the launcher refuses a clip for D = inf)
        # the row's |g|^2: its tiles' partial sums in order (NB at a time), the same in every tile
        q = tl.zeros([ROWS], dtype=tl.float64)
        for k in range(0, P_LOOP, NB):  # P_LOOP = blocks_per_row: a constexpr bound (see field_target.py)
            idx = k + tl.arange(0, NB)[None, :]
            part = tl.load(partial_ptr + rows[:, None] * blocks_per_row + idx,
                           mask=row_mask[:, None] & (idx < blocks_per_row), other=0.0)
            q += tl.sum(part.to(tl.float64), axis=1)
        scale64 = chi2_scale(seed, rows, alpha, CAND)
        scale = (scale64 * clip_factor(q, scale64, alpha, t_lo, t_hi)).to(tl.float32)
    elif FINITE_D:
        scale = chi2_scale(seed, rows, alpha, CAND).to(tl.float32)
    else:
        scale = tl.full([ROWS], 1.0, dtype=tl.float32)
    if SIGMA_PER_ROW:
        sigma = tl.load(sigma_ptr + rows, mask=row_mask, other=1.0)
    else:
        sigma = tl.full([ROWS], sigma_scalar, dtype=tl.float32)
    # A bad sigma in a device tensor cannot raise without a host sync: make the row NaN.
    factor = tl.where((sigma > 0.0) & (sigma < float("inf")), sigma * scale, float("nan"))

    rows64 = rows[:, None]
    cols = chunk * (4 * BLOCK_G) + tl.arange(0, 4 * BLOCK_G)[None, :]
    mask = row_mask[:, None] & (cols < n)
    if GIVEN_G:
        g = tl.load(g_ptr + rows64 * g_row_stride + cols, mask=mask).to(tl.float32)
    else:
        group = chunk * BLOCK_G + tl.arange(0, BLOCK_G)[None, :]
        n1, n2, n3, n4 = tl.randn4x(seed, rows64 * groups + group)
        g = tl.reshape(tl.join(tl.join(n1, n3), tl.join(n2, n4)), [ROWS, 4 * BLOCK_G])
    if HAS_X:
        x = tl.load(x_ptr + rows64 * x_row_stride + cols, mask=mask).to(tl.float32)
        y = x + factor[:, None] * g
    else:
        y = factor[:, None] * g
    tl.store(y_ptr + rows64 * y_row_stride + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    if WRITE_NOISE:
        noise = scale[:, None] * g
        tl.store(noise_ptr + rows64 * noise_row_stride + cols, noise.to(noise_ptr.dtype.element_ty), mask=mask)
