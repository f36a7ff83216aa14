r"""PFGM++ perturbation and prior: four layers in one file.

    kernel      kernels/perturb.py (Triton), csrc/cpu/perturb.cpp, csrc/cuda/perturb.cu
    launcher    _launch_perturb: row layout, raw pointers, grid / stream
    torch op    leaves ipfm_fast::perturb, ipfm_fast::perturb_noise (custom ops with fake
                implementations); _PerturbFunction, _NoiseFunction (autograd; the perturb
                backward regenerates the noise through perturb_noise): see ops/_op.py
    public      perturb(), sample_prior()

.. math::
    y = x + \sigma \, g \sqrt{D / W}, \quad g \sim \mathcal N(0, I_N), \quad W \sim \chi^2_D

Cost of a fused call: reads x once, writes y once (and the noise once when asked):
``(2 or 3) * B * N`` elements; the Philox key is one 8-byte draw from the generator.
"""

import math

import torch

from ipfm_fast import backends
from ipfm_fast import reference as ref
from ipfm_fast._checks import check_gpu_sizes, check_perturb, check_philox_rows, check_prior
from ipfm_fast.ops import _launch, _op

# Philox counters (4 elements each) per Triton program: ~1024 elements on a GPU; in the
# interpreter each program costs milliseconds whatever its size, so tiles are much larger.
_TRITON_TILE_G = 256
_TRITON_TILE_G_INTERPRET = 4096
_CUDA_ELEMS_PER_BLOCK = 2048  # csrc/cuda/perturb.cu kElemsPerBlock; one row per block


def _next_pow2(v):
    return 1 << max(v - 1, 0).bit_length()


def triton_tiles(rows, n, gpu=None):
    """(ROWS, BLOCK_G, blocks_per_row, programs) of the Triton launch for ``rows`` rows of
    ``n`` elements: tiles of ROWS x 4 * BLOCK_G elements, ROWS > 1 only for short rows.
    gpu: the GPU tile sizes (True) or the interpreter's (False); None: as
    :func:`ipfm_fast.ops._launch.use_gpu_tiles` says."""
    gpu = _launch.use_gpu_tiles() if gpu is None else gpu
    tile_g = _TRITON_TILE_G if gpu else _TRITON_TILE_G_INTERPRET
    groups = (n + 3) // 4
    block_g = min(tile_g, _next_pow2(groups))
    rows_per_program = min(_next_pow2(rows), max(1, tile_g // block_g))
    blocks_per_row = -(-groups // block_g)
    return rows_per_program, block_g, blocks_per_row, -(-rows // rows_per_program) * blocks_per_row


def _check_gpu_sizes(op, backend, rows, n):
    if backend not in ("triton", "cuda"):
        return
    if backend == "triton":
        programs = triton_tiles(rows, n, gpu=True)[3]  # the GPU grid, also when interpreted
    else:
        programs = rows * -(-n // _CUDA_ELEMS_PER_BLOCK)
    check_gpu_sizes(op, backend, n, {f"{rows} rows of {n} elements": programs})


def _alpha(D):
    return D / 2.0  # inf stays inf: the kernels then skip the chi-square draw


def _launch_perturb(backend, x, y, noise, sigma, sigma_scalar, D, seed):
    """Runs one fused backend. x may be None (prior: y = sigma * noise); noise may be None.
    All tensors share the row layout described by _launch.kernel_views."""
    rows = y.shape[0]
    n = y[0].numel() if rows else 0
    if rows == 0 or n == 0:
        return
    alpha = _alpha(D)
    x_stride = _launch.row_stride(x) if x is not None else 0
    noise_stride = _launch.row_stride(noise) if noise is not None else 0
    sigma_scalar = 0.0 if sigma is not None else sigma_scalar
    if backend == "cpu":
        _launch.ext().perturb_cpu(
            x.data_ptr() if x is not None else 0, x_stride, y.data_ptr(), _launch.row_stride(y),
            noise.data_ptr() if noise is not None else 0, noise_stride, _launch.DTYPE_CODES[y.dtype],
            rows, n, sigma.data_ptr() if sigma is not None else 0, sigma_scalar, alpha,
            _launch.seed_as_uint64(seed), _launch.num_threads())
    elif backend == "cuda":
        _launch.ext().perturb_cuda(
            x.data_ptr() if x is not None else 0, x_stride, y.data_ptr(), _launch.row_stride(y),
            noise.data_ptr() if noise is not None else 0, noise_stride, _launch.DTYPE_CODES[y.dtype],
            rows, n, sigma.data_ptr() if sigma is not None else 0, sigma_scalar, alpha,
            seed.data_ptr(), y.device.index, _launch.cuda_stream(y.device))
    elif backend == "triton":
        from ipfm_fast.kernels.perturb import CAND, perturb_kernel

        rows_per_program, block_g, blocks_per_row, programs = triton_tiles(rows, n)
        with _launch.triton_device(y):
            perturb_kernel[(programs,)](
                x if x is not None else y, x_stride, y, _launch.row_stride(y),
                noise if noise is not None else y, noise_stride,
                sigma if sigma is not None else seed, sigma_scalar, alpha, seed,
                rows, n, (n + 3) // 4, blocks_per_row,
                HAS_X=x is not None, SIGMA_PER_ROW=sigma is not None, WRITE_NOISE=noise is not None,
                FINITE_D=not math.isinf(D), ROWS=rows_per_program, BLOCK_G=block_g, CAND=CAND,
            )
    else:
        raise AssertionError(backend)


# --------------------------------------------------------------------------------------
# leaves (torch.library custom ops) and the autograd.Functions over them
# --------------------------------------------------------------------------------------


@_op.leaf("ipfm_fast::perturb")
def _perturb(x: torch.Tensor, sigma: torch.Tensor | None, sigma_scalar: float, D: float, seed: torch.Tensor,
             return_noise: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x + sigma * noise (and the noise, or an empty tensor)."""
    y = torch.empty_like(x)
    noise = torch.empty_like(x) if return_noise else x.new_empty(0)
    x_k, outs_k, copy_back = _launch.kernel_views(x, y, *([noise] if return_noise else []))
    _launch_perturb(backend, x_k, outs_k[0], outs_k[1] if return_noise else None, sigma, sigma_scalar, D, seed)
    copy_back()
    return y, noise


@_perturb.register_fake
def _(x, sigma, sigma_scalar, D, seed, return_noise, backend):
    return torch.empty_like(x), (torch.empty_like(x) if return_noise else x.new_empty(0))


@_op.leaf("ipfm_fast::perturb_noise")
def _noise(shape: list[int], stride: list[int], dtype: torch.dtype, sigma: torch.Tensor | None,
           sigma_scalar: float, D: float, seed: torch.Tensor, backend: str) -> torch.Tensor:
    """sigma * g * sqrt(D / W) with the given shape/strides on seed's device, with the same
    element -> random number mapping as ipfm_fast::perturb on a tensor of that layout."""
    y = torch.empty_strided(shape, stride, dtype=dtype, device=seed.device)
    _, (y_k,), copy_back = _launch.kernel_views(y, y)
    _launch_perturb(backend, None, y_k, None, sigma, sigma_scalar, D, seed)
    copy_back()
    return y


@_noise.register_fake
def _(shape, stride, dtype, sigma, sigma_scalar, D, seed, backend):
    return torch.empty_strided(shape, stride, dtype=dtype, device=seed.device)


class _PerturbFunction(_op.Function):
    """dy/dx = 1; dy/dsigma = noise, summed per row against the upstream gradient. Without
    return_noise the backward regenerates the noise from the seed (counter-based Philox)
    rather than storing it."""

    leaf = _perturb

    @staticmethod
    def save(ctx, inputs, outputs):
        x, sigma, _, D, seed, return_noise, backend = inputs
        ctx.D, ctx.backend = D, backend
        ctx.layout = (list(x.shape), list(x.stride()))
        ctx.mark_non_differentiable(outputs[1])
        ctx.save_for_backward(seed, outputs[1] if return_noise else None)

    @staticmethod
    def backward(ctx, grad_y, grad_noise):
        seed, noise = ctx.saved_tensors
        grad_x = grad_y if ctx.needs_input_grad[0] else None
        grad_sigma = None
        if ctx.needs_input_grad[1]:
            if noise is None:
                shape, stride = ctx.layout
                noise = _noise(shape, stride, torch.float32, None, 1.0, ctx.D, seed, ctx.backend)
            grad_sigma = (grad_y.float() * noise.float()).reshape(grad_y.shape[0], -1).sum(1)
        return grad_x, grad_sigma, None, None, None, None, None


class _NoiseFunction(_op.Function):
    """y = sigma * noise: dy/dsigma = y / sigma (no cancellation, nothing regenerated)."""

    leaf = _noise

    @staticmethod
    def save(ctx, inputs, outputs):
        ctx.save_for_backward(outputs, inputs[3])

    @staticmethod
    def backward(ctx, grad_y):
        y, sigma = ctx.saved_tensors
        grad_sigma = None
        if ctx.needs_input_grad[3]:
            grad_sigma = (grad_y.float() * y.float()).reshape(y.shape[0], -1).sum(1) / sigma
        return None, None, None, grad_sigma, None, None, None, None


# --------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------


def perturb(x, sigma, D, *, generator=None, return_noise=False, backend="auto"):
    r"""Draw :math:`y \sim p_r(y \mid x) \propto (\lVert y-x\rVert^2 + r^2)^{-(N+D)/2}`, fused.

    .. math::
        y = x + \sigma \, g \sqrt{D / W}, \quad g \sim \mathcal N(0, I_N), \quad W \sim \chi^2_D

    one W per row, drawn in the kernel (no host sync); ``D = math.inf`` gives exactly
    :math:`y = x + \sigma g`.

    Args:
        x: [B, ...] float32 / bfloat16 / float16 (float64 runs on the reference); rows are
            the first dimension; any layout (contiguous, channels_last, sliced).
        sigma: float, or tensor [B] (also [] or [B, 1, ...]) on x's device. May require
            grad: :math:`\partial y / \partial \sigma = (y - x) / \sigma`. On CUDA a
            non-positive or non-finite entry yields a NaN row (checking would sync).
        D: positive float or math.inf.
        generator: torch.Generator on x's device; default: that device's default
            generator, so ``torch.manual_seed`` reproduces a run.
        return_noise: also return ``noise = g * sqrt(D / W)`` (so ``y = x + sigma * noise``).
        backend: "auto", "triton", "cuda", "cpu" or "reference".

    Returns:
        y with x's shape and dtype (arithmetic in fp32), and the noise if asked.

    The fused backends draw the same numbers for the same seed (Philox4x32-10 with
    Triton's ``randn4x`` mapping, in each row's memory order); the reference uses
    torch's own generators.

    Limits (InvalidInput past them): B <= 2^32 - 1 rows on every backend (the row is a
    Philox counter word). The GPU backends also need N <= 2^31 - 1 (32-bit column
    indices) and one launch of at most 2^31 - 1 programs: ``B * ceil(N / 2048)`` blocks on
    "cuda", ``ceil(B / R) * ceil(N / 1024)`` on "triton" (R > 1 rows per program for rows
    of at most 512 elements) -- about 2^41 elements; split larger batches.
    """
    op = "perturb"
    D, sigma_t, sigma_f = check_perturb(x, sigma, D, generator, op)
    check_philox_rows(x.shape[0], op)  # on every backend: "auto" never changes what is valid
    name = backends.resolve(op, backend, x.device, x.dtype)
    if name == "reference":
        return ref.perturb(x, sigma, D, generator=generator, return_noise=return_noise)
    _check_gpu_sizes(op, name, x.shape[0], math.prod(x.shape[1:]))
    if sigma_t is not None:
        sigma_t = sigma_t.to(torch.float32).contiguous()
    seed = _launch.draw_seed(generator, x.device)
    y, noise = _PerturbFunction.run(x, sigma_t, sigma_f or 0.0, D, seed, return_noise, name)
    return (y, noise) if return_noise else y


def sample_prior(shape, sigma, D, *, device=None, dtype=None, generator=None, backend="auto"):
    r"""Sample the PFGM++ prior at level ``sigma``: the perturbation kernel around 0,

    .. math::
        y = \sigma \, g \sqrt{D / W}

    Args:
        shape: [B, ...]; rows are the first dimension.
        sigma: float or tensor [B] (differentiable).
        D: positive float or math.inf.
        device, dtype: of the result (defaults: sigma's device or CPU, torch's default dtype).
        generator, backend: as in :func:`perturb`.

    Only the output is written: ``B * N`` elements. Size limits: as in :func:`perturb`.
    """
    op = "sample_prior"
    shape, device, dtype, D, sigma_t, sigma_f = check_prior(shape, sigma, D, device, dtype, generator, op)
    check_philox_rows(shape[0], op)
    name = backends.resolve(op, backend, device, dtype)
    if name == "reference":
        return ref.sample_prior(shape, sigma, D, device=device, dtype=dtype, generator=generator)
    _check_gpu_sizes(op, name, shape[0], math.prod(shape[1:]))
    if sigma_t is not None:
        sigma_t = sigma_t.to(torch.float32).contiguous()
    seed = _launch.draw_seed(generator, device)
    stride = [1] * len(shape)  # contiguous
    for i in range(len(shape) - 2, -1, -1):
        stride[i] = stride[i + 1] * max(shape[i + 1], 1)
    return _NoiseFunction.run(list(shape), stride, dtype, sigma_t, sigma_f or 0.0, D, seed, name)
