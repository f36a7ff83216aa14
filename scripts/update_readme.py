"""Fills the result blocks of README.md and docs/ from the files the runs wrote, so no
number there is typed by hand:

    demo     docs/demo/metrics.json        (ipfm-fast demo --publish docs/demo)
    study    docs/study/study.md            (ipfm-fast study --publish docs/study)
    noise    docs/results/metric_noise.md   (scripts/metric_noise.py --run runs/demo)
    recipe   docs/results/recipe.md         (scripts/recipe_sweep.py)
    teacher  docs/results/teacher_digits.md (scripts/teacher_report.py --field --dinf)
    perf     benchmarks/results/*/*.json    (make bench; see benchmarks/summarize.py)
    e2e      benchmarks/results/*/distill_step*.json (make bench-e2e)
    profile  benchmarks/results/*/distill_profile.md (make bench-e2e; benchmarks/profile_step.py)
    compat   benchmarks/results/*/compat_*.json (make bench; benchmarks/bench_compat.py) -> docs/compat.md

    python scripts/update_readme.py          # rewrite the blocks in place
    python scripts/update_readme.py --check  # exit 1 if one is out of date
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import summarize  # noqa: E402


def _read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def _tables(markdown):
    """The lines of the markdown tables in a text."""
    return "\n".join(line for line in markdown.splitlines() if line.startswith("|"))


def demo_block():
    m = json.loads(_read("docs/demo/metrics.json"))
    lo, hi = m["paired_diff_ci95"]
    n = len(m["seeds"])
    rows = [
        f"| model | NFE | {m['score_name']} vs test (mean ± std, {n} seeds) | excess over the data | "
        f"{m['space_fd_name']} | sampling images/s (CPU) |",
        "|---|---|---|---|---|---|",
        f"| data baseline (train split vs test split) | – | {m['data_baseline_score']:.3f} | 0 | "
        f"{m['data_baseline_space_fd']:.4f} | – |",
        f"| PFGM++ teacher (Heun ODE, D = {m['D']:g}) | {m['teacher_nfe']} | {m['teacher_score']:.3f} ± "
        f"{m['teacher_score_std']:.3f} | {m['teacher_excess']:+.3f} | {m['teacher_space_fd']:.4f} | "
        f"{m['teacher_sampling_images_per_second']:,.0f} |",
        f"| generator before distillation (teacher at σ_init = 2.5) | 1 | {m['initial_generator_score']:.1f} | "
        f"{m['initial_generator_score'] - m['data_baseline_score']:+.1f} | – | – |",
        f"| **IPFM-distilled generator** (α = {m['alpha']:g}) | **{m['generator_nfe']}** | **{m['generator_score']:.3f} ± "
        f"{m['generator_score_std']:.3f}** | {m['generator_excess']:+.3f} | {m['generator_space_fd']:.4f} | "
        f"{m['generator_sampling_images_per_second']:,.0f} |",
        "",
        f"Generator − teacher, paired over the {n} sampling seeds: **{m['paired_diff_mean']:+.3f}**, 95% interval "
        f"[{lo:+.3f}, {hi:+.3f}] (half-width {m['ci_half_width_over_teacher_excess']:.2f} × the teacher's excess): "
        f"the 1-NFE generator is {'at least as good as' if hi <= 0 else 'not shown to be as good as'} the "
        f"35-NFE teacher with 95% confidence. {m['date']}, {m['machine']}. Distillation: "
        f"{m['distill_iterations']:,} iterations × batch {m['distill_batch']} in {m['distill_seconds']:.0f} s "
        f"({m['images_per_second']:,.0f} generator images/s); teacher training {m['teacher_train_seconds']:.0f} s"
        f"{' (in an earlier run; this run reused the teacher)' if m.get('teacher_reused') else ''}; "
        f"whole run {m['total_seconds']:.0f} s.",
    ]
    return "\n".join(rows)


def e2e_block(base):
    import glob

    rows = ["| device | network | batch | ipfm_fast settings | reference-style loop | ipfm_fast loop | speedup (by min) "
            "| peak memory (ref / ipfm_fast) | host syncs per iteration (ref / ipfm_fast) | source |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "*", "distill_step*.json"))):
        with open(path) as f:
            r = json.load(f)
        net = r["network"]
        how = ", ".join([r.get("precision", "fp32")] + [k.replace("_", " ") for k in ("compiled", "channels_last",
                                                                                       "cuda_graph") if r.get(k)])
        how = how if r.get("compiled") else how + ", eager"
        peak = ("–" if r.get("reference_peak_memory_mb") is None else
                f"{r['reference_peak_memory_mb']:,.0f} / {r['ipfm_fast_peak_memory_mb']:,.0f} MB")
        syncs = ("–" if r.get("reference_host_syncs_per_iteration") is None else
                 f"{r['reference_host_syncs_per_iteration']} / {r['ipfm_fast_host_syncs_per_iteration']}")
        # median of the interleaved rounds; the fastest rounds' ratio beside it where recorded
        best = f" ({r['speedup_min']:.2f})" if r.get("speedup_min") is not None else ""
        rows.append(f"| {r['device']} | {net['arch']} {'x'.join(map(str, net['shape']))}, {net['parameters']:,} params "
                    f"| {r['batch']} | {how} | {r['reference_images_per_s']:,.0f} images/s "
                    f"| {r['ipfm_fast_images_per_s']:,.0f} images/s | **{r['speedup']:.2f}**{best} | {peak} | {syncs} "
                    f"| [{r['date'][:10]}]({os.path.relpath(path, os.path.join(ROOT, base))}) |")
    return "\n".join(rows)


def profile_block(base):
    import glob

    parts = []
    for path in sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "*", "distill_profile.md"))):
        with open(path) as f:
            parts.append(f.read().strip() + f"\n\n([{os.path.relpath(path, ROOT)}]({os.path.relpath(path, os.path.join(ROOT, base))}))")
    return "\n\n".join(parts)


# benchmarks/bench_compat.py's ops: the call site each one times (original -> drop-in)
COMPAT_SITES = {
    "compat_pfgmpp_perturb": "pfgmpp `EDMLoss` perturbation: host Beta + CPU Gaussian -> `ipf.perturb(clip_beta=...)`",
    "compat_sample_noise": "pfgmpp-idmd `sample_noise`: CPU Beta -> device chi-square",
    "compat_pfgmpp_target": "pfgmpp reference-batch target: float64 [B, M, N+1] -> `ipf.field_target`",
    "compat_pfgmpp_edm_loss": "pfgmpp `EDMLoss(pfgmpp=True)`",
    "compat_sid_generator_loss": "SiD / pfgmpp-idmd `SID_EDMLoss.generator_loss`",
    "compat_sid_fake_loss": "SiD / pfgmpp-idmd `SID_EDMLoss.__call__` (fake loss)",
    "compat_rand_beta_prime": "pfgmpp `generate.py` prior (`rand_beta_prime`)",
}


def compat_block(base):
    """The drop-ins against the originals at their call sites: median and minimum over the
    interleaved rounds of each side, and the speedups by both statistics."""
    import glob

    rows = ["| call site | device | size | mode | original (median / min) | ipfm_fast.compat (median / min) "
            "| speedup by median | by min | rounds | source |", "|---|---|---|---|---|---|---|---|---|---|"]
    for op, site in COMPAT_SITES.items():
        for path in sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "*", f"{op}.json"))):
            with open(path) as f:
                run = json.load(f)
            device = run["device"]
            group = {}
            for r in run["rows"]:
                group.setdefault((r["size"], r["mode"]), {})[r["provider"]] = r
            for (size, mode), by in sorted(group.items()):
                orig, new = by.get("original"), by.get("ipfm_fast.compat")
                if not orig or not new:
                    continue
                threads = new.get("threads")  # CPU rows: the threads both sides ran on
                name = device.split(" (")[0]
                where = device if threads is None else f"{name} ({threads} thread{'s' * (threads != 1)})"
                backend = f", {new['backend']}" if new.get("backend") else ""
                rows.append(f"| {site} | {where}{backend} | {size} | {mode} | {orig['median_ms']:.3g} / "
                            f"{orig['min_ms']:.3g} ms | {new['median_ms']:.3g} / {new['min_ms']:.3g} ms "
                            f"| **{new['speedup_median']:.1f}x** | {new['speedup_min']:.1f}x | {new['rounds']} "
                            f"| [{run['date'][:10]}]({os.path.relpath(path, os.path.join(ROOT, base))}) |")
    return "\n".join(rows)


# (file, block) -> the text between <!-- block-table:begin --> and <!-- block-table:end -->
BLOCKS = {
    ("README.md", "demo"): demo_block,
    ("README.md", "perf"): lambda: summarize.table(summarize.load()),
    ("docs/guide.md", "study"): lambda: _tables(_read("docs/study/study.md")),
    ("docs/guide.md", "teacher"): lambda: _tables(_read("docs/results/teacher_digits.md")),
    ("docs/quality.md", "noise"): lambda: _read("docs/results/metric_noise.md").strip(),
    ("docs/quality.md", "recipe"): lambda: _read("docs/results/recipe.md").strip(),
    ("docs/quality.md", "study"): lambda: _tables(_read("docs/study/study.md")),
    ("docs/performance.md", "e2e"): lambda: e2e_block("docs"),
    ("docs/performance.md", "profile"): lambda: profile_block("docs"),
    ("docs/compat.md", "compat"): lambda: compat_block("docs"),
}
FILES = sorted({f for f, _ in BLOCKS})


def render(path, text):
    for (where, name), make in BLOCKS.items():
        if where != path:
            continue
        begin, end = f"<!-- {name}-table:begin -->", f"<!-- {name}-table:end -->"
        if begin not in text or end not in text:
            raise SystemExit(f"{path} has no {begin} ... {end} block")
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{begin}\n{make()}\n{end}{tail}"
    return text


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a file is out of date")
    args = parser.parse_args()
    stale = []
    for path in FILES:
        old = _read(path)
        new = render(path, old)
        if new != old:
            stale.append(path)
            if not args.check:
                with open(os.path.join(ROOT, path), "w", encoding="utf-8") as f:
                    f.write(new)
    if args.check and stale:
        print(f"out of date: {', '.join(stale)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
