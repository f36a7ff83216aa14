"""Produce the numbers of the README's "train your own teacher" section.

Runs the default `ipfm-fast train-teacher` on digits (D = 128) as a subprocess, timing
the whole command, then scores the EMA teacher at 35 NFE over several sampling seeds
(`ipfm-fast evaluate`) next to the train-vs-test data baseline, and writes
docs/results/teacher_digits.json and .md. With --field, also trains the same recipe with
`--target field` (--field) and at D = inf (--dinf) and scores them the same way.

    .venv/bin/python scripts/teacher_report.py                  # ~3 minutes on 2 CPU cores
    .venv/bin/python scripts/teacher_report.py --field --dinf   # ~12 minutes
    .venv/bin/python scripts/teacher_report.py --reuse    # re-score an existing run
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

from _results import write_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd):
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - t0


def train_and_score(name, extra, args):
    out = os.path.join(args.runs, name)
    cli = [sys.executable, "-m", "ipfm_fast"]
    timing = os.path.join(out, "report_timing.json")
    if args.reuse and os.path.exists(os.path.join(out, "teacher.safetensors")) and os.path.exists(timing):
        wall = json.load(open(timing))["command_seconds"]
    else:
        wall = run(cli + ["train-teacher", "--out", out, "--overwrite", *extra])  # a rerun starts over
        with open(timing, "w") as f:
            json.dump({"command_seconds": wall}, f)
    summary = json.load(open(os.path.join(out, "summary.json")))
    ev_path = os.path.join(out, "eval.json")
    if not (args.reuse and os.path.exists(ev_path) and "nn_ratio" in json.load(open(ev_path))):
        run(cli + ["evaluate", "--teacher", out, "--seeds", str(args.seeds), "--json", ev_path])
    ev = json.load(open(ev_path))
    return {"name": name, "args": extra, "command_seconds": wall, "train_seconds": summary["train_seconds"],
            "images_per_second": summary["images_per_second"], "parameters": summary["parameters"],
            "steps": summary["steps"], "fd": ev["fd"], "sw": ev["sw"], "baseline_fd": ev["baseline_fd"],
            "baseline_sw": ev["baseline_sw"], "nfe": ev["nfe"], "num_samples": ev["num_samples"],
            "n_test": ev["n_test"], "classifier_test_accuracy": ev["classifier_test_accuracy"],
            "nn_ratio": ev["nn_ratio"],
            "fd_over_baseline": ev["fd"]["mean"] / ev["baseline_fd"]}


def markdown(res):
    rows = ["| teacher | train time | FD @ 35 NFE (mean ± std, {s} seeds) | data baseline FD | ratio | SW | baseline SW "
            "| NN ratio |",
            "|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        t = f"{r['train_seconds']:.0f} s" + (f" ({r['command_seconds']:.0f} s whole command)" if r["command_seconds"] else "")
        rows.append(f"| {r['label']} | {t} | {r['fd']['mean']:.2f} ± {r['fd']['std']:.2f} "
                    f"(min {r['fd']['min']:.2f}, max {r['fd']['max']:.2f}) | {r['baseline_fd']:.2f} | "
                    f"{r['fd_over_baseline']:.2f}x | {r['sw']['mean']:.4f} | {r['baseline_sw']:.4f} | "
                    f"{r['nn_ratio']['mean']:.2f} |")
    r0 = res["runs"][0]
    head = (f"Digits teacher, D = 128, default `ipfm-fast train-teacher` ({r0['parameters']:,}-parameter MLP, "
            f"{r0['steps']} steps, {r0['images_per_second']:.0f} images/s), scored with {r0['num_samples']} samples "
            f"per seed against the {r0['n_test']}-image test split (FD classifier test accuracy "
            f"{r0['classifier_test_accuracy']:.3f}). Machine: {res['machine']}; {res['date']}.")
    foot = ("FD: Frechet distance in the features of a small classifier trained on the training split; SW: "
            "pixel-space sliced Wasserstein-2; both against the test split. Data baseline: the training split "
            "scored the same way. NN ratio: median distance of samples to their nearest training image over the "
            "same for test images (1 = as novel as held-out data, << 1 = copying).")
    return head + "\n\n" + "\n".join(rows).replace("{s}", str(res["seeds"])) + "\n\n" + foot + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default=os.path.join(ROOT, "runs", "teacher_report"))
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "teacher_digits"))
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--field", action="store_true", help="also train with --target field --ref-batch 1024")
    p.add_argument("--dinf", action="store_true", help="also train the default recipe at D = inf (EDM)")
    p.add_argument("--reuse", action="store_true", help="do not retrain (or re-score) runs that exist")
    args = p.parse_args()
    runs = [train_and_score("default", [], args)]
    runs[0]["label"] = "default (target x)"
    if args.field:
        runs.append(train_and_score("field", ["--target", "field", "--ref-batch", "1024"], args))
        runs[-1]["label"] = "--target field --ref-batch 1024"
    if args.dinf:
        runs.append(train_and_score("dinf", ["--D", "inf"], args))
        runs[-1]["label"] = "--D inf (EDM)"
    import torch

    res = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), torch {torch.__version__}",
           "seeds": args.seeds, "runs": runs}
    write_results(args.out, res, markdown(res))
    print(f"-> {args.out}.json, {args.out}.md")


if __name__ == "__main__":
    main()
