"""Command line: ``ipfm-fast <command>`` (also ``python -m ipfm_fast <command>``).

Each command is a function ``cmd_<name>(args)`` plus an ``add_<name>(subparsers)`` that
declares its arguments; COMMANDS lists them in help order.
"""

import argparse
import json
import sys


def add_info(sub):
    p = sub.add_parser("info", help="versions, build flags, backends available and why not",
                       description="Print versions, build flags and which backend serves which device.")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def cmd_info(args):
    from ipfm_fast.info import collect, format_report

    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


COMMANDS = [("info", add_info, cmd_info)]


def build_parser():
    parser = argparse.ArgumentParser(prog="ipfm-fast", description="Fused kernels and training loops for IPFM.")
    sub = parser.add_subparsers(dest="command", metavar="command")
    sub.required = True
    for _, add, _ in COMMANDS:
        add(sub)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = dict((name, cmd) for name, _, cmd in COMMANDS)[args.command]
    try:
        return handler(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"ipfm-fast {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
