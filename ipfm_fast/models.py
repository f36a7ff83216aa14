r"""Denoisers: the network interface every teacher, fake network and generator shares.

A **denoiser** is any ``nn.Module`` with ``forward(x, sigma) -> x0``: x is a batch
[B, ...] of noisy rows, sigma a tensor [B] (or a float) of noise levels, and the result
the estimate of the clean rows, same shape as x. This is the EDM convention that PFGM++
networks use, with :math:`\sigma = r / \sqrt D` (so one network serves every D).

:class:`EDMPrecond` wraps a raw network :math:`F(x_{in}, c_{noise})` with EDM's
preconditioning (Karras et al. 2022, table 1), :math:`\sigma_{data} = 0.5`:

.. math::
    D(x, \sigma) = c_{skip} x + c_{out} F(c_{in} x, c_{noise}), \quad
    c_{skip} = \frac{\sigma_d^2}{\sigma^2 + \sigma_d^2},\ c_{out} = \frac{\sigma\sigma_d}{\sqrt{\sigma^2 + \sigma_d^2}},\
    c_{in} = \frac{1}{\sqrt{\sigma^2 + \sigma_d^2}},\ c_{noise} = \tfrac14 \ln\sigma

Raw networks here: :class:`MLPNet` (vector data, any trailing shape flattened) and
:class:`UNet` (images [B, C, H, W]); their linear layers are :class:`Linear` (``nn.Linear``
whose float32 CPU GEMMs, when compiled, run on oneDNN where MKL would not use the CPU's
AVX-512). :func:`build_denoiser` builds a preconditioned
denoiser from a JSON-able config dict, which is what checkpoints store.
"""

import math
import os

import torch
from torch import nn
import torch.nn.functional as F

from ipfm_fast.errors import BadFile, InvalidInput

SIGMA_DATA = 0.5


def _sigma_rows(sigma, x):
    """sigma as a float32 tensor [B] on x's device."""
    if not isinstance(sigma, torch.Tensor):  # filled on the device: torch.tensor(v, device=cuda) is a blocking copy
        sigma = torch.full((x.shape[0],), float(sigma), dtype=torch.float32, device=x.device)
    sigma = sigma.to(device=x.device, dtype=torch.float32).reshape(-1)
    if sigma.numel() == 1 and x.shape[0] != 1:
        sigma = sigma.expand(x.shape[0])
    if sigma.shape[0] != x.shape[0]:
        raise InvalidInput(f"denoiser: sigma must be a float or a tensor [B] with B = {x.shape[0]}, "
                           f"got shape {tuple(sigma.shape)}")
    return sigma


# --- linear layers: the networks' GEMMs on CPU under torch.compile ---------------------------
# torch.mm / F.linear run MKL's sgemm, which takes its AVX-512 kernels on Intel CPUs only: on
# other CPUs with AVX-512 it runs AVX2 code at half the FLOPs a core has, while torch's bundled
# oneDNN chooses its kernels by instruction set. Only inside compiled graphs: there the routing
# is free, and the compiled e2e iteration is 1.1-1.2x faster (benchmarks/bench_linear.py); in
# eager mode an autograd.Function (~8 us a call, ~10 us a backward) and oneDNN's ~10 us a call
# cost as much as the MLP's small GEMMs gain (docs/results/cpu_isa_17.md), so eager runs stay
# on F.linear, bit for bit.
LINEAR_ENV = "IPFM_FAST_LINEAR"


def _cpu_vendor():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


# this torch build has the oneDNN linear op (``mkldnn._linear_pointwise``)
HAS_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def linear_backend():
    """(``"onednn"`` or ``"torch"``, why): what :class:`Linear` runs float32 CPU GEMMs on
    inside ``torch.compile``d networks. IPFM_FAST_LINEAR=auto|onednn|torch, read at import."""
    choice = os.environ.get(LINEAR_ENV, "auto")
    if not HAS_ONEDNN_LINEAR:
        return "torch", "this torch build has no oneDNN linear"
    if choice in ("onednn", "torch"):
        return choice, f"{LINEAR_ENV}={choice}"
    ignored = "" if choice == "auto" else f"{LINEAR_ENV}={choice!r} ignored (auto|onednn|torch); "
    vendor, isa = _cpu_vendor() or "unknown", torch.backends.cpu.get_cpu_capability()
    if isa != "AVX512":
        return "torch", f"{ignored}CPU capability {isa}: MKL and oneDNN run the same instructions"
    if vendor in ("unknown", "GenuineIntel"):
        return "torch", f"{ignored}{vendor} CPU: MKL takes its AVX-512 kernels"
    return "onednn", f"{ignored}{vendor} CPU with AVX-512: MKL would run its AVX2 kernels"


# An op of its own, opaque to inductor (whose lowering of mkldnn._linear_pointwise wants frozen,
# constant weights): x [M, K] @ weight [N, K]^T (+ bias [N]); any strides.
_LIB = torch.library.Library("ipfm_fast", "FRAGMENT")
_LIB.define("onednn_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
_LIB.impl("onednn_linear", lambda x, weight, bias: torch.ops.mkldnn._linear_pointwise(
    x, weight, bias, "none", [], ""), "CPU")


@torch.library.register_fake("ipfm_fast::onednn_linear")
def _(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


_onednn_linear = torch.ops.ipfm_fast.onednn_linear.default


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b and dx = dy W on oneDNN; dW = dy^T x on torch.mm, which reads the
    transposed operands in place (oneDNN's wrapper copies them: 0.66-0.74x on the small
    layers, and no faster in the compiled iteration)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = _onednn_linear(grad, weight.t(), None) if ctx.needs_input_grad[0] else None
        grad_w = grad.t().mm(x) if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, state dict and eager results) whose float32 CPU
    forward and input-gradient GEMMs run on oneDNN inside ``torch.compile``d graphs where
    :func:`linear_backend` says so (``onednn``, a class attribute; set it on a layer to
    choose per layer)."""

    onednn = linear_backend()[0] == "onednn"

    def forward(self, x):
        # (not under torch.export: an exported program should not need ipfm_fast to load)
        if (self.onednn and torch.compiler.is_compiling() and not torch.compiler.is_exporting()
                and x.dtype == self.weight.dtype == torch.float32
                and x.device.type == "cpu" and x.dim() >= 2 and x.numel() > 0
                and not torch.is_autocast_enabled("cpu")):
            y = _OneDNNLinear.apply(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)


class EDMPrecond(nn.Module):
    r"""EDM preconditioning around a raw network ``net(x_in, c_noise)``; see the module doc.

    Inputs may be any floating dtype; the skip connection and output are computed in
    float32 and returned in x's dtype (so bf16 autocast only touches the raw network).
    """

    def __init__(self, net, sigma_data=SIGMA_DATA):
        super().__init__()
        self.net = net
        self.sigma_data = float(sigma_data)

    def forward(self, x, sigma):
        sig = _sigma_rows(sigma, x)
        view = (-1,) + (1,) * (x.dim() - 1)
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sig**2 + sd2)
        c_out = sig * self.sigma_data / (sig**2 + sd2).sqrt()
        c_in = 1.0 / (sig**2 + sd2).sqrt()
        c_noise = sig.log() / 4
        xf = x.float()
        f = self.net((c_in.view(view) * xf), c_noise)
        return (c_skip.view(view) * xf + c_out.view(view) * f.float()).to(x.dtype)


class FourierEmbedding(nn.Module):
    """Sinusoidal embedding of the scalar c_noise (fixed frequencies), then a 2-layer MLP."""

    def __init__(self, dim, max_period=100.0):
        super().__init__()
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half) / half) * 2 * math.pi * 4
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(Linear(2 * half, dim), nn.SiLU(), Linear(dim, dim))

    def forward(self, c_noise):
        ang = c_noise.float()[:, None] * self.freqs[None, :]
        return self.mlp(torch.cat([ang.cos(), ang.sin()], dim=1))


class MLPNet(nn.Module):
    """Raw MLP for vector data: residual blocks of width ``width`` modulated by the noise
    embedding. Input [B, ...] is flattened to [B, N] and the output reshaped back."""

    def __init__(self, in_features, width=128, depth=3, emb_dim=None):
        super().__init__()
        emb_dim = emb_dim or width
        self.emb = FourierEmbedding(emb_dim)
        self.inp = Linear(in_features, width)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            self.blocks.append(nn.ModuleDict(dict(
                norm=nn.LayerNorm(width), film=Linear(emb_dim, 2 * width),
                fc1=Linear(width, 2 * width), fc2=Linear(2 * width, width))))
        self.out_norm = nn.LayerNorm(width)
        self.out = Linear(width, in_features)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x, c_noise):
        shape = x.shape
        h = self.inp(x.reshape(shape[0], -1))
        e = F.silu(self.emb(c_noise))
        for blk in self.blocks:
            scale, shift = blk["film"](e).chunk(2, dim=1)
            z = blk["norm"](h) * (1 + scale) + shift
            h = h + blk["fc2"](F.silu(blk["fc1"](z)))
        return self.out(F.silu(self.out_norm(h))).reshape(shape)


def _groups(ch):
    for g in (32, 16, 8, 4, 2, 1):
        if ch % g == 0 and ch // g >= 4 or g == 1:
            return g
    return 1


class ResBlock(nn.Module):
    def __init__(self, cin, cout, emb_dim):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.film = Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, e):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(e)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class UNet(nn.Module):
    """A small U-Net for images [B, C, H, W]: ``len(mults)`` resolutions (H and W must be
    divisible by 2^(len(mults) - 1)), ``blocks`` residual blocks per resolution with
    ``width * mult`` channels, the noise embedding added to every block (FiLM)."""

    def __init__(self, in_channels, width=32, mults=(1, 2), blocks=1, emb_dim=None):
        super().__init__()
        emb_dim = emb_dim or 4 * width
        self.emb = FourierEmbedding(emb_dim)
        self.inp = nn.Conv2d(in_channels, width, 3, padding=1)
        self.down, self.up = nn.ModuleList(), nn.ModuleList()
        chans, skips = width, [width]
        for level, mult in enumerate(mults):
            cout = width * mult
            for _ in range(blocks):
                self.down.append(ResBlock(chans, cout, emb_dim))
                chans = cout
                skips.append(chans)
            if level < len(mults) - 1:
                self.down.append(nn.Conv2d(chans, chans, 3, stride=2, padding=1))
                skips.append(chans)
        self.mid = nn.ModuleList([ResBlock(chans, chans, emb_dim), ResBlock(chans, chans, emb_dim)])
        for level, mult in reversed(list(enumerate(mults))):
            cout = width * mult
            for _ in range(blocks + 1):
                self.up.append(ResBlock(chans + skips.pop(), cout, emb_dim))
                chans = cout
            if level > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.out_norm = nn.GroupNorm(_groups(chans), chans)
        self.out = nn.Conv2d(chans, in_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.factor = 2 ** (len(mults) - 1)

    def forward(self, x, c_noise):
        if x.dim() != 4 or x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise InvalidInput(f"UNet: input must be [B, C, H, W] with H, W divisible by {self.factor}, "
                               f"got {tuple(x.shape)}")
        e = F.silu(self.emb(c_noise))
        h = self.inp(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, e) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, e)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, hs.pop()], dim=1), e)
            else:
                h = layer(h)
        return self.out(F.silu(self.out_norm(h)))


# --------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------

ARCHS = ("auto", "unet", "mlp")
MLP_MAX_VALUES = 1024


def default_mults(shape):
    """U-Net resolutions for an image size: (1, 2) up to 8x8, (1, 2, 2) up to 16x16, else
    (1, 2, 2, 2), shortened until H and W divide by 2^(levels - 1)."""
    h, w = shape[-2:]
    mults = [1, 2] if max(h, w) <= 8 else [1, 2, 2] if max(h, w) <= 16 else [1, 2, 2, 2]
    while len(mults) > 1 and (h % 2 ** (len(mults) - 1) or w % 2 ** (len(mults) - 1)):
        mults.pop()
    return mults


def model_config(arch, shape, *, width=None, depth=None, mults=None, sigma_data=SIGMA_DATA):
    """A JSON-able config dict for :func:`build_denoiser`. ``shape`` is one row's shape,
    e.g. [1, 8, 8]. ``arch="auto"``: the MLP for rows of at most 1,024 values (8x8 digits:
    on a CPU it trains ~20x faster than the U-Net at equal quality), the U-Net for larger
    images. For "unet", ``depth`` = residual blocks per resolution; for "mlp", the number
    of residual blocks."""
    if arch not in ARCHS:
        raise InvalidInput(f"model: arch must be one of {ARCHS}, got {arch!r}")
    shape = [int(s) for s in shape]
    if arch == "auto":
        arch = "mlp" if math.prod(shape) <= MLP_MAX_VALUES or len(shape) != 3 else "unet"
    if arch == "unet":
        if len(shape) != 3:
            raise InvalidInput(f"model: the U-Net needs image rows [C, H, W], got row shape {shape}; use --arch mlp")
        cfg = dict(arch="unet", shape=shape, width=int(32 if width is None else width),
                   depth=int(1 if depth is None else depth), mults=[int(m) for m in (mults or default_mults(shape))])
    else:
        cfg = dict(arch="mlp", shape=shape, width=int(128 if width is None else width),
                   depth=int(3 if depth is None else depth))
    cfg["sigma_data"] = float(sigma_data)
    for key in ("width", "depth"):
        if cfg[key] < 1:
            raise InvalidInput(f"model: {key} must be >= 1, got {cfg[key]}")
    return cfg


def build_denoiser(cfg):
    """Preconditioned denoiser from a config made by :func:`model_config`."""
    arch = cfg.get("arch")
    if arch == "unet":
        net = UNet(cfg["shape"][0], width=cfg["width"], mults=tuple(cfg["mults"]), blocks=cfg["depth"])
    elif arch == "mlp":
        net = MLPNet(math.prod(cfg["shape"]), width=cfg["width"], depth=cfg["depth"])
    else:
        raise BadFile(f"model: unknown arch {arch!r} in config (expected one of {ARCHS})")
    return EDMPrecond(net, sigma_data=cfg.get("sigma_data", SIGMA_DATA))


def count_params(module):
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in module.parameters())


def describe(module, cfg=None):
    """One line: architecture and parameter count, as the CLI prints it."""
    n = count_params(module)
    arch = (cfg or {}).get("arch", type(module).__name__)
    extra = ""
    if cfg and cfg.get("arch") == "unet":
        extra = f" width={cfg['width']} mults={cfg['mults']} blocks={cfg['depth']}"
    elif cfg and cfg.get("arch") == "mlp":
        extra = f" width={cfg['width']} depth={cfg['depth']}"
    return f"{arch}{extra}: {n:,} parameters"
