"""Turns benchmarks/results/<device>/<op>.json into the README's performance table.

    python benchmarks/summarize.py    # print the table (scripts/update_readme.py puts it in README.md)

For each op, device, size and mode it reports the best fused backend's time (median, and the
minimum where the rows were timed in interleaved rounds) and its speedup over every other
provider measured in the same run (Triton rows that ran in the
interpreter are left out: they are not speed measurements).
"""

import glob
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
FUSED = ("cuda", "triton", "cpu")


def load():
    runs = []
    for path in sorted(glob.glob(os.path.join(HERE, "results", "*", "*.json"))):
        with open(path) as f:
            run = json.load(f)
        if "rows" in run:  # op microbenchmarks (distill_step.json is the end-to-end result)
            runs.append((os.path.relpath(path, os.path.dirname(HERE)), run))
    return runs


def table(runs):
    lines = ["| op | device | size | mode | fused backend | time | throughput | speedup over | source |",
             "|---|---|---|---|---|---|---|---|---|"]
    for path, run in runs:
        rows = [r for r in run["rows"] if not (run.get("triton_interpreter") and r["provider"] == "triton")]
        keys = sorted({(r["size"], r["mode"]) for r in rows})
        for size, mode in keys:
            group = [r for r in rows if r["size"] == size and r["mode"] == mode]
            fused = [r for r in group if r["provider"] in FUSED]
            if not fused:
                continue
            best = min(fused, key=lambda r: r["median_ms"])
            # "cpu-avx2", "cpu-generic": the CPU backend on a narrower instruction-set path, not a competitor
            others = [r for r in group if r["provider"] not in FUSED and not r["provider"].startswith("cpu-")]
            # rows timed in interleaved rounds carry min_ms too: the speedup by median (and by min)
            speedups = ", ".join(
                f"{r['provider']} {r['median_ms'] / best['median_ms']:.1f}x"
                + (f" (min {r['min_ms'] / best['min_ms']:.1f}x)" if "min_ms" in r and "min_ms" in best else "")
                for r in others)
            when = f"{best['median_ms']:.3g} ms" + (f" (min {best['min_ms']:.3g})" if "min_ms" in best else "")
            if "GB/s" in best:
                rate = f"{best['GB/s']:.1f} GB/s"
                if "copy_bw_fraction" in best:
                    rate += f" ({100 * best['copy_bw_fraction']:.0f}% of copy)"
            elif "TFLOP/s" in best:
                rate = f"{best['TFLOP/s']:.2f} TFLOP/s"
            else:
                rate = ""
            device = run["device"]
            lines.append(f"| {run['op']} | {device} | {size} | {mode} | {best['provider']} | "
                         f"{when} | {rate} | {speedups} | [{run['date'][:10]}]({path}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(load()))
