r"""Pure-PyTorch reference of every op: the spec the fused backends are tested against,
the fallback for inputs they do not serve, and float64-capable.

Notation (see DESIGN.md): data rows :math:`x \in \mathbb R^N` (any trailing shape is
flattened to N), augmentation dimension :math:`D > 0` or ``math.inf``, alignment
:math:`r = \sigma \sqrt D`.
"""

import math
import numbers

import numpy as np
import torch

from ipfm_fast._checks import check_D, check_generator, check_rows, check_sigma
from ipfm_fast.errors import InvalidInput, InvalidType

# --------------------------------------------------------------------------------------
# sigma <-> r
# --------------------------------------------------------------------------------------


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
        raise InvalidInput(f"{op}: the Beta recipe needs a finite D")
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
        raise InvalidInput(f"{op}: shape must have a leading batch dimension, got {shape}")
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
        raise InvalidInput(f"sampler_sigmas: num_steps must be >= 1, got {num_steps}")
    i = torch.arange(num_steps, device=device, dtype=dtype)
    denom = max(num_steps - 1, 1)
    sig = (sigma_max ** (1 / rho) + i / denom * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sig, torch.zeros(1, device=device, dtype=dtype)])


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
    op = "reference.field_target"
    check_rows(y, "y", op)
    check_rows(x_ref, "x_ref", op)
    D = check_D(D, op)
    if tuple(x_ref.shape[1:]) != tuple(y.shape[1:]):
        raise InvalidInput(f"{op}: x_ref must have y's trailing shape {tuple(y.shape[1:])}, got {tuple(x_ref.shape)}")
    if x_ref.shape[0] == 0:
        raise InvalidInput(f"{op}: x_ref must have at least one row (M >= 1)")
    rows, n = y.shape[0], math.prod(y.shape[1:])
    sig = _row_sigma(sigma, rows, y.device, torch.float64, op)
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


def field_target_pfgmpp_style(y, sigma, x_ref, D, *, chunk_bytes=2**28):
    r"""The field target as the public reference codes compute it (benchmark baseline):
    PFGM++ ``pfgmpp_target`` (finite D) and STF ``stf_scores`` (D = inf) in float64.

    Finite D: augment rows with the radius, :math:`\tilde y_i = (y_i, r_i)`,
    :math:`\tilde x_j = (x_j, 0)`, take :math:`d_{ij} = \lVert \tilde y_i - \tilde x_j\rVert`
    from explicit broadcast differences, weights :math:`(\min_l d_{il} / (d_{ij} + 10^{-7}))^{N+D}`
    normalised with :math:`+10^{-7}` in the denominator. D = inf: :math:`-d_{ij}^2 / (2\sigma_i^2)`,
    max-subtracted softmax. The originals materialize [B, M, N] broadcasts; here they run
    over blocks of rows of at most ``chunk_bytes`` each (same arithmetic, bounded memory).
    """
    op = "reference.field_target_pfgmpp_style"
    check_rows(y, "y", op)
    D = check_D(D, op)
    rows, n, m = y.shape[0], y[0].numel(), x_ref.shape[0]
    sig = _row_sigma(sigma, rows, y.device, torch.float64, op)
    yf = y.reshape(rows, -1).double()
    xf = x_ref.reshape(m, -1).double()
    finite = not math.isinf(D)
    if finite:
        yf = torch.cat([yf, (sig * math.sqrt(D))[:, None]], dim=1)
        xf = torch.cat([xf, xf.new_zeros(m, 1)], dim=1)
    step = max(1, chunk_bytes // max(1, m * xf.shape[1] * 8))
    out = []
    for i0 in range(0, rows, step):
        d2 = ((yf[i0:i0 + step, None, :] - xf[None]) ** 2).sum(-1)
        if finite:
            dist = d2.sqrt()
            ratio = (dist.min(dim=1, keepdim=True)[0] / (dist + 1e-7)) ** (n + D)
            coeff = ratio / (ratio.sum(dim=1, keepdim=True) + 1e-7)
        else:
            logits = -d2 / (2 * sig[i0:i0 + step, None] ** 2)
            e = torch.exp(logits - logits.max(dim=1, keepdim=True)[0])
            coeff = e / e.sum(dim=1, keepdim=True)
        out.append(coeff @ xf)
    target = torch.cat(out)
    if finite:
        target = target[:, :-1]
    return target.reshape(y.shape).to(y.dtype)


# --------------------------------------------------------------------------------------
# IPFM losses
# --------------------------------------------------------------------------------------


REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction, op):
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise InvalidInput(f"{op}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return reduction


def check_loss_inputs(op, **tensors):
    """The loss inputs (name -> tensor): floating-point tensors [B, ...] of one shape, one
    device and one dtype. Returns the number of rows B."""
    (first_name, first), *rest = tensors.items()
    check_rows(first, first_name, op)
    for name, t in rest:
        check_rows(t, name, op)
        if t.shape != first.shape:
            raise InvalidInput(f"{op}: {name} has shape {tuple(t.shape)} but {first_name} has shape "
                               f"{tuple(first.shape)}; they must match")
        if t.device != first.device:
            raise InvalidInput(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}")
        if t.dtype != first.dtype:
            raise InvalidType(f"{op}: {name} is {t.dtype} but {first_name} is {first.dtype}; pass one dtype")
    return first.shape[0]


def check_real(value, name, op, *, positive=False):
    """A finite Python number (positive if asked), returned as float."""
    if isinstance(value, torch.Tensor) or isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidType(f"{op}: {name} must be a Python float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        raise InvalidInput(f"{op}: {name} must be {'positive and ' if positive else ''}finite, got {value}")
    return value


def check_loss_weight(weight, rows, device, op):
    """weight: "adaptive" (returns None) or a floating-point tensor [B] (also [B, 1, ...]) on
    ``device`` (returned as [B])."""
    if isinstance(weight, str):
        if weight != "adaptive":
            raise InvalidInput(f"{op}: weight must be 'adaptive' or a tensor of shape [{rows}], got {weight!r}")
        return None
    if not isinstance(weight, torch.Tensor):
        raise InvalidType(f"{op}: weight must be 'adaptive' or a tensor of shape [{rows}], got {type(weight).__name__}")
    if not weight.dtype.is_floating_point:
        raise InvalidType(f"{op}: weight must be a floating-point tensor, got {weight.dtype}")
    if weight.device != torch.device(device):
        raise InvalidInput(f"{op}: weight is on {weight.device} but the inputs are on {device}")
    if weight.dim() < 1 or weight.shape[0] != rows or any(s != 1 for s in weight.shape[1:]):
        raise InvalidInput(f"{op}: weight must have shape [{rows}] (one per row), got {tuple(weight.shape)}")
    return weight.reshape(rows)


def _reduce(per_row, reduction, op):
    if reduction == "mean":
        return per_row.mean()
    if reduction == "sum":
        return per_row.sum()
    if reduction == "none":
        return per_row
    raise InvalidInput(f"{op}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


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
    op = "reference.ipfm_generator_loss"
    a, b = teacher_out, fake_out
    rows = check_loss_inputs(op, teacher_out=a, fake_out=b, x=x)
    alpha = check_real(alpha, "alpha", op)
    weight = check_loss_weight(weight, rows, a.device, op)
    check_reduction(reduction, op)
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
    loss = _reduce(per_row, reduction, op)
    return (loss, (~finite).sum()) if return_masked else loss


def fake_loss_weight(sigma, sigma_data=0.5):
    r""":math:`\lambda(\sigma) = (\sigma^2 + \sigma_d^2) / (\sigma \sigma_d)^2` (EDM's loss weight)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def ipfm_fake_loss(fake_out, x, sigma, *, sigma_data=0.5, reduction="mean"):
    r"""Field-matching loss of the fake network (and PFGM++ teacher training),
    :math:`\ell_i = \lambda(\sigma_i)\lVert b_i - x_i\rVert^2` with b = fake_out [B, ...],
    x the target [B, ...] (callers detach it), sigma float or [B] (differentiable).
    reduction as in :func:`ipfm_generator_loss`. Non-finite values are not masked."""
    op = "reference.ipfm_fake_loss"
    rows = check_loss_inputs(op, fake_out=fake_out, x=x)
    sigma_data = check_real(sigma_data, "sigma_data", op, positive=True)
    check_reduction(reduction, op)
    compute = torch.float64 if fake_out.dtype == torch.float64 else torch.float32
    sig = _row_sigma(sigma, rows, fake_out.device, compute, op)
    per_row = fake_loss_weight(sig, sigma_data) * (fake_out.to(compute) - x.to(compute)).reshape(rows, math.prod(x.shape[1:])).square().sum(1)
    return _reduce(per_row, reduction, op)


def ipfm_generator_loss_sid_style(teacher_out, fake_out, x, *, alpha=1.0):
    r"""The generator loss as the SiD / IPFM training loops write it in eager PyTorch (the
    baseline the fused kernels are measured against): rows with a NaN are dropped by
    boolean indexing (a host sync), the adaptive weight is taken in fp32 without
    gradient, about ten elementwise passes forward and as many backward; returns the sum
    of the per-row losses / B (reduction "mean")."""
    a, b = teacher_out, fake_out
    rows = x.shape[0]
    dims = list(range(1, x.dim()))
    nan_rows = torch.isnan(x).flatten(1).any(1) | torch.isnan(a).flatten(1).any(1) | torch.isnan(b).flatten(1).any(1)
    if nan_rows.any():
        keep = ~nan_rows
        a, b, x = a[keep], b[keep], x[keep]
    with torch.no_grad():
        weight_factor = (x.float() - a.float()).abs().mean(dim=dims, keepdim=True).clip(min=1e-5)
    loss = (a - b) * ((a - x) - alpha * (a - b)) / weight_factor
    return loss.sum() / rows


def ipfm_fake_loss_edm_style(fake_out, x, sigma, *, sigma_data=0.5):
    r"""The fake-network loss as EDM / SiD write it in eager PyTorch (baseline):
    ``weight * (b - x) ** 2`` with the weight broadcast per row, summed / B."""
    rows = fake_out.shape[0]
    if not isinstance(sigma, torch.Tensor):
        sigma = torch.full((rows,), float(sigma), device=fake_out.device)
    sigma = sigma.reshape(rows, *[1] * (fake_out.dim() - 1))
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    return (weight * ((fake_out - x) ** 2)).sum() / rows
