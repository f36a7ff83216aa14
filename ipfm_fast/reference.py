r"""Pure-PyTorch reference of every op: the spec the fused backends are tested against,
the fallback for inputs they do not serve, and float64-capable. Each function checks its
arguments with the rules the public op uses (:mod:`ipfm_fast._checks`, under the same op
name), so both accept and refuse the same inputs. Baselines written as other codebases
write these ops live with the benchmarks (benchmarks/baselines.py), not here.

Notation (as in the README's op table): data rows :math:`x \in \mathbb R^N` (any trailing shape is
flattened to N), augmentation dimension :math:`D > 0` or ``math.inf``, alignment
:math:`r = \sigma \sqrt D`.
"""

import math

import torch

from ipfm_fast._checks import (check_D, check_fake_loss, check_field_target, check_generator_loss,
                               check_perturb, check_prior)

# --------------------------------------------------------------------------------------
# Perturbation kernel
# --------------------------------------------------------------------------------------


def _row_sigma(sigma_t, sigma_f, rows, device, dtype):
    """sigma as checked by ipfm_fast._checks.check_sigma, one per row in ``dtype``."""
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
    D, sigma_t, sigma_f = check_perturb(x, sigma, D, generator, "perturb")
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    rows = x.shape[0]
    sig = _row_sigma(sigma_t, sigma_f, rows, x.device, compute)
    g = torch.randn(x.shape, device=x.device, dtype=compute, generator=generator)
    noise = g * chi2_scale(rows, D, device=x.device, dtype=compute, generator=generator).view(-1, *[1] * (x.dim() - 1))
    y = (x.to(compute) + sig.view(-1, *[1] * (x.dim() - 1)) * noise).to(x.dtype)
    return (y, noise.to(x.dtype)) if return_noise else y


def sample_prior(shape, sigma, D, *, device=None, dtype=None, generator=None):
    r"""Sample the PFGM++ prior at level sigma: the perturbation kernel around x = 0,
    :math:`y = \sigma g \sqrt{D/W}`. shape = [B, ...]; sigma float or [B] tensor."""
    shape, device, dtype, *_ = check_prior(shape, sigma, D, device, dtype, generator, "sample_prior")
    zeros = torch.zeros(shape, device=device, dtype=dtype)
    return perturb(zeros, sigma, D, generator=generator)


# --------------------------------------------------------------------------------------
# Field target (reference-batch posterior mean)
# --------------------------------------------------------------------------------------


def field_target(y, sigma, x_ref, D, *, return_logz=False):
    r"""Posterior mean of the source over a reference batch (PFGM++ / STF target).

    .. math::
        s_{ij} = -\tfrac{N + D}{2} \log(\lVert y_i - x_j\rVert^2 + D\sigma_i^2)
        \quad (D = \infty:\ s_{ij} = -\lVert y_i - x_j\rVert^2 / (2\sigma_i^2)),

        w_{ij} = \mathrm{softmax}_j(s_{ij}), \qquad \mathrm{target}_i = \sum_j w_{ij} x_j

    Computed in float64 over the full [B, M] matrix with exact pairwise differences
    (no ``|y|^2 - 2 y.x + |x|^2`` cancellation). Differentiable in y and x_ref.

    Args:
        y: [B, ...] perturbed rows. sigma: float or [B]. x_ref: [M, ...], same trailing
        shape. D: positive float or math.inf.

    Returns:
        target [B, ...] in y's dtype; with ``return_logz`` also logsumexp_j s_ij, [B]
        (float64 here).
    """
    D, sigma_t, sigma_f = check_field_target(y, sigma, x_ref, D, "field_target")
    rows, n = y.shape[0], math.prod(y.shape[1:])
    sig = _row_sigma(sigma_t, sigma_f, rows, y.device, torch.float64)
    yf = y.reshape(rows, n).double()
    xf = x_ref.reshape(x_ref.shape[0], n).double()
    d2 = torch.cdist(yf, xf, compute_mode="donot_use_mm_for_euclid_dist").square()
    if math.isinf(D):
        logits = -d2 / (2 * sig.square()[:, None])
    else:
        logits = -0.5 * (n + D) * torch.log(d2 + D * sig.square()[:, None])
    logz = torch.logsumexp(logits, dim=1)
    target = (torch.softmax(logits, dim=1) @ xf).reshape(y.shape).to(y.dtype)
    return (target, logz) if return_logz else target


# --------------------------------------------------------------------------------------
# IPFM losses
# --------------------------------------------------------------------------------------


def _reduce(per_row, reduction):
    if reduction == "mean":
        return per_row.mean()
    if reduction == "sum":
        return per_row.sum()
    return per_row  # "none" (check_reduction refuses anything else)


def ipfm_generator_loss(teacher_out, fake_out, x, *, alpha=1.0, weight="adaptive", reduction="mean",
                        return_masked=False):
    r"""IPFM / SiD generator loss, per row (a = teacher_out, b = fake_out, all [B, ...]):

    .. math::
        \ell_i = w_i \sum_n (a - b)\,\big((a - x) - \alpha (a - b)\big), \qquad
        w_i = 1 / \max(\mathrm{mean}_n |x_i - a_i|, 10^{-5})\ \text{(no gradient)}

    or a given weight [B]. Rows with a NaN/Inf in any input contribute 0 and get zero
    gradient. reduction: "mean" = sum of per-row losses / B (as the reference loops
    scale it), "sum", or "none" -> [B]. With ``return_masked`` also returns the number of
    masked rows as a 0-dim int64 tensor (no host sync). Computed in float32 (float64 for
    float64 inputs, the tests' ground truth); the loss has that dtype.
    """
    a, b = teacher_out, fake_out
    rows, alpha, weight = check_generator_loss(a, b, x, alpha, weight, reduction, "ipfm_generator_loss")
    compute = torch.float64 if a.dtype == torch.float64 else torch.float32
    n = math.prod(a.shape[1:])
    a2, b2, x2 = (t.reshape(rows, n).to(compute) for t in (a, b, x))
    finite = torch.isfinite(a2).all(1) & torch.isfinite(b2).all(1) & torch.isfinite(x2).all(1)
    keep = finite[:, None]
    a2, b2, x2 = (torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device)) for t in (a2, b2, x2))
    if weight is None:
        w = 1.0 / (x2 - a2).abs().mean(1).clamp_min(1e-5)
        w = w.detach()
    else:
        w = torch.where(finite, weight.to(compute), torch.zeros((), dtype=compute, device=weight.device))
    diff = a2 - b2
    per_row = w * (diff * ((a2 - x2) - alpha * diff)).sum(1)
    per_row = torch.where(finite, per_row, torch.zeros((), dtype=per_row.dtype, device=per_row.device))
    loss = _reduce(per_row, reduction)
    return (loss, (~finite).sum()) if return_masked else loss


def fake_loss_weight(sigma, sigma_data=0.5):
    r""":math:`\lambda(\sigma) = (\sigma^2 + \sigma_d^2) / (\sigma \sigma_d)^2` (EDM's loss weight)."""
    return 1.0 / sigma_data**2 + 1.0 / sigma**2  # the same value; no cancellation in d/dsigma


def ipfm_fake_loss(fake_out, x, sigma, *, sigma_data=0.5, reduction="mean"):
    r"""Field-matching loss of the fake network (and PFGM++ teacher training),
    :math:`\ell_i = \lambda(\sigma_i)\lVert b_i - x_i\rVert^2` with b = fake_out [B, ...],
    x the target [B, ...] (callers detach it), sigma float or [B] (differentiable).
    reduction as in :func:`ipfm_generator_loss`. Non-finite values are not masked."""
    rows, sigma_data, sigma_t, sigma_f = check_fake_loss(fake_out, x, sigma, sigma_data, reduction, "ipfm_fake_loss")
    compute = torch.float64 if fake_out.dtype == torch.float64 else torch.float32
    sig = _row_sigma(sigma_t, sigma_f, rows, fake_out.device, compute)
    sq = (fake_out.to(compute) - x.to(compute)).reshape(rows, math.prod(x.shape[1:])).square().sum(1)
    per_row = fake_loss_weight(sig, sigma_data) * sq
    return _reduce(per_row, reduction)

