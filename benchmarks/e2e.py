"""End-to-end images/s of a full IPFM iteration (one fake update + one generator update):
a loop written the way the public SiD / PFGM++ training code does it, against the
ipfm_fast loop (ipfm_fast.train.distill.train_step), same network, batch, D and number of
iterations, measured in one run after warm-up, in interleaved rounds (medians).

    python benchmarks/e2e.py                 # CPU defaults: runs in about a minute
    python benchmarks/e2e.py --device cuda --shape 3 32 32 --arch unet --width 128 --batch 256

The reference-style loop: the perturbation drawn with a NumPy Beta on the host and a
normalised Gaussian (ipfm_fast.reference.perturb_pfgmpp_style), the losses as eager
formulas, fp32, ``.item()`` logging every step. Writes
benchmarks/results/<device>/distill_step.json and prints ``speedup: X.XX`` last.
"""

import argparse
import datetime
import json
import math
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _env import device_name, device_slug, versions  # noqa: E402
from ipfm_fast.models import build_denoiser, count_params, model_config  # noqa: E402
from ipfm_fast.reference import fake_loss_weight, perturb_pfgmpp_style, sample_sigma_distill, sample_sigma_train  # noqa: E402
from ipfm_fast.train import distill  # noqa: E402


class ReferenceLoop:
    """One IPFM iteration as the public SiD / PFGM++ code writes it (eager, fp32, host-side
    Beta draws, ``.item()`` every step)."""

    def __init__(self, teacher, D, batch, shape, lr=1e-4, alpha=1.0, sigma_init=2.5, ema=0.995, seed=0):
        self.teacher = teacher
        self.G = build_denoiser(teacher.config_dict).to(next(teacher.parameters()).device)
        self.G.load_state_dict(teacher.state_dict())
        self.fake = build_denoiser(teacher.config_dict).to(next(teacher.parameters()).device)
        self.fake.load_state_dict(teacher.state_dict())
        self.G_ema = build_denoiser(teacher.config_dict).to(next(teacher.parameters()).device)
        self.G_ema.load_state_dict(teacher.state_dict())
        self.G_ema.requires_grad_(False)
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=lr, betas=(0.0, 0.999))
        self.opt_f = torch.optim.Adam(self.fake.parameters(), lr=lr, betas=(0.0, 0.999))
        self.D, self.batch, self.shape, self.alpha, self.sigma_init, self.ema = D, batch, shape, alpha, sigma_init, ema
        self.rng = np.random.default_rng(seed)
        self.device = next(teacher.parameters()).device
        self.log = []

    def _z(self):
        zeros = torch.zeros((self.batch, *self.shape), device=self.device)
        return perturb_pfgmpp_style(zeros, self.sigma_init, self.D, rng=self.rng)

    def step(self, step):
        dims = list(range(1, 1 + len(self.shape)))
        # fake score network
        with torch.no_grad():
            x = self.G(self._z(), self.sigma_init)
        sigma = sample_sigma_train(self.batch, device=self.device)
        y = perturb_pfgmpp_style(x, sigma, self.D, rng=self.rng)
        b = self.fake(y, sigma)
        w = fake_loss_weight(sigma).view(-1, *[1] * len(self.shape))
        loss_f = (w * (b - x) ** 2).sum(dims).mean()
        self.opt_f.zero_grad()
        loss_f.backward()
        self.opt_f.step()
        # generator
        self.fake.requires_grad_(False)
        x = self.G(self._z(), self.sigma_init)
        sigma = sample_sigma_distill(self.batch, device=self.device)
        y = perturb_pfgmpp_style(x, sigma, self.D, rng=self.rng)
        a = self.teacher(y, sigma)
        b = self.fake(y, sigma)
        with torch.no_grad():
            weight = (x - a).abs().mean(dims, keepdim=True).clip(min=1e-5)
        per_elem = (a - b) * ((a - x) - self.alpha * (a - b)) / weight
        per_elem = torch.where(torch.isnan(per_elem), torch.zeros_like(per_elem), per_elem)
        loss_g = per_elem.sum(dims).mean()
        self.opt_g.zero_grad()
        loss_g.backward()
        self.opt_g.step()
        self.fake.requires_grad_(True)
        with torch.no_grad():
            for p_ema, p in zip(self.G_ema.parameters(), self.G.parameters()):
                p_ema.copy_(p.detach().lerp(p_ema, self.ema))
        self.log.append((step, loss_f.item(), loss_g.item()))  # per-step logging, as the reference loops do


def build_teacher(args, device):
    cfg = model_config(args.arch, list(args.shape), width=args.width, depth=args.depth)
    torch.manual_seed(0)
    teacher = build_denoiser(cfg).to(device).eval().requires_grad_(False)
    teacher.config_dict = cfg
    return teacher, cfg


def ipfm_fast_loop(teacher, cfg, args, device):
    dcfg = distill.DistillConfig(D=args.D, batch=args.batch, lr=1e-4, ema=0.995, device=str(device),
                                 precision=args.precision, model=cfg, eval_every=0)
    state = distill.build_state(dcfg, teacher=teacher, teacher_meta={"D": args.D, "data": "digits"}, device=device)
    return lambda step: distill.train_step(state, step)


def timed(step_fn, first, iters, device):
    """Seconds for iterations first .. first + iters - 1 (device work included) and the
    peak device memory (MB, CUDA only)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(first, first + iters):
        step_fn(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return seconds, peak


def interleaved(loops, iters, warmup, rounds, device):
    """Warm every loop up, then time ``rounds`` rounds of ``iters`` iterations of each loop,
    alternating their order, so both see the same machine state. Returns {name: (median
    seconds per round, peak MB)}."""
    step = {name: 0 for name in loops}
    for name, fn in loops.items():
        for _ in range(warmup):
            fn(step[name])
            step[name] += 1
    times = {name: [] for name in loops}
    peaks = {name: None for name in loops}
    names = list(loops)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            seconds, peak = timed(loops[name], step[name], iters, device)
            step[name] += iters
            times[name].append(seconds)
            if peak is not None:
                peaks[name] = max(peaks[name] or 0.0, peak)
    return {name: (float(np.median(times[name])), peaks[name]) for name in loops}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", type=int, nargs=3, default=[3, 16, 16])
    p.add_argument("--arch", default="mlp", choices=["mlp", "unet"])
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--D", type=float, default=128.0)
    p.add_argument("--iters", type=int, default=20, help="iterations per timed round")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds per loop, interleaved; medians reported")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for both loops (default: torch's)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="ipfm_fast loop only; the reference loop is fp32 as the reference code is")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/<device>/distill_step.json)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher, cfg = build_teacher(args, device)
    shape = list(args.shape)

    ref = ReferenceLoop(teacher, args.D, args.batch, shape)
    res = interleaved({"reference": ref.step, "ipfm_fast": ipfm_fast_loop(teacher, cfg, args, device)},
                      args.iters, args.warmup, args.rounds, device)
    (ref_s, ref_peak), (fast_s, fast_peak) = res["reference"], res["ipfm_fast"]

    images = args.iters * args.batch
    result = {
        "reference_images_per_s": images / ref_s,
        "ipfm_fast_images_per_s": images / fast_s,
        "speedup": ref_s / fast_s,
        "reference_peak_memory_mb": ref_peak,
        "ipfm_fast_peak_memory_mb": fast_peak,
        "device": device_name(), "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "network": {"arch": args.arch, "shape": shape, "parameters": count_params(teacher), "config": cfg},
        "batch": args.batch, "D": args.D if math.isfinite(args.D) else "inf", "iterations_per_round": args.iters,
        "rounds": args.rounds, "warmup": args.warmup,
        "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/e2e.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    out = args.out or os.path.join(HERE, "results", device_slug(), "distill_step.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"reference loop: {result['reference_images_per_s']:.0f} images/s; "
          f"ipfm_fast loop: {result['ipfm_fast_images_per_s']:.0f} images/s ({count_params(teacher):,} parameters, "
          f"batch {args.batch}, shape {shape}; median of {args.rounds} interleaved rounds of {args.iters} iterations) "
          f"-> {out}")
    print(f"speedup: {result['speedup']:.2f}")
    return result


if __name__ == "__main__":
    main()
