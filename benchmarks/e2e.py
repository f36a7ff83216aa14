"""End-to-end images/s of a full IPFM iteration (one fake update + one generator update):
a loop written the way the public SiD / PFGM++ training code does it, against the
ipfm_fast loop (ipfm_fast.train.distill.train_step), same network, batch, D and number of
iterations, measured in one run after warm-up, in interleaved rounds (medians).

    python benchmarks/e2e.py                 # CPU defaults: about a minute (compilation included)
    python benchmarks/e2e.py --compile off   # the eager loop -> distill_step_eager.json
    python benchmarks/e2e.py --device cuda --arch unet --shape 3 32 32 --width 128 --depth 3 \
        --mults 1 2 2 2 --batch 256      # CIFAR-10 size, 47M-parameter U-Net

The reference-style loop: the perturbation drawn with a NumPy Beta on the host and a
normalised Gaussian (baselines.perturb_pfgmpp_style), the losses as eager
formulas, fp32, plain Adam, ``.item()`` logging every step. The ipfm_fast loop is
``ipfm_fast.train.distill.train_step`` as ``ipfm-fast distill`` runs it, with its networks
compiled (``--compile on``, the default here; ``ipfm-fast distill`` compiles by default on
CUDA only) and, on CUDA, bf16 autocast and channels_last. On CUDA the result also holds the
peak memory of each loop and the host syncs of one steady-state iteration (CUDA's sync
debug mode). Writes benchmarks/results/<device>/distill_step.json (distill_step_eager.json
when the networks ran uncompiled) and prints ``speedup: X.XX`` last.
"""

import argparse
import datetime
import json
import math
import os
import sys
import time
import warnings

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _env import device_name, device_slug, versions  # noqa: E402
from ipfm_fast import models  # noqa: E402
from ipfm_fast.models import build_denoiser, count_params, model_config  # noqa: E402
from baselines import perturb_pfgmpp_style  # noqa: E402
from ipfm_fast.reference import fake_loss_weight  # noqa: E402
from ipfm_fast.schedules import sample_sigma_distill, sample_sigma_train  # noqa: E402
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


def setup(args):
    """(device, teacher, model config) for the parsed setup arguments (add_setup_args); sets
    the CPU threads. Not the process-wide host-memory policy ``ipfm-fast distill`` sets
    (host_memory.keep_freed): here it would speed the reference loop too (its per-tensor Adam
    allocates more; measured +2-3% for it, 0-1% for the ipfm_fast loop), so both loops run
    under glibc's defaults; profile_step.py, which times the ipfm_fast loop alone, sets it."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = model_config(args.arch, list(args.shape), width=args.width, depth=args.depth, mults=args.mults)
    torch.manual_seed(0)
    teacher = build_denoiser(cfg).to(device).eval().requires_grad_(False)
    teacher.config_dict = cfg
    return device, teacher, cfg


def ipfm_fast_state(teacher, cfg, args, device):
    dcfg = distill.DistillConfig(D=args.D, batch=args.batch, lr=1e-4, ema=0.995, device=str(device),
                                 precision=args.precision, compile=args.compile, channels_last=args.channels_last,
                                 cuda_graph=args.cuda_graph, model=cfg, eval_every=0)
    return distill.build_state(dcfg, teacher=teacher, teacher_meta={"D": args.D, "data": "digits"}, device=device)


def ipfm_fast_loop(teacher, cfg, args, device):
    state = ipfm_fast_state(teacher, cfg, args, device)
    run = distill.step_runner(state)
    run.state = state
    return run


def timed(step_fn, first, iters, device):
    """Seconds for iterations first .. first + iters - 1 (device work included) and, on
    CUDA, (peak MB allocated, MB the loop's iterations added on top of what was allocated
    before them: activations and temporaries)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    for i in range(first, first + iters):
        step_fn(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if device.type != "cuda":
        return seconds, None
    peak = torch.cuda.max_memory_allocated()
    return seconds, (peak / 2**20, (peak - base) / 2**20)


def interleaved(loops, iters, warmup, rounds, device):
    """Warm every loop up, then time ``rounds`` rounds of ``iters`` iterations of each loop,
    alternating their order, so both see the same machine state. Returns {name: (median
    seconds per round, (peak MB, working MB) or None, min seconds per round)}."""
    step = {name: 0 for name in loops}
    for name, fn in loops.items():
        for _ in range(warmup):
            fn(step[name])
            step[name] += 1
    times = {name: [] for name in loops}
    mem = {name: None for name in loops}
    names = list(loops)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            seconds, m = timed(loops[name], step[name], iters, device)
            step[name] += iters
            times[name].append(seconds)
            if m is not None:
                mem[name] = tuple(max(a, b) for a, b in zip(mem[name] or m, m))
    return {name: (float(np.median(times[name])), mem[name], float(np.min(times[name]))) for name in loops}


def count_host_syncs(step_fn, step, device):
    """Host-device synchronisations in one iteration (CUDA's sync debug mode, "warn"), or
    None on CPU."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step_fn(step)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def add_setup_args(p):
    """The network, batch and loop settings (shared with profile_step.py)."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", type=int, nargs=3, default=[3, 16, 16])
    p.add_argument("--arch", default="mlp", choices=["mlp", "unet"])
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--mults", type=int, nargs="+", default=None, help="U-Net channel multipliers per resolution")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--D", type=float, default=128.0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for both loops (default: torch's)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="ipfm_fast loop only; the reference loop is fp32 as the reference code is")
    p.add_argument("--compile", default="on", choices=distill.SWITCHES,
                   help="ipfm_fast loop: torch.compile the networks (auto: on CUDA only, as `ipfm-fast distill`)")
    p.add_argument("--channels-last", default="auto", choices=distill.SWITCHES,
                   help="ipfm_fast loop: channels_last convolutional networks (auto: on CUDA)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="ipfm_fast loop: replay the whole iteration as a CUDA graph (-> distill_step_graph.json)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_setup_args(p)
    p.add_argument("--iters", type=int, default=20, help="iterations per timed round")
    p.add_argument("--rounds", type=int, default=15, help="timed rounds per loop, interleaved; medians reported")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/<device>/distill_step.json)")
    args = p.parse_args(argv)
    device, teacher, cfg = setup(args)
    shape = list(args.shape)

    ref = ReferenceLoop(teacher, args.D, args.batch, shape)
    fast = ipfm_fast_loop(teacher, cfg, args, device)
    loops = {"reference": ref.step, "ipfm_fast": fast}
    res = interleaved(loops, args.iters, args.warmup, args.rounds, device)
    (ref_s, ref_peak, ref_min), (fast_s, fast_peak, fast_min) = res["reference"], res["ipfm_fast"]
    syncs = {name: count_host_syncs(fn, 10**6, device) for name, fn in loops.items()}

    images = args.iters * args.batch
    result = {
        "reference_images_per_s": images / ref_s,
        "ipfm_fast_images_per_s": images / fast_s,
        "speedup": ref_s / fast_s,
        # the fastest round of each side (a busy machine slows some rounds; the min shows the pace)
        "reference_images_per_s_best": images / ref_min,
        "ipfm_fast_images_per_s_best": images / fast_min,
        "speedup_min": ref_min / fast_min,
        # CUDA: peak allocated while the loop ran (both loops' networks and optimizer states are
        # resident throughout) and the part its iterations added (activations, temporaries)
        "reference_peak_memory_mb": ref_peak and ref_peak[0],
        "ipfm_fast_peak_memory_mb": fast_peak and fast_peak[0],
        "reference_working_memory_mb": ref_peak and ref_peak[1],
        "ipfm_fast_working_memory_mb": fast_peak and fast_peak[1],
        "reference_host_syncs_per_iteration": syncs["reference"],
        "ipfm_fast_host_syncs_per_iteration": syncs["ipfm_fast"],
        "compiled": fast.state.compiled, "cuda_graph": fast.state.graphed, "channels_last": fast.state.channels_last,
        # the GEMMs of the networks' linear layers (oneDNN only inside compiled CPU graphs; getattr:
        # this script also times older checkouts, PYTHONPATH=<checkout>, for before/after figures)
        "ipfm_fast_linear_gemms": ("onednn" if fast.state.compiled and device.type == "cpu"
                                   and getattr(getattr(models, "Linear", None), "onednn", False) else "torch"),
        "precision": fast.state.precision,
        "device": device_name(), "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "network": {"arch": args.arch, "shape": shape, "parameters": count_params(teacher), "config": cfg},
        "batch": args.batch, "D": args.D if math.isfinite(args.D) else "inf", "iterations_per_round": args.iters,
        "rounds": args.rounds, "warmup": args.warmup,
        "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/e2e.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    name = ("distill_step_graph.json" if fast.state.graphed else
            "distill_step.json" if fast.state.compiled else "distill_step_eager.json")
    out = args.out or os.path.join(HERE, "results", device_slug(), name)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"reference loop: {result['reference_images_per_s']:.0f} images/s; "
          f"ipfm_fast loop: {result['ipfm_fast_images_per_s']:.0f} images/s ({count_params(teacher):,} parameters, "
          f"batch {args.batch}, shape {shape}; median of {args.rounds} interleaved rounds of {args.iters} iterations) "
          f"-> {out}")
    print(f"speedup: {result['speedup']:.2f} (by the fastest rounds: {result['speedup_min']:.2f})")
    return result


if __name__ == "__main__":
    main()
