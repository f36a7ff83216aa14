r"""Triton kernels of the IPFM distillation losses (same math as
``csrc/include/ipfm/losses_math.h``).

Generator loss, :math:`a` = teacher output, :math:`b` = fake output, :math:`x` = generator
output, :math:`d = a - b`, :math:`e = a - x`:

.. math::
    \ell_i = w_i \sum_n d\,(e - \alpha d), \qquad
    w_i = 1 / \max(\mathrm{mean}_n |x - a|, 10^{-5}) \ \text{or given}

    \partial_a = c_i\,[e + (1 - 2\alpha) d], \quad \partial_b = c_i\,[2\alpha d - e], \quad
    \partial_x = -c_i\, d, \qquad c_i = g_i \cdot \mathrm{scale} \cdot w_i

Fake loss: :math:`\ell_i = \lambda_i \sum_n (b - x)^2`, :math:`\partial_b = 2 c_i (b - x) = -\partial_x`.

Forward = two launches: ``*_partial_kernel``, one program per (row, chunk of ``BLOCK``
elements), reads each input once and writes its partial sums (``tl.sum``, a fixed tree);
``*_finalize_kernel``, one program, sums the chunks of each row and the rows of the batch
in a fixed order. Backward = one launch of ``*_backward_kernel`` per call: reads the needed
inputs once, writes each needed gradient once. No atomics: the same bits on every run.
Rows with a NaN/Inf in a, b or x are masked (generator loss): zero loss, zero gradient.
"""

import triton
import triton.language as tl

# Layouts shared with the launchers in ipfm_fast/ops/losses.py:
#   generator partials [B * chunks, 3]: sum d (e - alpha d), sum |x - a|, non-finite count
#   generator stats    [3, B]: w, u (= loss / w), keep (1.0 or 0.0), saved for backward
#   fake partials      [B * chunks]: sum (b - x)^2;   fake stats [2, B]: lambda, sum
#   REDUCTION          0 = "none", 1 = "mean", 2 = "sum"


@triton.jit
def _nonfinite(v):
    return tl.where(tl.abs(v) < float("inf"), 0.0, 1.0)


@triton.jit
def gen_partial_kernel(
    a_ptr, a_stride, b_ptr, b_stride, x_ptr, x_stride, partial_ptr,
    alpha, n, chunks,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row = (pid // chunks).to(tl.int64)
    cols = (pid % chunks) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    a = tl.load(a_ptr + row * a_stride + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + row * b_stride + cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    d = a - b
    term = d * ((a - x) - alpha * d)
    bad = _nonfinite(a) + _nonfinite(b) + _nonfinite(x)
    out = partial_ptr + pid.to(tl.int64) * 3  # pid * 3 in int32 wraps past 715M programs
    tl.store(out, tl.sum(term, axis=0))
    tl.store(out + 1, tl.sum(tl.abs(x - a), axis=0))
    tl.store(out + 2, tl.sum(bad, axis=0))


# rows / n stay runtime values when they equal 1 (Triton would make a 1 a constexpr)
@triton.jit(do_not_specialize=["rows", "n", "chunks"])
def gen_finalize_kernel(
    partial_ptr, weight_ptr, stats_ptr, loss_ptr, masked_ptr,
    rows, n, chunks,
    ADAPTIVE: tl.constexpr, REDUCTION: tl.constexpr, BLOCK_R: tl.constexpr,
):
    total = tl.zeros([BLOCK_R], dtype=tl.float64)  # fp64 over rows, as the CPU and CUDA kernels
    count = tl.zeros([BLOCK_R], dtype=tl.int32)
    # Row indices in int64 (a runtime value, so that the compiled while loop can carry it):
    # r0 + BLOCK_R and 2 * rows wrap in int32 for rows near 2^31 and 2^30.
    rows64 = rows.to(tl.int64)
    r0 = rows64 * 0
    while r0 < rows:  # while, not range(): the interpreter cannot range over a runtime int
        r = r0 + tl.arange(0, BLOCK_R)
        live = r < rows
        su = tl.zeros([BLOCK_R], dtype=tl.float32)
        sabs = tl.zeros([BLOCK_R], dtype=tl.float32)
        sbad = tl.zeros([BLOCK_R], dtype=tl.float32)
        c = chunks * 0
        while c < chunks:
            p = partial_ptr + (r.to(tl.int64) * chunks + c) * 3
            su += tl.load(p, mask=live, other=0.0)
            sabs += tl.load(p + 1, mask=live, other=0.0)
            sbad += tl.load(p + 2, mask=live, other=0.0)
            c += 1
        keep = sbad == 0.0
        if ADAPTIVE:
            w = 1.0 / tl.maximum(sabs / n.to(tl.float32), 1e-5)
        else:
            w = tl.load(weight_ptr + r, mask=live, other=0.0)
        w = tl.where(keep, w, 0.0)
        u = tl.where(keep, su, 0.0)
        loss = tl.where(keep, w * su, 0.0)
        tl.store(stats_ptr + r, w, mask=live)
        tl.store(stats_ptr + rows + r, u, mask=live)
        tl.store(stats_ptr + 2 * rows64 + r, tl.where(keep, 1.0, 0.0), mask=live)
        if REDUCTION == 0:
            tl.store(loss_ptr + r, loss.to(loss_ptr.dtype.element_ty), mask=live)
        total += tl.where(live, loss, 0.0).to(tl.float64)
        count += (live & (sbad != 0.0)).to(tl.int32)
        r0 += BLOCK_R
    s = tl.sum(total, axis=0)
    if REDUCTION == 1:
        tl.store(loss_ptr, (s / rows.to(tl.float64)).to(loss_ptr.dtype.element_ty))
    if REDUCTION == 2:
        tl.store(loss_ptr, s.to(loss_ptr.dtype.element_ty))
    tl.store(masked_ptr, tl.sum(count, axis=0).to(tl.int64))


@triton.jit
def gen_backward_kernel(
    grad_ptr, grad_stride, a_ptr, a_stride, b_ptr, b_stride, x_ptr, x_stride, stats_ptr,
    ga_ptr, gb_ptr, gx_ptr, g_stride,
    rows, alpha, scale, n, chunks,
    NEED_A: tl.constexpr, NEED_B: tl.constexpr, NEED_X: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row = (pid // chunks).to(tl.int64)
    cols = (pid % chunks) * BLOCK + tl.arange(0, BLOCK)
    keep = tl.load(stats_ptr + rows + rows + row) != 0.0  # two i32 steps: 2 * rows wraps past 2^30 rows
    w = tl.load(stats_ptr + row)
    g = tl.load(grad_ptr + row * grad_stride).to(tl.float32)
    c = tl.where(keep, g * scale * w, 0.0)
    mask = cols < n
    load_mask = cols < tl.where(keep, n, 0)  # a masked row is written with zeros without being read
    a = tl.load(a_ptr + row * a_stride + cols, mask=load_mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + row * b_stride + cols, mask=load_mask, other=0.0).to(tl.float32)
    d = a - b
    out = row * g_stride + cols
    if NEED_A or NEED_B:
        x = tl.load(x_ptr + row * x_stride + cols, mask=load_mask, other=0.0).to(tl.float32)
        e = a - x
        if NEED_A:
            ga = c * (e + (1.0 - 2.0 * alpha) * d)
            tl.store(ga_ptr + out, ga.to(ga_ptr.dtype.element_ty), mask=mask)
        if NEED_B:
            gb = c * (2.0 * alpha * d - e)
            tl.store(gb_ptr + out, gb.to(gb_ptr.dtype.element_ty), mask=mask)
    if NEED_X:
        tl.store(gx_ptr + out, (-c * d).to(gx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def fake_partial_kernel(
    b_ptr, b_stride, x_ptr, x_stride, partial_ptr, n, chunks,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row = (pid // chunks).to(tl.int64)
    cols = (pid % chunks) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    b = tl.load(b_ptr + row * b_stride + cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    r = b - x
    tl.store(partial_ptr + pid, tl.sum(r * r, axis=0))


# rows / n stay runtime values when they equal 1 (Triton would make a 1 a constexpr)
@triton.jit(do_not_specialize=["rows", "chunks"])
def fake_finalize_kernel(
    partial_ptr, sigma_ptr, sigma_scalar, sigma_data, stats_ptr, loss_ptr,
    rows, chunks,
    SIGMA_PER_ROW: tl.constexpr, REDUCTION: tl.constexpr, BLOCK_R: tl.constexpr,
):
    total = tl.zeros([BLOCK_R], dtype=tl.float64)  # fp64 over rows, as the CPU and CUDA kernels
    sd2 = sigma_data * sigma_data
    r0 = rows.to(tl.int64) * 0  # int64 and runtime, as in gen_finalize_kernel
    while r0 < rows:
        r = r0 + tl.arange(0, BLOCK_R)
        live = r < rows
        s = tl.zeros([BLOCK_R], dtype=tl.float32)
        c = chunks * 0
        while c < chunks:
            s += tl.load(partial_ptr + r.to(tl.int64) * chunks + c, mask=live, other=0.0)
            c += 1
        if SIGMA_PER_ROW:
            sigma = tl.load(sigma_ptr + r, mask=live, other=1.0)
        else:
            sigma = tl.zeros([BLOCK_R], dtype=tl.float32) + sigma_scalar
        s2 = sigma * sigma
        # a device tensor's sigma is not checked on the host: a bad one makes the row NaN
        lam = tl.where((sigma > 0.0) & (sigma < float("inf")), (s2 + sd2) / (s2 * sd2), float("nan"))
        loss = lam * s
        tl.store(stats_ptr + r, lam, mask=live)
        tl.store(stats_ptr + rows + r, s, mask=live)
        if REDUCTION == 0:
            tl.store(loss_ptr + r, loss.to(loss_ptr.dtype.element_ty), mask=live)
        total += tl.where(live, loss, 0.0).to(tl.float64)
        r0 += BLOCK_R
    t = tl.sum(total, axis=0)
    if REDUCTION == 1:
        tl.store(loss_ptr, (t / rows.to(tl.float64)).to(loss_ptr.dtype.element_ty))
    if REDUCTION == 2:
        tl.store(loss_ptr, t.to(loss_ptr.dtype.element_ty))


@triton.jit
def fake_backward_kernel(
    grad_ptr, grad_stride, b_ptr, b_stride, x_ptr, x_stride, stats_ptr,
    gb_ptr, gx_ptr, g_stride, scale, n, chunks,
    NEED_B: tl.constexpr, NEED_X: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row = (pid // chunks).to(tl.int64)
    cols = (pid % chunks) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    c2 = 2.0 * tl.load(grad_ptr + row * grad_stride).to(tl.float32) * scale * tl.load(stats_ptr + row)
    b = tl.load(b_ptr + row * b_stride + cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    g = c2 * (b - x)
    out = row * g_stride + cols
    if NEED_B:
        tl.store(gb_ptr + out, g.to(gb_ptr.dtype.element_ty), mask=mask)
    if NEED_X:
        tl.store(gx_ptr + out, (-g).to(gx_ptr.dtype.element_ty), mask=mask)
