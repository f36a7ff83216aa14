r"""IPFM distillation losses, fused: four layers in one file.

    kernel      kernels/losses.py (Triton), csrc/cpu/losses.cpp, csrc/cuda/losses.cu
                (math shared by C++ and CUDA in csrc/include/ipfm/losses_math.h)
    launcher    _launch_gen_forward / _launch_gen_backward / _launch_fake_forward /
                _launch_fake_backward: row layout, raw pointers, grid / stream
    torch op    leaves ipfm_fast::ipfm_generator_loss (+ _backward), ipfm_fast::ipfm_fake_loss
                (+ _backward): custom ops with fake implementations; _GenLoss, _FakeLoss
                (autograd): see ops/_op.py
    public      ipfm_generator_loss(), ipfm_fake_loss()

Generator loss (a = teacher_out, b = fake_out, x = generator output, d = a - b, e = a - x):

.. math::
    \ell_i = w_i \sum_n d\,(e - \alpha d), \qquad
    \partial_a = c_i [e + (1 - 2\alpha) d], \quad \partial_b = c_i [2\alpha d - e], \quad
    \partial_x = -c_i d

Fake loss: :math:`\ell_i = \lambda(\sigma_i) \sum_n (b - x)^2`,
:math:`\partial_b = 2 c_i (b - x) = -\partial_x`.

Cost of a fused call (B rows of N elements): the forward reads each input once
(3 BN elements for the generator loss, 2 BN for the fake loss) and writes a few floats
per row; the backward reads each input it needs once and writes each needed gradient once
(at most 3 BN + 3 BN, resp. 2 BN + 2 BN). The per-row sums are formed as fixed-size
chunk partials and reduced in a fixed order: results are bitwise reproducible.
"""

import math

import torch

from ipfm_fast import backends
from ipfm_fast import reference as ref
from ipfm_fast._checks import check_fake_loss, check_generator_loss, check_gpu_sizes, check_sigma_values
from ipfm_fast.ops import _launch, _op

_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
_TRITON_BLOCK = 2048  # elements per Triton program (the CUDA kernels use the same chunk)
_TRITON_BLOCK_ROWS = 1024  # rows per step of the Triton finalization


# --------------------------------------------------------------------------------------
# layouts and launchers
# --------------------------------------------------------------------------------------


def _row_numel(t):
    return math.prod(t.shape[1:])


def _inner(t):
    """Strides of the non-trivial inner dimensions: two tensors with equal keys store the
    elements of a row in the same order."""
    return tuple(st for sz, st in zip(t.shape[1:], t.stride()[1:]) if sz != 1)


def _contiguous_inner(t):
    out, step = [], 1
    for sz in reversed(t.shape[1:]):
        if sz != 1:
            out.append(step)
        step *= sz
    return tuple(reversed(out))


def _kernel_inputs(*ts):
    """The inputs as the kernels walk them: every row one dense block at b * stride(0),
    its elements in the same order in every tensor. Tensors are used in place when their
    layouts agree (contiguous, channels_last, sliced rows, ...); otherwise those that are
    not row-major get a contiguous copy."""
    if all(t.is_contiguous() and t.shape == ts[0].shape for t in ts) and ts[0].dim() > 0:
        return ts  # the common case, without the stride analysis below
    if all(_launch.rows_dense(t) for t in ts) and all(_inner(t) == _inner(ts[0]) for t in ts[1:]):
        return ts
    return tuple(t if _launch.rows_dense(t) and _inner(t) == _contiguous_inner(t) else t.contiguous() for t in ts)


def _grad_like(t):
    """A gradient buffer with t's element order inside each row and rows packed (stride N)."""
    if t.dim() == 0:
        return torch.empty_like(t)
    stride = list(t.stride())
    stride[0] = _row_numel(t)
    return torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device)


def _grad_buffers(views, needs):
    """Gradient outputs: a buffer for each needed one, else an empty tensor."""
    return tuple(_grad_like(v) if need else v.new_empty(0) for v, need in zip(views, needs))


def _ptr(t):
    return t.data_ptr() if t is not None else 0


def _pow2(v):
    return 1 << max(int(v) - 1, 0).bit_length()


def _triton_grid(n):
    block = max(16, min(_TRITON_BLOCK, _pow2(n)))
    return block, -(-n // block), max(1, min(8, block // 256))  # block, chunks per row, warps


def _check_gpu_sizes(op, backend, rows, n):
    if backend not in ("triton", "cuda"):
        return
    # one program per (row, chunk of 2048) on both GPU backends (csrc/cuda/losses.cu kChunk)
    check_gpu_sizes(op, backend, n, {f"{rows} rows of {n} elements": rows * -(-n // _TRITON_BLOCK)})


def _scale(reduction, rows):
    return 1.0 / rows if reduction == "mean" else 1.0


def _grad_stride(grad):
    return grad.stride(0) if grad.dim() == 1 else 0


def _launch_gen_forward(backend, a, b, x, weight, alpha, reduction, loss, masked, stats):
    """Runs one fused forward: a, b, x share the row layout of _kernel_inputs; weight is
    None (adaptive) or fp32 [B]; writes loss (fp32), masked (int64 []) and stats (fp32 [3, B])."""
    rows, n = a.shape[0], _row_numel(a)
    strides = [_launch.row_stride(t) for t in (a, b, x)]
    red = _REDUCTIONS[reduction]
    if backend == "cpu":
        _launch.ext().gen_loss_forward_cpu(
            a.data_ptr(), strides[0], b.data_ptr(), strides[1], x.data_ptr(), strides[2],
            _launch.DTYPE_CODES[a.dtype], rows, n, _ptr(weight), alpha, red, loss.data_ptr(),
            masked.data_ptr(), stats.data_ptr(), _launch.num_threads())
    elif backend == "cuda":
        ext = _launch.ext()
        workspace = torch.empty(ext.gen_loss_workspace_cuda(rows, n), dtype=torch.float32, device=a.device)
        ext.gen_loss_forward_cuda(
            a.data_ptr(), strides[0], b.data_ptr(), strides[1], x.data_ptr(), strides[2],
            _launch.DTYPE_CODES[a.dtype], rows, n, _ptr(weight), alpha, red, loss.data_ptr(),
            masked.data_ptr(), stats.data_ptr(), workspace.data_ptr(), a.device.index,
            _launch.cuda_stream(a.device))
    elif backend == "triton":
        from ipfm_fast.kernels.losses import gen_finalize_kernel, gen_partial_kernel

        block, chunks, warps = _triton_grid(n)
        partials = torch.empty(rows * chunks * 3, dtype=torch.float32, device=a.device)
        with _launch.triton_device(a):
            gen_partial_kernel[(rows * chunks,)](
                a, strides[0], b, strides[1], x, strides[2], partials, alpha, n, chunks,
                BLOCK=block, num_warps=warps)
            gen_finalize_kernel[(1,)](
                partials, weight if weight is not None else stats, stats, loss, masked, rows, n, chunks,
                ADAPTIVE=weight is None, REDUCTION=red, BLOCK_R=min(_TRITON_BLOCK_ROWS, _pow2(rows)), num_warps=4)
    else:
        raise AssertionError(backend)


def _launch_gen_backward(backend, grad, a, b, x, stats, alpha, scale, ga, gb, gx):
    """Fills the needed gradients (None = not needed), all with row stride N."""
    rows, n = a.shape[0], _row_numel(a)
    strides = [_launch.row_stride(t) for t in (a, b, x)]
    if backend == "cpu":
        _launch.ext().gen_loss_backward_cpu(
            grad.data_ptr(), _grad_stride(grad), a.data_ptr(), strides[0], b.data_ptr(), strides[1],
            x.data_ptr(), strides[2], _launch.DTYPE_CODES[a.dtype], rows, n, stats.data_ptr(), alpha, scale,
            _ptr(ga), _ptr(gb), _ptr(gx), n, _launch.num_threads())
    elif backend == "cuda":
        _launch.ext().gen_loss_backward_cuda(
            grad.data_ptr(), _grad_stride(grad), a.data_ptr(), strides[0], b.data_ptr(), strides[1],
            x.data_ptr(), strides[2], _launch.DTYPE_CODES[a.dtype], rows, n, stats.data_ptr(), alpha, scale,
            _ptr(ga), _ptr(gb), _ptr(gx), n, a.device.index, _launch.cuda_stream(a.device))
    elif backend == "triton":
        from ipfm_fast.kernels.losses import gen_backward_kernel

        block, chunks, warps = _triton_grid(n)
        any_out = next(g for g in (ga, gb, gx) if g is not None)
        with _launch.triton_device(a):
            gen_backward_kernel[(rows * chunks,)](
                grad, _grad_stride(grad), a, strides[0], b, strides[1], x, strides[2], stats,
                ga if ga is not None else any_out, gb if gb is not None else any_out,
                gx if gx is not None else any_out, n, rows, alpha, scale, n, chunks,
                NEED_A=ga is not None, NEED_B=gb is not None, NEED_X=gx is not None, BLOCK=block, num_warps=warps)
    else:
        raise AssertionError(backend)


def _launch_fake_forward(backend, b, x, sigma, sigma_scalar, sigma_data, reduction, loss, stats):
    """sigma: fp32 [B] or None (then sigma_scalar); writes loss (fp32) and stats (fp32 [2, B])."""
    rows, n = b.shape[0], _row_numel(b)
    strides = [_launch.row_stride(t) for t in (b, x)]
    red = _REDUCTIONS[reduction]
    if backend == "cpu":
        _launch.ext().fake_loss_forward_cpu(
            b.data_ptr(), strides[0], x.data_ptr(), strides[1], _launch.DTYPE_CODES[b.dtype], rows, n,
            _ptr(sigma), sigma_scalar, sigma_data, red, loss.data_ptr(), stats.data_ptr(), _launch.num_threads())
    elif backend == "cuda":
        ext = _launch.ext()
        workspace = torch.empty(ext.fake_loss_workspace_cuda(rows, n), dtype=torch.float32, device=b.device)
        ext.fake_loss_forward_cuda(
            b.data_ptr(), strides[0], x.data_ptr(), strides[1], _launch.DTYPE_CODES[b.dtype], rows, n,
            _ptr(sigma), sigma_scalar, sigma_data, red, loss.data_ptr(), stats.data_ptr(), workspace.data_ptr(),
            b.device.index, _launch.cuda_stream(b.device))
    elif backend == "triton":
        from ipfm_fast.kernels.losses import fake_finalize_kernel, fake_partial_kernel

        block, chunks, warps = _triton_grid(n)
        partials = torch.empty(rows * chunks, dtype=torch.float32, device=b.device)
        with _launch.triton_device(b):
            fake_partial_kernel[(rows * chunks,)](
                b, strides[0], x, strides[1], partials, n, chunks, BLOCK=block, num_warps=warps)
            fake_finalize_kernel[(1,)](
                partials, sigma if sigma is not None else stats, sigma_scalar, sigma_data, stats, loss, rows, chunks,
                SIGMA_PER_ROW=sigma is not None, REDUCTION=red, BLOCK_R=min(_TRITON_BLOCK_ROWS, _pow2(rows)),
                num_warps=4)
    else:
        raise AssertionError(backend)


def _launch_fake_backward(backend, grad, b, x, stats, scale, gb, gx):
    rows, n = b.shape[0], _row_numel(b)
    strides = [_launch.row_stride(t) for t in (b, x)]
    if backend == "cpu":
        _launch.ext().fake_loss_backward_cpu(
            grad.data_ptr(), _grad_stride(grad), b.data_ptr(), strides[0], x.data_ptr(), strides[1],
            _launch.DTYPE_CODES[b.dtype], rows, n, stats.data_ptr(), scale, _ptr(gb), _ptr(gx), n,
            _launch.num_threads())
    elif backend == "cuda":
        _launch.ext().fake_loss_backward_cuda(
            grad.data_ptr(), _grad_stride(grad), b.data_ptr(), strides[0], x.data_ptr(), strides[1],
            _launch.DTYPE_CODES[b.dtype], rows, n, stats.data_ptr(), scale, _ptr(gb), _ptr(gx), n,
            b.device.index, _launch.cuda_stream(b.device))
    elif backend == "triton":
        from ipfm_fast.kernels.losses import fake_backward_kernel

        block, chunks, warps = _triton_grid(n)
        any_out = gb if gb is not None else gx
        with _launch.triton_device(b):
            fake_backward_kernel[(rows * chunks,)](
                grad, _grad_stride(grad), b, strides[0], x, strides[1], stats,
                gb if gb is not None else any_out, gx if gx is not None else any_out, n, scale, n, chunks,
                NEED_B=gb is not None, NEED_X=gx is not None, BLOCK=block, num_warps=warps)
    else:
        raise AssertionError(backend)


# --------------------------------------------------------------------------------------
# leaves (torch.library custom ops) and the autograd.Functions over them
# --------------------------------------------------------------------------------------


def _gen_outputs(a, reduction):
    rows = a.shape[0]
    loss = torch.empty((rows,) if reduction == "none" else (), dtype=torch.float32, device=a.device)
    masked = torch.empty((), dtype=torch.int64, device=a.device)
    stats = torch.empty((3, rows), dtype=torch.float32, device=a.device)
    return loss, masked, stats


@_op.leaf("ipfm_fast::ipfm_generator_loss")
def _gen_loss(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, alpha: float,
              reduction: str, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss fp32, masked-row count int64 [], per-row stats fp32 [3, B] =
    (w, u, keep) saved for backward)."""
    loss, masked, stats = _gen_outputs(a, reduction)
    a_k, b_k, x_k = _kernel_inputs(a, b, x)
    _launch_gen_forward(backend, a_k, b_k, x_k, weight, alpha, reduction, loss, masked, stats)
    return loss, masked, stats


@_gen_loss.register_fake
def _(a, b, x, weight, alpha, reduction, backend):
    return _gen_outputs(a, reduction)


@_op.leaf("ipfm_fast::ipfm_generator_loss_backward")
def _gen_loss_backward(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, x: torch.Tensor, stats: torch.Tensor,
                       alpha: float, reduction: str, need_a: bool, need_b: bool, need_x: bool,
                       backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. (a, b, x); an empty tensor for each one not needed."""
    views = _kernel_inputs(a, b, x)
    ga, gb, gx = _grad_buffers(views, (need_a, need_b, need_x))
    _launch_gen_backward(backend, grad.to(torch.float32), *views, stats, alpha, _scale(reduction, a.shape[0]),
                         ga if need_a else None, gb if need_b else None, gx if need_x else None)
    return ga, gb, gx


@_gen_loss_backward.register_fake
def _(grad, a, b, x, stats, alpha, reduction, need_a, need_b, need_x, backend):
    return _grad_buffers(_kernel_inputs(a, b, x), (need_a, need_b, need_x))


class _GenLoss(_op.Function):
    """Gradients of a, b, x from one fused pass; of a given weight from the saved stats."""

    leaf = _gen_loss

    @staticmethod
    def save(ctx, inputs, outputs):
        a, b, x, weight, alpha, reduction, backend = inputs
        ctx.alpha, ctx.reduction, ctx.backend = alpha, reduction, backend
        ctx.mark_non_differentiable(outputs[1], outputs[2])
        ctx.save_for_backward(a, b, x, outputs[2])

    @staticmethod
    def backward(ctx, grad_loss, grad_masked, grad_stats):
        need_a, need_b, need_x, need_w = ctx.needs_input_grad[:4]
        a, b, x, stats = ctx.saved_tensors
        ga = gb = gx = gw = None
        if need_a or need_b or need_x:
            ga, gb, gx = _gen_loss_backward(grad_loss, a, b, x, stats, ctx.alpha, ctx.reduction, need_a, need_b,
                                            need_x, ctx.backend)
            ga, gb, gx = (g if need else None for g, need in zip((ga, gb, gx), (need_a, need_b, need_x)))
        if need_w:  # d loss_i / d w_i = u_i (0 on masked rows)
            gw = grad_loss.float() * _scale(ctx.reduction, a.shape[0]) * stats[1]
            gw = torch.where(stats[2] != 0, gw, torch.zeros((), dtype=gw.dtype, device=gw.device))
        return ga, gb, gx, gw, None, None, None


def _fake_outputs(b, reduction):
    rows = b.shape[0]
    loss = torch.empty((rows,) if reduction == "none" else (), dtype=torch.float32, device=b.device)
    return loss, torch.empty((2, rows), dtype=torch.float32, device=b.device)


@_op.leaf("ipfm_fast::ipfm_fake_loss")
def _fake_loss(b: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor | None, sigma_scalar: float,
               sigma_data: float, reduction: str, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss fp32, per-row stats fp32 [2, B] = (lambda, sum (b - x)^2))."""
    loss, stats = _fake_outputs(b, reduction)
    b_k, x_k = _kernel_inputs(b, x)
    _launch_fake_forward(backend, b_k, x_k, sigma, sigma_scalar, sigma_data, reduction, loss, stats)
    return loss, stats


@_fake_loss.register_fake
def _(b, x, sigma, sigma_scalar, sigma_data, reduction, backend):
    return _fake_outputs(b, reduction)


@_op.leaf("ipfm_fast::ipfm_fake_loss_backward")
def _fake_loss_backward(grad: torch.Tensor, b: torch.Tensor, x: torch.Tensor, stats: torch.Tensor, reduction: str,
                        need_b: bool, need_x: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. (b, x); an empty tensor for each one not needed."""
    views = _kernel_inputs(b, x)
    gb, gx = _grad_buffers(views, (need_b, need_x))
    _launch_fake_backward(backend, grad.to(torch.float32), *views, stats, _scale(reduction, b.shape[0]),
                          gb if need_b else None, gx if need_x else None)
    return gb, gx


@_fake_loss_backward.register_fake
def _(grad, b, x, stats, reduction, need_b, need_x, backend):
    return _grad_buffers(_kernel_inputs(b, x), (need_b, need_x))


class _FakeLoss(_op.Function):
    """Gradients of b and x from one fused pass; of sigma from the saved stats."""

    leaf = _fake_loss

    @staticmethod
    def save(ctx, inputs, outputs):
        b, x, sigma, sigma_scalar, sigma_data, reduction, backend = inputs
        ctx.reduction, ctx.backend = reduction, backend
        ctx.mark_non_differentiable(outputs[1])
        ctx.save_for_backward(b, x, sigma, outputs[1])

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        need_b, need_x, need_sigma = ctx.needs_input_grad[:3]
        b, x, sigma, stats = ctx.saved_tensors
        gb = gx = gsigma = None
        if need_b or need_x:
            gb, gx = _fake_loss_backward(grad_loss, b, x, stats, ctx.reduction, need_b, need_x, ctx.backend)
            gb, gx = (gb if need_b else None), (gx if need_x else None)
        if need_sigma:  # d lambda / d sigma = -2 / sigma^3
            gsigma = grad_loss.float() * _scale(ctx.reduction, b.shape[0]) * stats[1] * (-2.0 / sigma**3)
        return gb, gx, gsigma, None, None, None, None


# --------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------


def ipfm_generator_loss(teacher_out, fake_out, x, *, alpha=1.0, weight="adaptive", reduction="mean",
                        backend="auto", return_masked=False):
    r"""IPFM / SiD generator loss, fused (forward and backward one pass each).

    With a = teacher_out, b = fake_out (the two denoisers at the perturbed generator
    output) and x the generator output, per row i:

    .. math::
        \ell_i = w_i \sum_n (a - b)\,\big((a - x) - \alpha (a - b)\big), \qquad
        w_i = 1 / \max(\mathrm{mean}_n |x_i - a_i|, 10^{-5})\ \text{(adaptive, no gradient)}

    Gradients flow to all three inputs (and to a given weight):
    :math:`\partial_a = w[(a-x) + (1-2\alpha)(a-b)]`, :math:`\partial_b = w[2\alpha(a-b) - (a-x)]`,
    :math:`\partial_x = -w(a-b)`.

    Args:
        teacher_out, fake_out, x: [B, ...] tensors of one shape, dtype (float32, bfloat16,
            float16; float64 runs on the reference) and device; any layout.
        alpha: finite float; 0.5 = plain IPFM, 1.0 = the stable default for finite D,
            1.2 = SiD.
        weight: "adaptive" or a tensor [B] (also [B, 1, ...]) on the inputs' device.
        reduction: "mean" (sum of the per-row losses / B, as the reference training loops
            scale it), "sum", or "none" (-> [B]).
        backend: "auto", "triton", "cuda", "cpu" or "reference".
        return_masked: also return the number of masked rows, a 0-dim int64 tensor on the
            inputs' device (no host sync).

    Rows with a NaN or Inf anywhere in a, b or x are masked: they add 0 to the loss and
    get zero gradient. Arithmetic and accumulation are fp32; the loss is float32 (float64
    for float64 inputs), the gradients have the inputs' dtype; results are bitwise
    reproducible run to run.

    Limits of the GPU backends (InvalidInput past them): N <= 2^31 - 1 elements per row
    (32-bit column indices) and ``B * ceil(N / 2048) <= 2^31 - 1`` programs per launch
    (about 2^42 elements); the cpu and reference backends have none.
    """
    op = "ipfm_generator_loss"
    a, b = teacher_out, fake_out
    rows, alpha, weight_t = check_generator_loss(a, b, x, alpha, weight, reduction, op)
    name = backends.resolve(op, backend, a.device, a.dtype)
    if name == "reference" or a.numel() == 0:
        return ref.ipfm_generator_loss(a, b, x, alpha=alpha, weight=weight, reduction=reduction,
                                       return_masked=return_masked)
    _check_gpu_sizes(op, name, rows, _row_numel(a))
    if weight_t is not None:
        weight_t = weight_t.to(torch.float32).contiguous()
    loss, masked, _ = _GenLoss.run(a, b, x, weight_t, alpha, reduction, name)
    return (loss, masked) if return_masked else loss


def ipfm_fake_loss(fake_out, x, sigma, *, sigma_data=0.5, reduction="mean", backend="auto"):
    r"""Field-matching loss of the fake network, fused (forward and backward one pass each):

    .. math::
        \ell_i = \lambda(\sigma_i) \lVert b_i - x_i \rVert^2, \qquad
        \lambda(\sigma) = (\sigma^2 + \sigma_d^2) / (\sigma \sigma_d)^2

    Args:
        fake_out: b, [B, ...] float32 / bfloat16 / float16 (float64 runs on the reference).
        x: the target, same shape, dtype and device (callers usually pass it detached;
            it gets a gradient when it requires one).
        sigma: positive float, or a tensor [B] (also [] or [B, 1, ...]) on the inputs'
            device, differentiable. A CPU tensor is checked; on CUDA a non-positive or
            non-finite entry makes its row NaN (checking would sync).
        sigma_data: positive float (EDM's 0.5).
        reduction: "mean" (sum of per-row losses / B), "sum" or "none" (-> [B]).
        backend: "auto", "triton", "cuda", "cpu" or "reference".

    Returns the loss in float32 (float64 for float64 inputs), accumulated in fp32,
    bitwise reproducible. Non-finite values are not masked. Size limits of the GPU
    backends: as in :func:`ipfm_generator_loss`.
    """
    op = "ipfm_fake_loss"
    rows, sigma_data, sigma_t, sigma_f = check_fake_loss(fake_out, x, sigma, sigma_data, reduction, op,
                                                         sigma_values=False)  # below, or by the CPU kernel
    name = backends.resolve(op, backend, fake_out.device, fake_out.dtype)
    if name == "reference" or fake_out.numel() == 0:
        return ref.ipfm_fake_loss(fake_out, x, sigma, sigma_data=sigma_data, reduction=reduction)
    _check_gpu_sizes(op, name, rows, _row_numel(fake_out))
    if name != "cpu":  # the C++ CPU kernel checks sigma as it reads it (the same InvalidInput, no extra pass)
        check_sigma_values(sigma_t, op)
    if sigma_t is not None:
        sigma_t = sigma_t.to(torch.float32).contiguous()
    loss, _ = _FakeLoss.run(fake_out, x, sigma_t, sigma_f or 0.0, sigma_data, reduction, name)
    return loss
