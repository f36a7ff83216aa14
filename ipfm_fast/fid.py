"""FID and KID as the PFGM++ / SiD / IPFM papers compute them: features of the standard FID
Inception network (the TensorFlow-ported InceptionV3 behind EDM's reference statistics) via
torch-fidelity, from a local weights file; reference statistics in EDM's ``.npz`` format
(``mu`` [2048], ``sigma`` [2048, 2048]).

torch-fidelity (and the torchvision it imports) is an optional dependency: ``pip install
torch-fidelity`` beside a torchvision that matches your torch. The weights are never
downloaded at run time: get ``pt_inception-2015-12-05-6726825d.pth`` once from
torch-fidelity's release assets (github.com/toshas/torch-fidelity/releases, the file its
``URL_INCEPTION_V3`` names) and pass its path (``--inception-weights`` or the environment
variable ``IPFM_FAST_INCEPTION_WEIGHTS``).
"""

import os

import numpy as np
import torch

from ipfm_fast._files import replacing
from ipfm_fast.errors import BadFile, InvalidInput, MissingFile

WEIGHTS_ENV = "IPFM_FAST_INCEPTION_WEIGHTS"
FEATURE_DIM = 2048


def _torch_fidelity():
    try:
        import torch_fidelity  # noqa: F401
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except Exception as err:  # ImportError, or torchvision failing to load beside this torch
        raise InvalidInput(f"--fid needs torch-fidelity and a torchvision that matches torch {torch.__version__} "
                           f"({type(err).__name__}: {err}); pip install torch-fidelity") from err
    return FeatureExtractorInceptionV3


def weights_path(path=None):
    """The Inception weights file: ``path``, else $IPFM_FAST_INCEPTION_WEIGHTS; it must exist."""
    path = path or os.environ.get(WEIGHTS_ENV)
    if not path:
        raise InvalidInput(f"--fid needs the FID Inception weights: pass --inception-weights PATH (or set "
                           f"{WEIGHTS_ENV}); the file is pt_inception-2015-12-05-6726825d.pth from torch-fidelity's "
                           f"release assets, nothing is downloaded at run time")
    if not os.path.exists(path):
        raise MissingFile(f"--inception-weights: {path!r} does not exist")
    return path


def inception(path=None, device="cpu"):
    """torch-fidelity's FID InceptionV3 (2048-d pool features) with the weights at ``path``."""
    extractor = _torch_fidelity()
    try:
        net = extractor("inception-v3-compat", ["2048"], feature_extractor_weights_path=weights_path(path))
    except (RuntimeError, KeyError, EOFError, OSError) as err:  # a state dict that does not fit, or a bad file
        raise BadFile(f"--inception-weights {path!r}: not the FID Inception weights ({type(err).__name__}: "
                      f"{str(err)[:200]})") from err
    return net.to(device)


def to_uint8_rgb(x):
    """Images in [-1, 1] ([B, C, H, W], C = 1 or 3) -> uint8 RGB [B, 3, H, W], rounded as
    the reference pipelines save PNGs."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


@torch.no_grad()
def features(net, images, *, batch=250, device="cpu", progress=None):
    """Inception pool features [n, 2048] (float64 numpy) of images in [-1, 1]."""
    out = []
    for i in range(0, len(images), batch):
        x = to_uint8_rgb(images[i:i + batch]).to(device)
        out.append(net(x)[0].double().cpu())
        if progress is not None:
            progress.update(len(x))
    return torch.cat(out).numpy()


def statistics(feats):
    """(mu, sigma) as torch-fidelity computes them (float64)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    st = fid_features_to_statistics(torch.as_tensor(feats, dtype=torch.float64))
    return st["mu"], st["sigma"]


def fid(stats1, stats2):
    """FID between (mu, sigma) pairs, torch-fidelity's formula."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    a = {"mu": np.asarray(stats1[0], np.float64), "sigma": np.asarray(stats1[1], np.float64)}
    b = {"mu": np.asarray(stats2[0], np.float64), "sigma": np.asarray(stats2[1], np.float64)}
    return float(fid_statistics_to_metric(a, b, verbose=False)[KEY_METRIC_FID])


def kid(feats1, feats2):
    """KID (mean over torch-fidelity's subsets) between two feature sets; needs both
    feature sets, so not against reference statistics alone."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric

    n = min(len(feats1), len(feats2))
    m = kid_features_to_metric(torch.as_tensor(feats1), torch.as_tensor(feats2), kid_subset_size=min(1000, n),
                               kid_subsets=100, verbose=False)
    return float(m[KEY_METRIC_KID_MEAN])


def load_reference(path):
    """(mu, sigma) of an EDM/PFGM++-style reference .npz."""
    if not os.path.exists(path):
        raise MissingFile(f"--fid-ref: {path!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
    except Exception as err:  # noqa: BLE001 - a missing key or a damaged file
        raise BadFile(f"--fid-ref {path}: expected an .npz with mu [2048] and sigma [2048, 2048] "
                      f"({type(err).__name__}: {err})") from err
    if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM) or not (
            np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise BadFile(f"--fid-ref {path}: expected finite mu [2048] and sigma [2048, 2048], got {mu.shape}, "
                      f"{sigma.shape}")
    return mu, sigma


def save_reference(path, mu, sigma):
    """Write (mu, sigma) in the EDM/PFGM++ reference format."""
    with replacing(path, ".npz") as tmp:
        np.savez(tmp, mu=mu, sigma=sigma)
    return path
