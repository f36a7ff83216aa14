"""Benchmark harness shared by every op's benchmarks.

Each test times every provider of one (op, size, mode) together with
:func:`time_providers` and records them with :func:`add_row`: on a CPU in
interleaved rounds (each round calls every provider once, the order reversed every other
round, so a neighbour's load slows all alike), each row keeping the median and the minimum
over the rounds; on CUDA do_bench per provider (median and min). At the end of the session every op's
rows go to ``benchmarks/results/<device>/<op>.json`` and ``.md`` with the device name,
versions and date, the speedup of each provider over the op's baseline provider at the
same size and mode, and on CUDA the fraction of the device-to-device copy bandwidth
measured in the same run.
"""

import datetime
import json
import os
import statistics
import time
from collections import defaultdict

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import ipfm_fast  # noqa: E402, F401  (imported before the benchmarks, with TRITON_INTERPRET set above)
from ipfm_fast import backends  # noqa: E402

from _env import device_name, device_slug, versions  # noqa: E402

# IPFM_BENCH_RESULTS_DIR: write elsewhere (gpu_check.sh --dry-run keeps the committed results untouched)
RESULTS_DIR = os.environ.get("IPFM_BENCH_RESULTS_DIR") or os.path.join(os.path.dirname(__file__), "results")
_rows = defaultdict(list)  # op -> [row]
_baselines = {}  # op -> provider the speedups are relative to
_copy_bandwidth = {}


def copy_bandwidth_gbs():
    """Device-to-device copy bandwidth (bytes read + written) of a 1 GiB buffer, GB/s."""
    if "cuda" not in _copy_bandwidth:
        import triton.testing

        src = torch.empty(2**28, dtype=torch.float32, device="cuda").normal_()
        dst = torch.empty_like(src)
        ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
        _copy_bandwidth["cuda"] = 2 * src.numel() * 4 / (ms * 1e-3) / 1e9
        del src, dst
    return _copy_bandwidth["cuda"]


def set_baseline(op, provider):
    _baselines[op] = provider


ROUNDS = int(os.environ.get("IPFM_BENCH_ROUNDS", 10))


def seconds(fn):
    """Wall clock of one call (around a CUDA synchronize on a GPU)."""
    if HAS_CUDA:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if HAS_CUDA:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved(fns, rounds=None, warmup=2):
    """{provider: [seconds per round]}: ``warmup`` calls each, then ``rounds`` rounds
    (IPFM_BENCH_ROUNDS, default 10) that call every provider once, the order reversed every
    other round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(max(1, ROUNDS if rounds is None else rounds)):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(seconds(fns[name]))
    return times


def time_providers(fns, device="cpu", rounds=None):
    """{provider: (median_s, min_s, rounds)} of every provider of one (op, size, mode): CPU in
    interleaved rounds, CUDA by do_bench (events) per provider."""
    if torch.device(device).type == "cuda":
        import triton.testing

        out = {}
        for name, fn in fns.items():
            fn()
            med, low = (triton.testing.do_bench(fn, return_mode=m) * 1e-3 for m in ("median", "min"))
            out[name] = (med, low, None)
        return out
    return {name: (statistics.median(ts), min(ts), len(ts)) for name, ts in interleaved(fns, rounds).items()}


def add_row(*, op, size, provider, mode="forward", median_s, min_s, rounds=None, nbytes=None, flops=None,
            device="cpu", **extra):
    """One result row: the median (and, where measured, the min and the number of rounds),
    the bandwidth or FLOP rate from the median, and any extra fields."""
    row = {"op": op, "size": size, "provider": provider, "mode": mode, "median_ms": median_s * 1e3}
    if min_s is not None:
        row["min_ms"] = min_s * 1e3
    if rounds:
        row["rounds"] = rounds
    if nbytes:
        row["GB/s"] = nbytes / median_s / 1e9
        if torch.device(device).type == "cuda":
            row["copy_bw_fraction"] = row["GB/s"] / copy_bandwidth_gbs()
    if flops:
        row["TFLOP/s"] = flops / median_s / 1e12
    row.update(extra)
    _rows[op].append(row)
    return row


def loadavg():
    """The 1-minute load average (None where /proc/loadavg is missing): a busy machine's rows say so."""
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except OSError:
        return None


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def pytest_sessionfinish(session, exitstatus):
    if not _rows:
        return
    out_dir = os.path.join(RESULTS_DIR, device_slug())
    os.makedirs(out_dir, exist_ok=True)
    meta = {
        "device": device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "backends": backends.report(),
        "triton_interpreter": backends.triton_interpreter(),
    }
    if HAS_CUDA:
        meta["copy_bandwidth_GBps"] = copy_bandwidth_gbs()
    for op, rows in _rows.items():
        path = os.path.join(out_dir, f"{op}.json")
        if os.path.exists(path):  # a partial run (-k ...) replaces only the rows it measured
            with open(path) as f:
                kept = json.load(f)["rows"]
            for r in rows:
                r.setdefault("measured", meta["date"])
            fresh = {(r["size"], r["provider"], r["mode"]) for r in rows}
            rows += [r for r in kept if (r["size"], r["provider"], r["mode"]) not in fresh]
        base = _baselines.get(op)
        if base:
            ref = {(r["size"], r["mode"]): r for r in rows if r["provider"] == base}
            for r in rows:
                b = ref.get((r["size"], r["mode"]))
                if b is not None:
                    r[f"speedup_vs_{base}"] = b["median_ms"] / r["median_ms"]
                    if "min_ms" in r and "min_ms" in b:
                        r[f"speedup_min_vs_{base}"] = b["min_ms"] / r["min_ms"]
        rows.sort(key=lambda r: (r["size"], r["mode"], r["median_ms"]))
        with open(os.path.join(out_dir, f"{op}.json"), "w") as f:
            json.dump({**meta, "op": op, "baseline": base, "rows": rows}, f, indent=2)
        cols = [c for c in rows[0].keys() if c != "op"]
        for r in rows:
            cols += [c for c in r if c not in cols and c != "op"]
        lines = [f"# {op} on {meta['device']}", "",
                 f"{meta['date']}; " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v), ""]
        if meta["triton_interpreter"]:
            lines += ["Triton rows ran in the interpreter (no GPU): correctness only, not speed.", ""]
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
        with open(os.path.join(out_dir, f"{op}.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
    print(f"\nbenchmark results written to {out_dir} at {time.strftime('%H:%M:%S')}")
