"""ipfm_fast.compat against restatements of the original call sites (written here from
reading mingyuanzhou/SiD and daniil-shlenskii/pfgmpp-idmd ``training/sid_loss.py`` and
``pfgmpp_kernel.py``, and Newbeeer/pfgmpp ``training/loss.py`` and ``generate.py``).

Deterministic parts exactly: the compat loss runs with networks that record their inputs;
the restatement replays the same sigma and noise (``noise = recorded input - y``) through the
original's formulas in float64, and the sums and the gradients with respect to the images
and the network outputs agree to 1e-5 relative. Random parts in distribution: the radius
``|n|^2 / r^2 = B / (1 - B)`` against ``betaprime(N/2, D/2)`` (Kolmogorov-Smirnov), with the
original's clip of B to [1e-3, 1 - 1e-3] (binomial masses at the bounds, KS inside),
including N = 3072, D = 4 where the clip binds for ~46% of rows; the direction uniform.
"""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from ipfm_fast.compat import CLIP_BETA, as_D, pfgmpp, sid
from ipfm_fast.errors import InvalidInput, InvalidType

from conftest import HAS_CUDA, fused_backends

BACKENDS = fused_backends("cpu") + ["reference"]
KS_P = 1e-3
REL = 1e-5  # sums and gradients, fp32 against float64


def _rel(got, want):
    got, want = got.double().cpu(), want.double().cpu()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def _sum_close(loss, want_elements, scale=1.0):
    """loss.sum() * scale against the original's per-element loss summed * scale, relative
    to the sum of the elements' magnitudes (the SiD loss's terms have both signs)."""
    want = want_elements.sum().item() * scale
    size = want_elements.abs().sum().item() * scale
    assert abs(loss.sum().item() * scale - want) <= REL * size, (loss.sum().item() * scale, want)


# ---------------------------------------------------------------------------------------
# networks that record their inputs, and their float64 twins
# ---------------------------------------------------------------------------------------


class RecordingNet(torch.nn.Module):
    """A small EDM-preconditioned denoiser, net(x, sigma, labels, augment_labels=None), that
    records each call's input x, sigma and augment_labels and keeps its output's gradient.
    ``poison``: rows whose output is set to NaN (or Inf)."""

    def __init__(self, channels=3, seed=0, poison=(), poison_value=float("nan")):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(channels, channels, generator=g) / channels**0.5)
        self.bias = torch.nn.Parameter(0.1 * torch.randn(channels, generator=g))
        self.poison, self.poison_value = list(poison), poison_value
        self.calls, self.outputs = [], []

    def denoise(self, x, sigma, weight, bias):
        sigma = sigma.reshape(-1, *[1] * (x.dim() - 1)).to(x.dtype)
        c_skip = 0.25 / (sigma**2 + 0.25)
        c_out = sigma * 0.5 / (sigma**2 + 0.25).sqrt()
        c_in = 1 / (sigma**2 + 0.25).sqrt()
        h = torch.einsum("oc,bc...->bo...", weight.to(x.dtype), c_in * x) + bias.to(x.dtype).reshape(1, -1, 1, 1)
        out = c_skip * x + c_out * torch.tanh(h)
        if self.poison:
            mask = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
            mask[self.poison] = True
            out = torch.where(mask.reshape(-1, 1, 1, 1), torch.full_like(out, self.poison_value), out)
        return out

    def forward(self, x, sigma, labels=None, augment_labels=None):
        self.calls.append(dict(x=x.detach().clone(), sigma=sigma.detach().clone(), labels=labels,
                               augment_labels=augment_labels))
        out = self.denoise(x, sigma, self.weight, self.bias)
        if out.requires_grad:
            out.retain_grad()
        self.outputs.append(out)
        return out

    def twin(self, x, sigma):
        """The same network in float64 (the restatements' ground truth)."""
        return self.denoise(x.double(), sigma.double(), self.weight.detach().double(), self.bias.detach().double())


def _images(rows=6, shape=(3, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(rows, *shape, generator=g) * 2 - 1).requires_grad_()


# ---------------------------------------------------------------------------------------
# the originals, restated (float64, replaying the recorded sigma and noise)
# ---------------------------------------------------------------------------------------


def sid_generator_loss_original(y, y_real, y_fake, alpha, sid_or_idmd):
    """training/sid_loss.py SID_EDMLoss.generator_loss after the networks: NaN rows dropped by
    boolean indexing, the weight factor without gradient, the per-element loss."""
    nan_mask = (torch.isnan(y).flatten(start_dim=1).any(dim=1) | torch.isnan(y_real).flatten(start_dim=1).any(dim=1)
                | torch.isnan(y_fake).flatten(start_dim=1).any(dim=1))
    if nan_mask.any():
        keep = ~nan_mask
        y, y_real, y_fake = y[keep], y_real[keep], y_fake[keep]
    with torch.no_grad():
        weight_factor = abs(y - y_real).mean(dim=[1, 2, 3], keepdim=True).clip(min=0.00001)
    if sid_or_idmd == "sid":
        return (y_real - y_fake) * ((y_real - y) - alpha * (y_real - y_fake)) / weight_factor
    return ((y_real - y) ** 2 - (y_fake - y) ** 2) / weight_factor


def sid_fake_loss_original(y, y_fake, sigma, sigma_data=0.5):
    """training/sid_loss.py SID_EDMLoss.__call__ after the network."""
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    nan_mask = torch.isnan(y).flatten(start_dim=1).any(dim=1) | torch.isnan(y_fake).flatten(start_dim=1).any(dim=1)
    if nan_mask.any():
        keep = ~nan_mask
        y_fake, y, weight = y_fake[keep], y[keep], weight[keep]
    return weight * ((y_fake - y) ** 2)


def pfgmpp_target_original(r, perturbed_samples, samples_full, N, D):
    """training/loss.py EDMLoss.pfgmpp_target: [B, M, N + 1] float64 broadcasts."""
    ps = torch.cat((perturbed_samples.reshape(len(perturbed_samples), -1), r[:, None]), dim=1).double()
    real = torch.cat((samples_full.reshape(len(samples_full), -1),
                      torch.zeros((len(samples_full), 1), dtype=samples_full.dtype)), dim=1).double()
    gt_distance = torch.sum((ps.unsqueeze(1) - real) ** 2, dim=[-1]).sqrt()
    distance = torch.min(gt_distance, dim=1, keepdim=True)[0] / (gt_distance + 1e-7)
    distance = (distance ** (N + D))[:, :, None]
    coeff = distance / (torch.sum(distance, dim=1, keepdim=True) + 1e-7)
    target = real.unsqueeze(0).repeat(len(perturbed_samples), 1, 1)
    return torch.sum(coeff * target, dim=1)[:, :-1]


def stf_scores_original(sigmas, perturbed_samples, samples_full):
    """training/loss.py EDMLoss.stf_scores (float64 here)."""
    with torch.no_grad():
        ps = perturbed_samples.reshape((len(perturbed_samples), -1)).double()
        sf = samples_full.reshape((len(samples_full), -1)).double()
        gt = -torch.sum((ps.unsqueeze(1) - sf) ** 2, dim=[-1]) / (2 * sigmas.double().unsqueeze(1) ** 2)
        distance = torch.exp(gt - torch.max(gt, dim=1, keepdim=True)[0])[:, :, None]
        weights = distance / torch.sum(distance, dim=1, keepdim=True)
        return torch.sum(weights * sf.unsqueeze(0).repeat(len(ps), 1, 1), dim=1)


def edm_loss_original(net, images, y, n, sigma, target_fn, sigma_data=0.5):
    """training/loss.py EDMLoss.__call__ with its sigma and noise given: weight * (D_yn - target)^2."""
    sigma = sigma.reshape(-1, 1, 1, 1).double()
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    D_yn = net.twin(y + n, sigma)
    target = target_fn(y + n)
    return weight * ((D_yn - target) ** 2), D_yn


def _grads(loss_sum, *wrt):
    return torch.autograd.grad(loss_sum, wrt, allow_unused=True)


# ---------------------------------------------------------------------------------------
# as_D and sample_noise
# ---------------------------------------------------------------------------------------


def test_as_D():
    assert as_D("inf") == math.inf and as_D(math.inf) == math.inf and as_D(" inf ") == math.inf
    assert as_D(128) == 128.0 and isinstance(as_D(128), float) and as_D(2.5) == 2.5 and as_D("64") == 64.0
    assert as_D(np.int64(32)) == 32.0
    for bad, error in [(0, InvalidInput), (-1, InvalidInput), ("abc", InvalidInput), (float("nan"), InvalidInput),
                       (None, InvalidType), (True, InvalidType), (torch.tensor(3.0), InvalidType)]:
        with pytest.raises(error):
            as_D(bad)


@pytest.mark.parametrize("sigma_kind", ["float", "[B]", "[B,1,1,1]"])
def test_sample_noise_infinite_D_is_the_original_product(sigma_kind):
    """D = "inf": exactly latents * sigma, as the original computes it."""
    latents = torch.randn(5, 3, 4, 4)
    sigma = {"float": 2.5, "[B]": torch.rand(5) + 0.1, "[B,1,1,1]": torch.rand(5, 1, 1, 1) + 0.1}[sigma_kind]
    if isinstance(sigma, float):
        want = latents * torch.tensor([sigma] * 5, dtype=latents.dtype).view(-1, 1, 1, 1)
    else:
        want = latents * sigma.view(-1, 1, 1, 1)
    for D in ("inf", math.inf, float("inf")):
        assert torch.equal(sid.sample_noise(latents=latents, sigma=sigma, D=D), want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sigma_kind", ["float", "[B]", "[B,1,1,1]"])
def test_sample_noise_finite_D_keeps_the_direction_and_is_deterministic(backend, sigma_kind):
    latents = torch.randn(7, 3, 4, 4)
    sigma = {"float": 0.8, "[B]": torch.rand(7) + 0.1, "[B,1,1,1]": torch.rand(7, 1, 1, 1) + 0.1}[sigma_kind]
    gen = torch.Generator().manual_seed(3)
    noise = sid.sample_noise(latents=latents, sigma=sigma, D=128, generator=gen, backend=backend)
    assert noise.shape == latents.shape and noise.dtype == torch.float32
    ratio = (noise.double() / latents.double()).reshape(7, -1)
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-5, atol=0)  # the direction of latents
    assert (ratio > 0).all()
    gen.manual_seed(3)
    assert torch.equal(noise, sid.sample_noise(latents=latents, sigma=sigma, D="128", generator=gen, backend=backend))
    assert not torch.equal(noise, sid.sample_noise(latents=latents, sigma=sigma, D=128, generator=gen,
                                                   backend=backend))  # the generator advanced


def _beta_of(noise, sigma, D):
    """B = t / (1 + t), t = |n|^2 / r^2 = |n|^2 / (sigma^2 D): the recipe's Beta draw."""
    t = noise.double().reshape(noise.shape[0], -1).square().sum(1) / (sigma.double().reshape(-1) ** 2 * D)
    return (t / (1 + t)).cpu().numpy()


def _check_radius(b, n, D, clip):
    """No clip: B / (1 - B) ~ betaprime(N/2, D/2) (KS). Clip (lo, hi): the masses at the
    bounds are binomial with the Beta's tails; inside, the Beta truncated to (lo, hi).
    Returns the fraction of rows clipped at hi."""
    if clip is None:
        assert stats.kstest(b / (1 - b), stats.betaprime(n / 2, D / 2).cdf).pvalue > KS_P
        return 0.0
    lo, hi = clip
    law = stats.beta(n / 2, D / 2)
    at_lo, at_hi = np.isclose(b, lo, rtol=1e-5, atol=0), np.isclose(b, hi, rtol=1e-5, atol=0)
    assert b.min() >= lo * (1 - 1e-5) and b.max() <= hi * (1 + 1e-5)
    assert stats.binomtest(int(at_lo.sum()), len(b), law.cdf(lo)).pvalue > KS_P
    assert stats.binomtest(int(at_hi.sum()), len(b), law.sf(hi)).pvalue > KS_P
    inner = b[~at_lo & ~at_hi]
    if len(inner) > 20:
        f_lo, f_hi = law.cdf(lo), law.cdf(hi)
        assert stats.kstest(inner, lambda v: (law.cdf(v) - f_lo) / (f_hi - f_lo)).pvalue > KS_P
    return at_hi.mean()


@pytest.mark.parametrize("D,shape", [(4, (3, 32, 32)), (128, (3, 32, 32)), (2048, (3, 4, 4)), (1, (1, 2, 2))])
@pytest.mark.parametrize("clip_beta", [None, False])
def test_sample_noise_radius_law(D, shape, clip_beta):
    """The original's law: with clip_beta=None its clip to [1e-3, 1 - 1e-3] (which binds for
    ~46% of rows at N = 3072, D = 4 and almost never at D >= 32), with False none."""
    torch.manual_seed(11)
    rows = 3000
    latents = torch.randn(rows, *shape)
    sigma = torch.rand(rows, 1, 1, 1) + 0.2
    noise = sid.sample_noise(latents=latents, sigma=sigma, D=D, clip_beta=clip_beta)
    n = math.prod(shape)
    frac = _check_radius(_beta_of(noise, sigma, D), n, D, CLIP_BETA if clip_beta is None else None)
    if (D, n) == (4, 3072) and clip_beta is None:
        assert 0.38 < frac < 0.54
    if (D, n) == (128, 3072) and clip_beta is None:
        assert frac == 0  # P(B > 1 - 1e-3) = 5e-78 per row at CIFAR-10 size, D = 128


def test_sample_noise_direction_is_uniform():
    torch.manual_seed(2)
    latents = torch.randn(4000, 1, 2, 3)
    u = sid.sample_noise(latents=latents, sigma=1.0, D=4).reshape(4000, -1).double()
    u = u / u.norm(dim=1, keepdim=True)
    v = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = (u @ (v / v.norm())).numpy()
    assert stats.kstest((t + 1) / 2, stats.beta(2.5, 2.5).cdf).pvalue > KS_P


def test_sample_noise_bad_input():
    latents = torch.randn(3, 1, 2, 2)
    with pytest.raises(InvalidInput, match="D must be"):
        sid.sample_noise(latents=latents, sigma=1.0, D="eight")
    with pytest.raises(InvalidInput, match="latents|g requires grad"):
        sid.sample_noise(latents=latents.requires_grad_(), sigma=1.0, D=8)
    with pytest.raises(InvalidInput, match="sigma must be"):
        sid.sample_noise(latents=torch.randn(3, 1, 2, 2), sigma=torch.ones(2), D="inf")


# ---------------------------------------------------------------------------------------
# SID_EDMLoss
# ---------------------------------------------------------------------------------------


def _sid_sigma(images, tmax):
    """The original's t-schedule draw (the same torch calls)."""
    rnd_t = torch.rand([images.shape[0], 1, 1, 1], device=images.device) * tmax / 1000
    min_inv_rho, max_inv_rho = 0.002 ** (1 / 7.0), 80 ** (1 / 7.0)
    return (max_inv_rho + (1 - rnd_t) * (min_inv_rho - max_inv_rho)) ** 7.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,D,alpha", [("sid", "inf", 1.2), ("sid", 128, 1.2), ("idmd", 128, 1.2),
                                          ("idmd", "inf", 0.7), ("sid", 4, 0.5)])
@pytest.mark.parametrize("call", ["keyword", "positional"])
def test_sid_generator_loss_matches_the_original(backend, mode, D, alpha, call):
    images = _images()
    true_score, fake_score = RecordingNet(seed=1), RecordingNet(seed=2)
    loss_fn = sid.SID_EDMLoss(sid_or_idmd=mode, backend=backend)
    torch.manual_seed(5)
    if call == "keyword":
        loss = loss_fn.generator_loss(true_score=true_score, fake_score=fake_score, images=images, labels=None,
                                      augment_pipe=None, alpha=alpha, tmax=800, D=D)
    else:
        loss = loss_fn.generator_loss(true_score, fake_score, images, None, None, alpha, 800, D)
    assert loss.shape == images.shape and loss.dtype == torch.float32
    loss.sum().mul(1 / 6).backward()  # the training loop's reduction

    torch.manual_seed(5)
    sigma = _sid_sigma(images, 800)
    (real_call,), (fake_call,) = true_score.calls, fake_score.calls
    assert torch.equal(real_call["sigma"], sigma) and torch.equal(fake_call["sigma"], sigma)  # same draws
    assert torch.equal(real_call["x"], fake_call["x"]) and torch.equal(real_call["augment_labels"], torch.zeros(6, 9))
    y64 = images.detach().double().requires_grad_()
    n64 = real_call["x"].double() - images.detach().double()  # the noise the compat drew
    a64 = true_score.twin(y64 + n64, sigma)
    b64 = fake_score.twin(y64 + n64, sigma)
    a_leaf, b_leaf = a64.detach().requires_grad_(), b64.detach().requires_grad_()
    elements = sid_generator_loss_original(y64, a64, b64, alpha, mode)
    _sum_close(loss, elements.detach(), 1 / 6)
    (gy,) = _grads(elements.sum() / 6, y64)
    assert _rel(images.grad, gy) <= REL
    ga, gb = _grads(sid_generator_loss_original(y64.detach(), a_leaf, b_leaf, alpha, mode).sum() / 6, a_leaf, b_leaf)
    assert _rel(true_score.outputs[0].grad, ga) <= REL and _rel(fake_score.outputs[0].grad, gb) <= REL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", ["inf", 64])
@pytest.mark.parametrize("call", ["keyword", "positional"])
def test_sid_fake_loss_matches_the_original(backend, D, call):
    images = _images(seed=3)
    fake_score = RecordingNet(seed=4)
    loss_fn = sid.SID_EDMLoss(backend=backend)
    torch.manual_seed(9)
    if call == "keyword":
        loss = loss_fn(fake_score=fake_score, images=images, labels=None, augment_pipe=None, D=D)
    else:
        loss = loss_fn(fake_score, images, None, None, D)
    assert loss.shape == images.shape
    loss.sum().backward()

    torch.manual_seed(9)
    sigma = (torch.randn([6, 1, 1, 1]) * 1.2 - 1.2).exp()
    (rec,) = fake_score.calls
    assert torch.equal(rec["sigma"], sigma) and rec["augment_labels"] is None
    y64 = images.detach().double().requires_grad_()
    b64 = fake_score.twin(y64 + (rec["x"].double() - images.detach().double()), sigma)
    elements = sid_fake_loss_original(y64, b64, sigma.double())
    _sum_close(loss, elements.detach())
    (gy,) = _grads(elements.sum(), y64)
    assert _rel(images.grad, gy) <= REL
    b_leaf = b64.detach().requires_grad_()
    (gb,) = _grads(sid_fake_loss_original(y64.detach(), b_leaf, sigma.double()).sum(), b_leaf)
    assert _rel(fake_score.outputs[0].grad, gb) <= REL


@pytest.mark.parametrize("backend", BACKENDS)
def test_sid_losses_with_an_augment_pipe(backend):
    """augment_pipe(images) -> (y, augment_labels): the nets see y + n and the labels."""
    def augment_pipe(images):
        return images.flip(3) * 0.9, torch.ones(images.shape[0], 9)

    images = _images(seed=6)
    true_score, fake_score = RecordingNet(seed=1), RecordingNet(seed=2)
    loss_fn = sid.SID_EDMLoss(backend=backend)
    torch.manual_seed(1)
    loss = loss_fn.generator_loss(true_score, fake_score, images, augment_pipe=augment_pipe, D=128)
    loss.sum().backward()
    y64 = images.detach().double().requires_grad_()
    y_aug = y64.flip(3) * 0.9
    rec = true_score.calls[0]
    assert torch.equal(rec["augment_labels"], torch.ones(6, 9))
    n64 = rec["x"].double() - augment_pipe(images.detach())[0].double()
    elements = sid_generator_loss_original(y_aug, true_score.twin(y_aug + n64, rec["sigma"]),
                                           fake_score.twin(y_aug + n64, rec["sigma"]), 1.2, "sid")
    (gy,) = _grads(elements.sum(), y64)
    _sum_close(loss, elements.detach())
    assert _rel(images.grad, gy) <= REL


@pytest.mark.parametrize("backend", BACKENDS)
def test_sid_nan_rows_contribute_zero(backend):
    """The original drops rows with NaN (boolean indexing: a host sync); here they are zero
    rows of the [B, C, H, W] loss with zero gradient, and the sum and the other rows'
    gradients are the original's."""
    images = _images(seed=7)
    true_score, fake_score = RecordingNet(seed=1, poison=[1, 4]), RecordingNet(seed=2, poison=[4])
    loss_fn = sid.SID_EDMLoss(backend=backend)
    torch.manual_seed(2)
    loss = loss_fn.generator_loss(true_score, fake_score, images, D="inf")
    assert torch.isfinite(loss).all() and (loss[[1, 4]] == 0).all() and (loss[[0, 2, 3, 5]] != 0).any()
    loss.sum().backward()
    y64 = images.detach().double().requires_grad_()
    rec = true_score.calls[0]
    n64 = rec["x"].double() - images.detach().double()
    elements = sid_generator_loss_original(y64, true_score.twin(y64 + n64, rec["sigma"]),
                                           fake_score.twin(y64 + n64, rec["sigma"]), 1.2, "sid")
    assert elements.shape[0] == 4  # the original dropped rows 1 and 4
    (gy,) = _grads(elements.sum(), y64)
    _sum_close(loss, elements.detach())
    assert torch.isfinite(images.grad).all() and (images.grad[[1, 4]] == 0).all() and _rel(images.grad, gy) <= REL
    # the fake loss: a NaN output row of the fake network
    images.grad = None
    fake_score = RecordingNet(seed=3, poison=[0])
    torch.manual_seed(2)
    loss = loss_fn(fake_score, images, D=64)
    loss.sum().backward()
    rec = fake_score.calls[0]
    elements = sid_fake_loss_original(y64, fake_score.twin(y64 + rec["x"].double() - images.detach().double(),
                                                           rec["sigma"]), rec["sigma"].double())
    (gy,) = _grads(elements.sum(), y64)
    assert (loss[0] == 0).all()
    _sum_close(loss, elements.detach())
    assert (images.grad[0] == 0).all() and _rel(images.grad, gy) <= REL


def test_sid_inf_rows_are_masked_too():
    """Documented difference: the original keeps an Inf row (its loss sum is then Inf/NaN);
    the fused loss masks it like a NaN row."""
    images = _images(seed=8)
    true_score, fake_score = RecordingNet(seed=1, poison=[2], poison_value=float("inf")), RecordingNet(seed=2)
    loss = sid.SID_EDMLoss().generator_loss(true_score, fake_score, images)
    assert torch.isfinite(loss.sum()) and (loss[2] == 0).all() and (loss[[0, 1, 3]] != 0).any()
    original = sid_generator_loss_original(images.detach(), true_score.outputs[0].detach(),
                                           fake_score.outputs[0].detach(), 1.2, "sid")
    assert not torch.isfinite(original.sum())


@pytest.mark.parametrize("D,shape", [(4, (3, 32, 32)), (128, (3, 4, 4))])
def test_sid_losses_perturb_with_the_original_law(D, shape):
    """The noise the networks see: the PFGM++ radius law with the original's clip."""
    rows = 1500
    images = torch.rand(rows, *shape) * 2 - 1
    net = RecordingNet(channels=shape[0])
    loss_fn = sid.SID_EDMLoss()
    with torch.no_grad():
        loss_fn(net, images, D=D)
        loss_fn.generator_loss(net, net, images, D=D)
    for call in (net.calls[0], net.calls[1]):
        frac = _check_radius(_beta_of(call["x"] - images, call["sigma"], D), math.prod(shape), D, CLIP_BETA)
        if D == 4:
            assert 0.38 < frac < 0.54
    with torch.no_grad():  # clip_beta=False: the unclipped law
        sid.SID_EDMLoss(clip_beta=False)(net, images, D=D)
    _check_radius(_beta_of(net.calls[-1]["x"] - images, net.calls[-1]["sigma"], D), math.prod(shape), D, None)


def test_sid_loss_bad_mode():
    with pytest.raises(InvalidInput, match="sid_or_idmd"):
        sid.SID_EDMLoss(sid_or_idmd="dmd")


# ---------------------------------------------------------------------------------------
# pfgmpp EDMLoss and rand_beta_prime
# ---------------------------------------------------------------------------------------


class Opts(dict):
    """dnnlib.EasyDict's shape: a dict with attribute access."""

    __getattr__ = dict.get


def _augment(images):
    return images.flip(2), torch.zeros(images.shape[0], 9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pfgmpp_mode", [True, False])
@pytest.mark.parametrize("stf", [False, True])
@pytest.mark.parametrize("augment", [False, True])
def test_pfgmpp_edm_loss_matches_the_original(backend, pfgmpp_mode, stf, augment):
    rows, m, shape, D = 5, 12, (3, 4, 4), 16
    n = math.prod(shape)
    images = _images(rows, shape, seed=10)
    extra = torch.rand(m - rows, *shape, generator=torch.Generator().manual_seed(11)) * 2 - 1
    ref_images = torch.cat([images.detach(), extra]) if stf else None
    net = RecordingNet(seed=12)
    augment_pipe = _augment if augment else None
    loss_fn = pfgmpp.EDMLoss(D=D, N=n, opts=Opts(lsun=False), backend=backend)
    torch.manual_seed(13)
    loss = loss_fn(net, images, labels=None, augment_pipe=augment_pipe, stf=stf, pfgmpp=pfgmpp_mode,
                   ref_images=ref_images)
    assert loss.shape == images.shape
    loss.sum().backward()

    torch.manual_seed(13)
    sigma = (torch.randn(rows if pfgmpp_mode else [rows, 1, 1, 1]) * 1.2 - 1.2).exp().reshape(rows)
    (rec,) = net.calls
    assert torch.equal(rec["sigma"].reshape(rows), sigma)
    y64 = images.detach().double().requires_grad_()
    y_aug = _augment(y64)[0] if augment else y64
    n64 = rec["x"].double() - (_augment(images.detach())[0] if augment else images.detach()).double()
    if stf:
        ref64 = torch.cat([y_aug, (_augment(extra)[0] if augment else extra).double()])
        assert torch.equal(ref_images[:rows], _augment(images.detach())[0] if augment else images.detach())
        if pfgmpp_mode:
            r = sigma.double() * math.sqrt(D)
            target_fn = lambda yn: pfgmpp_target_original(r, yn, ref64, n, D).view_as(y_aug)  # noqa: E731
        else:
            target_fn = lambda yn: stf_scores_original(sigma, yn, ref64).view_as(y_aug)  # noqa: E731
    else:
        target_fn = lambda yn: y_aug  # noqa: E731
    elements, D_yn = edm_loss_original(net, images, y_aug, n64, sigma, target_fn)
    _sum_close(loss, elements.detach())
    gy, gd = torch.autograd.grad(elements.sum(), (y64, D_yn))
    assert _rel(images.grad, gy) <= REL and _rel(net.outputs[0].grad, gd) <= REL


def test_pfgmpp_edm_loss_lsun_sigma_and_opts_none():
    images = _images(4, (1, 2, 2), seed=1)
    for opts, lsun in [(Opts(lsun=True), True), (None, False), (Opts(), False)]:
        for mode in (True, False):
            net = RecordingNet(channels=1)
            torch.manual_seed(0)
            pfgmpp.EDMLoss(D=8, N=4, opts=opts)(net, images, pfgmpp=mode)
            torch.manual_seed(0)
            sigma = (torch.randn(4) * 1.2 - 1.2).exp()
            if lsun:
                sigma *= 380.0 / 80
            assert torch.equal(net.calls[0]["sigma"].reshape(4), sigma)


def test_pfgmpp_stf_without_an_augment_pipe_keeps_the_reference_rows():
    """The original assigned the B images to the M - B other reference rows when there is no
    augment pipe (a shape error unless M = 2B, a silently wrong batch when it is)."""
    images = _images(4, (3, 4, 4), seed=2)
    extra = torch.randn(4, 3, 4, 4)
    ref_images = torch.cat([torch.zeros(4, 3, 4, 4), extra])  # M = 2B: the original would not even crash
    pfgmpp.EDMLoss(D=8, N=48)(RecordingNet(), images, stf=True, pfgmpp=True, ref_images=ref_images)
    assert torch.equal(ref_images[4:], extra) and torch.equal(ref_images[:4], images.detach())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [1, 128, 2048])
def test_pfgmpp_target_and_stf_scores_match_the_originals(backend, D):
    """Against the float64 [B, M, N + 1] originals, over the training sigma range; the
    PFGM++ target's gradient too (the original is differentiable there)."""
    rows, m, n = 6, 40, 3 * 8 * 8
    g = torch.Generator().manual_seed(D)
    x = torch.rand(m, 3, 8, 8, generator=g) * 2 - 1
    sigma = (torch.randn(rows, generator=g) * 1.2 - 1.2).exp()
    y = (x[:rows] + sigma.reshape(-1, 1, 1, 1) * torch.randn(rows, 3, 8, 8, generator=g)).requires_grad_()
    loss_fn = pfgmpp.EDMLoss(D=D, N=n, backend=backend)
    r = sigma.double() * math.sqrt(D)
    got = loss_fn.pfgmpp_target(r, y, x)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    y64 = y.detach().double().requires_grad_()
    want = pfgmpp_target_original(r, y64, x.double(), n, D)
    assert _rel(got, want) <= REL
    # the gradient where the posterior mixes several reference rows (at the training sigmas
    # it is mostly one-hot and the gradient ~0: fp32 rounding then dominates a relative error)
    sigma = 3 + 7 * torch.rand(rows, generator=g)
    y = (x[:rows] + sigma.reshape(-1, 1, 1, 1) * torch.randn(rows, 3, 8, 8, generator=g)).requires_grad_()
    r = sigma.double() * math.sqrt(D)
    y64 = y.detach().double().requires_grad_()
    w = torch.randn(rows, n, dtype=torch.float64, generator=g)
    (gy,) = torch.autograd.grad((loss_fn.pfgmpp_target(r, y, x) * w.float()).sum(), y)
    (gy64,) = torch.autograd.grad((pfgmpp_target_original(r, y64, x.double(), n, D) * w).sum(), y64)
    # the fused backward starts from fp32 weights, whose logits carry (N + D) / 2 times an fp32
    # rounding (ipfm_fast/ops/field_target.py): a few 1e-5 here, far below the loss's gradient
    assert _rel(gy, gy64) <= 3e-5
    got = loss_fn.stf_scores(sigma, y, x)
    assert got.shape == (rows, n) and not got.requires_grad
    assert _rel(got, stf_scores_original(sigma, y.detach(), x)) <= REL


def test_pfgmpp_edm_loss_bad_N():
    with pytest.raises(InvalidInput, match="N = 3072 but the images have 48"):
        pfgmpp.EDMLoss()(RecordingNet(), _images(2), pfgmpp=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pfgmpp_edm_loss_perturbs_with_the_original_law(backend):
    """The original's law, clip included: 256 x 256 x 3 would clip every row at D = 128;
    N = 3072, D = 4 clips ~46%."""
    rows = 1500 if backend != "triton" else 300
    images = torch.rand(rows, 3, 32, 32) * 2 - 1
    net = RecordingNet()
    with torch.no_grad():
        pfgmpp.EDMLoss(D=4, N=3072, backend=backend)(net, images, pfgmpp=True)
    rec = net.calls[0]
    frac = _check_radius(_beta_of(rec["x"] - images, rec["sigma"], 4), 3072, 4, CLIP_BETA)
    assert 0.36 < frac < 0.56


def test_rand_beta_prime_rows_depend_on_their_seed_only():
    size = [4, 3, 4, 4]
    a = pfgmpp.rand_beta_prime(size, N=48, D=128, pfgmpp=True, device="cpu", sigma_max=80, seeds=[5, 6, 7, 8])
    b = pfgmpp.rand_beta_prime(size, N=48, D=128, device="cpu", seeds=[8, 7, 6, 5])
    assert a.dtype == torch.float64 and a.shape == tuple(size)
    assert torch.equal(a, b.flip(0))
    one = pfgmpp.rand_beta_prime([1, 3, 4, 4], N=48, D=128, device="cpu", seeds=[7])
    assert torch.equal(one[0], a[2])
    state = torch.get_rng_state()
    pfgmpp.rand_beta_prime(size, N=48, D=128, device="cpu", seeds=[1, 2, 3, 4])
    assert torch.equal(state, torch.get_rng_state())  # the global generator is left alone
    with pytest.raises(InvalidInput, match="3 seeds for 4 rows"):
        pfgmpp.rand_beta_prime(size, N=48, D=128, device="cpu", seeds=[1, 2, 3])


def test_rand_beta_prime_law_and_sigma_max():
    seeds = list(range(3000))
    y = pfgmpp.rand_beta_prime([3000, 1, 4, 4], N=16, D=32, device="cpu", sigma_max=380, seeds=seeds)
    t = y.reshape(3000, -1).square().sum(1).numpy() / (80.0**2 * 32)  # N < 256 * 256 * 3: sigma_max = 80
    assert stats.kstest(t, stats.betaprime(8, 16).cdf).pvalue > KS_P
    size, n = [2, 3, 256, 256], 3 * 256 * 256  # from this size on, the given sigma_max
    big = pfgmpp.rand_beta_prime(size, N=n, D=128, device="cpu", sigma_max=380, seeds=[1, 2])
    ref = pfgmpp.rand_beta_prime(size, N=n, D=128, device="cpu", sigma_max=80, seeds=[1, 2])
    torch.testing.assert_close(big, ref * (380 / 80), rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------
# CUDA: no host sync in any compat call
# ---------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_no_host_sync_on_cuda():
    device = "cuda"
    images = torch.rand(8, 3, 8, 8, device=device) * 2 - 1
    ref_images = torch.cat([images, torch.rand(8, 3, 8, 8, device=device)])
    net = RecordingNet().to(device)
    sid_loss, edm_loss = sid.SID_EDMLoss(), pfgmpp.EDMLoss(D=128, N=192)
    latents = torch.randn(8, 3, 8, 8, device=device)

    def calls():
        sid.sample_noise(latents=latents, sigma=2.5, D=128)
        sid.sample_noise(latents=latents, sigma=2.5, D="inf")
        for D in ("inf", 128):
            sid_loss.generator_loss(net, net, images, D=D).sum().backward()
            sid_loss(net, images, D=D).sum().backward()
        for mode in (True, False):
            edm_loss(net, images, stf=True, pfgmpp=mode, ref_images=ref_images).sum().backward()
        pfgmpp.rand_beta_prime([4, 3, 8, 8], N=192, D=128, device=device, seeds=[1, 2, 3, 4])

    calls()  # warm up: kernel loads, Triton compiles
    for b in fused_backends(device):
        sid_loss.backend = edm_loss.backend = b
        torch.cuda.set_sync_debug_mode("error")
        try:
            calls()
        finally:
            torch.cuda.set_sync_debug_mode(0)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_losses_match_the_original():
    images = _images(6, (3, 4, 4), seed=3).detach().cuda().requires_grad_()
    for backend in fused_backends("cuda"):
        images.grad = None
        net, net2 = RecordingNet(seed=1).cuda(), RecordingNet(seed=2).cuda()
        loss = sid.SID_EDMLoss(backend=backend).generator_loss(net, net2, images, D=128)
        loss.sum().backward()
        rec = net.calls[0]
        y64 = images.detach().double().requires_grad_()
        n64 = rec["x"].double() - y64.detach()
        elements = sid_generator_loss_original(y64, net.twin(y64 + n64, rec["sigma"]),
                                               net2.twin(y64 + n64, rec["sigma"]), 1.2, "sid")
        (gy,) = _grads(elements.sum(), y64)
        _sum_close(loss, elements.detach())
        assert _rel(images.grad, gy) <= REL
