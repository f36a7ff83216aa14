r"""Pure-PyTorch reference of every op: the spec the fused backends are tested against,
the fallback for inputs they do not serve, and float64-capable.

Notation (see DESIGN.md): data rows :math:`x \in \mathbb R^N` (any trailing shape is
flattened to N), augmentation dimension :math:`D > 0` or ``math.inf``, alignment
:math:`r = \sigma \sqrt D`.
"""

import math

import numpy as np
import torch

from ipfm_fast._checks import check_D, check_generator, check_rows, check_sigma

# --------------------------------------------------------------------------------------
# sigma <-> r
# --------------------------------------------------------------------------------------


def sigma_to_r(sigma, D):
    r"""PFGM++ radius :math:`r = \sigma \sqrt D` (D finite). Works on floats and tensors."""
    D = check_D(D, "sigma_to_r")
    if math.isinf(D):
        raise ValueError("sigma_to_r: r = sigma * sqrt(D) is infinite for D = inf; use sigma directly")
    return sigma * math.sqrt(D)


def r_to_sigma(r, D):
    r""":math:`\sigma = r / \sqrt D` (D finite), the EDM noise level a PFGM++ network sees."""
    D = check_D(D, "r_to_sigma")
    if math.isinf(D):
        raise ValueError("r_to_sigma: undefined for D = inf (r is infinite)")
    return r / math.sqrt(D)


# --------------------------------------------------------------------------------------
# Perturbation kernel
# --------------------------------------------------------------------------------------


def _row_sigma(sigma, rows, device, dtype, op):
    sigma_t, sigma_f = check_sigma(sigma, rows, device, op)
    if sigma_t is None:
        return torch.full((rows,), sigma_f, device=device, dtype=dtype)
    return sigma_t.to(dtype)


def chi2_scale(rows, D, *, device=None, dtype=torch.float32, generator=None):
    r""":math:`\sqrt{D / W}` per row, :math:`W \sim \chi^2_D` (shape [rows]); ones for D = inf."""
    D = check_D(D, "chi2_scale")
    if math.isinf(D):
        return torch.ones(rows, device=device, dtype=dtype)
    alpha = torch.full((rows,), D / 2, device=device, dtype=torch.float64)
    gamma = torch._standard_gamma(alpha, generator=generator)  # W / 2
    return torch.sqrt(alpha / gamma).to(dtype)


def perturb(x, sigma, D, *, generator=None, return_noise=False):
    r"""Draw :math:`y \sim p_r(y \mid x) \propto (\lVert y - x\rVert^2 + r^2)^{-(N+D)/2}`.

    The kernel is a multivariate Student-t with D degrees of freedom and scale
    :math:`\sigma`:

    .. math::
        y = x + \sigma \, g \sqrt{D / W}, \quad g \sim \mathcal N(0, I_N), \quad W \sim \chi^2_D

    one W per row; D = inf gives :math:`y = x + \sigma g`.

    Args:
        x: [B, ...] floating point (float64 computes in float64, others in float32).
        sigma: float or tensor [B] (also [] or [B, 1, ...]); differentiable.
        D: positive float or math.inf.
        generator: torch.Generator on x's device (default: the device's default).
        return_noise: also return ``noise = (y - x) / sigma = g * sqrt(D / W)``.

    Returns:
        y in x's dtype (and noise), shape [B, ...].
    """
    op = "reference.perturb"
    check_rows(x, "x", op)
    D = check_D(D, op)
    check_generator(generator, x.device, op)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    rows = x.shape[0]
    sig = _row_sigma(sigma, rows, x.device, compute, op)
    g = torch.randn(x.shape, device=x.device, dtype=compute, generator=generator)
    noise = g * chi2_scale(rows, D, device=x.device, dtype=compute, generator=generator).view(-1, *[1] * (x.dim() - 1))
    y = (x.to(compute) + sig.view(-1, *[1] * (x.dim() - 1)) * noise).to(x.dtype)
    return (y, noise.to(x.dtype)) if return_noise else y


def perturb_pfgmpp_style(x, sigma, D, *, rng=None):
    r"""The perturbation as the public PFGM++ code draws it: a Beta on the host with NumPy,

    .. math::
        B \sim \mathrm{Beta}(N/2, D/2), \quad R = r \sqrt{B / (1 - B)}, \quad
        y = x + R \, g / \lVert g \rVert,

    one host round-trip per call (the baseline the fused kernels are measured against).
    Same distribution as :func:`perturb`; D must be finite.
    """
    op = "reference.perturb_pfgmpp_style"
    check_rows(x, "x", op)
    D = check_D(D, op)
    if math.isinf(D):
        raise ValueError(f"{op}: the Beta recipe needs a finite D")
    rng = np.random.default_rng() if rng is None else rng
    rows, n = x.shape[0], x[0].numel()
    sig = _row_sigma(sigma, rows, x.device, torch.float64, op).cpu().numpy()  # host sync, as in the original
    beta = rng.beta(a=n / 2.0, b=D / 2.0, size=rows)
    radius = torch.from_numpy(sig * math.sqrt(D) * np.sqrt(beta / (1.0 - beta))).to(x.device, torch.float32)
    g = torch.randn(x.shape, device=x.device)
    unit = g / g.reshape(rows, -1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))
    return (x + radius.view(-1, *[1] * (x.dim() - 1)) * unit).to(x.dtype)


def sample_prior(shape, sigma, D, *, device=None, dtype=None, generator=None):
    r"""Sample the PFGM++ prior at level sigma: the perturbation kernel around x = 0,
    :math:`y = \sigma g \sqrt{D/W}`. shape = [B, ...]; sigma float or [B] tensor."""
    op = "reference.sample_prior"
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1:
        raise ValueError(f"{op}: shape must have a leading batch dimension, got {shape}")
    dtype = dtype or torch.get_default_dtype()
    zeros = torch.zeros(shape, device=device, dtype=dtype)
    return perturb(zeros, sigma, D, generator=generator)


# --------------------------------------------------------------------------------------
# sigma schedules (DESIGN.md)
# --------------------------------------------------------------------------------------

SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0


def sample_sigma_train(batch, *, p_mean=-1.2, p_std=1.2, device=None, generator=None):
    r"""Teacher training levels: :math:`\ln\sigma \sim \mathcal N(P_{mean}, P_{std}^2)`, shape [batch]."""
    return torch.exp(p_mean + p_std * torch.randn(batch, device=device, generator=generator))


def sigma_from_t(t, *, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO):
    r"""EDM's :math:`\rho` map: :math:`\sigma(t) = (\sigma_{min}^{1/\rho} + t(\sigma_{max}^{1/\rho}
    - \sigma_{min}^{1/\rho}))^\rho`, t in [0, 1]."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + t * (hi - lo)) ** rho


def sample_sigma_distill(batch, *, t_max=800, device=None, generator=None, **schedule):
    r"""Distillation levels: :math:`t \sim U[0, t_{max}/1000]`, :math:`\sigma = \sigma(t)`, shape [batch]."""
    t = torch.rand(batch, device=device, generator=generator) * (t_max / 1000.0)
    return sigma_from_t(t, **schedule)


def sampler_sigmas(num_steps=18, *, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO, device=None,
                   dtype=torch.float64):
    r"""EDM sampling levels :math:`\sigma_0 = \sigma_{max} > \dots > \sigma_{n-1} = \sigma_{min}`,
    then 0: shape [num_steps + 1]."""
    if num_steps < 1:
        raise ValueError(f"sampler_sigmas: num_steps must be >= 1, got {num_steps}")
    i = torch.arange(num_steps, device=device, dtype=dtype)
    denom = max(num_steps - 1, 1)
    sig = (sigma_max ** (1 / rho) + i / denom * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sig, torch.zeros(1, device=device, dtype=dtype)])
