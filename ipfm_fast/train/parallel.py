"""Several processes (``torchrun``): this process's place in the run, joining the process
group and leaving it on every exit path, and the few collectives the loops make outside
DDP's gradient all-reduce."""

import faulthandler
import importlib
import inspect
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ipfm_fast.errors import InvalidInput
from ipfm_fast.train import common


EXIT_WATCHDOG_S = 90


def exit_watchdog_seconds():
    """IPFM_FAST_EXIT_WATCHDOG_S (default 90; 0: off): how long a process of a distributed
    run may take to tear down and exit once its work is done."""
    raw = os.environ.get("IPFM_FAST_EXIT_WATCHDOG_S", str(EXIT_WATCHDOG_S))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds < 1e6:
        raise InvalidInput(f"IPFM_FAST_EXIT_WATCHDOG_S must be a number of seconds in [0, 1e6), got {raw!r}")
    return seconds


def arm_exit_watchdog(seconds=None):
    """If this process is still alive ``seconds`` from now, print every thread's stack to
    stderr and exit with code 1 (faulthandler, which stays armed through interpreter
    shutdown), so that a teardown that hangs ends a torchrun job with the stacks that show
    where, instead of keeping it waiting forever. Replaces any faulthandler timer."""
    if seconds is None:
        try:
            seconds = exit_watchdog_seconds()
        except InvalidInput:  # refused when the run started (init_distributed); a teardown does not raise
            seconds = EXIT_WATCHDOG_S
    if seconds > 0:
        faulthandler.dump_traceback_later(seconds, exit=True, file=sys.__stderr__)


@dataclass
class Dist:
    """This process's place in the run: rank, world size, and the distributed backend."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self):
        return self.backend is not None

    @property
    def main(self):
        return self.rank == 0


def init_distributed(device_spec):
    """Join the process group when started by torchrun (WORLD_SIZE > 1): nccl for CUDA,
    gloo for CPU; each CUDA process uses cuda:LOCAL_RANK. Returns (Dist, torch.device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = common.resolve_device(device_spec)
    if world <= 1:
        return Dist(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    exit_watchdog_seconds()  # a bad value is refused now, not at the end of the run
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise InvalidInput(f"this is process {local} of its node (LOCAL_RANK) but the node has "
                               f"{torch.cuda.device_count()} CUDA device(s): start at most that many processes "
                               f"per node (torchrun --nproc_per_node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        # torch.distributed.nn.functional's collectives default to `group=group.WORLD`, a
        # default evaluated at import. DDP imports that module (through torch._dynamo); if
        # that happens after init_process_group, ten function defaults keep the process group
        # alive forever: destroy_process_group cannot free it, its gloo worker threads outlive
        # the interpreter, and one still releasing a collective's tensors at exit needs the
        # GIL during finalization -> std::terminate (SIGABRT). Importing it first makes the
        # defaults None. (importlib: `import torch.distributed.nn` here would make `torch` a
        # local name of this function.)
        importlib.import_module("torch.distributed.nn")
        dist.init_process_group(backend=backend)
    return Dist(rank=rank, world=world, local_rank=local, backend=backend), device


class DistributedRun:
    """``with DistributedRun(device_spec) as (dctx, device):`` joins the process group when
    started by torchrun (:func:`init_distributed`) and tears it down on every exit path,
    so that no collective's worker thread is alive when the interpreter shuts down.

    Tearing down means freeing the process group, which joins its threads: first the
    run's own references to it (DDP modules, reducers) must be gone. On a normal return
    they are garbage once the loop's frame ends (``gc.collect()`` breaks module cycles); when
    an exception propagates its traceback keeps those frames alive, so their locals are
    cleared first (the traceback still shows every line)."""

    def __init__(self, device_spec):
        self.device_spec = device_spec
        self.dctx = None

    def __enter__(self):
        self.dctx, device = init_distributed(self.device_spec)
        return self.dctx, device

    def __exit__(self, exc_type, exc, tb):
        if self.dctx is not None and self.dctx.enabled and dist.is_initialized():
            import gc
            import traceback

            if tb is not None:
                traceback.clear_frames(tb)
            arm_exit_watchdog()
            gc.collect()
            dist.destroy_process_group()
            faulthandler.cancel_dump_traceback_later()
        return False


def data_parallel(module, device):
    """``module`` under DDP without a per-forward buffer broadcast (the networks' only buffers
    are constants, identical on every process). torch >= 2.13 spells that
    ``forward_sync_buffers=False``; its deprecated ``broadcast_buffers=False`` warns on every
    wrap (and fails a run with warnings as errors), so the older spelling is kept for older torch."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return DDP(module, device_ids=ids, forward_sync_buffers=False)
    return DDP(module, device_ids=ids, broadcast_buffers=False)


def any_process(flag, dctx, device):
    """True on every process when ``flag`` is True on any (one all-reduce when distributed)."""
    if not dctx.enabled:
        return bool(flag)
    t = torch.full((1,), 1.0 if flag else 0.0, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
