"""How much of a score's spread between sampling seeds is noise, and what the pixel-space
score gains: for a teacher and a distilled generator (a `make demo` run folder), over the
same sampling seeds, the seed-to-seed spread of each metric, the spread of the paired
difference (generator - teacher, same seeds), and the spread the same metric shows on the
*data* itself (bootstrap resamples of the training split, scored against the test split:
pure measurement noise, no model in it).

    python scripts/metric_noise.py --run runs/demo --seeds 10   # -> docs/results/metric_noise.{md,json}

Metrics: the classifier-feature FD (the demo's score until 2026-12), the pixel FD, and KID in
pixel space (the score since).
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from tqdm.auto import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ipfm_fast import checkpoint as ckpt  # noqa: E402
from ipfm_fast.data import load_dataset  # noqa: E402
from ipfm_fast.metrics import Evaluator, extract, frechet_distance, gaussian_stats, kernel_distance  # noqa: E402
from ipfm_fast.metrics import paired_difference  # noqa: E402
from ipfm_fast.sampling import sample  # noqa: E402
from ipfm_fast.train.evaluation import generate, load_generator  # noqa: E402


def scores(ev, x, n_fd):
    """{metric: value} of images x against the test split: the FDs and a KID on the first
    ``n_fd`` (the baseline's count; FD is biased by it), the score (KID) on all of x."""
    x = x.clamp(-1, 1)
    emb = ev.embed(x)
    out = {"classifier FD": frechet_distance(*gaussian_stats(extract(ev.net, x[:n_fd])), *ev.test_stats),
           "pixel FD": frechet_distance(*gaussian_stats(emb[:n_fd]), *ev.test_space_stats),
           f"pixel KID x 1e3, {n_fd} samples": 1e3 * kernel_distance(emb[:n_fd], ev.test_emb)}
    if len(x) > n_fd:
        out[f"pixel KID x 1e3, {len(x)} samples (the score)"] = 1e3 * kernel_distance(emb, ev.test_emb)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/demo", help="a `make demo` output folder (teacher/ and distill/ inside)")
    p.add_argument("--seeds", type=int, default=10, help="sampling seeds (and bootstrap resamples of the data)")
    p.add_argument("--num", type=int, default=10_000, help="samples per seed for the score (the demo's count)")
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "metric_noise"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the classifier and the scores as the demo computes them
    t0 = time.perf_counter()
    data = load_dataset("digits")
    ev = Evaluator(data, os.path.join(args.run, "teacher"))
    teacher, meta = ckpt.load_denoiser(os.path.join(args.run, "teacher", "teacher.safetensors"))
    gen, D, sigma_init, _ = load_generator(os.path.join(args.run, "distill"))
    n = len(data.train)
    boot = "data (bootstrap of the training split)"
    per = {"teacher": [], "generator": [], boot: []}
    rng = np.random.default_rng(0)
    train = data.train.floats()
    for seed in tqdm(range(args.seeds), desc="seeds", disable=None):
        per["teacher"].append(scores(ev, sample(teacher, args.num, data.shape, D, seed=seed, steps=18), n))
        per["generator"].append(scores(ev, generate(gen, args.num, data.shape, D, sigma_init, seed=seed), n))
        per[boot].append(scores(ev, train[rng.integers(0, n, n)], n))  # only n images exist: n per resample
    base_kid = ev.baseline["baseline_score"]
    baselines = {"classifier FD": ev.baseline["baseline_fd"], "pixel FD": ev.baseline["baseline_space_fd"]}
    rows = []
    for m in per["teacher"][0]:
        vals = {k: np.array([r[m] for r in v]) for k, v in per.items() if m in v[0]}
        diff, ci = paired_difference(vals["generator"], vals["teacher"])
        base = baselines.get(m, base_kid)  # KID is unbiased: one baseline for every count
        excess = vals["teacher"].mean() - base
        rows.append({"metric": m, "baseline": base, **{f"{k} mean": float(v.mean()) for k, v in vals.items()},
                     **{f"{k} std": float(v.std(ddof=1)) for k, v in vals.items()},
                     "paired diff": diff, "paired diff ci95": ci, "teacher excess": float(excess),
                     "paired diff std": float((vals["generator"] - vals["teacher"]).std(ddof=1)),
                     "half-width / teacher excess": (ci[1] - ci[0]) / 2 / excess if excess > 0 else None})
    res = {"run": args.run, "seeds": args.seeds, "samples": args.num, "fd_samples": n, "n_test": len(data.test), "rows": rows,
           "seconds": time.perf_counter() - t0,
           "command": "python scripts/metric_noise.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(res, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(res) + "\n")
    print(markdown(res))


def markdown(res):
    lines = [f"Spread over {res['seeds']} sampling seeds ({res['samples']:,} samples each; the FDs on the first "
             f"{res['fd_samples']:,}, the baseline's count; against the {res['n_test']}-image test split), from "
             f"`{res['command']}`:", "",
             "| metric | data baseline | teacher (mean ± std) | generator (mean ± std) | data itself: bootstrap "
             "std | generator − teacher, paired (95% CI) | paired std | teacher's excess | CI half-width / excess |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lo, hi = r["paired diff ci95"]
        ratio = "-" if r["half-width / teacher excess"] is None else f"{r['half-width / teacher excess']:.2f}"
        boot = r.get("data (bootstrap of the training split) std")
        boot_std = "–" if boot is None else f"{boot:.4f}"
        lines.append(f"| {r['metric']} | {r['baseline']:.4f} | {r['teacher mean']:.4f} ± {r['teacher std']:.4f} | "
                     f"{r['generator mean']:.4f} ± {r['generator std']:.4f} | "
                     f"{boot_std} | {r['paired diff']:+.4f} "
                     f"[{lo:+.4f}, {hi:+.4f}] | {r['paired diff std']:.4f} | {r['teacher excess']:+.4f} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
