"""What the CPU training loops' host-memory policy (ipfm_fast.train.host_memory) changes:
minor page faults and time per eager e2e iteration with and without keep_freed (one
process per variant, alternating), and torch's fused Adam over a network's worth of flat
buffers on 4 KiB pages against transparent huge pages, caches flushed before each call
(interleaved rounds).

    python benchmarks/bench_host_memory.py      # -> benchmarks/results/<device>/host_memory.json, .md
"""

import argparse
import datetime
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _env import device_name, device_slug, versions, write_result  # noqa: E402
from ipfm_fast.train import host_memory  # noqa: E402

ADAM_ELEMENTS = 528_384  # the e2e MLP's parameters


def child_faults(warmup, iters):
    import e2e
    from ipfm_fast.train import distill

    p = argparse.ArgumentParser()
    e2e.add_setup_args(p)
    args = p.parse_args(["--compile", "off"])
    device, teacher, cfg = e2e.setup(args)
    print(host_memory.keep_freed(), file=sys.stderr)
    state = e2e.ipfm_fast_state(teacher, cfg, args, device)
    for step in range(warmup):
        distill.train_step(state, step)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    for step in range(warmup, warmup + iters):
        distill.train_step(state, step)
    ms = (time.perf_counter() - t0) / iters * 1e3
    print(f"{(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / iters} {ms}")


def faults(alternations, warmup, iters):
    out = {"keep": [], "default": []}
    for _ in range(alternations):
        for policy in out:
            env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
            env[host_memory.ENV] = policy
            r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", str(warmup), str(iters)],
                               env=env, capture_output=True, text=True, check=True)
            f, ms = (float(v) for v in r.stdout.split())
            out[policy].append({"faults_per_iteration": f, "ms_per_iteration": ms})
    return out


def adam(rounds, calls):
    junk = torch.empty(64 << 20, dtype=torch.uint8)  # larger than the caches: touched before each call
    grads = torch.randn(ADAM_ELEMENTS) * 1e-3
    steps = torch.zeros(())
    buffers = {"4 KiB pages": [torch.zeros(ADAM_ELEMENTS) for _ in range(3)],
               "huge pages": [host_memory.zeros(ADAM_ELEMENTS, torch.float32, "cpu") for _ in range(3)]}
    times = {k: [] for k in buffers}
    for _ in range(rounds):
        for name, (p, m, v) in buffers.items():
            for _ in range(calls):
                junk.add_(1)
                t0 = time.perf_counter()
                torch._fused_adam_([p], [grads], [m], [v], [], [steps], lr=1e-4, beta1=0.0, beta2=0.999,
                                   weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False, grad_scale=None,
                                   found_inf=None)
                times[name].append((time.perf_counter() - t0) * 1e6)
    return {k: {"min_us": min(v), "median_us": statistics.median(v)} for k, v in times.items()}


def markdown(r):
    lines = [f"Host memory on {r['device']} ({r['date'][:10]}; {r['host_memory']}).", "",
             "| eager e2e iteration | minor page faults per iteration (min / median) | ms per iteration (min / median) |",
             "|---|---|---|"]
    for policy, runs in r["faults"].items():
        f = [x["faults_per_iteration"] for x in runs]
        ms = [x["ms_per_iteration"] for x in runs]
        label = "freed memory kept (keep_freed)" if policy == "keep" else "glibc's defaults"
        lines.append(f"| {label} | {min(f):.1f} / {statistics.median(f):.1f} | {min(ms):.2f} / "
                     f"{statistics.median(ms):.2f} |")
    lines += ["", f"| torch fused Adam, {ADAM_ELEMENTS:,} float32, caches flushed | min us | median us |", "|---|---|---|"]
    for name, t in r["adam"].items():
        lines.append(f"| {name} | {t['min_us']:.0f} | {t['median_us']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_faults(int(argv[1]), int(argv[2]))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--alternations", type=int, default=3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"device": device_name(), "host_memory": host_memory.describe(),
              "faults": faults(args.alternations, args.warmup, args.iters), "adam": adam(args.rounds, args.calls),
              "versions": versions(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python benchmarks/bench_host_memory.py " + " ".join(argv)}
    write_result(result, args.out or os.path.join(HERE, "results", device_slug(), "host_memory.json"), markdown(result))
    return result


if __name__ == "__main__":
    main()
