"""ipfm_fast: fused Triton / CUDA / C++ kernels for Inverse Poisson Flow Matching.

    import ipfm_fast as ipf
    y = ipf.perturb(x, sigma, D)                 # PFGM++ perturbation kernel
    n = ipf.noise_from_gaussian(g, sigma, D)     # its noise for a given gaussian g
    z = ipf.sample_prior((B, C, H, W), 80.0, D)  # prior at sigma_max
    t = ipf.field_target(y, sigma, x_ref, D)     # reference-batch posterior mean (PFGM++ / STF target)
    loss_g = ipf.ipfm_generator_loss(teacher_out, fake_out, x)   # generator (SiD/IPFM) loss
    loss_f = ipf.ipfm_fake_loss(fake_out, x.detach(), sigma)     # fake-network loss

Every op takes ``backend=`` "auto" | "triton" | "cuda" | "cpu" | "reference";
``ipfm-fast info`` (or ``python -m ipfm_fast info``) says which are available and why not.
"""

__version__ = "0.1.0"

from ipfm_fast import errors  # noqa: E402
from ipfm_fast import reference  # noqa: E402,F401 - the spec: ipfm_fast.reference.<op>, see __all__
from ipfm_fast.backends import BACKENDS  # noqa: E402
from ipfm_fast.errors import BackendUnavailable, IpfmError  # noqa: E402
from ipfm_fast.ops.field_target import field_target  # noqa: E402
from ipfm_fast.ops.losses import ipfm_fake_loss, ipfm_generator_loss  # noqa: E402
from ipfm_fast.ops.perturb import noise_from_gaussian, perturb, sample_prior  # noqa: E402
from ipfm_fast.schedules import r_to_sigma, sigma_to_r  # noqa: E402

# What a user calls. The reference (the spec and the fallback) is reached through
# backend="reference" on every op; the module stays importable for tests and for code that
# compares against the spec, but a star import should not bind a name as generic as `reference`.
__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "IpfmError",
    "field_target",
    "ipfm_fake_loss",
    "ipfm_generator_loss",
    "errors",
    "noise_from_gaussian",
    "perturb",
    "r_to_sigma",
    "sample_prior",
    "sigma_to_r",
]
