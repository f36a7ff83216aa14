r"""Field target (reference-batch posterior mean, PFGM++ / STF): four layers in one file.

    kernel      kernels/field_target.py (Triton), csrc/cpu/field_target.cpp,
                csrc/cuda/field_target.cu (selection math shared in csrc/include/ipfm/field_math.h)
    launcher    _launch_field: raw pointers / grid / stream
    torch op    leaf ipfm_fast::field_target (custom op, fake implementation); _FieldTarget
                (autograd, in PyTorch from the saved [B, M] weights): see ops/_op.py
    public      field_target()

.. math::
    s_{ij} = -\tfrac{N + D}{2} \log(\lVert y_i - x_j\rVert^2 + D\sigma_i^2)
    \quad (D = \infty:\ s_{ij} = -\lVert y_i - x_j\rVert^2 / (2\sigma_i^2)), \qquad
    \mathrm{target}_i = \sum_j \mathrm{softmax}_j(s_{ij})\, x_j

Accuracy method (all fused backends). ``(N + D) / 2`` (about 1600 for CIFAR-10 with
D = 128) multiplies the log of a squared distance, so a relative error of 1e-7 in
``q = d2 + D sigma^2`` -- one fp32 rounding -- already moves a logit by 1.6e-4. Hence:

1. *Screen* with fp32 dot products: ``d2~ = |y|^2 + |x|^2 - 2 y.x`` with the row norms in
   fp64 and the dot in fp32 (CPU: 8-lane FMA chains over K chunks; GPU: fp32 "ieee" /
   3xTF32 tensor-core dots). Its error is bounded by ``E = 2 L u |y| |x|`` (``L`` the
   accumulation-chain length, ``u = 2^-24``), which covers the ``|y|^2 - 2y.x + |x|^2``
   cancellation when y is near x.
2. *Select*: an entry is a candidate if, with every error against it (the worst-case bound
   E), it could be within 40 of the row's best logit; the rest get weight exactly 0 (they
   weigh < e^-40 of the best entry). A candidate whose logit error *estimate*
   ``k E' / q`` exceeds ``REFINE_TOL`` = 2e-5 is *refined*: its distance is recomputed from
   exact pairwise differences in fp64. ``E'`` is a 6-standard-deviation estimate of the
   fp32 rounding (``csrc/include/ipfm/field_math.h``), ~70x below the worst case at
   N = 3072, so realistic logit errors of unrefined entries stay ~1e-6. With small sigma
   the refined entries are the source row and its near neighbours; with large sigma
   (dense posteriors) the estimate is small and nothing is refined.
3. *Normalize* relative to the row's best ``q_ref``: the ratio ``(q_ij - q_ref) / q_ref`` in
   fp64, then ``s_ij - s_ref = -k log1p(ratio)`` (fp32 log1p/exp on the CPU, fp64 on the
   GPUs: the gaps are in [-40, 0], so a few ulp of them is <= 1e-5 and only for negligible
   weights); ``log Z = s_ref + log sum exp`` in fp64. No large logit is ever rounded to fp32.

Measured (benchmarks/field_target_accuracy.py, B = 8, M = 256, N = 3072, D in {1, 128,
2048, inf}, sigma in [0.002, 80], mixing posteriors): fused <= 4.3e-7 relative error,
plain fp32 eager (cdist + logsumexp + matmul) up to 2.1e-3.
4. *Combine*: ``target = W x_ref`` in fp32 (the weights are in [0, 1], no amplification);
   the CPU kernel skips reference rows whose weights are all zero for a 4-row tile.

Two-phase rather than flash-style: the selection needs the row's best bound before it
can decide which entries to refine, which an online softmax does not have; the [B, M]
fp32 weight matrix (the only O(B M) scratch) is also what the backward needs.
Memory: ``B M`` fp32 weights + ``B`` logz + O(M) per CPU thread; never O(B M N).

Backward (PyTorch ops on the saved weights and log Z): with ``g`` the target's gradient,
``b_ij = w_ij (g_i . (x_j - t_i) + gz_i)``, ``c_ij = -b_ij k / q_ij`` (``q_ij`` recovered
from ``log w_ij + log Z_i``; D = inf: ``-b_ij / (2 sigma_i^2)``):
``dy_i = 2 sum_j c_ij (y_i - x_j)``, ``dx_j = sum_i w_ij g_i - 2 sum_i c_ij (y_i - x_j)``,
``dsigma_i = 2 D sigma_i sum_j c_ij`` (D = inf: ``-2/sigma_i sum_j b_ij s_ij``). Five GEMMs,
in fp64 (with ``t = W x_ref`` recomputed and ``W`` renormalised in fp64): at sigma << |x|
the GEMM forms ``y_i sum_j c_ij - (c x_ref)_i`` and ``g_i . x_j - g_i . t_i`` cancel to a
fraction ~sigma / |x| of their terms, so fp32 would lose ~u |x| / sigma of the gradient
(1e-2 at sigma = 1e-4). The gradients are then within 1e-5 (normwise) of the float64
spec, or 2x plain fp32 autograd's error where that is larger (tests/test_field_target.py,
tests/test_properties.py).
The training loops never differentiate the target; where a user does, on a GPU with slow
fp64 the backward is correspondingly slower.
"""

import math

import torch

from ipfm_fast import backends
from ipfm_fast import reference as ref
from ipfm_fast._checks import check_field_target, check_finite, check_gpu_sizes
from ipfm_fast.ops import _launch, _op


# Logit error bound above which a candidate's distance is recomputed exactly (tests set
# 0 to refine every candidate, inf to refine none).
REFINE_TOL = 2.0e-5


def _launch_field(backend, y, x, out, logz, w, sigma, sigma_scalar, D, refine_tol):
    """y [B, N], x [M, N], out [B, N]: fp32 with unit last stride; logz [B], w [B, M] dense."""
    rows, n = y.shape
    m = x.shape[0]
    if rows == 0:
        return
    if backend == "cpu":
        _launch.ext().field_target_cpu(
            y.data_ptr(), y.stride(0), x.data_ptr(), x.stride(0), out.data_ptr(), out.stride(0),
            logz.data_ptr(), w.data_ptr(), rows, m, n, sigma.data_ptr() if sigma is not None else 0,
            sigma_scalar, D, refine_tol, _launch.num_threads())
    elif backend == "cuda":
        norms = torch.empty(rows + m, dtype=torch.float64, device=y.device)  # O(B + M) scratch
        _launch.ext().field_target_cuda(
            y.data_ptr(), y.stride(0), x.data_ptr(), x.stride(0), out.data_ptr(), out.stride(0),
            logz.data_ptr(), w.data_ptr(), norms.data_ptr(), rows, m, n, sigma.data_ptr() if sigma is not None else 0,
            sigma_scalar, D, refine_tol, y.device.index, _launch.cuda_stream(y.device))
    elif backend == "triton":
        from ipfm_fast.kernels.field_target import field_target_triton

        with _launch.triton_device(y):
            field_target_triton(y, x, out, logz, w, sigma, sigma_scalar, D, refine_tol)
    else:
        raise AssertionError(backend)


# --------------------------------------------------------------------------------------
# leaf (torch.library custom op) and the autograd.Function over it
# --------------------------------------------------------------------------------------


@_op.leaf("ipfm_fast::field_target")
def _field(y: torch.Tensor, sigma: torch.Tensor | None, sigma_scalar: float, x_ref: torch.Tensor, D: float,
           refine_tol: float, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y [B, N] and x_ref [M, N] fp32 with unit last stride -> (target [B, N] fp32,
    logz [B] fp32, weights [B, M] fp32)."""
    rows, m = y.shape[0], x_ref.shape[0]
    out = y.new_empty(y.shape)
    logz = y.new_empty(rows)
    w = y.new_empty(rows, m)
    _launch_field(backend, y, x_ref, out, logz, w, sigma, sigma_scalar, D, refine_tol)
    return out, logz, w


@_field.register_fake
def _(y, sigma, sigma_scalar, x_ref, D, refine_tol, backend):
    return y.new_empty(y.shape), y.new_empty(y.shape[0]), y.new_empty(y.shape[0], x_ref.shape[0])


class _FieldTarget(_op.Function):
    """The backward in PyTorch from the saved weights and log Z (module docstring)."""

    leaf = _field

    @staticmethod
    def save(ctx, inputs, outputs):
        y, sigma, sigma_scalar, x_ref, D, _, _ = inputs
        _, logz, w = outputs
        ctx.D, ctx.sigma_scalar = D, sigma_scalar
        ctx.mark_non_differentiable(w)
        ctx.save_for_backward(y, sigma, x_ref, logz, w)

    @staticmethod
    def backward(ctx, g_out, g_logz, g_w):
        # in float64: its GEMM forms cancel at sigma << |x| (module docstring, "Backward")
        y, sigma, x, logz, w = ctx.saved_tensors
        D, n = ctx.D, y.shape[1]
        y, x = y.double(), x.double()
        w = w.double()
        w = w / w.sum(1, keepdim=True)  # sums to 1 in fp64, so that sum_j b_ij = g_logz_i exactly
        sig = (sigma if sigma is not None else torch.full_like(logz, ctx.sigma_scalar)).double()
        b = torch.zeros_like(w)
        if g_out is not None:
            g_out = g_out.double()
            b = g_out @ x.T - (g_out * (w @ x)).sum(1, keepdim=True)  # g_i . (x_j - t_i), t in fp64
        if g_logz is not None:
            b = b + g_logz.double()[:, None]
        b = w * b
        live = w > 0
        s = torch.where(live, torch.log(torch.where(live, w, 1.0)) + logz.double()[:, None], 0.0)  # s_ij, w_ij > 0
        if math.isinf(D):
            c = -b * (0.5 / sig.square())[:, None]
            grad_sigma = (-2.0 / sig) * (b * s).sum(1)
        else:
            k = 0.5 * (n + D)
            kq = torch.where(live, k * torch.exp(s / k), 0.0)  # k / q_ij = k exp(s_ij / k)
            c = -b * kq
            grad_sigma = 2.0 * D * sig * c.sum(1)
        grad_y = grad_x = None
        if ctx.needs_input_grad[0]:
            grad_y = (2.0 * (y * c.sum(1, keepdim=True) - c @ x)).float()
        if ctx.needs_input_grad[3]:
            grad_x = 2.0 * (x * c.sum(0)[:, None] - c.T @ y)
            if g_out is not None:
                grad_x = grad_x + w.T @ g_out
            grad_x = grad_x.float()
        grad_sigma = grad_sigma.float() if ctx.needs_input_grad[1] else None
        return grad_y, grad_sigma, None, grad_x, None, None, None


# --------------------------------------------------------------------------------------
# public function
# --------------------------------------------------------------------------------------


def _rows2d(t, rows, n):
    t2 = t.reshape(rows, n)
    if t2.dtype != torch.float32:
        t2 = t2.float()
    if t2.stride(1) != 1 and n > 1:
        t2 = t2.contiguous()
    return t2


def _check_gpu_sizes(op, backend, rows, m, n):
    """One program per row of y and of x_ref, one per output tile of the two GEMM-shaped
    kernels ([64, 64] tiles of [B, M]; [32 or 64, 128 or 64] of [B, N]: at most
    ceil(B / 32) * ceil(N / 64)), each a 1-D grid; 32-bit column indices."""
    if backend not in ("triton", "cuda"):
        return
    check_gpu_sizes(op, backend, n, {
        f"B = {rows} rows of y (one program each)": rows,
        f"M = {m} rows of x_ref (one program each)": m,
        f"the [B, M] = [{rows}, {m}] tiles": -(-rows // 64) * -(-m // 64),
        f"the [B, N] = [{rows}, {n}] tiles": -(-rows // 32) * -(-n // 64),
    })


def field_target(y, sigma, x_ref, D, *, return_logz=False, backend="auto"):
    r"""Posterior mean of the source over a reference batch: the PFGM++ / STF training target.

    .. math::
        s_{ij} = -\tfrac{N + D}{2} \log(\lVert y_i - x_j\rVert^2 + D\sigma_i^2)
        \quad (D = \infty:\ s_{ij} = -\lVert y_i - x_j\rVert^2 / (2\sigma_i^2)),

        w_{ij} = \mathrm{softmax}_j(s_{ij}), \qquad \mathrm{target}_i = \sum_j w_{ij} x_j

    The field direction at ``(y_i, r_i = sigma_i sqrt(D))`` is ``y_i - target_i``.

    Args:
        y: [B, ...] perturbed rows (float32 / bfloat16 / float16; float64 runs on the
            reference). Any layout.
        sigma: float, or tensor [B] (also [] or [B, 1, ...]) on y's device; differentiable.
        x_ref: [M, ...] reference batch with y's trailing shape, M >= 1; differentiable.
        D: positive float or math.inf.
        return_logz: also return ``log Z_i = logsumexp_j s_ij``, [B] float32.
        backend: "auto", "triton", "cuda", "cpu" or "reference".

    Returns:
        target [B, ...] in y's dtype (computed in fp32 with the accuracy method of
        :mod:`ipfm_fast.ops.field_target`: relative error ~1e-6 against float64), and
        log Z when asked. Differentiable in y, x_ref and sigma.

    Reference batch as the reference codes build it (PFGM++ ``pfgmpp_target`` and STF):
    the minibatch's own clean sources come first, then extra data rows, and row i of y
    was perturbed from row i of the reference batch::

        x_ref = torch.cat([x, x_extra])          # [B + M_extra, ...]
        y = ipf.perturb(x, sigma, D)             # y_i ~ p_r(. | x_i)
        target = ipf.field_target(y, sigma, x_ref, D)
        loss = weight * (net(y, sigma) - target) ** 2   # instead of (net(y) - x) ** 2

    (With ``x_ref = x`` only, the target is the posterior mean over the minibatch.)

    Input checks: trailing shapes that differ, M = 0, D <= 0 and non-finite sigma raise
    InvalidInput (a ValueError) naming the argument; B = 0 returns an empty result. NaN/Inf
    in y or x_ref raise for CPU tensors; for CUDA tensors checking would need a host sync,
    so they are not checked and propagate: a non-finite y_i gives a NaN row, a non-finite
    x_ref row NaN everywhere (as the reference computes it).

    Limits of the GPU backends (InvalidInput past them): B, M and N at most 2^31 - 1 each
    (one program per row of y and of x_ref; 32-bit column indices), and at most 2^31 - 1
    output tiles per launch, ``ceil(B / 64) * ceil(M / 64)`` and ``ceil(B / 32) *
    ceil(N / 64)`` (the [B, M] fp32 scratch runs out of memory first).
    """
    op = "field_target"
    D, sigma_t, sigma_f = check_field_target(y, sigma, x_ref, D, op, finite=False)  # finiteness: below
    rows, m = y.shape[0], x_ref.shape[0]
    name = backends.resolve(op, backend, y.device, y.dtype)
    if name == "reference":
        if not return_logz:
            return ref.field_target(y, sigma, x_ref, D)
        target, logz = ref.field_target(y, sigma, x_ref, D, return_logz=True)
        return target, logz.to(torch.float64 if y.dtype == torch.float64 else torch.float32)
    _check_gpu_sizes(op, name, rows, m, math.prod(y.shape[1:]))  # before a pass over inputs of any size
    if name != "cpu":  # the CPU kernel checks finiteness itself, for free, on its row norms
        check_finite(y, "y", op)
        check_finite(x_ref, "x_ref", op)
    if rows == 0:
        target = torch.empty_like(y)
        logz = y.new_empty(0, dtype=torch.float32)
        return (target, logz) if return_logz else target
    n = math.prod(y.shape[1:])
    y2 = _rows2d(y, rows, n)
    x2 = _rows2d(x_ref, m, n)
    if sigma_t is not None:
        sigma_t = sigma_t.to(torch.float32).contiguous()
    out, logz, _ = _FieldTarget.run(y2, sigma_t, sigma_f or 0.0, x2, D, REFINE_TOL, name)
    target = out.reshape(y.shape).to(y.dtype)
    return (target, logz) if return_logz else target

