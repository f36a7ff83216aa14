"""Drop-in fused ops for the public PFGM++ / SiD / IPFM codebases.

    from ipfm_fast.compat import as_D, sid, pfgmpp

    sid.sample_noise(latents=..., sigma=..., D="inf")    # pfgmpp-idmd pfgmpp_kernel.sample_noise
    sid.SID_EDMLoss(...)                                   # SiD and pfgmpp-idmd training/sid_loss.py
    pfgmpp.EDMLoss(...)                                    # pfgmpp training/loss.py EDMLoss
    pfgmpp.rand_beta_prime(size, N, D, seeds=..., ...)     # pfgmpp generate.py's prior

Same names, signatures and return shapes as the originals (mingyuanzhou/SiD,
daniil-shlenskii/pfgmpp-idmd, Newbeeer/pfgmpp), so that swapping one in is one line, e.g.
``class_name='ipfm_fast.compat.sid.SID_EDMLoss'`` for ``dnnlib.util.construct_class_by_name``.
The contract, for the same sigmas and the same noise:

* each loss returns a [B, C, H, W] tensor (the originals' per-element shape) whose ``.sum()``
  and whose gradients with respect to the images and the network outputs equal the
  original's to fp32 rounding. The elements are each row's loss spread evenly over the
  row (row loss / N): the fused ops compute per-row sums, and the training loops only
  ever take ``loss.sum()`` (so a per-element statistic such as training_stats' std of
  ``Loss/loss`` differs, its mean does not);
* rows with NaN contribute zero where the original drops them by boolean indexing (SiD /
  IPFM losses: a data-dependent shape, which would need a host sync); rows with Inf are
  masked too (the original keeps them, and its loss is then Inf or NaN);
* sigma is drawn with the same torch calls as the original (a seeded run draws the same
  sigmas and augmentations); the noise comes from ipfm_fast's counter-based Philox on the
  device (:func:`ipfm_fast.perturb`): only the random streams differ;
* finite D reproduces the original's clip of the Beta draw to [1e-3, 1 - 1e-3]
  (:data:`CLIP_BETA`) by default, so a swapped run has the original's distribution;
  ``clip_beta=False`` turns it off, ``(lo, hi)`` sets other bounds;
* no host sync on CUDA.

docs/compat.md has the patch for each codebase and the measured speedups.
"""

from ipfm_fast.compat._util import CLIP_BETA, as_D
from ipfm_fast.compat import pfgmpp, sid

__all__ = ["CLIP_BETA", "as_D", "pfgmpp", "sid"]
