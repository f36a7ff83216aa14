"""Where the time of one ipfm_fast distillation iteration goes (torch.profiler): the
networks (forward and backward of G, the fake network and the teacher), the ipfm_fast ops
(perturbation, prior, both losses: forward and backward), the two optimizer updates with
the gradient check and the EMA, and everything else (the noise levels, the statistics,
Python and launch overhead between ops).

    python benchmarks/profile_step.py            # CPU: the e2e.py default network
    python benchmarks/profile_step.py --device cuda --arch unet --shape 3 32 32 --width 128 --batch 256

Same network flags as e2e.py. On CPU the shares are of the wall time of the profiled
iterations (the ops' own time is self CPU time on the calling thread; what no category
claims is "elsewhere"); the profiler's per-op cost inflates small ops several-fold, so on
CPU the report adds the same parts timed by the clock alone, without the profiler
(``--rounds`` rounds of ``--iters`` iterations, medians): the loop's ranges, every
``backward()`` call (the networks' and the ops' backward passes together), and the rest. On CUDA they are of the GPU's kernel time, and the report adds how
long the GPU sat idle within the iterations. Writes
benchmarks/results/<device>/distill_profile.json and .md.
"""

import argparse
import contextlib
import datetime
import statistics
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import e2e  # noqa: E402
from _env import device_name, device_slug, versions, write_result  # noqa: E402
from ipfm_fast.models import count_params  # noqa: E402
import ipfm_fast  # noqa: E402, F401  (registers every op Function in _op.FUNCTIONS)
from ipfm_fast.ops import _op  # noqa: E402
from ipfm_fast.train import distill  # noqa: E402

try:
    from ipfm_fast.train import host_memory  # noqa: E402
except ImportError:  # an older checkout run by PYTHONPATH (before/after comparisons)
    host_memory = None

LABEL = distill.PROFILE_LABEL  # the loop's own profiler ranges (distill.region)
CATEGORIES = ("networks", "ipfm_fast ops", "optimizer + EMA", "elsewhere")
# the autograd nodes of the ops' autograd.Functions (their backward passes run by the engine)
OP_NODES = tuple(f.__name__ + "Backward" for f in _op.FUNCTIONS)


def _boundary(event):
    """The category an event opens (a labelled range, or an autograd node run by the engine:
    an ipfm_fast op's or, for every other node, a network's), or None."""
    if event.name.startswith(LABEL):
        return event.name[len(LABEL):]
    if event.name.startswith("autograd::engine::evaluate_function:"):
        return "ipfm_fast ops" if any(node in event.name for node in OP_NODES) else "networks"
    return None


def category(event):
    """The category of the innermost boundary around an event ("elsewhere" if none)."""
    e = event
    while e is not None:
        found = _boundary(e)
        if found:
            return found
        e = e.cpu_parent
    return "elsewhere"


def breakdown(events, device, wall_us):
    """{category: microseconds}. CPU: the inclusive time of the outermost boundaries (so
    the Python inside a network's forward counts as the network's), the rest of the wall
    time "elsewhere". CUDA: the kernel time of the ops in each category."""
    times = dict.fromkeys(CATEGORIES, 0.0)
    for ev in events:
        if ev.device_type != torch.autograd.DeviceType.CPU:
            continue
        if device.type == "cuda":
            times[category(ev)] += ev.self_device_time_total
        elif _boundary(ev) and (ev.cpu_parent is None or category(ev.cpu_parent) == "elsewhere"):
            times[_boundary(ev)] += ev.cpu_time_total
    if device.type != "cuda":
        times["elsewhere"] = max(wall_us - sum(times.values()), 0.0)
    return times


@contextlib.contextmanager
def _clocked(totals):
    """While inside, the loop's ranges (distill.region) and every Tensor.backward call add
    their perf_counter seconds to ``totals`` (restored on exit)."""
    @contextlib.contextmanager
    def clock(name):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - t0

    region, backward = distill.region, torch.Tensor.backward

    def timed_backward(self, *args, **kwargs):
        with clock("backward (networks and ops)"):
            return backward(self, *args, **kwargs)

    distill.region, torch.Tensor.backward = clock, timed_backward
    try:
        yield
    finally:
        distill.region, torch.Tensor.backward = region, backward


def clock_parts(state, first, iters, rounds):
    """{part: median ms per iteration} over ``rounds`` rounds of ``iters`` iterations from
    step ``first``, by perf_counter alone (CPU): "networks" is their forward passes,
    "backward (networks and ops)" every backward() call, "rest" the iteration less the parts."""
    per_round = []
    for r in range(rounds):
        totals = {}
        with _clocked(totals):
            t0 = time.perf_counter()
            for step in range(first + r * iters, first + (r + 1) * iters):
                distill.train_step(state, step)
            wall = time.perf_counter() - t0
        parts = {k: v / iters * 1e3 for k, v in totals.items()}
        parts["rest"] = (wall - sum(totals.values())) / iters * 1e3
        parts["iteration"] = wall / iters * 1e3
        per_round.append(parts)
    return {k: statistics.median(p.get(k, 0.0) for p in per_round) for k in per_round[0]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    e2e.add_setup_args(p)
    p.add_argument("--iters", type=int, default=10, help="profiled iterations")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=9, help="CPU: rounds of --iters iterations timed by the clock alone")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/<device>/distill_profile.json)")
    args = p.parse_args(argv)
    device, teacher, cfg = e2e.setup(args)
    if device.type == "cpu" and host_memory is not None:
        host_memory.keep_freed()  # as ipfm-fast distill runs (older checkouts run by PYTHONPATH have none)
    state = e2e.ipfm_fast_state(teacher, cfg, args, device)
    for step in range(args.warmup):
        distill.train_step(state, step)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    sync()
    t0 = time.perf_counter()
    for step in range(args.warmup, args.warmup + args.iters):
        distill.train_step(state, step)
    sync()
    plain_ms = (time.perf_counter() - t0) / args.iters * 1e3

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        sync()
        t0 = time.perf_counter()
        for step in range(args.warmup + args.iters, args.warmup + 2 * args.iters):
            distill.train_step(state, step)
        sync()
        wall_us = (time.perf_counter() - t0) * 1e6
    times = breakdown(prof.events(), device, wall_us)
    clock = (clock_parts(state, args.warmup + 2 * args.iters, args.iters, args.rounds)
             if device.type == "cpu" and args.rounds > 0 else None)
    total = sum(times.values())
    shares = {k: v / total for k, v in times.items()}
    per_iter_ms = {k: share * plain_ms for k, share in shares.items()}  # the profiler slows every op down
    result = {
        "device": device_name(), "measure": "GPU kernel time" if device.type == "cuda" else "CPU wall time",
        "iteration_ms": plain_ms, "profiled_iteration_ms": wall_us / args.iters / 1e3,
        "shares": shares, "ms_per_iteration": per_iter_ms,
        "gpu_idle_share": (max(wall_us - total, 0.0) / wall_us if device.type == "cuda" else None),
        "clock_ms_per_iteration": clock,
        "network": {"arch": args.arch, "shape": list(args.shape), "parameters": count_params(teacher), "config": cfg},
        "batch": args.batch, "D": args.D, "precision": state.precision, "compiled": state.compiled,
        "channels_last": state.channels_last, "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "iterations": args.iters, "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/profile_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    write_result(result, args.out or os.path.join(HERE, "results", device_slug(), "distill_profile.json"), markdown(result))
    return result


def markdown(r):
    net = r["network"]
    lines = [f"One ipfm_fast distillation iteration on {r['device']}: {net['arch']} "
             f"{'x'.join(map(str, net['shape']))} ({net['parameters']:,} parameters), batch {r['batch']}, "
             f"{r['precision']}, {'compiled' if r['compiled'] else 'eager'}"
             f"{', channels_last' if r['channels_last'] else ''}; {r['iteration_ms']:.2f} ms per iteration "
             f"unprofiled ({r['date'][:10]}, torch {r['versions']['torch']}). Shares of {r['measure']} under "
             "the profiler:",
             "", "| part | share | ms per iteration (share x unprofiled time) |", "|---|---|---|"]
    for k in CATEGORIES:
        lines.append(f"| {k} | {100 * r['shares'][k]:.1f}% | {r['ms_per_iteration'][k]:.2f} |")
    if r.get("clock_ms_per_iteration"):
        c = r["clock_ms_per_iteration"]
        lines += ["", "Timed by the clock alone (no profiler; medians of rounds, ms per iteration):", "",
                  "| " + " | ".join(c) + " |", "|" + "---|" * len(c), "| " + " | ".join(f"{v:.2f}" for v in c.values())
                  + " |"]
    if r["gpu_idle_share"] is not None:
        lines += ["", f"The GPU was idle {100 * r['gpu_idle_share']:.1f}% of the profiled iterations' wall time."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
