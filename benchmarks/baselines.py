r"""The ops as other code writes them: the baselines the benchmarks (and the accuracy tests)
put next to the fused backends. Never used by ipfm_fast itself; the spec is
:mod:`ipfm_fast.reference`.

    perturb         perturb_pfgmpp_style (PFGM++: a NumPy Beta on the host), perturb_chi2_eager
    field target    field_target_pfgmpp_style (PFGM++ pfgmpp_target / STF stf_scores, float64),
                    field_target_eager (plain fp32: cdist, log, logsumexp, softmax, matmul)
    losses          ipfm_generator_loss_sid_style (the SiD / IPFM loops), ipfm_fake_loss_edm_style
    call sites      the originals that ipfm_fast.compat replaces, restated as they are (their
                    host draws, CPU Gaussians, float64 broadcasts and host syncs included):
                    pfgmpp_perturbation, pfgmpp_target_float64, stf_scores_float64,
                    pfgmpp_edm_loss (Newbeeer/pfgmpp training/loss.py), rand_beta_prime_seeded
                    (its generate.py), sample_noise_idmd (daniil-shlenskii/pfgmpp-idmd
                    pfgmpp_kernel.py), SidLossOriginal (training/sid_loss.py of
                    mingyuanzhou/SiD and of pfgmpp-idmd)

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


# --------------------------------------------------------------------------------------
# call sites of the PFGM++ / SiD / IPFM codebases (what ipfm_fast.compat replaces)
# --------------------------------------------------------------------------------------


def pfgmpp_perturbation(images, sigma, N, D, *, clip=(1e-3, 1 - 1e-3)):
    """pfgmpp EDMLoss's pfgmpp branch: the Beta on the host with NumPy (a host round-trip for
    sigma's device), clipped, the [B, N] Gaussian on the CPU and copied to the device;
    returns y + n."""
    rows = images.shape[0]
    r = sigma.double() * np.sqrt(D).astype(np.float64)
    samples_norm = np.random.beta(a=N / 2.0, b=D / 2.0, size=rows).astype(np.double)
    samples_norm = np.clip(samples_norm, *clip)
    inverse_beta = samples_norm / (1 - samples_norm + 1e-8)
    inverse_beta = torch.from_numpy(inverse_beta).to(images.device).double()
    samples_norm = (r * torch.sqrt(inverse_beta + 1e-8)).view(rows, -1)
    gaussian = torch.randn(rows, N).to(samples_norm.device)
    unit_gaussian = gaussian / torch.norm(gaussian, p=2, dim=1, keepdim=True)
    return images + (unit_gaussian * samples_norm).float().view_as(images)


def pfgmpp_target_float64(r, perturbed_samples, samples_full, N, D):
    """pfgmpp EDMLoss.pfgmpp_target: [B, M, N + 1] float64 broadcasts (differences, squares,
    the repeated reference batch and its weighted copy)."""
    ps = torch.cat((perturbed_samples.reshape(len(perturbed_samples), -1), r[:, None]), dim=1).double()
    real = torch.cat((samples_full.reshape(len(samples_full), -1),
                      torch.zeros((len(samples_full), 1), device=samples_full.device)), dim=1).double()
    gt_distance = torch.sum((ps.unsqueeze(1) - real) ** 2, dim=[-1]).sqrt()
    distance = torch.min(gt_distance, dim=1, keepdim=True)[0] / (gt_distance + 1e-7)
    distance = (distance ** (N + D))[:, :, None]
    coeff = distance / (torch.sum(distance, dim=1, keepdim=True) + 1e-7)
    target = real.unsqueeze(0).repeat(len(perturbed_samples), 1, 1)
    return torch.sum(coeff * target, dim=1)[:, :-1].float()


def stf_scores_float64(sigmas, perturbed_samples, samples_full):
    """pfgmpp EDMLoss.stf_scores (D = inf), in the samples' dtype as there, [B, M, N] broadcasts."""
    with torch.no_grad():
        ps = perturbed_samples.reshape((len(perturbed_samples), -1))
        sf = samples_full.reshape((len(samples_full), -1))
        gt = -torch.sum((ps.unsqueeze(1) - sf) ** 2, dim=[-1]) / (2 * sigmas.unsqueeze(1) ** 2)
        distance = torch.exp(gt - torch.max(gt, dim=1, keepdim=True)[0])[:, :, None]
        weights = distance / torch.sum(distance, dim=1, keepdim=True)
        return torch.sum(weights * sf.unsqueeze(0).repeat(len(ps), 1, 1), dim=1)


def pfgmpp_edm_loss(net, images, *, N, D, P_mean=-1.2, P_std=1.2, sigma_data=0.5, pfgmpp=True, stf=False,
                    ref_images=None, augment_pipe=None):
    """pfgmpp EDMLoss.__call__ as it is (stf with an augment pipe: without one the original
    crashes); returns the per-element loss [B, C, H, W]."""
    rows = images.shape[0]
    if pfgmpp:
        sigma = (torch.randn(rows, device=images.device) * P_std + P_mean).exp()
        r = sigma.double() * np.sqrt(D).astype(np.float64)
        y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
        y_n = pfgmpp_perturbation(y, sigma, N, D)
        sigma = sigma.reshape(rows, 1, 1, 1)
    else:
        sigma = (torch.randn([rows, 1, 1, 1], device=images.device) * P_std + P_mean).exp()
        y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
        y_n = y + torch.randn_like(y) * sigma
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    D_yn = net(y_n, sigma, None, augment_labels=augment_labels)
    if stf:
        ref_images[rows:], _ = augment_pipe(ref_images[rows:])
        ref_images[:rows] = y
        if pfgmpp:
            target = pfgmpp_target_float64(r.squeeze(), y_n, ref_images, N, D).view_as(y)
        else:
            target = stf_scores_float64(sigma.squeeze(), y_n, ref_images).view_as(y)
    else:
        target = y
    return weight * ((D_yn - target) ** 2)


def rand_beta_prime_seeded(size, N, D, seeds, device, sigma_max=80):
    """pfgmpp generate.py StackedRandomGenerator.rand_beta_prime: per row, reseed torch's
    global generator, a Beta sample and an N-vector Gaussian on the CPU, copied to the device."""
    from torch.distributions import Beta

    beta_gen = Beta(torch.FloatTensor([N / 2.0]), torch.FloatTensor([D / 2.0]))
    latents = []
    for seed in seeds:
        torch.manual_seed(seed)
        sample_norm = beta_gen.sample().to(device).double()
        inverse_beta = sample_norm / (1 - sample_norm)
        sigma = 80 if N < 256 * 256 * 3 else sigma_max
        sample_norm = torch.sqrt(inverse_beta) * sigma * np.sqrt(D)
        gaussian = torch.randn(N).to(sample_norm.device)
        latents.append((gaussian / torch.norm(gaussian, p=2) * sample_norm).reshape((1, *size[1:])))
    return torch.cat(latents, dim=0)


def sample_noise_idmd(latents, sigma, D="inf"):
    """pfgmpp-idmd pfgmpp_kernel.sample_noise: D = "inf": latents * sigma; finite D: a
    Beta(N/2, D/2) draw on the CPU (copied to the device), clamped to [1e-3, 1 - 1e-3], times
    latents / |latents|."""
    from torch.distributions import Beta

    eps = 1e-8
    if isinstance(sigma, (float, int)):
        sigma = torch.tensor([sigma] * len(latents), device=latents.device, dtype=latents.dtype)
    if D == "inf":
        return latents * sigma.view(-1, 1, 1, 1)
    N = np.prod(latents.shape[1:])
    r = sigma.reshape(-1) * D**0.5
    beta_gen = Beta(torch.FloatTensor([N / 2.0]), torch.FloatTensor([D / 2.0]))
    sample_norm = beta_gen.sample((len(latents),)).to(latents.device).to(latents.dtype)
    sample_norm = torch.clamp(sample_norm, min=1e-3, max=1 - 1e-3).reshape(-1)
    inverse_beta = sample_norm / (1 - sample_norm + eps)
    R = r * torch.sqrt(inverse_beta + eps)
    unit_gaussian = latents / torch.norm(latents, p=2, dim=(1, 2, 3), keepdim=True)
    return (unit_gaussian * R.view(-1, 1, 1, 1)).float().view_as(latents)


class SidLossOriginal:
    """training/sid_loss.py SID_EDMLoss as SiD (D = "inf": ``randn_like * sigma``) and the
    IPFM authors' fork (``sample_noise``) write it: NaN rows dropped by boolean indexing
    after ``nan_mask.any()`` (a host sync), the loss per element in eager PyTorch."""

    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5, sid_or_idmd="sid"):
        self.P_mean, self.P_std, self.sigma_data, self.sid_or_idmd = P_mean, P_std, sigma_data, sid_or_idmd

    def generator_loss(self, true_score, fake_score, images, labels=None, augment_pipe=None, alpha=1.2, tmax=800,
                       D="inf"):
        min_inv_rho, max_inv_rho = 0.002 ** (1 / 7.0), 80 ** (1 / 7.0)
        rnd_t = torch.rand([images.shape[0], 1, 1, 1], device=images.device) * tmax / 1000
        sigma = (max_inv_rho + (1 - rnd_t) * (min_inv_rho - max_inv_rho)) ** 7.0
        y, augment_labels = (augment_pipe(images) if augment_pipe is not None
                             else (images, torch.zeros(images.shape[0], 9).to(images.device)))
        n = sample_noise_idmd(torch.randn_like(y), sigma, D)
        y_real = true_score(y + n, sigma, labels, augment_labels=augment_labels)
        y_fake = fake_score(y + n, sigma, labels, augment_labels=augment_labels)
        nan_mask = (torch.isnan(y).flatten(start_dim=1).any(dim=1) | torch.isnan(y_real).flatten(start_dim=1).any(dim=1)
                    | torch.isnan(y_fake).flatten(start_dim=1).any(dim=1))
        if nan_mask.any():
            y, y_real, y_fake = y[~nan_mask], y_real[~nan_mask], y_fake[~nan_mask]
        with torch.no_grad():
            weight_factor = abs(y - y_real).to(torch.float32).mean(dim=[1, 2, 3], keepdim=True).clip(min=0.00001)
        if self.sid_or_idmd == "sid":
            return (y_real - y_fake) * ((y_real - y) - alpha * (y_real - y_fake)) / weight_factor
        return ((y_real - y) ** 2 - (y_fake - y) ** 2) / weight_factor

    def __call__(self, fake_score, images, labels=None, augment_pipe=None, D="inf"):
        rnd_normal = torch.randn([images.shape[0], 1, 1, 1], device=images.device)
        sigma = (rnd_normal * self.P_std + self.P_mean).exp()
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
        n = sample_noise_idmd(torch.randn_like(y), sigma, D)
        y_fake = fake_score(y + n, sigma, labels, augment_labels=augment_labels)
        nan_mask = torch.isnan(y).flatten(start_dim=1).any(dim=1) | torch.isnan(y_fake).flatten(start_dim=1).any(dim=1)
        if nan_mask.any():
            y_fake, y, weight = y_fake[~nan_mask], y[~nan_mask], weight[~nan_mask]
        return weight * ((y_fake - y) ** 2)
