"""The eager distillation step's parts by the clock alone (profile_step.py's timing) for
this tree against older checkouts, each in its own processes, the processes alternating
so that every variant sees the same minutes of a drifting machine.

    git worktree add ../ipfm-384dfd4 384dfd4
    (cd ../ipfm-384dfd4 && ../main/.venv/bin/python setup.py build_ext --inplace)
    python benchmarks/compare_checkouts.py --checkout 384dfd4=../ipfm-384dfd4 --default-memory

Every variant runs this tree's benchmark code with the library of its checkout (by
PYTHONPATH); "now" is this tree, "now, default memory" this tree without the host-memory
policy (``--default-memory``). Prints, per part, the min and median over the processes
(each the median of its rounds) and the non-network time's change against the first
checkout, paired by alternation; writes benchmarks/results/<device>/checkouts.json and .md.
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PARTS = ["ipfm_fast ops", "optimizer + EMA", "rest", "non-network", "networks", "backward (networks and ops)",
         "iteration"]


_OWN_OPTIONS = {"--checkout": 1, "--alternations": 1, "--out": 1, "--default-memory": 0, "--compile": 1,
                "--iters": 1, "--rounds": 1, "--warmup": 1}


def _setup_argv(argv):
    """The network/batch options of ``argv`` (e2e.add_setup_args) for the child processes."""
    out, skip = [], 0
    for a in argv:
        if skip:
            skip -= 1
            continue
        key = a.split("=", 1)[0]
        if key in _OWN_OPTIONS:
            skip = 0 if "=" in a else _OWN_OPTIONS[key]
            continue
        out.append(a)
    return out


def child(args):
    sys.path.insert(0, HERE)
    import e2e
    import profile_step
    from ipfm_fast.train import distill

    device, teacher, cfg = e2e.setup(args)
    if profile_step.host_memory is not None and not args.no_keep:
        profile_step.host_memory.keep_freed()
    state = e2e.ipfm_fast_state(teacher, cfg, args, device)
    for step in range(args.warmup):
        distill.train_step(state, step)
    parts = profile_step.clock_parts(state, args.warmup, args.iters, args.rounds)
    parts["non-network"] = parts["ipfm_fast ops"] + parts["optimizer + EMA"] + parts["rest"]
    print(json.dumps(parts))


def main(argv=None):
    sys.path.insert(0, HERE)
    import e2e
    from _env import device_name, device_slug, versions, write_result

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    e2e.add_setup_args(p)
    p.add_argument("--checkout", action="append", default=[], metavar="NAME=DIR",
                   help="an older checkout with its extension built (repeatable; the first is the baseline)")
    p.add_argument("--default-memory", action="store_true", help="also this tree without the host-memory policy")
    p.add_argument("--alternations", type=int, default=12)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-keep", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    if args.compile != "off":
        p.error("compares the eager step: pass --compile off")
    variants = []
    for spec in args.checkout:
        name, sep, folder = spec.partition("=")
        if not sep or not os.path.isdir(os.path.join(folder, "ipfm_fast")):
            p.error(f"--checkout {spec!r}: expected NAME=DIR with DIR/ipfm_fast")
        variants.append((name, os.path.abspath(folder), False))
    variants.append(("now", ROOT, False))
    if args.default_memory:
        variants.append(("now, default memory", ROOT, True))
    setup_argv = _setup_argv(argv if argv is not None else sys.argv[1:])
    runs = {name: [] for name, _, _ in variants}
    for i in range(args.alternations):
        for name, folder, no_keep in variants:
            env = dict(os.environ, PYTHONPATH=folder)
            cmd = [sys.executable, os.path.abspath(__file__), "--child", "--compile", "off", "--iters", str(args.iters),
                   "--rounds", str(args.rounds), "--warmup", str(args.warmup)] + (["--no-keep"] if no_keep else [])
            cmd += setup_argv
            out = subprocess.run(cmd, env=env, cwd="/", capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{name}: the child failed:\n{out.stderr[-2000:]}")
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"alternation {i + 1}/{args.alternations}", file=sys.stderr)
    base = variants[0][0]
    table = {name: {k: (min(r[k] for r in rs), statistics.median(r[k] for r in rs)) for k in PARTS}
             for name, rs in runs.items()}
    paired = {}
    for name in runs:
        if name != base:
            ratios = [n["non-network"] / b["non-network"] - 1 for b, n in zip(runs[base], runs[name])]
            paired[name] = (statistics.median(ratios), min(ratios), max(ratios))
    result = {"device": device_name(), "variants": [[n, f] for n, f, _ in variants], "runs": runs, "table": table,
              "paired_non_network_change": paired, "alternations": args.alternations, "iters": args.iters,
              "rounds": args.rounds, "versions": versions(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python benchmarks/compare_checkouts.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    write_result(result, args.out or os.path.join(HERE, "results", device_slug(), "checkouts.json"), markdown(result))
    return result


def markdown(r):
    names = [n for n, _ in r["variants"]]
    lines = [f"The eager step's parts by the clock alone on {r['device']} ({r['date'][:10]}): {r['alternations']} "
             f"alternations of one process per variant, {r['rounds']} rounds of {r['iters']} iterations each; "
             "ms per iteration, min / median over the processes.", "",
             "| part | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for k in PARTS:
        lines.append(f"| {k} | " + " | ".join("{:.2f} / {:.2f}".format(*r["table"][n][k]) for n in names) + " |")
    lines.append(f"| non-network against {names[0]}, paired (median, range) | | " + " | ".join(
        "{:+.1%} ({:+.1%} .. {:+.1%})".format(*r["paired_non_network_change"][n]) for n in names[1:]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
