r"""Teacher sampling: EDM's Heun ODE in sigma.

.. math::
    \frac{dy}{d\sigma} = \frac{y - D(y, \sigma)}{\sigma}, \qquad
    y(\sigma_{max}) \sim \text{prior}(\sigma_{max}, D)

on the levels :func:`ipfm_fast.schedules.sampler_sigmas` (EDM's rho = 7 spacing from
sigma_max = 80 to sigma_min = 0.002, then 0). Each step is a Heun (2nd order) step except
the last one into sigma = 0, an Euler step: ``steps`` steps cost ``2 * steps - 1``
denoiser evaluations (18 steps = 35 NFE). The ODE is the same for every D (PFGM++ networks
see sigma = r / sqrt(D)); only the prior depends on D (heavy-tailed for finite D).
"""

import json
import math

import numpy as np
import torch

import ipfm_fast as ipf
from ipfm_fast._files import replacing
from ipfm_fast.errors import BadFile, InvalidInput
from ipfm_fast.schedules import RHO, SIGMA_MAX, SIGMA_MIN, sampler_sigmas


def nfe(steps):
    """Denoiser evaluations of :func:`heun_sample` with ``steps`` steps."""
    return 2 * steps - 1


@torch.no_grad()
def heun_sample(model, z, *, steps=18, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO, autocast=None):
    """Integrate the probability-flow ODE from prior samples ``z`` (drawn at sigma_max)
    down to sigma = 0. Deterministic given z. Returns [B, ...] in z's dtype."""
    sig = sampler_sigmas(steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, device=z.device)
    ctx = autocast if autocast is not None else _null
    y = z.to(torch.float64)
    b = z.shape[0]

    def denoise(y, s):
        with ctx():
            out = model(y.to(torch.float32), torch.full((b,), float(s), device=z.device))
        return out.to(torch.float64)

    for i in range(steps):
        s_cur, s_next = float(sig[i]), float(sig[i + 1])
        d_cur = (y - denoise(y, s_cur)) / s_cur
        y_next = y + (s_next - s_cur) * d_cur
        if s_next > 0:
            d_next = (y_next - denoise(y_next, s_next)) / s_next
            y_next = y + (s_next - s_cur) * 0.5 * (d_cur + d_next)
        y = y_next
    return y.to(z.dtype)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def sample(model, num, shape, D, *, seed=0, steps=18, batch=500, device="cpu", sigma_max=SIGMA_MAX,
           sigma_min=SIGMA_MIN, rho=RHO, autocast=None, progress=None, backend="auto"):
    """``num`` samples of shape ``shape`` (one row, e.g. [1, 8, 8]) from a denoiser with the
    Heun sampler. Deterministic for a seed, whatever ``batch`` is: the prior is drawn in
    one call from a generator seeded with ``seed`` on ``device``."""
    if num < 1:
        raise InvalidInput(f"sample: the number of samples must be >= 1, got {num}")
    if steps < 1:
        raise InvalidInput(f"sample: steps must be >= 1, got {steps}")
    device = torch.device(device)
    rng = torch.Generator(device=device).manual_seed(int(seed))
    z = ipf.sample_prior((num, *shape), sigma_max, D, device=device, dtype=torch.float32, generator=rng, backend=backend)
    out = []
    for i in range(0, num, batch):
        out.append(heun_sample(model, z[i:i + batch], steps=steps, sigma_min=sigma_min, sigma_max=sigma_max,
                               rho=rho, autocast=autocast))
        if progress is not None:
            progress.update(min(batch, num - i))
    return torch.cat(out)


def save_npz(path, x, **meta):
    """Samples in [-1, 1] ([B, C, H, W]) -> .npz with uint8 ``x`` [B, H, W, C] (loadable
    by :func:`ipfm_fast.data.load_dataset`), float32 ``x_float`` (clipped to [-1, 1]) and
    ``meta``, a JSON string (what made the samples: seed, NFE, D, the model and its data),
    read back by :func:`read_npz_meta`."""
    from ipfm_fast.data import to_uint8

    bad = int((~torch.isfinite(x.detach().reshape(x.shape[0], -1))).any(1).sum()) if x.numel() else 0
    if bad:  # a NaN has no uint8 value: the file would hold arbitrary images
        model = f" {meta['model']}" if meta.get("model") else ""
        raise BadFile(f"{bad} of {x.shape[0]} samples hold NaN/Inf values (the model{model} produces non-finite "
                      f"output); {path} not written")
    meta = {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in meta.items() if v is not None}
    with replacing(path, ".npz") as tmp:
        np.savez_compressed(tmp, x=to_uint8(x), x_float=x.detach().float().clamp(-1, 1).cpu().numpy(),
                            meta=np.array(json.dumps(meta)))
    return path


def read_npz_meta(path):
    """The ``meta`` dict :func:`save_npz` stored ({} for other .npz files, and for files that
    cannot be opened: the image loader says why). A ``meta`` entry that exists but cannot be
    read or parsed is a BadFile: the samples would be scored against unknown data."""
    try:
        f = np.load(path, allow_pickle=False)
    except Exception:  # noqa: BLE001 - not an .npz, or unreadable
        return {}
    if not hasattr(f, "files"):  # an .npy: one array, no meta
        return {}
    with f:
        if "meta" not in f:
            return {}
        try:
            meta = json.loads(str(f["meta"]))
        except Exception as err:  # noqa: BLE001 - a damaged member (zlib/zipfile) or damaged JSON
            raise BadFile(f"{path}[meta]: cannot read what made these samples ({type(err).__name__}: {err}); the "
                          f"file is damaged") from err
    if not isinstance(meta, dict):
        raise BadFile(f"{path}[meta]: expected a JSON object, got {type(meta).__name__}")
    return meta
