"""Run by tests/test_ddp.py under torchrun: `ipfm-fast distill ARGS` in this process (with
``fail`` as the first argument: a planted error at iteration 2), then write the outcome and
the names of the threads still alive to $PROBE_DIR/rank<RANK>.txt (one file per rank: two
processes printing to one pipe can interleave). A collective's worker thread alive at interpreter shutdown is
what made ranks abort at exit (std::terminate) one run in three."""

import os
import sys

from ipfm_fast.cli import main
from ipfm_fast.train import distill as dl

args = sys.argv[1:]
if args[0] == "fail":
    args = args[1:]
    real_step = dl.train_step

    def failing_step(state, step):
        if step == 2:
            raise RuntimeError("planted failure")
        return real_step(state, step)

    dl.train_step = failing_step
try:
    rc = main(args)
except RuntimeError as err:
    rc = f"raised {err}"
threads = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
with open(os.path.join(os.environ["PROBE_DIR"], f"rank{os.environ['RANK']}.txt"), "w") as f:
    f.write(f"{rc}; threads {threads}\n")
