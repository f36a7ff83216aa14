r"""The ops as other code writes them: the baselines the benchmarks (and the accuracy tests)
put next to the fused backends. Never used by ipfm_fast itself; the spec is
:mod:`ipfm_fast.reference`.

    perturb         perturb_pfgmpp_style (PFGM++: a NumPy Beta on the host), perturb_chi2_eager
    field target    field_target_pfgmpp_style (PFGM++ pfgmpp_target / STF stf_scores, float64),
                    field_target_eager (plain fp32: cdist, log, logsumexp, softmax, matmul)
    losses          ipfm_generator_loss_sid_style (the SiD / IPFM loops), ipfm_fake_loss_edm_style

Arguments are not validated beyond what the recipe itself needs (the originals do not).
"""

import math

import numpy as np
import torch


def _row_sigma(sigma, rows, device, dtype):
    if isinstance(sigma, torch.Tensor):
        return (sigma.expand(rows) if sigma.dim() == 0 else sigma.reshape(rows)).to(device, dtype)
    return torch.full((rows,), float(sigma), device=device, dtype=dtype)


def _per_row(v, x):
    return v.view(-1, *[1] * (x.dim() - 1))


# --------------------------------------------------------------------------------------
# perturbation
# --------------------------------------------------------------------------------------


def perturb_pfgmpp_style(x, sigma, D, *, rng=None):
    r"""The perturbation as the public PFGM++ code draws it: a Beta on the host with NumPy,

    .. math::
        B \sim \mathrm{Beta}(N/2, D/2), \quad R = r \sqrt{B / (1 - B)}, \quad
        y = x + R \, g / \lVert g \rVert,

    one host round-trip per call. Same distribution as :func:`ipfm_fast.perturb`; D must be
    finite.
    """
    D = float(D)
    if math.isinf(D):
        raise ValueError("perturb_pfgmpp_style: the Beta recipe needs a finite D")
    rng = np.random.default_rng() if rng is None else rng
    rows, n = x.shape[0], x[0].numel()
    sig = _row_sigma(sigma, rows, x.device, torch.float64).cpu().numpy()  # host sync, as in the original
    beta = rng.beta(a=n / 2.0, b=D / 2.0, size=rows)
    radius = torch.from_numpy(sig * math.sqrt(D) * np.sqrt(beta / (1.0 - beta))).to(x.device, torch.float32)
    g = torch.randn(x.shape, device=x.device)
    unit = g / _per_row(g.reshape(rows, -1).norm(dim=1), x)
    return (x + _per_row(radius, x) * unit).to(x.dtype)


def perturb_chi2_eager(x, sigma, D):
    """The chi-square (Student-t) form in eager PyTorch: randn, a Gamma per row, scale, add."""
    rows = x.shape[0]
    w = 2.0 * torch._standard_gamma(torch.full((rows,), D / 2, device=x.device))
    scale = _per_row(sigma * torch.sqrt(D / w), x)
    return x + scale * torch.randn_like(x)


# --------------------------------------------------------------------------------------
# field target
# --------------------------------------------------------------------------------------


def field_target_pfgmpp_style(y, sigma, x_ref, D, *, chunk_bytes=2**28):
    r"""The field target as the public reference codes compute it: PFGM++ ``pfgmpp_target``
    (finite D) and STF ``stf_scores`` (D = inf) in float64.

    Finite D: augment rows with the radius, :math:`\tilde y_i = (y_i, r_i)`,
    :math:`\tilde x_j = (x_j, 0)`, take :math:`d_{ij} = \lVert \tilde y_i - \tilde x_j\rVert`
    from explicit broadcast differences, weights :math:`(\min_l d_{il} / (d_{ij} + 10^{-7}))^{N+D}`
    normalised with :math:`+10^{-7}` in the denominator. D = inf: :math:`-d_{ij}^2 / (2\sigma_i^2)`,
    max-subtracted softmax. The originals materialize [B, M, N] broadcasts; here they run
    over blocks of rows of at most ``chunk_bytes`` each (same arithmetic, bounded memory).
    """
    D = float(D)
    rows, n, m = y.shape[0], y[0].numel(), x_ref.shape[0]
    sig = _row_sigma(sigma, rows, y.device, torch.float64)
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


def field_target_eager(y, sigma, x_ref, D, *, return_logz=False):
    """The plain formulation in y's dtype (fp32 for the comparisons): cdist, log, logsumexp,
    softmax, matmul, materializing [B, M]. What a PyTorch user writes."""
    rows = y.shape[0]
    n = y[0].numel()
    yf = y.reshape(rows, -1)
    xf = x_ref.reshape(x_ref.shape[0], -1).to(yf.dtype)
    sig = _row_sigma(sigma, rows, yf.device, yf.dtype)
    d2 = torch.cdist(yf, xf).square()
    if math.isinf(D):
        logits = -d2 / (2 * sig.square()[:, None])
    else:
        logits = -0.5 * (n + D) * torch.log(d2 + D * sig.square()[:, None])
    logz = torch.logsumexp(logits, dim=1)
    target = (torch.softmax(logits, dim=1) @ xf).reshape(y.shape)
    return (target, logz) if return_logz else target


# --------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------


def ipfm_generator_loss_sid_style(teacher_out, fake_out, x, *, alpha=1.0):
    r"""The generator loss as the SiD / IPFM training loops write it in eager PyTorch: rows
    with a NaN are dropped by boolean indexing (a host sync), the adaptive weight is taken
    in fp32 without gradient, about ten elementwise passes forward and as many backward;
    returns the sum of the per-row losses / B (reduction "mean")."""
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
    r"""The fake-network loss as EDM / SiD write it in eager PyTorch:
    ``weight * (b - x) ** 2`` with the weight broadcast per row, summed / B."""
    rows = fake_out.shape[0]
    if not isinstance(sigma, torch.Tensor):
        sigma = torch.full((rows,), float(sigma), device=fake_out.device)
    sigma = sigma.reshape(rows, *[1] * (fake_out.dim() - 1))
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    return (weight * ((fake_out - x) ** 2)).sum() / rows
