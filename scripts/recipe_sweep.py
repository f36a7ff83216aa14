"""The distillation recipe from measurement (docs/quality.md): on digits, D in {128, inf} x
alpha in {0.5, 1.0, 1.2} x lr in {3e-5, 1e-4, 3e-4}, several distillation seeds each, under
equal budgets (the same iterations x batch: the same number of generator images seen), the
teachers' recipe frozen (the default train-teacher run per D), the kept checkpoint chosen on
the *training* split only, then scored at 1 NFE against the test split over 5 sampling seeds,
paired with the teacher over the same seeds.

    python scripts/recipe_sweep.py --steps 4000 --seeds 3 --jobs 2   # -> docs/results/recipe.{md,json}

Each finished run is cached in --out-dir/<run>/result.json, so an interrupted sweep resumes.
"""

import argparse
import itertools
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ALPHAS, LRS, DS = (0.5, 1.0, 1.2), (3e-5, 1e-4, 3e-4), (128.0, math.inf)  # the grid
SCORE_SEEDS = list(range(5))
SCORE_SAMPLES = 10_000  # per seed: the KID score is unbiased, so more samples only sharpen it


def _name(D):
    return "Dinf" if math.isinf(D) else f"D{D:g}"


def teacher_scores(tdir, D):
    """The teacher's per-seed score (35 NFE) against the test split, cached next to it."""
    import torch

    from ipfm_fast import checkpoint as ckpt
    from ipfm_fast.data import load_dataset
    from ipfm_fast.train.evaluation import evaluate_denoiser

    path = os.path.join(tdir, "recipe_teacher_scores.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    torch.set_num_threads(1)
    data = load_dataset("digits")
    teacher, _ = ckpt.load_denoiser(os.path.join(tdir, "teacher.safetensors"))
    res = evaluate_denoiser(teacher, data, D, tdir, num=SCORE_SAMPLES, steps=18, seeds=SCORE_SEEDS, log=lambda m: None)
    out = {"values": res["score"]["values"], "baseline": res["baseline_score"], "score_name": res["score_name"]}
    with open(path, "w") as f:
        json.dump(out, f)
    return out


def one_run(job):
    """One distillation of the sweep, then its 1-NFE scores; returns (and caches) the result."""
    import torch

    from ipfm_fast.data import load_dataset
    from ipfm_fast.metrics import paired_difference
    from ipfm_fast.train.distill import DistillConfig, distill
    from ipfm_fast.train.evaluation import evaluate_generator, load_generator

    D, alpha, lr, seed, tdir, out_dir, steps, teacher = job
    run = os.path.join(out_dir, f"{_name(D)}-a{alpha:g}-lr{lr:g}-s{seed}")
    cached = os.path.join(run, "result.json")
    if os.path.exists(cached):
        with open(cached) as f:
            return json.load(f)
    torch.set_num_threads(1)
    cfg = DistillConfig(teacher=tdir, out=run, alpha=alpha, lr=lr, seed=seed, steps=steps, eval_every=max(steps // 12, 1),
                        device="cpu", threads="1", checkpoint_every=steps)
    t0 = time.perf_counter()
    summary = distill(cfg, overwrite=True, log=lambda m: None)
    data = load_dataset("digits")
    gen, gD, sigma_init, _ = load_generator(run)
    res = evaluate_generator(gen, data, gD, sigma_init, tdir, num=SCORE_SAMPLES, seeds=SCORE_SEEDS, log=lambda m: None)
    diff, ci = paired_difference(res["score"]["values"], teacher["values"])
    out = {"D": "inf" if math.isinf(D) else D, "alpha": alpha, "lr": lr, "seed": seed, "steps": steps,
           "batch": cfg.batch, "kept_step": summary["best_step"], "score": res["score"]["mean"],
           "score_values": res["score"]["values"], "excess": res["score"]["mean"] - teacher["baseline"],
           "paired_diff": diff, "paired_ci95": ci, "seconds": time.perf_counter() - t0}
    with open(cached, "w") as f:
        json.dump(out, f)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4000, help="iterations per run (batch 256: the equal budget)")
    p.add_argument("--seeds", type=int, default=3, help="distillation seeds per recipe")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one CPU thread each)")
    p.add_argument("--out-dir", default=os.path.join(ROOT, "runs", "recipe"))
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "recipe"))
    args = p.parse_args(argv)
    from ipfm_fast.train.demo import ensure_teacher

    t0 = time.perf_counter()
    os.makedirs(args.out_dir, exist_ok=True)
    teachers = {}
    for D in DS:
        tdir = os.path.join(args.out_dir, f"teacher-{_name(D)}")
        ensure_teacher(tdir, D=D, device="cpu", log=print)
        teachers[D] = (tdir, teacher_scores(tdir, D))
    jobs = [(D, a, lr, s, teachers[D][0], args.out_dir, args.steps, teachers[D][1])
            for D, a, lr, s in itertools.product(DS, ALPHAS, LRS, range(args.seeds))]
    results = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for r in pool.map(one_run, jobs):
            results.append(r)
            print(f"D = {r['D']}, alpha {r['alpha']}, lr {r['lr']:g}, seed {r['seed']}: score {r['score']:.4f}, "
                  f"paired diff vs teacher {r['paired_diff']:+.4f} ({len(results)}/{len(jobs)})", flush=True)
    res = {"steps": args.steps, "batch": results[0]["batch"], "seeds": args.seeds, "runs": results,
           "teachers": {("inf" if math.isinf(D) else f"{D:g}"): t[1] for D, t in teachers.items()},
           "seconds": time.perf_counter() - t0,
           "command": "python scripts/recipe_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    res["table"] = table(res)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(res, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(res) + "\n")
    print(markdown(res))


def table(res):
    import numpy as np

    rows = []
    for D, alpha, lr in itertools.product(DS, ALPHAS, LRS):
        key = "inf" if math.isinf(D) else D
        runs = [r for r in res["runs"] if r["D"] == key and r["alpha"] == alpha and r["lr"] == lr]
        diffs = np.array([r["paired_diff"] for r in runs])
        rows.append({"D": key, "alpha": alpha, "lr": lr, "score_mean": float(np.mean([r["score"] for r in runs])),
                     "excess_mean": float(np.mean([r["excess"] for r in runs])),
                     "score_std": float(np.std([r["score"] for r in runs], ddof=1)) if len(runs) > 1 else 0.0,
                     "paired_diff_mean": float(diffs.mean()), "paired_diff_max": float(diffs.max()),
                     "beats_teacher": int(sum(r["paired_ci95"][1] <= 0 for r in runs)), "runs": len(runs)})
    return rows


def markdown(res):
    t = res["teachers"]
    head = [f"{res['steps']} iterations x batch {res['batch']} per run ({res['steps'] * res['batch'] // 1000}k "
            f"generator images), {res['seeds']} distillation seeds per recipe, {len(res['runs'])} runs "
            f"({sum(r['seconds'] for r in res['runs']) / 3600:.1f} CPU-thread hours); from `{res['command']}`. Score: {t[next(iter(t))]['score_name']} at 1 NFE "
            f"against the test split, 5 sampling seeds x {SCORE_SAMPLES} samples; 'vs teacher': generator − teacher paired over those seeds "
            f"(negative: better than the 35-NFE teacher). Teachers: "
            + "; ".join(f"D = {k}: excess {sum(v['values']) / len(v['values']) - v['baseline']:.3f} (score "
                        f"{sum(v['values']) / len(v['values']):.4f}, data baseline {v['baseline']:.4f})"
                        for k, v in t.items()) + ".", "",
            "| D | alpha | lr | excess over the data (mean ± std over seeds) | vs teacher (mean, worst seed) | runs beating the teacher "
            "(95% CI) |", "|---|---|---|---|---|---|"]
    for r in res["table"]:
        head.append(f"| {r['D'] if isinstance(r['D'], str) else format(r['D'], 'g')} | {r['alpha']:g} | {r['lr']:g} | {r['excess_mean']:.3f} ± {r['score_std']:.3f} | "
                    f"{r['paired_diff_mean']:+.4f}, {r['paired_diff_max']:+.4f} | {r['beats_teacher']}/{r['runs']} |")
    return "\n".join(head)


if __name__ == "__main__":
    main()
