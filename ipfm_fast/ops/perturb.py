r"""PFGM++ perturbation and prior: four layers in one file.

    kernel      kernels/perturb.py (Triton), csrc/cpu/perturb.cpp, csrc/cuda/perturb.cu
    launcher    _launch_perturb: row layout, raw pointers, grid / stream
    torch op    ipfm_fast::perturb, ipfm_fast::perturb_noise (torch.library.custom_op,
                fake implementations, autograd)
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
from ipfm_fast._checks import check_D, check_generator, check_gpu_sizes, check_rows, check_sigma
from ipfm_fast.errors import InvalidInput, InvalidType
from ipfm_fast.ops import _launch

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
# torch ops
# --------------------------------------------------------------------------------------


def _perturb_impl(x, sigma, sigma_scalar, D, seed, return_noise, backend):
    y = torch.empty_like(x)
    noise = torch.empty_like(x) if return_noise else x.new_empty(0)
    x_k, outs_k, copy_back = _launch.kernel_views(x, y, *([noise] if return_noise else []))
    _launch_perturb(backend, x_k, outs_k[0], outs_k[1] if return_noise else None, sigma, sigma_scalar, D, seed)
    copy_back()
    return y, noise


def _noise_impl(shape, stride, dtype, sigma, sigma_scalar, D, seed, backend):
    y = torch.empty_strided(shape, stride, dtype=dtype, device=seed.device)
    _, (y_k,), copy_back = _launch.kernel_views(y, y)
    _launch_perturb(backend, None, y_k, None, sigma, sigma_scalar, D, seed)
    copy_back()
    return y


@torch.library.custom_op("ipfm_fast::perturb", mutates_args=())
def _perturb_op(x: torch.Tensor, sigma: torch.Tensor | None, sigma_scalar: float, D: float,
                seed: torch.Tensor, return_noise: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x + sigma * noise (and the noise, or an empty tensor)."""
    return _perturb_impl(x, sigma, sigma_scalar, D, seed, return_noise, backend)


@_perturb_op.register_fake
def _(x, sigma, sigma_scalar, D, seed, return_noise, backend):
    return torch.empty_like(x), (torch.empty_like(x) if return_noise else x.new_empty(0))


@torch.library.custom_op("ipfm_fast::perturb_noise", mutates_args=())
def _noise_op(shape: list[int], stride: list[int], dtype: torch.dtype, sigma: torch.Tensor | None,
              sigma_scalar: float, D: float, seed: torch.Tensor, backend: str) -> torch.Tensor:
    """sigma * g * sqrt(D / W) with the given shape/strides on seed's device, with the same
    element -> random number mapping as ipfm_fast::perturb on a tensor of that layout."""
    return _noise_impl(shape, stride, dtype, sigma, sigma_scalar, D, seed, backend)


@_noise_op.register_fake
def _(shape, stride, dtype, sigma, sigma_scalar, D, seed, backend):
    return torch.empty_strided(shape, stride, dtype=dtype, device=seed.device)


def _setup_perturb(ctx, inputs, output):
    x, sigma, _, D, seed, return_noise, backend = inputs
    ctx.D, ctx.backend, ctx.return_noise = D, backend, return_noise
    ctx.layout = (list(x.shape), list(x.stride()))
    ctx.save_for_backward(seed, output[1] if return_noise else None)


def _perturb_backward(ctx, grad_y, grad_noise):
    seed, noise = ctx.saved_tensors
    grad_x = grad_y if ctx.needs_input_grad[0] else None
    grad_sigma = None
    if ctx.needs_input_grad[1]:
        if noise is None:  # regenerate from the counter-based stream instead of storing it
            shape, stride = ctx.layout
            # always the custom op: a backward traced by AOTAutograd sees fake tensors, and torch 2.11
            # reports is_compiling() False there (the raw-pointer launcher would fail on them)
            noise = _noise_op(shape, stride, torch.float32, None, 1.0, ctx.D, seed, ctx.backend)
        grad_sigma = (grad_y.float() * noise.float()).reshape(grad_y.shape[0], -1).sum(1)
    return grad_x, grad_sigma, None, None, None, None, None


_perturb_op.register_autograd(_perturb_backward, setup_context=_setup_perturb)


def _setup_noise(ctx, inputs, output):
    sigma = inputs[3]
    ctx.save_for_backward(output, sigma)


def _noise_backward(ctx, grad_y):
    y, sigma = ctx.saved_tensors
    grad_sigma = None
    if ctx.needs_input_grad[3]:  # y = sigma * noise: dy/dsigma = y / sigma, no cancellation
        grad_sigma = (grad_y.float() * y.float()).reshape(y.shape[0], -1).sum(1) / sigma
    return None, None, None, grad_sigma, None, None, None, None


_noise_op.register_autograd(_noise_backward, setup_context=_setup_noise)


class _PerturbFunction(torch.autograd.Function):
    """The same forward/backward as ipfm_fast::perturb without the dispatcher: eager calls
    skip ~0.1 ms of custom-op overhead (and the one-off torch._dynamo import)."""

    @staticmethod
    def forward(ctx, *inputs):
        y, noise = _perturb_impl(*inputs)
        _setup_perturb(ctx, inputs, (y, noise))
        ctx.mark_non_differentiable(noise)
        return y, noise

    @staticmethod
    def backward(ctx, grad_y, grad_noise):
        return _perturb_backward(ctx, grad_y, grad_noise)


class _NoiseFunction(torch.autograd.Function):
    """ipfm_fast::perturb_noise without the dispatcher (eager calls)."""

    @staticmethod
    def forward(ctx, *inputs):
        y = _noise_impl(*inputs)
        _setup_noise(ctx, inputs, y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return _noise_backward(ctx, grad_y)


def _perturb_call(*inputs):
    return _perturb_op(*inputs) if torch.compiler.is_compiling() else _PerturbFunction.apply(*inputs)


def _noise_call(*inputs):
    return _noise_op(*inputs) if torch.compiler.is_compiling() else _NoiseFunction.apply(*inputs)


# --------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------


def _check_rows_limit(rows, op):
    if rows >= 2**32:
        raise InvalidInput(f"{op}: at most 2^32 - 1 rows per call (the row index is a Philox counter word), got {rows}")


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
    check_rows(x, "x", op)
    D = check_D(D, op)
    check_generator(generator, x.device, op)
    sigma_t, sigma_f = check_sigma(sigma, x.shape[0], x.device, op)
    _check_rows_limit(x.shape[0], op)
    name = backends.resolve(op, backend, x.device, x.dtype)
    if name in ("triton", "cuda"):
        _check_gpu_sizes(op, name, x.shape[0], math.prod(x.shape[1:]))
    if name == "reference":
        return ref.perturb(x, sigma, D, generator=generator, return_noise=return_noise)
    if sigma_t is not None:
        sigma_t = sigma_t.to(torch.float32).contiguous()
    seed = _launch.draw_seed(generator, x.device)
    y, noise = _perturb_call(x, sigma_t, sigma_f or 0.0, D, seed, return_noise, name)
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
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError as err:
        raise InvalidType(f"{op}: shape must be a sequence of ints, got {shape!r}") from err
    if len(shape) < 1 or any(s < 0 for s in shape):
        raise InvalidInput(f"{op}: shape must be [B, ...] with non-negative sizes, got {shape}")
    if device is None:
        device = sigma.device if isinstance(sigma, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = dtype or torch.get_default_dtype()
    if not dtype.is_floating_point:
        raise InvalidType(f"{op}: dtype must be floating point, got {dtype}")
    D = check_D(D, op)
    check_generator(generator, device, op)
    sigma_t, sigma_f = check_sigma(sigma, shape[0], device, op)
    _check_rows_limit(shape[0], op)
    name = backends.resolve(op, backend, device, dtype)
    if name in ("triton", "cuda"):
        _check_gpu_sizes(op, name, shape[0], math.prod(shape[1:]))
    if name == "reference":
        return ref.sample_prior(shape, sigma, D, device=device, dtype=dtype, generator=generator)
    if sigma_t is not None:
        sigma_t = sigma_t.to(torch.float32).contiguous()
    seed = _launch.draw_seed(generator, device)
    stride = [1] * len(shape)  # contiguous
    for i in range(len(shape) - 2, -1, -1):
        stride[i] = stride[i + 1] * max(shape[i + 1], 1)
    return _noise_call(list(shape), stride, dtype, sigma_t, sigma_f or 0.0, D, seed, name)
