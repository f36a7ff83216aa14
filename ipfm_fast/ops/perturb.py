r"""PFGM++ perturbation and prior: four layers in one file.

    kernel      kernels/perturb.py (Triton), csrc/cpu/perturb.cpp, csrc/cuda/perturb.cu
    launcher    _launch_perturb: row layout, raw pointers, grid / stream
    torch op    leaves ipfm_fast::perturb, ipfm_fast::perturb_noise (custom ops with fake
                implementations); _PerturbFunction, _NoiseFunction (autograd; the perturb
                backward regenerates the noise through perturb_noise): see ops/_op.py
    public      perturb(), sample_prior(), noise_from_gaussian()

.. math::
    y = x + \sigma \, g \sqrt{D / W}, \quad g \sim \mathcal N(0, I_N), \quad W \sim \chi^2_D

Cost of a fused call: reads x once, writes y once (and the noise once when asked):
``(2 or 3) * B * N`` elements; the Philox key is one 8-byte draw from the generator.

Opt-in variants (new kernel flags; the default path computes exactly what it did before):

* ``clip_beta=(lo, hi)``: the PFGM++ reference recipe draws B ~ Beta(N/2, D/2) and clips it
  to [lo, hi] (pfgmpp and the IPFM authors' code: [1e-3, 1 - 1e-3]). Here B / (1 - B) =
  |g|^2 / W, so the clip scales each row's radius by sqrt(clip(t) / t), t = |g|^2 / W, which
  needs |g|^2 of the row before its first write: on the GPUs a pre-pass over the same tiles
  sums it (drawn g: one Philox call and two logs per four elements, no sin/cos; given g: a
  read); the CPU kernel keeps each row's normals while it sums (csrc/cpu/perturb.cpp).
* a given gaussian (:func:`noise_from_gaussian`): g read from a tensor instead of drawn,
  W still drawn per row from the generator.
"""

import math

import torch

from ipfm_fast import backends
from ipfm_fast import reference as ref
from ipfm_fast._checks import (check_clip_beta, check_given_gaussian, check_gpu_sizes, check_perturb,
                               check_philox_rows, check_prior)
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


NO_CLIP = (0.0, math.inf)  # (t_lo, t_hi) of no Beta clip: the kernels' default path


def _ptr(t):
    return t.data_ptr() if t is not None else 0


def _launch_perturb(backend, x, y, noise, sigma, sigma_scalar, D, seed, g=None, clip=NO_CLIP):
    """Runs one fused backend. x may be None (prior: y = sigma * noise); noise may be None;
    g: a given gaussian (else drawn); clip: (t_lo, t_hi) of the Beta clip (NO_CLIP: none).
    All tensors share the row layout described by _launch.kernel_views."""
    rows = y.shape[0]
    n = y[0].numel() if rows else 0
    if rows == 0 or n == 0:
        return
    alpha = _alpha(D)
    t_lo, t_hi = clip
    clipped = tuple(clip) != NO_CLIP
    x_stride = _launch.row_stride(x) if x is not None else 0
    noise_stride = _launch.row_stride(noise) if noise is not None else 0
    g_stride = _launch.row_stride(g) if g is not None else 0
    sigma_scalar = 0.0 if sigma is not None else sigma_scalar
    if backend == "cpu":
        _launch.ext().perturb_cpu(
            _ptr(x), x_stride, y.data_ptr(), _launch.row_stride(y), _ptr(noise), noise_stride, _ptr(g), g_stride,
            _launch.DTYPE_CODES[y.dtype], rows, n, _ptr(sigma), sigma_scalar, alpha,
            _launch.seed_as_uint64(seed), t_lo, t_hi, _launch.num_threads())
    elif backend == "cuda":
        ext = _launch.ext()
        partials = (torch.empty(ext.perturb_partials_cuda(rows, n), dtype=torch.float64, device=y.device)
                    if clipped else None)  # |g|^2 per block of the pre-pass
        ext.perturb_cuda(
            _ptr(x), x_stride, y.data_ptr(), _launch.row_stride(y), _ptr(noise), noise_stride, _ptr(g), g_stride,
            _launch.DTYPE_CODES[y.dtype], rows, n, _ptr(sigma), sigma_scalar, alpha,
            seed.data_ptr(), _ptr(partials), t_lo, t_hi, y.device.index, _launch.cuda_stream(y.device))
    elif backend == "triton":
        from ipfm_fast.kernels.perturb import CAND, perturb_kernel, perturb_norm_kernel

        rows_per_program, block_g, blocks_per_row, programs = triton_tiles(rows, n)
        partials = seed  # a placeholder pointer when there is no clip (never read)
        with _launch.triton_device(y):
            if clipped:  # |g|^2 of each row's part in each tile, before the tiles are written
                partials = torch.empty(rows * blocks_per_row, dtype=torch.float32, device=y.device)
                perturb_norm_kernel[(programs,)](
                    g if g is not None else y, g_stride, partials, seed, rows, n, (n + 3) // 4, blocks_per_row,
                    GIVEN_G=g is not None, ROWS=rows_per_program, BLOCK_G=block_g)
            perturb_kernel[(programs,)](
                x if x is not None else y, x_stride, y, _launch.row_stride(y),
                noise if noise is not None else y, noise_stride, g if g is not None else y, g_stride,
                sigma if sigma is not None else seed, sigma_scalar, alpha, seed, partials, t_lo, t_hi,
                rows, n, (n + 3) // 4, blocks_per_row,
                HAS_X=x is not None, SIGMA_PER_ROW=sigma is not None, WRITE_NOISE=noise is not None,
                FINITE_D=not math.isinf(D), ROWS=rows_per_program, BLOCK_G=block_g, CAND=CAND,
                GIVEN_G=g is not None, CLIP=clipped, NB=min(64, _next_pow2(blocks_per_row)) if clipped else 1,
                P_LOOP=blocks_per_row if clipped else 1,
            )
    else:
        raise AssertionError(backend)


def _reference_noise(shape, dtype, device, D, generator, gaussian, clip):
    """The noise ``g * sqrt(D / W)`` (times the clip factor) in the reference's arithmetic
    (float64 for float64, else float32) with torch's generators: g drawn (as
    ipfm_fast.reference.perturb draws it: randn, then one Gamma per row) or given."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    rows = shape[0]
    if gaussian is None:
        g = torch.randn(shape, device=device, dtype=compute, generator=generator)
    else:
        g = gaussian.to(compute)
    per_row = (rows,) + (1,) * (len(shape) - 1)
    noise = g * ref.chi2_scale(rows, D, device=device, dtype=compute, generator=generator).view(per_row)
    if tuple(clip) != NO_CLIP:
        t = noise.reshape(rows, -1).double().square().sum(1) / D  # |g|^2 / W
        factor = torch.where(t > 0, torch.sqrt(t.clamp(*clip) / torch.where(t > 0, t, 1.0)), 1.0)
        noise = noise * factor.to(compute).view(per_row)
    return noise


def _reference_sigma(sigma_t, sigma_f, noise):
    per_row = (noise.shape[0],) + (1,) * (noise.dim() - 1)
    if sigma_t is None:
        return sigma_f
    return sigma_t.to(noise.dtype).view(per_row)


# --------------------------------------------------------------------------------------
# leaves (torch.library custom ops) and the autograd.Functions over them
# --------------------------------------------------------------------------------------


@_op.leaf("ipfm_fast::perturb")
def _perturb(x: torch.Tensor, sigma: torch.Tensor | None, sigma_scalar: float, D: float, seed: torch.Tensor,
             return_noise: bool, t_lo: float, t_hi: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x + sigma * noise (and the noise, or an empty tensor); (t_lo, t_hi): the Beta
    clip in t = |g|^2 / W (NO_CLIP: none)."""
    y = torch.empty_like(x)
    noise = torch.empty_like(x) if return_noise else x.new_empty(0)
    x_k, outs_k, copy_back = _launch.kernel_views(x, y, *([noise] if return_noise else []))
    _launch_perturb(backend, x_k, outs_k[0], outs_k[1] if return_noise else None, sigma, sigma_scalar, D, seed,
                    clip=(t_lo, t_hi))
    copy_back()
    return y, noise


@_perturb.register_fake
def _(x, sigma, sigma_scalar, D, seed, return_noise, t_lo, t_hi, backend):
    return torch.empty_like(x), (torch.empty_like(x) if return_noise else x.new_empty(0))


@_op.leaf("ipfm_fast::perturb_noise")
def _noise(shape: list[int], stride: list[int], dtype: torch.dtype, sigma: torch.Tensor | None,
           sigma_scalar: float, D: float, seed: torch.Tensor, gaussian: torch.Tensor | None, t_lo: float,
           t_hi: float, backend: str) -> torch.Tensor:
    """sigma * g * sqrt(D / W) with the given shape/strides on seed's device, with the same
    element -> random number mapping as ipfm_fast::perturb on a tensor of that layout; g
    drawn, or the given ``gaussian`` (of that shape and dtype; then its layout is used)."""
    if gaussian is not None:
        y = torch.empty_like(gaussian)
        g_k, (y_k,), copy_back = _launch.kernel_views(gaussian, y)
    else:
        y = torch.empty_strided(shape, stride, dtype=dtype, device=seed.device)
        _, (y_k,), copy_back = _launch.kernel_views(y, y)
        g_k = None
    _launch_perturb(backend, None, y_k, None, sigma, sigma_scalar, D, seed, g=g_k, clip=(t_lo, t_hi))
    copy_back()
    return y


@_noise.register_fake
def _(shape, stride, dtype, sigma, sigma_scalar, D, seed, gaussian, t_lo, t_hi, backend):
    if gaussian is not None:
        return torch.empty_like(gaussian)
    return torch.empty_strided(shape, stride, dtype=dtype, device=seed.device)


class _PerturbFunction(_op.Function):
    """dy/dx = 1; dy/dsigma = noise, summed per row against the upstream gradient. Without
    return_noise the backward regenerates the noise from the seed (counter-based Philox)
    rather than storing it."""

    leaf = _perturb

    @staticmethod
    def save(ctx, inputs, outputs):
        x, sigma, _, D, seed, return_noise, t_lo, t_hi, backend = inputs
        ctx.D, ctx.clip, ctx.backend = D, (t_lo, t_hi), backend
        y = outputs[0]  # the layout the forward drew on (x's may overlap: a zero-stride expand)
        ctx.layout = (list(y.shape), list(y.stride()))
        ctx.mark_non_differentiable(outputs[1])
        ctx.save_for_backward(seed, outputs[1] if return_noise else None)

    @staticmethod
    def backward(ctx, grad_y, grad_noise):
        seed, noise = ctx.saved_tensors
        grad_x = grad_y if ctx.needs_input_grad[0] else None
        grad_sigma = None
        if ctx.needs_input_grad[1]:  # the clip factor does not depend on sigma: d y / d sigma = noise
            if noise is None:
                shape, stride = ctx.layout
                noise = _noise(shape, stride, torch.float32, None, 1.0, ctx.D, seed, None, *ctx.clip, ctx.backend)
            grad_sigma = (grad_y.float() * noise.float()).reshape(grad_y.shape[0], -1).sum(1)
        return grad_x, grad_sigma, None, None, None, None, None, None, None


class _NoiseFunction(_op.Function):
    """y = sigma * noise: dy/dsigma = y / sigma (no cancellation, nothing regenerated). A
    given gaussian gets no gradient: the public functions refuse one that requires it."""

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
        return None, None, None, grad_sigma, None, None, None, None, None, None, None


# --------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------


def perturb(x, sigma, D, *, generator=None, return_noise=False, clip_beta=None, backend="auto"):
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
        clip_beta: None (default), or ``(lo, hi)`` with ``0 <= lo < hi <= 1`` and finite D:
            the PFGM++ reference recipe's clip of its Beta draw. That recipe writes
            :math:`R = r\sqrt{B/(1-B)}`, :math:`B \sim \mathrm{Beta}(N/2, D/2)`, and pfgmpp /
            the IPFM authors' code clip B to [1e-3, 1 - 1e-3]; here
            :math:`B/(1-B) = \lVert g\rVert^2 / W`, so each row's radius is scaled by
            :math:`\sqrt{\mathrm{clip}(t)/t}`, :math:`t = \lVert g\rVert^2/W` clipped to
            :math:`[lo/(1-lo), hi/(1-hi)]`. That needs :math:`\lVert g\rVert^2` of a row
            before its first write: the GPU kernels sum it in a pre-pass (Philox and two
            logs per four elements, no memory traffic), the CPU kernel keeps each row's
            normals while it sums. The clip changes the distribution only where it binds:
            rarely at CIFAR-10 size with D >= 32, for nearly every row at 256x256x3 with
            D = 128.
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
    clip = check_clip_beta(clip_beta, D, op)
    check_philox_rows(x.shape[0], op)  # on every backend: "auto" never changes what is valid
    name = backends.resolve(op, backend, x.device, x.dtype)
    if name == "reference":
        if clip == NO_CLIP:
            return ref.perturb(x, sigma, D, generator=generator, return_noise=return_noise)
        noise = _reference_noise(x.shape, x.dtype, x.device, D, generator, None, clip)
        y = (x.to(noise.dtype) + _reference_sigma(sigma_t, sigma_f, noise) * noise).to(x.dtype)
        return (y, noise.to(x.dtype)) if return_noise else y
    _check_gpu_sizes(op, name, x.shape[0], math.prod(x.shape[1:]))
    if sigma_t is not None:
        sigma_t = sigma_t.to(torch.float32).contiguous()
    seed = _launch.draw_seed(generator, x.device)
    y, noise = _PerturbFunction.run(x, sigma_t, sigma_f or 0.0, D, seed, return_noise, *clip, name)
    return (y, noise) if return_noise else y


def _contiguous_strides(shape):
    stride = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        stride[i] = stride[i + 1] * max(shape[i + 1], 1)
    return stride


def sample_prior(shape, sigma, D, *, device=None, dtype=None, generator=None, clip_beta=None, backend="auto"):
    r"""Sample the PFGM++ prior at level ``sigma``: the perturbation kernel around 0,

    .. math::
        y = \sigma \, g \sqrt{D / W}

    Args:
        shape: [B, ...]; rows are the first dimension.
        sigma: float or tensor [B] (differentiable).
        D: positive float or math.inf.
        device, dtype: of the result (defaults: sigma's device or CPU, torch's default dtype).
        generator, clip_beta, backend: as in :func:`perturb`.

    Only the output is written: ``B * N`` elements. Size limits: as in :func:`perturb`.
    """
    op = "sample_prior"
    shape, device, dtype, D, sigma_t, sigma_f = check_prior(shape, sigma, D, device, dtype, generator, op)
    clip = check_clip_beta(clip_beta, D, op)
    check_philox_rows(shape[0], op)
    name = backends.resolve(op, backend, device, dtype)
    if name == "reference":
        if clip == NO_CLIP:
            return ref.sample_prior(shape, sigma, D, device=device, dtype=dtype, generator=generator)
        noise = _reference_noise(shape, dtype, device, D, generator, None, clip)
        return (_reference_sigma(sigma_t, sigma_f, noise) * noise).to(dtype)
    _check_gpu_sizes(op, name, shape[0], math.prod(shape[1:]))
    if sigma_t is not None:
        sigma_t = sigma_t.to(torch.float32).contiguous()
    seed = _launch.draw_seed(generator, device)
    return _NoiseFunction.run(list(shape), _contiguous_strides(shape), dtype, sigma_t, sigma_f or 0.0, D, seed,
                              None, *clip, name)


def noise_from_gaussian(g, sigma, D, *, generator=None, clip_beta=None, backend="auto"):
    r"""The PFGM++ noise with a given gaussian: ``sigma * g * sqrt(D / W)``, one
    :math:`W \sim \chi^2_D` per row drawn on g's device, fused (one read of g, one write).

    .. math::
        n = \sigma \, g \sqrt{D / W}

    When g is standard normal this is the perturbation kernel's noise (``perturb(x, ...) -
    x``); for any g it is a pure function of g and the generator, which is what code that
    passes its own latents needs (the IPFM authors' ``pfgmpp_kernel.sample_noise``:
    :func:`ipfm_fast.compat.sid.sample_noise`). ``D = math.inf`` gives ``sigma * g``.

    Args:
        g: [B, ...] float32 / bfloat16 / float16 (float64 runs on the reference); any
            layout. Not differentiable (InvalidInput if it requires grad).
        sigma: float or tensor [B] (also [] or [B, 1, ...]) on g's device; differentiable.
        D, generator, clip_beta, backend: as in :func:`perturb` (the clip reads g twice:
            once for |g|^2 per row, once for the write).

    Returns the noise with g's shape and dtype (arithmetic in fp32).
    """
    op = "noise_from_gaussian"
    D, sigma_t, sigma_f = check_given_gaussian(g, sigma, D, generator, op)
    clip = check_clip_beta(clip_beta, D, op)
    check_philox_rows(g.shape[0], op)
    name = backends.resolve(op, backend, g.device, g.dtype)
    if name == "reference":
        noise = _reference_noise(g.shape, g.dtype, g.device, D, generator, g, clip)
        return (_reference_sigma(sigma_t, sigma_f, noise) * noise).to(g.dtype)
    _check_gpu_sizes(op, name, g.shape[0], math.prod(g.shape[1:]))
    if sigma_t is not None:
        sigma_t = sigma_t.to(torch.float32).contiguous()
    seed = _launch.draw_seed(generator, g.device)
    return _NoiseFunction.run(list(g.shape), list(g.stride()), g.dtype, sigma_t, sigma_f or 0.0, D, seed, g, *clip,
                              name)
