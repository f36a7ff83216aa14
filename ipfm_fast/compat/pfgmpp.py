r"""Drop-ins for the PFGM++ reference code (Newbeeer/pfgmpp, an EDM fork):
``training/loss.py``'s ``EDMLoss`` and the prior of ``generate.py``
(``StackedRandomGenerator.rand_beta_prime``).

    c.loss_kwargs.class_name = 'ipfm_fast.compat.pfgmpp.EDMLoss'   # instead of 'training.loss.EDMLoss'
    latents = pfgmpp.rand_beta_prime([B, C, H, W], N=N, D=aug_dim, device=device, sigma_max=..., seeds=batch_seeds)

What changes at the call sites (see ipfm_fast.compat for the contract):

* the perturbation: the original draws B ~ Beta(N/2, D/2) with NumPy on the host, clips
  it to [1e-3, 1 - 1e-3], draws a [B, N] Gaussian on the CPU and copies both to the GPU;
  here :func:`ipfm_fast.perturb` draws the same law (with the same clip by default) on the
  device in one pass;
* the STF / PFGM++ reference-batch target: the original materializes [B, M, N + 1] float64
  tensors (6 GiB each at B = 64, M = 4096, N = 3072); here :func:`ipfm_fast.field_target`
  computes the same posterior mean with O(B M) scratch, to ~1e-6 relative of float64;
* the loss :math:`\lambda(\sigma) \lVert D(y + n) - \mathrm{target}\rVert^2` is
  :func:`ipfm_fast.ipfm_fake_loss` per row (one fused pass each way).

Kept from the original: sigma's draw (``torch.randn``; x 380/80 with ``opts.lsun``), the
networks' calls, the reference batch's first B rows set to y in place, no NaN masking (a
NaN propagates, as there). Fixed: ``stf=True`` without an augment pipe crashed there
(it assigned the B images to the M - B other reference rows); here those rows are kept.
``opts=None`` (the signature's default, which crashed on ``opts.lsun``) means no lsun.
"""

import math

import numpy as np
import torch

import ipfm_fast as ipf
from ipfm_fast.compat._util import as_D, common_dtype, per_element, resolve_clip
from ipfm_fast.errors import InvalidInput

__all__ = ["EDMLoss", "rand_beta_prime"]

LSUN_SIGMA_FACTOR = 380.0 / 80.0  # pfgmpp: "use larger sigma for high-resolution datasets"


def _lsun(opts):
    if opts is None:
        return False
    if isinstance(opts, dict):  # dnnlib.EasyDict is a dict
        return bool(opts.get("lsun", False))
    return bool(getattr(opts, "lsun", False))


class EDMLoss:
    """pfgmpp's ``training.loss.EDMLoss``, fused.

    Args (as the original's): P_mean, P_std (ln sigma ~ N(P_mean, P_std^2)), sigma_data (EDM's
    weight), D (augmentation dimension; int as ``--aug_dim`` gives it, or "inf"), N (C H W;
    the training loop sets it from the network), gamma (stored; only the original's unused
    ``pfgm_target`` needs it), opts (``opts.lsun`` scales sigma by 380/80). Extra: clip_beta
    (None: the original's clip of the Beta draw; False: none; or (lo, hi)), backend.

    ``__call__(net, images, labels=None, augment_pipe=None, stf=False, pfgmpp=False,
    ref_images=None)`` returns the [B, C, H, W] loss: PFGM++ at D with ``pfgmpp=True``, EDM
    otherwise; with ``stf=True`` the target is the reference-batch posterior mean over
    ``ref_images`` ([M, C, H, W], its first B rows are overwritten with the (augmented)
    images, as in the original).
    """

    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5, D=128, N=3072, gamma=5, opts=None, clip_beta=None,
                 backend="auto"):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data
        self.D = D
        self.N = N
        self.gamma = gamma
        self.opts = opts
        self.clip_beta = clip_beta
        self.backend = backend

    def _check_rows(self, t, op):
        n = t[0].numel() if t.shape[0] else math.prod(t.shape[1:])
        if n != self.N:
            raise InvalidInput(f"EDMLoss.{op}: N = {self.N} but the images have {n} elements per row; set N to "
                               f"C * H * W (pfgmpp's training loop does)")

    def __call__(self, net, images, labels=None, augment_pipe=None, stf=False, pfgmpp=False, ref_images=None):
        rows = images.shape[0]
        if pfgmpp:
            self._check_rows(images, "__call__")
        # one normal per row either way, drawn as the original draws it (the same generator state after)
        sigma = (torch.randn(rows, device=images.device) * self.P_std + self.P_mean).exp()
        if _lsun(self.opts):
            sigma *= LSUN_SIGMA_FACTOR
        D = as_D(self.D) if pfgmpp else math.inf
        r = sigma.double() * np.sqrt(D) if pfgmpp else None
        sigma = sigma.reshape((rows, 1, 1, 1))
        y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
        clip = resolve_clip(self.clip_beta, D) if pfgmpp else None
        y_n = ipf.perturb(y, sigma, D, clip_beta=clip, backend=self.backend)
        D_yn = net(y_n, sigma, labels, augment_labels=augment_labels)

        if stf:
            if augment_pipe is not None:
                ref_images[rows:], _ = augment_pipe(ref_images[rows:])
            ref_images[:rows] = y
        if pfgmpp and stf:
            target = self.pfgmpp_target(r.squeeze(), y_n, ref_images).view_as(y)
        elif stf:
            target = self.stf_scores(sigma.squeeze(), y_n, ref_images).view_as(y)
        else:
            target = y
        out, target = common_dtype(D_yn, target)
        per_row = ipf.ipfm_fake_loss(out, target, sigma.reshape(rows), sigma_data=self.sigma_data, reduction="none",
                                     backend=self.backend)
        return per_element(per_row, y)

    def stf_scores(self, sigmas, perturbed_samples, samples_full):
        r"""The STF target (D = inf): :math:`\sum_j \mathrm{softmax}_j(-\lVert y_i - x_j\rVert^2 /
        (2\sigma_i^2)) x_j`, [B, N], without gradient (as the original's ``torch.no_grad``)."""
        rows, m = perturbed_samples.shape[0], samples_full.shape[0]
        with torch.no_grad():
            return ipf.field_target(perturbed_samples.reshape(rows, -1), sigmas, samples_full.reshape(m, -1), math.inf,
                                    backend=self.backend)

    def pfgmpp_target(self, r, perturbed_samples, samples_full):
        r"""The PFGM++ reference-batch target at alignment r = sigma sqrt(D): weights
        :math:`\propto (\lVert y_i - x_j\rVert^2 + r_i^2)^{-(N+D)/2}` over the reference batch,
        [B, N] float32, differentiable in perturbed_samples and samples_full (as the
        original's). The original's ``+ 1e-7`` guards (on each distance and on the weights'
        sum) are left out: they change the weights by at most (N + D) 1e-7 / |y_i - x_j|
        relative."""
        D = as_D(self.D)
        rows, m = perturbed_samples.shape[0], samples_full.shape[0]
        self._check_rows(perturbed_samples, "pfgmpp_target")
        sigma = (r.reshape(-1).double() if isinstance(r, torch.Tensor) else float(r)) / math.sqrt(D)
        target = ipf.field_target(perturbed_samples.reshape(rows, -1), sigma, samples_full.reshape(m, -1), D,
                                  backend=self.backend)
        return target.float()


def rand_beta_prime(size, N=3072, D=128, *, seeds, device=None, sigma_max=80, backend="auto", **kwargs):
    r"""pfgmpp ``generate.py``'s prior (``StackedRandomGenerator.rand_beta_prime``): one
    draw of the PFGM++ prior at sigma_max per row, row b a function of ``seeds[b]`` alone
    (its own torch.Generator, as the original reseeds per row), drawn on the device.

    .. math::
        y = \sigma_{max} \, g \sqrt{D / W}: \quad \lVert y\rVert = \sigma_{max}\sqrt{D}\sqrt{B/(1-B)},
        \ B \sim \mathrm{Beta}(N/2, D/2), \text{ direction uniform}

    Args as the original's: size [B, C, H, W], N = C H W, D; ``device`` and ``sigma_max``
    (used only when N >= 256 * 256 * 3: below that the original takes 80, and so does this);
    other keyword arguments (``pfgmpp=``) are accepted and ignored, as there. Extra:
    ``seeds`` (the generator's seeds, one per row: ``rnd.seeds``), backend.

    Returns float64 [B, C, H, W] like the original (the draw itself is fp32, as the
    original's Gaussian). Unlike the original it does not reseed torch's global generator.
    """
    del kwargs  # pfgmpp=...: the original accepts and ignores it too
    size = [int(s) for s in size]
    if len(seeds) != size[0]:
        raise InvalidInput(f"rand_beta_prime: {len(seeds)} seeds for {size[0]} rows")
    if math.prod(size[1:]) != N:
        raise InvalidInput(f"rand_beta_prime: N = {N} but size {size} has {math.prod(size[1:])} elements per row")
    D = as_D(D)
    sigma = 80.0 if N < 256 * 256 * 3 else float(sigma_max)
    device = torch.device(device if device is not None else "cpu")
    rows = []
    for seed in seeds:
        rng = torch.Generator(device=device).manual_seed(int(seed))
        rows.append(ipf.sample_prior([1] + size[1:], sigma, D, device=device, generator=rng, backend=backend))
    if not rows:
        return torch.empty(size, dtype=torch.float64, device=device)
    return torch.cat(rows).to(torch.float64)
