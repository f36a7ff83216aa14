r"""Noise levels: the PFGM++ alignment :math:`r = \sigma\sqrt D`,
the level distributions of teacher training and distillation, and the EDM sampler's levels.

    teacher training   ln sigma ~ N(P_mean, P_std^2)                     sample_sigma_train
    distillation       t ~ U[0, t_max / 1000], sigma = sigma(t)          sample_sigma_distill
                       sigma(t) = (s_min^(1/rho) + t (s_max^(1/rho) - s_min^(1/rho)))^rho
    sampling           sigma_max = s_0 > ... > s_{n-1} = sigma_min, then 0   sampler_sigmas
"""

import math

import torch

from ipfm_fast._checks import check_D
from ipfm_fast.errors import InvalidInput


def sigma_to_r(sigma, D):
    r"""PFGM++ radius :math:`r = \sigma \sqrt D` (D finite). Works on floats and tensors."""
    D = check_D(D, "sigma_to_r")
    if math.isinf(D):
        raise InvalidInput("sigma_to_r: r = sigma * sqrt(D) is infinite for D = inf; use sigma directly")
    return sigma * math.sqrt(D)


def r_to_sigma(r, D):
    r""":math:`\sigma = r / \sqrt D` (D finite), the EDM noise level a PFGM++ network sees."""
    D = check_D(D, "r_to_sigma")
    if math.isinf(D):
        raise InvalidInput("r_to_sigma: undefined for D = inf (r is infinite)")
    return r / math.sqrt(D)



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
        raise InvalidInput(f"sampler_sigmas: num_steps must be >= 1, got {num_steps}")
    i = torch.arange(num_steps, device=device, dtype=dtype)
    denom = max(num_steps - 1, 1)
    sig = (sigma_max ** (1 / rho) + i / denom * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sig, torch.zeros(1, device=device, dtype=dtype)])
