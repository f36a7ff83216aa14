r"""Sample-quality metrics against a data set's held-out split.

- **Fréchet distance (FD)** between Gaussians fitted to features of a small classifier
  trained deterministically on the data set's training split (the FID recipe with a
  network that fits the data: Inception features mean nothing on 8x8 digits):

  .. math::
      FD = \lVert\mu_1 - \mu_2\rVert^2 + \mathrm{tr}\,\Sigma_1 + \mathrm{tr}\,\Sigma_2
           - 2\,\mathrm{tr}\big(\Sigma_1^{1/2}\Sigma_2\Sigma_1^{1/2}\big)^{1/2}

  (:func:`frechet_distance`; equal to scipy's ``sqrtm(S1 @ S2)`` formula, computed with
  symmetric eigen-decompositions instead). The classifier is cached next to the run
  (``fd_classifier-<data fingerprint>.safetensors``). A data set without labels gets a
  fixed random-feature network instead (reported as ``features: "random"``).
- **Sliced Wasserstein-2 (SW)** in pixel space: the root mean square over fixed random
  unit directions of the 1-D W2 distance between the projected sets (quantile functions).

- **nn_ratio**, a memorisation check: the median pixel distance of the samples to their
  nearest training image over the same median for the test images. About 1 = samples
  are as novel as held-out data; well below 1 = the model copies training images (which
  the FD alone would not notice: a copy of the training set scores the baseline).

Every score comes with the **data baseline**: the same metric between the training split
and the test split, i.e. what a perfect sampler that memorised nothing would score with
that many samples. By default the number of generated samples equals the training
split's size, so a score and its baseline use the same sample sizes.
"""

import os

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from ipfm_fast._files import replacing
from ipfm_fast.errors import CannotWrite, InvalidInput

CLASSIFIER_VERSION = 1
FEATURE_DIM = 64

# --------------------------------------------------------------------------------------
# distances
# --------------------------------------------------------------------------------------


def gaussian_stats(feats):
    """(mean [d], covariance [d, d]) in float64 of features [n, d] (unbiased covariance)."""
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise InvalidInput(f"gaussian_stats: need features [n >= 2, d], got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def _psd_sqrt(s):
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    r"""Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2), float.
    Uses :math:`\mathrm{tr}(\Sigma_1\Sigma_2)^{1/2} = \sum_i \sqrt{\lambda_i(\Sigma_1^{1/2}\Sigma_2\Sigma_1^{1/2})}`
    (a symmetric PSD matrix: no complex parts, no failures on singular covariances)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise InvalidInput(f"frechet_distance: shapes differ: mu {mu1.shape} / {mu2.shape}, "
                           f"sigma {s1.shape} / {s2.shape}")
    r1 = _psd_sqrt(s1)
    m = r1 @ s2 @ r1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def frechet_distance_features(f1, f2):
    """FD between Gaussians fitted to two feature sets [n, d], [m, d]."""
    return frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))


def kernel_distance(a, b, *, block=4096):
    r"""Unbiased squared MMD (the KID estimator) between feature sets a [n, d] and b [m, d]
    with the cubic polynomial kernel :math:`k(x, y) = (x^\top y / d + 1)^3`: zero in
    expectation when both come from one distribution, whatever n and m (FD is biased by
    the sample counts). float64, in blocks of ``block`` rows (O(block * n) memory)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise InvalidInput(f"kernel_distance: need features [n >= 2, d] and [m >= 2, d], got {a.shape}, {b.shape}")
    d = a.shape[1]

    def total(x, y):
        return sum(((x[i:i + block] @ y.T / d + 1) ** 3).sum() for i in range(0, len(x), block))

    def within(x):  # sum over pairs i != j
        return total(x, x) - ((np.einsum("ij,ij->i", x, x) / d + 1) ** 3).sum()

    n, m = len(a), len(b)
    return float(within(a) / (n * (n - 1)) + within(b) / (m * (m - 1)) - 2 * total(a, b) / (n * m))


# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (then the normal's 1.96)
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.306, 2.2622, 2.2281, 2.201, 2.1788, 2.1604,
         2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.093, 2.086, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
         2.0518, 2.0484, 2.0452, 2.0423)


def paired_difference(a, b):
    """Mean of the paired differences a_i - b_i (the same sampling seeds for both models:
    the seeds' common noise cancels) and its 95% Student-t interval [low, high]."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if d.size < 2:
        raise InvalidInput(f"paired_difference: need at least 2 pairs, got {d.size}")
    t = _T975[d.size - 2] if d.size - 1 <= len(_T975) else 1.96
    half = t * d.std(ddof=1) / np.sqrt(d.size)
    return float(d.mean()), [float(d.mean() - half), float(d.mean() + half)]


def sliced_wasserstein(a, b, *, projections=256, seed=0, levels=None):
    r"""Sliced Wasserstein-2 distance between two sample sets [n, ...] and [m, ...]
    (rows flattened): :math:`\big(\frac1P\sum_p W_2^2(\theta_p^\top a, \theta_p^\top b)\big)^{1/2}`
    over ``projections`` fixed random unit directions (seeded), with the 1-D W2 from
    quantile functions at ``levels`` (default max(n, m)) evenly spaced probabilities."""
    a = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).reshape(len(a), -1).double().cpu()
    b = torch.as_tensor(np.asarray(b) if not isinstance(b, torch.Tensor) else b).reshape(len(b), -1).double().cpu()
    if a.shape[1] != b.shape[1]:
        raise InvalidInput(f"sliced_wasserstein: rows have {a.shape[1]} vs {b.shape[1]} features")
    rng = torch.Generator().manual_seed(int(seed))
    theta = torch.randn(a.shape[1], projections, generator=rng, dtype=torch.float64)
    theta /= theta.norm(dim=0, keepdim=True)
    k = levels or max(len(a), len(b))
    q = (torch.arange(k, dtype=torch.float64) + 0.5) / k
    qa = _quantiles(a @ theta, q)
    qb = _quantiles(b @ theta, q)
    return float((qa - qb).square().mean().sqrt())


def _quantiles(p, q):
    """Quantiles (linear interpolation of the sorted values) of each column of p [n, P]."""
    s, _ = p.sort(dim=0)
    n = s.shape[0]
    pos = q * n - 0.5  # inverse of the empirical cdf at the sample midpoints
    lo = pos.floor().clamp(0, n - 1).long()
    hi = (lo + 1).clamp(max=n - 1)
    frac = (pos - lo.double()).clamp(0, 1)[:, None]
    return s[lo] * (1 - frac) + s[hi] * frac


# --------------------------------------------------------------------------------------
# the feature network
# --------------------------------------------------------------------------------------


class FeatureNet(nn.Module):
    """Small classifier; ``features(x)`` = the FEATURE_DIM-d penultimate layer
    (pre-activation), the space the FD is computed in. Images of at most
    ``MLP_MAX_PIXELS`` values (e.g. 8x8 digits) get an MLP, larger ones a small CNN."""

    MLP_MAX_PIXELS = 1024

    def __init__(self, shape, num_classes, width=None):
        super().__init__()
        c, h, w = shape
        if c * h * w <= self.MLP_MAX_PIXELS:
            width = width or 256
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, width), nn.SiLU(),
                                      nn.Linear(width, width), nn.SiLU())
            body_out = width
        else:
            width = width or 32
            self.body = nn.Sequential(
                nn.Conv2d(c, width, 3, padding=1), nn.SiLU(),
                nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
                nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.SiLU(),
                nn.Conv2d(4 * width, 4 * width, 3, stride=2, padding=1), nn.SiLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten())
            body_out = 4 * width
        self.feat = nn.Linear(body_out, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, max(num_classes, 1))

    def features(self, x):
        return self.feat(self.body(x))

    def forward(self, x):
        return self.head(F.silu(self.features(x)))


def train_classifier(dataset, *, seed=0, steps=800, batch=128, lr=2e-3, noise=0.1, device="cpu", log=None):
    """Train the FD feature network on the training split, deterministically (fixed seed,
    fixed batch order, small Gaussian-noise augmentation from a seeded generator).
    Without labels, returns the seeded random-init network (random features)."""
    device = torch.device(device)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    net = FeatureNet(dataset.shape, dataset.num_classes).to(device)
    torch.random.set_rng_state(torch_state)
    if not dataset.num_classes:
        return net.eval(), {"features": "random", "test_accuracy": None}
    from ipfm_fast.train.common import num_threads

    with num_threads(1 if device.type == "cpu" else None):  # the same numbers whatever the machine's threads
        return _fit(net, dataset, seed, steps, batch, lr, noise, device, log)


def _fit(net, dataset, seed, steps, batch, lr, noise, device, log):
    from ipfm_fast.train.common import BatchOrder

    train = dataset.train.to(device)
    order = BatchOrder(batch, len(train), seed, device)
    rng = torch.Generator(device=device).manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    net.train()
    for step in range(steps):
        idx = order(step)
        x = train.floats(idx)
        x = x + noise * torch.randn(x.shape, generator=rng, device=device)
        loss = F.cross_entropy(net(x), train.labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    acc = accuracy(net, dataset.test, device)
    if log:
        log(f"FD feature classifier: trained {steps} steps, test accuracy {acc:.3f}")
    return net, {"features": "classifier", "test_accuracy": acc}


@torch.no_grad()
def accuracy(net, split, device):
    x = split.floats(device=device)
    return float((net(x).argmax(1).cpu() == split.labels.cpu()).double().mean())


@torch.no_grad()
def extract(net, x, *, batch=1000, device="cpu"):
    """Features [n, FEATURE_DIM] (float64 numpy) of images in [-1, 1]."""
    out = []
    for i in range(0, len(x), batch):
        out.append(net.features(x[i:i + batch].to(device).float()).double().cpu())
    return torch.cat(out).numpy()


def load_or_train_classifier(dataset, cache_dir=None, *, device="cpu", log=None):
    """The data set's feature network, from ``cache_dir`` when it holds one for this exact
    data (fingerprint) and recipe version, else trained and cached there."""
    from safetensors.torch import load_file, save_file

    from ipfm_fast.checkpoint import _sha256_tensors

    device = torch.device(device)
    path = None
    if cache_dir:
        path = os.path.join(cache_dir, f"fd_classifier-{dataset.fingerprint()}-v{CLASSIFIER_VERSION}.safetensors")
        if os.path.exists(path):
            try:
                from safetensors import safe_open

                with safe_open(path, framework="pt") as f:
                    meta = f.metadata() or {}
                state = load_file(path)
                # caches written before the digest have none; any other mismatch is a damaged file
                if meta.get("sha256_tensors") not in (None, _sha256_tensors(state)):
                    raise ValueError("its weights do not match the digest it was saved with")
                net = FeatureNet(dataset.shape, dataset.num_classes)
                net.load_state_dict(state)
                info = {"features": meta.get("features", "classifier"),
                        "test_accuracy": float(meta["test_accuracy"]) if meta.get("test_accuracy") not in (None, "None") else None,
                        "cached": path}
                return net.to(device).eval(), info
            except Exception as err:  # noqa: BLE001 - a broken cache is rebuilt
                if log:
                    log(f"FD classifier cache {path} unreadable ({err}); retraining")
    net, info = train_classifier(dataset, device=device, log=log)
    if path:
        try:
            state = {k: v.contiguous().cpu() for k, v in net.state_dict().items()}
            with replacing(path) as tmp:
                save_file(state, tmp, metadata={"features": info["features"], "test_accuracy": str(info["test_accuracy"]),
                                                "sha256_tensors": _sha256_tensors(state)})
            info["cached"] = path
        except CannotWrite as err:  # e.g. a read-only model folder: score anyway, retrain next time
            if log:
                log(f"FD classifier not cached ({err}); --cache-dir names another folder")
    return net, info


PIXEL_SCORE_MAX = 1024  # images of at most this many values are scored in pixel space


class Evaluator:
    """Scores sample sets against ``dataset.test``; computes the data baseline once.

    >>> ev = Evaluator(load_dataset("digits"), cache_dir="runs/teacher")
    >>> ev.score(samples)   # {"score": ..., "kid": ..., "fd": ..., "sw": ..., "baseline_score": ..., ...}

    The **score** is the unbiased kernel distance (KID, x 1000) in the *score space*: the
    pixels for images of at most :data:`PIXEL_SCORE_MAX` values (well conditioned and
    sensitive to everything a sample gets wrong: on 8x8 digits the 35-NFE teacher is clearly
    worse than the data there, while in the classifier's features its excess is lost in the
    seed-to-seed noise), else the classifier features standardized by the training split.
    KID is unbiased whatever the sample counts, so many samples (sharper) are scored against
    the baseline's fixed splits like for like. Beside it, on the first ``baseline_n``
    samples (the baseline's count, as FD is biased by it): "space_fd", the FD in the same
    space, and "fd", the classifier-feature FD.
    """

    def __init__(self, dataset, cache_dir=None, *, device="cpu", log=None, sw_projections=256):
        self.dataset = dataset
        self.device = torch.device(device)
        self.net, self.info = load_or_train_classifier(dataset, cache_dir, device=self.device, log=log)
        self.sw_projections = sw_projections
        self.test_x = dataset.test.floats()
        self.test_stats = gaussian_stats(extract(self.net, self.test_x, device=self.device))
        train_x = dataset.train.floats()
        self.train_x = train_x
        self._test_nn = float(nearest_distance(self.test_x, train_x).median())
        self.space = "pixels" if int(np.prod(dataset.shape)) <= PIXEL_SCORE_MAX else self.info["features"]
        train_f = extract(self.net, train_x, device=self.device)
        self._standardize = (train_f.mean(0), train_f.std(0) + 1e-12)
        self.train_emb, self.test_emb = self.embed(train_x), self.embed(self.test_x)
        self.train_space_stats, self.test_space_stats = gaussian_stats(self.train_emb), gaussian_stats(self.test_emb)
        self.baseline = {
            "baseline_fd": frechet_distance(*gaussian_stats(train_f), *self.test_stats),
            "baseline_sw": sliced_wasserstein(train_x, self.test_x, projections=sw_projections),
            "baseline_score": 1e3 * kernel_distance(self.train_emb, self.test_emb),
            "baseline_space_fd": frechet_distance(*self.train_space_stats, *self.test_space_stats),
            "baseline_n": len(train_x),
        }

    @property
    def score_name(self):
        return "pixel KID x 1e3" if self.space == "pixels" else f"{self.space}-feature KID x 1e3"

    @property
    def space_fd_name(self):
        return "pixel FD" if self.space == "pixels" else f"{self.space}-feature FD (standardized)"

    def embed(self, x):
        """Images [n, C, H, W] in [-1, 1] -> their points in the score space [n, d] (float64)."""
        if self.space == "pixels":
            return x.reshape(len(x), -1).double().cpu().numpy()
        mean, std = self._standardize
        return (extract(self.net, x, device=self.device) - mean) / std

    def feature_space(self):
        """What the FD is computed in, for every printed score."""
        if self.info["features"] == "classifier":
            acc = self.info.get("test_accuracy")
            return "classifier features" + (f" (test accuracy {acc:.3f})" if acc is not None else "")
        return ("RANDOM-network features (the data has no class labels: compare such scores only with each other, "
                "on this data)")

    def warn_sample_count(self, n, log):
        """FD is biased by the sample count: the FDs use the baseline's count of samples, so
        fewer samples than that make them unlike the baseline (the KID score is unbiased)."""
        if n < self.baseline["baseline_n"] and log:
            log(f"warning: {n} samples per score but the data baseline uses {self.baseline['baseline_n']} training "
                f"images; the FDs depend on the sample count, so they are not like for like with the baseline "
                f"(use --num {self.baseline['baseline_n']} or more; the KID score is unbiased)")

    @property
    def default_num_samples(self):
        """The training split's size: scores then match the baseline's sample sizes."""
        return len(self.dataset.train)

    def score(self, samples):
        """Metrics of images [n, C, H, W] in [-1, 1] (clipped) against the test split."""
        x = samples.detach().float().cpu().clamp(-1, 1)
        if list(x.shape[1:]) != self.dataset.shape:
            raise InvalidInput(f"evaluate: samples have shape {list(x.shape[1:])} but the data set's images are "
                               f"{self.dataset.shape}")
        n_fd = min(len(x), self.baseline["baseline_n"])  # FD is biased by n: the baseline's count
        fd = frechet_distance(*gaussian_stats(extract(self.net, x[:n_fd], device=self.device)), *self.test_stats)
        sw = sliced_wasserstein(x, self.test_x, projections=self.sw_projections)
        nn_ratio = float(nearest_distance(x, self.train_x).median()) / self._test_nn
        emb = self.embed(x)
        return {"score": 1e3 * kernel_distance(emb, self.test_emb),
                "space_fd": frechet_distance(*gaussian_stats(emb[:n_fd]), *self.test_space_stats), "fd": fd,
                "sw": sw, "nn_ratio": nn_ratio, "n": len(x), "n_fd": n_fd, "n_test": len(self.test_x),
                **self.baseline, "score_name": self.score_name, "space_fd_name": self.space_fd_name,
                "features": self.info["features"], "classifier_test_accuracy": self.info["test_accuracy"]}


def nearest_distance(a, ref, batch=2048):
    """Pixel-space L2 distance of each row of ``a`` to its nearest row of ``ref`` ([n])."""
    a, ref = a.reshape(len(a), -1).float(), ref.reshape(len(ref), -1).float()
    return torch.cat([torch.cdist(a[i:i + batch], ref).min(1).values for i in range(0, len(a), batch)])


def summarize(values):
    """mean, std (ddof=1), min, max of a list of floats."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "values": [float(x) for x in v]}
