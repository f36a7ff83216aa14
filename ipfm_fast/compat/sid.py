r"""Drop-ins for SiD (mingyuanzhou/SiD) and the IPFM authors' SiD fork
(daniil-shlenskii/pfgmpp-idmd): ``pfgmpp_kernel.sample_noise`` and
``training/sid_loss.py``'s ``SID_EDMLoss``.

    from ipfm_fast.compat.sid import sample_noise        # instead of: from pfgmpp_kernel import sample_noise
    c.loss_kwargs.class_name = 'ipfm_fast.compat.sid.SID_EDMLoss'   # instead of 'training.sid_loss.SID_EDMLoss'

What changes at the call sites (see ipfm_fast.compat for the contract):

* the original perturbs with ``torch.randn_like(y) * sigma`` (SiD) or ``sample_noise`` (the
  fork: a Beta draw on the host-side CPU generator, clipped, times ``latents / |latents|``);
  here :func:`ipfm_fast.perturb` draws the PFGM++ kernel on the device in one pass, with the
  same clip by default;
* the loss is :func:`ipfm_fast.ipfm_generator_loss` (one fused pass forward and one
  backward) instead of about ten elementwise passes, and NaN rows are masked on the device
  instead of ``if nan_mask.any(): y = y[~nan_mask]`` (a host sync each step).

Generator loss, per row (a = true_score, b = fake_score outputs at y + n, x = y):

.. math::
    \mathrm{sid}: \ell_i = w_i \sum (a - b)((a - x) - \alpha (a - b)), \qquad
    \mathrm{idmd}: \ell_i = w_i \sum \big((a - x)^2 - (b - x)^2\big) = 2 \ell_i|_{\alpha = 1/2}

with :math:`w_i = 1 / \max(\mathrm{mean}|x_i - a_i|, 10^{-5})` (no gradient). Fake loss:
:math:`\ell_i = \lambda(\sigma_i) \lVert b_i - y_i \rVert^2`.
"""

import math

import torch

import ipfm_fast as ipf
from ipfm_fast.compat._util import as_D, common_dtype, per_element, resolve_clip, row_shape, sigma_rows
from ipfm_fast.errors import InvalidInput
from ipfm_fast.ops.perturb import noise_from_gaussian

__all__ = ["SID_EDMLoss", "sample_noise"]

SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0  # the generator loss's t-schedule (both originals)


def sample_noise(*, latents, sigma, D="inf", generator=None, clip_beta=None, backend="auto"):
    r"""pfgmpp-idmd's ``pfgmpp_kernel.sample_noise``: the noise that perturbs data at level
    sigma, with the direction of ``latents``.

    * ``D = "inf"`` (EDM): ``latents * sigma`` per row, exactly the original's product.
    * finite D: ``sigma * latents * sqrt(D / W)``, one :math:`W \sim \chi^2_D` per row drawn on
      latents' device from ``generator`` (no host round-trip). With standard normal latents
      :math:`\lVert latents\rVert^2 \sim \chi^2_N` is the radius's :math:`\chi^2_N` part, so
      this has the original's law (radius :math:`r\sqrt{B/(1-B)}`, B ~ Beta(N/2, D/2),
      direction uniform); unlike the original (a Beta draw from the global CPU generator) it
      is a pure function of latents and the generator.

    Args:
        latents: [B, ...] tensor (the original: [B, C, H, W] standard normal). Not
            differentiable for finite D (InvalidInput if it requires grad).
        sigma: float, or a tensor [B] / [B, 1, 1, 1] / 0-dim.
        D: "inf", or a positive number (int, float, numeric string).
        generator: torch.Generator on latents' device (default: the device's).
        clip_beta: None (default): the original's clip of B to [1e-3, 1 - 1e-3]
            (``ipfm_fast.compat.CLIP_BETA``); False: none; ``(lo, hi)``: those bounds.
        backend: for the finite-D op (see :func:`ipfm_fast.perturb`).

    Returns float32 noise of latents' shape for finite D (as the original's
    ``noise.float()``); for D = "inf" the product's dtype.

    The original's ``+ 1e-8`` guards (``B / (1 - B + 1e-8)``, ``sqrt(. + 1e-8)``) are not
    reproduced: they move the radius by less than 1e-5 relative, at the clip bounds only.
    """
    D = as_D(D)
    if math.isinf(D):
        return latents * sigma_rows(sigma, latents, "sample_noise")
    noise = noise_from_gaussian(latents, sigma, D, generator=generator, clip_beta=resolve_clip(clip_beta, D),
                                backend=backend)
    return noise.float()


class SID_EDMLoss:
    """``training/sid_loss.py``'s SID_EDMLoss of SiD and of the IPFM authors' fork, fused.

    Args (as the originals'): P_mean, P_std, sigma_data (the fake loss's log-normal sigma and
    EDM weight), sid_or_idmd ("sid": the SiD loss with its alpha; "idmd": the fork's
    finite-D field-matching form, 2 x the alpha = 1/2 loss), beta_d, beta_min (SiD's, stored
    and unused there too). Extra: clip_beta (finite D; see :func:`sample_noise`), backend
    (of the fused ops).

    ``generator_loss(true_score, fake_score, images, labels=None, augment_pipe=None,
    alpha=1.2, tmax=800, D="inf")`` and ``__call__(fake_score, images, labels=None,
    augment_pipe=None, D="inf")`` take their arguments by keyword (the fork) or by position
    (SiD) and return [B, C, H, W] tensors whose sum and gradients are the originals'
    (module docstring of :mod:`ipfm_fast.compat`). The networks are called exactly as there:
    ``net(y + n, sigma, labels, augment_labels=...)`` with sigma [B, 1, 1, 1].
    """

    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5, sid_or_idmd="sid", beta_d=19.9, beta_min=0.1,
                 clip_beta=None, backend="auto"):
        if sid_or_idmd not in ("sid", "idmd"):
            raise InvalidInput(f"SID_EDMLoss: sid_or_idmd must be 'sid' or 'idmd', got {sid_or_idmd!r}")
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data
        self.sid_or_idmd = sid_or_idmd
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.clip_beta = clip_beta
        self.backend = backend

    def _perturb(self, y, sigma, D):
        """y + n, n the PFGM++ kernel's noise at sigma (D = inf: sigma * a standard normal)."""
        D = as_D(D)
        return ipf.perturb(y, sigma, D, clip_beta=resolve_clip(self.clip_beta, D), backend=self.backend)

    def generator_loss(self, true_score, fake_score, images, labels=None, augment_pipe=None, alpha=1.2, tmax=800,
                       D="inf"):
        rows = images.shape[0]
        min_inv_rho, max_inv_rho = SIGMA_MIN ** (1 / RHO), SIGMA_MAX ** (1 / RHO)
        rnd_t = torch.rand(list(row_shape(images)), device=images.device) * tmax / 1000
        sigma = (max_inv_rho + (1 - rnd_t) * (min_inv_rho - max_inv_rho)) ** RHO
        if augment_pipe is not None:
            y, augment_labels = augment_pipe(images)
        else:
            y, augment_labels = images, torch.zeros(rows, 9, device=images.device)
        y_n = self._perturb(y, sigma, D)
        y_real = true_score(y_n, sigma, labels, augment_labels=augment_labels)
        y_fake = fake_score(y_n, sigma, labels, augment_labels=augment_labels)
        a, b, x = common_dtype(y_real, y_fake, y)
        if self.sid_or_idmd == "sid":
            per_row = ipf.ipfm_generator_loss(a, b, x, alpha=alpha, reduction="none", backend=self.backend)
        else:  # (a - x)^2 - (b - x)^2 = 2 (a - b)((a - x) - (a - b) / 2)
            per_row = 2.0 * ipf.ipfm_generator_loss(a, b, x, alpha=0.5, reduction="none", backend=self.backend)
        return per_element(per_row, y)

    def __call__(self, fake_score, images, labels=None, augment_pipe=None, D="inf"):
        rows = images.shape[0]
        rnd_normal = torch.randn(list(row_shape(images)), device=images.device)
        sigma = (rnd_normal * self.P_std + self.P_mean).exp()
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
        y_n = self._perturb(y, sigma, D)
        y_fake = fake_score(y_n, sigma, labels, augment_labels=augment_labels)
        # weight * |y_fake - y|^2 with the rows holding NaN/Inf masked, fused: the generator
        # loss with a = x = y, b = y_fake, alpha = -1 is w * sum (y - y_fake)^2, and its
        # gradients are 2 w (y_fake - y) for y_fake and (a's + x's) 2 w (y - y_fake) for y.
        # (ipfm_fake_loss does not mask non-finite rows.)
        y_c, b = common_dtype(y, y_fake)
        per_row = ipf.ipfm_generator_loss(y_c, b, y_c, alpha=-1.0, weight=weight.reshape(rows).detach(),
                                          reduction="none", backend=self.backend)
        return per_element(per_row, y)
