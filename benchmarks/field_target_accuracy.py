"""Accuracy table of field_target: each fused backend of this machine vs the plain fp32
eager formulation (cdist + log + logsumexp/softmax + matmul), both against the exact
float64 reference, on the cases the tests assert (only the fused backends are bounded,
by 1e-4).

    python benchmarks/field_target_accuracy.py [--n 3072] [--m 256] [--rows 8] [--backends cpu,cuda]

Inputs: reference rows in 4 clusters (centres ~ N(mean, 1)) with per-row offsets of size
spread * sigma (so that the posterior mixes over ~spread^-2-separated logits), y the PFGM++
perturbation of random reference rows. ``eff`` = median over rows of 1 / sum_j w_ij^2.
Error: max_i ||t_i - t64_i|| / ||t64_i||.
"""

import argparse
import math
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import baselines  # noqa: E402
import ipfm_fast as ipf  # noqa: E402
from ipfm_fast import backends  # noqa: E402
from ipfm_fast import reference as ref  # noqa: E402


def make_case(rows, m, n, sigma, D, spread, mean, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, n, generator=g) + mean
    x = centers[torch.randint(0, 4, (m,), generator=g)] + spread / math.sqrt(n) * sigma * torch.randn(m, n, generator=g)
    y = ref.perturb(x[torch.randint(0, m, (rows,), generator=g)], sigma, D, generator=g)
    return y, x


def rel_err(t, t64):
    a, b = t.double().cpu().reshape(t.shape[0], -1), t64.reshape(t64.shape[0], -1)
    return ((a - b).norm(dim=1) / b.norm(dim=1)).max().item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=3072)
    p.add_argument("--m", type=int, default=256)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--backends", default=None, help="comma list (default: the built fused backends, no interpreter)")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    names = args.backends.split(",") if args.backends else [
        b for b in ("cuda", "triton", "cpu")
        if backends.why_not(b, device, torch.float32) is None and not (b == "triton" and device == "cpu")]
    print(f"B={args.rows} M={args.m} N={args.n} on {device}; fused: {', '.join(names)}\n")
    print("| D | sigma | spread | mean | eff | " + " | ".join(names) + " | fp32 eager |")
    print("|---" * (6 + len(names)) + "|")
    worst = {b: 0.0 for b in names + ["eager"]}
    for D in (1.0, 128.0, 2048.0, math.inf):
        for sigma in (0.002, 0.05, 1.0, 10.0, 80.0):
            for spread, mean in ((1.0, 0.0), (3.0, 0.0), (1.0, 3.0)):
                y, x = make_case(args.rows, args.m, args.n, sigma, D, spread, mean)
                y64, x64 = y.double(), x.double()
                t64 = ref.field_target(y64, sigma, x64, D)
                d2 = torch.cdist(y64, x64, compute_mode="donot_use_mm_for_euclid_dist").square()
                s = -d2 / (2 * sigma**2) if math.isinf(D) else -0.5 * (args.n + D) * torch.log(d2 + D * sigma**2)
                eff = (1 / torch.softmax(s, 1).square().sum(1)).median().item()
                errs = [rel_err(ipf.field_target(y.to(device), sigma, x.to(device), D, backend=b), t64) for b in names]
                e_eager = rel_err(baselines.field_target_eager(y.to(device), sigma, x.to(device), D), t64)
                for b, e in zip(names + ["eager"], errs + [e_eager]):
                    worst[b] = max(worst[b], e)
                print(f"| {D:g} | {sigma:g} | {spread:g} | {mean:g} | {eff:.1f} | "
                      + " | ".join(f"{e:.1e}" for e in errs) + f" | {e_eager:.1e} |")
    print("\nworst: " + ", ".join(f"{b} {e:.1e}" for b, e in worst.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
