r"""Triton kernels for the field target (reference-batch posterior mean).

.. math::
    s_{ij} = -\tfrac{N + D}{2} \log(\lVert y_i - x_j\rVert^2 + D\sigma_i^2)
    \quad (D = \infty:\ -\lVert y_i - x_j\rVert^2 / (2\sigma_i^2)), \qquad
    \mathrm{target}_i = \sum_j \mathrm{softmax}_j(s_{ij})\, x_j

Two phases, four launches (the method and its error analysis are in
``ipfm_fast/ops/field_target.py``; the CPU and CUDA kernels implement the same steps):

* ``_norms_kernel``   squared row norms of y and x_ref in fp64 (reads ``(B + M) N``).
* ``_screen_kernel``  ``S = y x_ref^T`` on tensor cores (3xTF32, ~fp32 accuracy; "ieee" in
  the interpreter), one [BM, BN] tile per program, written to the [B, M] fp32 scratch
  (reads ``B N M / BN + M N B / BM``, writes ``B M``).
* ``_finalize_kernel`` one program per row, five sweeps over its M entries: the best
  upper bound; the anchor ``q_anchor``, the smallest q of the entries that can be the
  row's minimum; the candidates, with exact fp64 distances for those that need them (a
  [BLOCK_M, BLOCK_N] tile whose loads are masked to the refined rows, skipped when a block
  has none; the anchor sweep computes them for its entries too), stored as fp32 offsets
  ``q - q_anchor`` (an entry within 40 logits of the anchor has an offset under 40
  logits, so the fp32 store costs at most ``u * 40`` of its logit); then ``log Z`` and the
  weights, written over the scratch.
* ``_combine_kernel``  ``target = W x_ref`` (3xTF32), skipping K tiles whose weights are
  all exactly zero -- most of them when the posterior is concentrated (small sigma).

Why two-phase and not flash-style (one pass with an online softmax): deciding which
distances must be recomputed exactly needs the row's best bound over all M first, and
the [B, M] fp32 weights are kept for the backward anyway; the second pass over the
scratch costs ``2 B M`` fp32 accesses, small next to the ``B M N`` products.
"""

import math

import triton
import triton.language as tl

CUTOFF = 40.0  # logit gap below which weights are dropped (as csrc/include/ipfm/field_math.h)
UNIT = 2.0**-24
# (BM, BN, BK) of the two GEMM-shaped kernels: the same on a GPU and in the interpreter.
SCREEN_TILE = (64, 64, 32)
COMBINE_TILE = (32, 128, 32)


@triton.jit
def _norms_kernel(a_ptr, a_stride, out_ptr, n, BLOCK: tl.constexpr, N_LOOP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for n0 in range(0, N_LOOP, BLOCK):
        cols = n0 + tl.arange(0, BLOCK)
        v = tl.load(a_ptr + row * a_stride + cols, mask=cols < n, other=0.0).to(tl.float64)
        acc += v * v
    tl.store(out_ptr + row, tl.sum(acc, axis=0))


@triton.jit
def _tile_ids(col_tiles):
    # 1-D grid of row_tiles * col_tiles programs, column tiles fastest: grid axes 1 and 2
    # hold at most 65535 programs, which would cap M (screen) or N (combine) at ~4-8M.
    pid = tl.program_id(0)
    return pid // col_tiles, pid % col_tiles


@triton.jit
def _screen_kernel(y_ptr, y_stride, x_ptr, x_stride, s_ptr, rows, m, n, col_tiles,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, N_LOOP: tl.constexpr):
    pid_b, pid_m = _tile_ids(col_tiles)
    ri = (pid_b * BM + tl.arange(0, BM)).to(tl.int64)
    rj = (pid_m * BN + tl.arange(0, BN)).to(tl.int64)
    rk = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, N_LOOP, BK):
        kk = k0 + rk
        a = tl.load(y_ptr + ri[:, None] * y_stride + kk[None, :], mask=(ri[:, None] < rows) & (kk[None, :] < n),
                    other=0.0)
        b = tl.load(x_ptr + rj[:, None] * x_stride + kk[None, :], mask=(rj[:, None] < m) & (kk[None, :] < n),
                    other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PREC)
    tl.store(s_ptr + ri[:, None] * m + rj[None, :], acc, mask=(ri[:, None] < rows) & (rj[None, :] < m))


@triton.jit
def _log1p64(v):
    w = 1.0 + v
    return tl.where(w == 1.0, v, tl.log(w) * (v / tl.where(w == 1.0, 1.0, w - 1.0)))


@triton.jit
def _screened(srow, nx_ptr, j, jm, ny, coef, coef_stat, c, k, inv2, refine_tol, FINITE_D: tl.constexpr):
    """Screened d2 of a block of entries, the lower bound of their q, and whether their
    logit error estimate asks for an exact distance."""
    dot = tl.load(srow + j, mask=jm, other=0.0).to(tl.float64)
    nxj = tl.load(nx_ptr + j, mask=jm, other=0.0)
    d = ny + nxj - 2.0 * dot
    err = coef * tl.sqrt(nxj)
    qlo = tl.maximum(d - err, 0.0)
    err_stat = tl.minimum(err, coef_stat * tl.sqrt(nxj))
    if FINITE_D:
        qlo += c
        lerr = k * err_stat / qlo
    else:
        lerr = err_stat * inv2
    return d, qlo, lerr > refine_tol


@triton.jit
def _q(y_ptr, y_stride, x_ptr, x_stride, row, j, d, exact, n, c,
       FINITE_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, N_LOOP: tl.constexpr):
    """q of a block of entries: from the screened d2, or from exact fp64 pairwise
    differences where ``exact`` (a [BLOCK_M, BLOCK_N] tile whose loads are masked to those
    rows; skipped when the block has none). Each entry's sum depends on its own row only, so
    one entry gives the same q in every sweep."""
    dd = tl.maximum(d, 0.0)
    if tl.max(exact.to(tl.int32), axis=0) > 0:
        acc = tl.zeros([BLOCK_M], dtype=tl.float64)
        for n0 in range(0, N_LOOP, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            cm = cols < n
            yv = tl.load(y_ptr + row * y_stride + cols, mask=cm, other=0.0).to(tl.float64)
            xv = tl.load(x_ptr + j[:, None].to(tl.int64) * x_stride + cols[None, :],
                         mask=exact[:, None] & cm[None, :], other=0.0).to(tl.float64)
            diff = tl.where(cm[None, :], yv[None, :] - xv, 0.0)
            acc += tl.sum(diff * diff, axis=1)
        dd = tl.where(exact, acc, dd)
    if FINITE_D:
        dd += c
    return dd


# n stays a runtime i32 when it is 1 (Triton makes an int argument equal to 1 a constexpr,
# and n.to() below needs a tensor). The float arguments feed fp64 row math: a plain Python
# float would be passed as fp32 (D = 0.1 rounded; D > 3.4e38 inf).
@triton.jit(do_not_specialize=["n"])
def _finalize_kernel(y_ptr, y_stride, x_ptr, x_stride, s_ptr, logz_ptr, ny_ptr, nx_ptr, sigma_ptr,
                     m, n, D: tl.float64, coef_l: tl.float64, coef_stat_l: tl.float64, refine_tol: tl.float64,
                     CUT: tl.constexpr,
                     FINITE_D: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, M_LOOP: tl.constexpr, N_LOOP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)

    sigma = tl.load(sigma_ptr + row).to(tl.float64)
    ok = (sigma > 0.0) & (sigma < float("inf"))
    sigma = tl.where(ok, sigma, 1.0)
    ny = tl.load(ny_ptr + row)
    nf = n.to(tl.float64)
    k = 0.5 * (nf + D)
    c = D * sigma * sigma
    inv2 = 0.5 / (sigma * sigma)
    coef = 2.0 * coef_l * tl.sqrt(ny)
    coef_stat = coef_stat_l * tl.sqrt(ny)
    offs = tl.arange(0, BLOCK_M)
    srow = s_ptr + row * m
    inf = float("inf")

    # sweep 1: best upper bound of q = d2 (+ c); any non-finite norm poisons the row
    best = tl.full([], inf, dtype=tl.float64)
    bad = tl.where(ny < inf, 0, 1)
    for m0 in range(0, M_LOOP, BLOCK_M):
        j = m0 + offs
        jm = j < m
        dot = tl.load(srow + j, mask=jm, other=0.0).to(tl.float64)
        nxj = tl.load(nx_ptr + j, mask=jm, other=0.0)
        bad = tl.maximum(bad, tl.max(tl.where(nxj < inf, 0, 1), axis=0))
        d = ny + nxj - 2.0 * dot
        qhi = tl.maximum(d + coef * tl.sqrt(nxj), 0.0)  # >= q_lo of the same entry: the anchor sweep finds it
        if FINITE_D:
            qhi += c
        best = tl.minimum(best, tl.min(tl.where(jm, qhi, inf), axis=0))
    if FINITE_D:
        cut = best * tl.exp(CUT / k)
    else:
        cut = best + CUT / inv2

    # sweep 2: the anchor, the smallest q among the entries that can be the row's minimum
    # (q_lo <= best), exact where the estimate asks. The stored offsets are taken from it;
    # from the upper bound `best`, whose slack (~E) can be thousands of logits at small
    # sigma, their fp32 rounding would cost u * slack of a logit.
    anchor = tl.full([], inf, dtype=tl.float64)
    for m0 in range(0, M_LOOP, BLOCK_M):
        j = m0 + offs
        jm = j < m
        d, qlo, needs_exact = _screened(srow, nx_ptr, j, jm, ny, coef, coef_stat, c, k, inv2, refine_tol, FINITE_D)
        maybe = jm & (qlo <= best)
        q = _q(y_ptr, y_stride, x_ptr, x_stride, row, j, d, maybe & needs_exact, n, c, FINITE_D, BLOCK_M, BLOCK_N,
               N_LOOP)
        anchor = tl.minimum(anchor, tl.min(tl.where(maybe, q, inf), axis=0))

    # sweep 3: candidates, exact distances where needed, offsets q - anchor stored in fp32
    dmin = tl.full([], inf, dtype=tl.float64)
    for m0 in range(0, M_LOOP, BLOCK_M):
        j = m0 + offs
        jm = j < m
        d, qlo, needs_exact = _screened(srow, nx_ptr, j, jm, ny, coef, coef_stat, c, k, inv2, refine_tol, FINITE_D)
        cand = jm & (qlo <= cut)
        q = _q(y_ptr, y_stride, x_ptr, x_stride, row, j, d, cand & needs_exact, n, c, FINITE_D, BLOCK_M, BLOCK_N,
               N_LOOP)
        delta = tl.where(cand, (q - anchor).to(tl.float32), inf)
        tl.store(srow + j, delta, mask=jm)
        dmin = tl.minimum(dmin, tl.min(delta, axis=0).to(tl.float64))
    q_ref = anchor + dmin

    # sweep 4: normaliser relative to q_ref (fp64)
    z = tl.full([], 0.0, dtype=tl.float64)
    for m0 in range(0, M_LOOP, BLOCK_M):
        j = m0 + offs
        delta = tl.load(srow + j, mask=j < m, other=inf).to(tl.float64)
        rel = tl.where(delta < inf, delta - dmin, 0.0)
        if FINITE_D:
            g = -k * _log1p64(rel / q_ref)
        else:
            g = -rel * inv2
        z += tl.sum(tl.where(delta < inf, tl.exp(g), 0.0), axis=0)
    ok = ok & (bad == 0)
    inv_z = tl.where(ok, 1.0 / z, float("nan"))

    # sweep 5: weights over the scratch
    for m0 in range(0, M_LOOP, BLOCK_M):
        j = m0 + offs
        jm = j < m
        delta = tl.load(srow + j, mask=jm, other=inf).to(tl.float64)
        rel = tl.where(delta < inf, delta - dmin, 0.0)
        if FINITE_D:
            g = -k * _log1p64(rel / q_ref)
        else:
            g = -rel * inv2
        w = tl.where(delta < inf, tl.exp(g) * inv_z, 0.0 * inv_z)
        tl.store(srow + j, w.to(tl.float32), mask=jm)
    if FINITE_D:
        s_ref = -k * tl.log(q_ref)
    else:
        s_ref = -q_ref * inv2
    logz = tl.where(ok, s_ref + tl.log(z), float("nan"))
    tl.store(logz_ptr + row, logz.to(tl.float32))


@triton.jit
def _combine_kernel(w_ptr, x_ptr, x_stride, out_ptr, out_stride, rows, m, n, col_tiles,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, M_LOOP: tl.constexpr):
    pid_b, pid_n = _tile_ids(col_tiles)

    ri = (pid_b * BM + tl.arange(0, BM)).to(tl.int64)
    cols = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, M_LOOP, BK):
        kk = (k0 + rk).to(tl.int64)
        wt = tl.load(w_ptr + ri[:, None] * m + kk[None, :], mask=(ri[:, None] < rows) & (kk[None, :] < m), other=0.0)
        if tl.sum((wt != 0.0).to(tl.int32)) > 0:  # NaN != 0 too: NaN rows propagate
            xt = tl.load(x_ptr + kk[:, None] * x_stride + cols[None, :], mask=(kk[:, None] < m) & (cols[None, :] < n),
                         other=0.0)
            acc = tl.dot(wt, xt, acc, input_precision=PREC)
    tl.store(out_ptr + ri[:, None] * out_stride + cols[None, :], acc, mask=(ri[:, None] < rows) & (cols[None, :] < n))


def _interpreter():
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_precision():
    """fp32 dot products: 3xTF32 on tensor cores; "ieee" in the interpreter (which has no TF32)."""
    return "ieee" if _interpreter() else "tf32x3"


def chain_length(n):
    """Accumulation-chain length for the screening error bound: tensor-core fp32 accumulation
    over all of K, taken as sequential (pessimistic), plus the 3xTF32 split terms."""
    return float(n + 32)


def stat_coef(n):
    """Statistical screening-error coefficient (csrc/include/ipfm/field_math.h stat_coef) for
    one fp32 accumulation chain over all of K."""
    return 2.0 * UNIT * n / math.sqrt(n)


def field_target_triton(y, x, out, logz, w, sigma, sigma_scalar, D, refine_tol):
    """y [B, N], x [M, N], out [B, N] fp32 with unit last stride; logz [B]; w [B, M] scratch."""
    import torch

    rows, n = y.shape
    m = x.shape[0]
    ny = torch.empty(rows, dtype=torch.float64, device=y.device)
    nx = torch.empty(m, dtype=torch.float64, device=y.device)
    # Loop bounds are constexprs (the kernels specialize on M and N, fixed in a training run;
    # B is free): the interpreter of Triton 3.6 with NumPy 2 cannot loop over a runtime scalar.
    n_loop, m_loop = n, m
    nb = min(1024, triton.next_power_of_2(n))
    _norms_kernel[(rows,)](y, y.stride(0), ny, n, BLOCK=nb, N_LOOP=n_loop)
    _norms_kernel[(m,)](x, x.stride(0), nx, n, BLOCK=nb, N_LOOP=n_loop)
    if sigma is None:  # one fp32 per row: a scalar argument would be rounded the same way
        sigma = torch.full((rows,), sigma_scalar, dtype=torch.float32, device=y.device)
    prec = dot_precision()
    bm, bn, bk = SCREEN_TILE
    m_tiles = triton.cdiv(m, bn)
    _screen_kernel[(triton.cdiv(rows, bm) * m_tiles,)](
        y, y.stride(0), x, x.stride(0), w, rows, m, n, m_tiles, BM=bm, BN=bn, BK=bk, PREC=prec, N_LOOP=n_loop,
        num_warps=4)
    finite = not math.isinf(D)
    _finalize_kernel[(rows,)](
        y, y.stride(0), x, x.stride(0), w, logz, ny, nx, sigma,
        m, n, float(D) if finite else 0.0, chain_length(n) * UNIT, stat_coef(n), float(refine_tol), CUT=CUTOFF,
        FINITE_D=finite, BLOCK_M=32, BLOCK_N=128, M_LOOP=m_loop, N_LOOP=n_loop, num_warps=4)
    cbm, cbn, cbk = COMBINE_TILE
    n_tiles = triton.cdiv(n, cbn)
    _combine_kernel[(triton.cdiv(rows, cbm) * n_tiles,)](
        w, x, x.stride(0), out, out.stride(0), rows, m, n, n_tiles, BM=cbm, BN=cbn, BK=cbk, PREC=prec, M_LOOP=m_loop,
        num_warps=4)
