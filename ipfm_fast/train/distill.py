r"""IPFM distillation of a PFGM++ teacher into a one-step generator (``ipfm-fast distill``).

The generator is a denoiser evaluated once: :math:`G(z) = D_\theta(z, \sigma_{init})`,
:math:`z \sim \text{prior}(\sigma_{init}, D)`, :math:`\sigma_{init} = 2.5`. G and the fake
network :math:`f_\psi` start from the teacher's (EMA) weights. One iteration:

1. ``fake_steps`` times (the fake network learns the generator's field):
   :math:`x = G(z)` (no gradient), :math:`\ln\sigma \sim \mathcal N(-1.2, 1.2^2)`,
   :math:`y = \mathrm{perturb}(x, \sigma, D)`,
   :math:`\mathcal L_f = \tfrac1B\sum_i \lambda(\sigma_i)\lVert f_\psi(y_i, \sigma_i) - x_i\rVert^2`.
2. one generator update: :math:`x = G(z)`, :math:`t \sim U[0, t_{max}/1000]`, :math:`\sigma = \sigma(t)`
   (EDM :math:`\rho = 7` map), :math:`y = \mathrm{perturb}(x, \sigma, D)`, :math:`a = f_{teacher}(y, \sigma)`,
   :math:`b = f_\psi(y, \sigma)` with both networks' parameters frozen (the gradient still
   flows through y to x), :math:`\mathcal L_G = \tfrac1B\sum_i w_i \sum_n (a - b)((a - x) - \alpha(a - b))`,
   :math:`w_i = 1/\mathrm{mean}_n|x_i - a_i|` (no gradient); rows with NaN/Inf are masked.

Adam with betas (0, 0.999) for both networks, an EMA of G (what samples well). D = inf
is Score identity Distillation (SiD).

**Randomness** is a pure function of (seed, step, phase, micro-batch index): every
micro-batch draws from its own ``torch.Generator`` seeded by :func:`draw_seed`. So

- a run with P processes x A micro-batches each equals one process with P*A micro-batches
  (``torchrun``: DistributedDataParallel, gloo on CPU, nccl on CUDA; the micro-batch
  size ``micro_batch`` is part of the recipe, the world size is not);
- ``--resume`` needs no random state and continues bit-identically on CPU, with any
  world size.

**Robustness**: SIGTERM/SIGINT finish the current iteration, write a checkpoint and
return; an update whose loss or gradient is not finite (or whose rows are all masked) is
skipped on the device (fused Adam's ``found_inf``; the EMA is masked alike) and reported
with a warning at the next log line, and ``max_bad_steps`` skipped updates in a row stop
the run with a message. The EMA generator is scored every ``eval_every`` iterations (1 NFE,
FD against the *training* split, so the test split stays for the final report) and the
best one is kept as ``generator.safetensors``.

**Throughput**: a steady-state iteration never waits for the device. Losses, gradient
norms and the masked/skipped counts are summed on the device (:class:`StepStats`) and
read once per ``log_every`` iterations; with several processes the decision to stop is
all-reduced only then. bf16 autocast on CUDA, fused Adam, ``compile`` (torch.compile of
the networks, default on CUDA), ``channels_last`` (conv networks, default on CUDA) and
``cuda_graph`` (:class:`GraphedStep`: the whole iteration replayed as one CUDA graph).

Run folder (``out``): ``config.json``, ``checkpoint.safetensors`` (resume state),
``generator.safetensors`` (best EMA generator; a denoiser file whose metadata records
``sigma_init``), ``generator_last.safetensors`` (EMA at the end), ``log.jsonl``,
``summary.json``.

The loop is split into :func:`fake_step`, :func:`generator_step` and :func:`train_step`
(one iteration) over a :class:`DistillState`, so a faster step can replace one piece.
"""

import contextlib
import copy
import dataclasses
import functools
import hashlib
import importlib
import math
import os
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

import ipfm_fast as ipf
from ipfm_fast import checkpoint as ckpt
from ipfm_fast._files import check_writable
from ipfm_fast.data import save_grid
from ipfm_fast.errors import InvalidInput, TrainingDiverged
from ipfm_fast.models import build_denoiser, count_params, describe
from ipfm_fast.reference import sample_sigma_distill, sample_sigma_train
from ipfm_fast.train import common

# The fused IPFM losses; the same names exist in ipfm_fast.reference, so
# `_ops = reference` runs the pure-PyTorch spec instead.
_ops = ipf

GRID_SAMPLES = 100  # images in a run folder's samples.png
# What --resume may change: the budget, the device and the outputs; the recipe comes from the checkpoint.
RESUMABLE = ("steps", "time_budget", "device", "precision", "threads", "compile", "channels_last", "cuda_graph",
             "checkpoint_every", "log_every", "eval_every", "eval_samples", "out", "max_bad_steps")
FAKE_PHASE, GEN_PHASE = 0, 1000  # phase ids of draw_seed: fake update k uses FAKE_PHASE + k
SWITCHES = ("auto", "on", "off")


def _switch(value, auto):
    return auto if value == "auto" else value == "on"


@dataclass
class DistillConfig:
    """Every setting of a distillation run (saved as config.json). The defaults are the
    tuned digits recipe (the `make demo` one): see docs/demo/."""

    teacher: str = "runs/teacher"
    out: str = "runs/distill"
    data: str | None = None  # evaluation data (default: the teacher's)
    D: float | None = None  # default: the teacher's
    sigma_init: float = 2.5
    alpha: float = 1.0
    fake_steps: int = 1
    steps: int = 2000
    time_budget: float | None = None  # seconds of training; stop earlier when reached
    batch: int = 256  # global batch (all processes, all micro-batches)
    micro_batch: int | None = None  # rows per micro-batch (default: batch / world size)
    lr: float = 1e-4
    lr_fake: float | None = None  # default: lr
    beta2: float = 0.999
    eps: float = 1e-8
    ema: float = 0.995  # with the EMA class's warm-up: beta = min(0.995, (1 + s) / (10 + s))
    grad_clip: float = 0.0  # 0: off
    t_max: float = 800.0
    p_mean: float = -1.2
    p_std: float = 1.2
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    threads: str = "auto"
    compile: str = "auto"  # torch.compile the networks: auto = on CUDA, off on CPU
    channels_last: str = "auto"  # conv networks in channels_last memory: auto = on CUDA
    cuda_graph: bool = False  # capture the whole iteration in a CUDA graph (CUDA, one process)
    checkpoint_every: int = 500
    log_every: int = 10
    eval_every: int = 50  # iterations between 1-NFE scores of the EMA generator (0: off)
    eval_samples: int | None = 5000  # None: the training split's size
    eval_seed: int = 1000
    max_bad_steps: int = 10
    test_fraction: float = 0.1
    model: dict = field(default_factory=dict)  # filled in: the teacher's model config

    def validate(self):
        if self.D is not None and not (isinstance(self.D, (int, float)) and self.D > 0):
            raise InvalidInput(f"--D must be a positive number or inf, got {self.D}")
        for name in ("steps", "batch", "fake_steps", "log_every", "checkpoint_every", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise InvalidInput(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.micro_batch is not None and (self.micro_batch < 1 or self.batch % self.micro_batch):
            raise InvalidInput(f"--micro-batch ({self.micro_batch}) must divide --batch ({self.batch})")
        if self.lr <= 0 or (self.lr_fake is not None and self.lr_fake <= 0):
            raise InvalidInput(f"--lr and --lr-fake must be > 0, got {self.lr}, {self.lr_fake}")
        if not 0 <= self.ema < 1:
            raise InvalidInput(f"--ema must be in [0, 1), got {self.ema}")
        if not self.sigma_init > 0:
            raise InvalidInput(f"--sigma-init must be > 0, got {self.sigma_init}")
        if not 0 < self.t_max <= 1000:
            raise InvalidInput(f"--t-max must be in (0, 1000], got {self.t_max}")
        if self.eval_every < 0 or (self.eval_samples is not None and self.eval_samples < 1):
            raise InvalidInput("--eval-every must be >= 0 and --eval-samples >= 1")
        if self.time_budget is not None and self.time_budget <= 0:
            raise InvalidInput(f"--time-budget must be > 0 seconds, got {self.time_budget}")
        if not isinstance(self.cuda_graph, bool):
            raise InvalidInput(f"cuda_graph must be True or False, got {self.cuda_graph!r}")
        for name in ("compile", "channels_last"):
            if getattr(self, name) not in SWITCHES:
                raise InvalidInput(f"--{name.replace('_', '-')} must be one of {SWITCHES}, got {getattr(self, name)!r}")
        return self

    def to_json(self):
        d = dataclasses.asdict(self)
        d["D"] = None if self.D is None else ckpt._encode_D(float(self.D))
        return d

    @classmethod
    def from_json(cls, d):
        d = dict(d)
        if d.get("D") is not None:
            d["D"] = ckpt.decode_D(d["D"])
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# --------------------------------------------------------------------------------------
# randomness and processes
# --------------------------------------------------------------------------------------


def draw_seed(seed, step, phase, micro):
    """63-bit seed of the draws of micro-batch ``micro`` (global index) in ``phase`` of
    iteration ``step``: a hash, so nearby keys give unrelated streams."""
    h = hashlib.blake2b(f"ipfm-distill:{seed}:{step}:{phase}:{micro}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & (2**63 - 1)


def micro_generator(device, seed, step, phase, micro):
    return torch.Generator(device=device).manual_seed(draw_seed(seed, step, phase, micro))


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
            gc.collect()
            dist.destroy_process_group()
        return False


def _any(flag, dctx, device):
    """True on every process when ``flag`` is True on any (one all-reduce when distributed)."""
    if not dctx.enabled:
        return bool(flag)
    t = torch.full((1,), 1.0 if flag else 0.0, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


# --------------------------------------------------------------------------------------
# state
# --------------------------------------------------------------------------------------


@dataclass
class DistillState:
    """Everything one iteration touches. ``generator`` / ``fake`` run the forward passes
    that train G and the fake network (DDP-wrapped when distributed, compiled when asked);
    ``fake_fwd`` runs the frozen fake network of the generator step; ``gen_net`` /
    ``fake_net`` are the plain modules (parameters, EMA, checkpoints)."""

    cfg: DistillConfig
    teacher: torch.nn.Module
    gen_net: torch.nn.Module
    fake_net: torch.nn.Module
    generator: torch.nn.Module
    fake: torch.nn.Module
    fake_fwd: torch.nn.Module
    ema: common.EMA
    opt_g: torch.optim.Optimizer
    opt_f: torch.optim.Optimizer
    D: float
    shape: list
    device: torch.device
    precision: str
    dctx: Dist
    accum: int  # micro-batches per process per iteration
    micro: int  # rows per micro-batch
    compiled: bool = False
    channels_last: bool = False
    graphed: bool = False  # iterations run through GraphedStep
    teacher_meta: dict = field(default_factory=dict)  # what the teacher's file records (D, data, ...)
    _generators: dict = field(default_factory=dict)
    capturing: bool = False  # inside CUDA-graph capture: the generators are seeded before each replay

    def __post_init__(self):
        self.gen_params = [p for p in self.gen_net.parameters() if p.requires_grad]
        self.fake_params = [p for p in self.fake_net.parameters() if p.requires_grad]
        # 1 - beta(step) of the EMA as a device value (a graph replays it; eager fills it too)
        self.ema_weight = torch.zeros((), device=self.device) if self.graphed else None

    def autocast(self):
        return common.autocast(self.device, self.precision, cache=not self.graphed)

    def micro_indices(self):
        """Global indices of this process's micro-batches."""
        return [self.dctx.rank * self.accum + j for j in range(self.accum)]

    def rng(self, step, phase, micro):
        """The generator of micro-batch ``micro`` in ``phase`` of iteration ``step`` (as
        :func:`micro_generator`): one cached torch.Generator per (phase, micro), reseeded."""
        g = self._generators.get((phase, micro))
        if g is None:
            g = self._generators[(phase, micro)] = torch.Generator(device=self.device)
        return g if self.capturing else g.manual_seed(draw_seed(self.cfg.seed, step, phase, micro))

    def draw_keys(self):
        """The (phase, micro-batch) of every generator one iteration of this process uses."""
        phases = [FAKE_PHASE + k for k in range(self.cfg.fake_steps)] + [GEN_PHASE]
        return [(phase, micro) for phase in phases for micro in self.micro_indices()]

    def _prior(self, g):
        return ipf.sample_prior((self.micro, *self.shape), self.cfg.sigma_init, self.D, device=self.device,
                                dtype=torch.float32, generator=g)


def _sync_context(module, last):
    """DDP's no_sync for every micro-batch but the last (gradients all-reduced once)."""
    module = getattr(module, "_orig_mod", module)  # torch.compile's wrapper
    if isinstance(module, torch.nn.parallel.DistributedDataParallel) and not last:
        return module.no_sync()
    return contextlib.nullcontext()


def _grad_norm(params, device):
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=device)
    return torch.nn.utils.get_total_norm(grads, foreach=True)  # one call, not one per tensor


def _finish_update(state, params, opt, loss, masked_all=None):
    """Clip and step, or skip, without a host sync: fused Adam skips the update on the
    device (its ``found_inf``) when the loss or the gradient norm is not finite or every
    row was masked, on every process alike. Returns (skipped: 0-dim bool tensor, gradient
    norm: 0-dim tensor)."""
    norm = _grad_norm(params, state.device)
    bad = ~(torch.isfinite(loss) & torch.isfinite(norm))
    if masked_all is not None:
        bad = bad | masked_all
    if state.dctx.enabled:  # the loss differs between processes (the all-reduced gradient does not)
        flag = bad.float()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        bad = flag > 0
    if state.cfg.grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, state.cfg.grad_clip, norm)
    opt.found_inf = bad.float()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return bad, norm


def fake_backward(state, step, k=0):
    """Gradients of the fake loss (fake update ``k`` of iteration ``step``) accumulated
    into the fake network, over this process's micro-batches (all-reduced by DDP on the
    last one). Returns the mean loss (a 0-dim tensor)."""
    cfg = state.cfg
    total = torch.zeros((), device=state.device)
    for j, micro in enumerate(state.micro_indices()):
        g = state.rng(step, FAKE_PHASE + k, micro)
        z = state._prior(g)
        with torch.no_grad(), state.autocast():
            x = state.generator(z, cfg.sigma_init).float()
        sigma = sample_sigma_train(state.micro, p_mean=cfg.p_mean, p_std=cfg.p_std, device=state.device, generator=g)
        y = ipf.perturb(x, sigma, state.D, generator=g)
        with _sync_context(state.fake, j == state.accum - 1):
            with state.autocast():
                b = state.fake(y, sigma)
            loss = _ops.ipfm_fake_loss(b.float(), x, sigma)
            (loss / state.accum).backward()
        total += loss.detach()
    return total / state.accum


def fake_step(state, step, k=0):
    """One update of the fake network on fresh generator samples; returns 0-dim device
    tensors {"fake_loss" (mean over this process's micro-batches), "fake_skipped",
    "fake_grad_norm"}."""
    state.opt_f.zero_grad(set_to_none=True)
    loss = fake_backward(state, step, k)
    skipped, norm = _finish_update(state, state.fake_params, state.opt_f, loss)
    return {"fake_loss": loss, "fake_skipped": skipped, "fake_grad_norm": norm}


def generator_backward(state, step):
    """Gradients of the generator loss of iteration ``step`` accumulated into the
    generator (teacher and fake parameters frozen; the gradient flows through y and the
    two networks to x). Returns (mean loss, number of masked rows), 0-dim tensors."""
    cfg = state.cfg
    for p in state.fake_params:
        p.requires_grad_(False)
    total = torch.zeros((), device=state.device)
    masked = torch.zeros((), dtype=torch.long, device=state.device)
    try:
        for j, micro in enumerate(state.micro_indices()):
            g = state.rng(step, GEN_PHASE, micro)
            z = state._prior(g)
            sigma = sample_sigma_distill(state.micro, t_max=cfg.t_max, device=state.device, generator=g)
            with _sync_context(state.generator, j == state.accum - 1):
                with state.autocast():
                    x = state.generator(z, cfg.sigma_init).float()
                y = ipf.perturb(x, sigma, state.D, generator=g)
                with state.autocast():
                    a = state.teacher(y, sigma)
                    b = state.fake_fwd(y, sigma)  # never the DDP module: its reducer must not see this pass
                loss, n_masked = _ops.ipfm_generator_loss(a.float(), b.float(), x, alpha=cfg.alpha,
                                                          return_masked=True)
                (loss / state.accum).backward()
            total += loss.detach()
            masked += n_masked
    finally:
        for p in state.fake_params:
            p.requires_grad_(True)
    return total / state.accum, masked


def generator_step(state, step):
    """One generator update; returns 0-dim device tensors {"gen_loss", "masked_rows",
    "gen_skipped", "gen_grad_norm"}."""
    state.opt_g.zero_grad(set_to_none=True)
    loss, masked = generator_backward(state, step)
    masked_all = masked >= state.micro * state.accum
    skipped, norm = _finish_update(state, state.gen_params, state.opt_g, loss, masked_all=masked_all)
    return {"gen_loss": loss, "masked_rows": masked, "gen_skipped": skipped, "gen_grad_norm": norm}


def train_step(state, step):
    """One IPFM iteration: ``fake_steps`` fake updates, one generator update, EMA (not
    moved when the generator update was skipped). Returns 0-dim device tensors: reading
    one is a host sync, which the loop does once per log window (:class:`StepStats`)."""
    fakes = [fake_step(state, step, k) for k in range(state.cfg.fake_steps)]
    stats = {"fake_loss": sum(f["fake_loss"] for f in fakes) / len(fakes),
             "fake_skipped": sum(f["fake_skipped"].long() for f in fakes),
             "fake_grad_norm": sum(f["fake_grad_norm"] for f in fakes) / len(fakes)}
    stats.update(generator_step(state, step))
    if state.ema_weight is not None and not state.capturing:  # a captured fill would replay a stale beta
        state.ema_weight.fill_(1.0 - state.ema.beta(step))
    state.ema.update(state.gen_net, step, skip=stats["gen_skipped"], weight=state.ema_weight)
    return stats


class GraphedStep:
    """:func:`train_step` captured once in a CUDA graph and replayed: one launch per
    iteration instead of thousands. The first ``warmup`` iterations run eagerly on a side
    stream (cuDNN/cuBLAS workspaces, torch.compile's compilation), the next is captured and
    replayed; before each replay the iteration's generators are reseeded (registered with
    the graph, so the draws equal the eager loop's) and the EMA weight refilled. Call it
    as ``GraphedStep(state)(step)``; it returns train_step's statistics (static tensors,
    overwritten by the next replay)."""

    def __init__(self, state, warmup=3):
        if not state.graphed:
            raise InvalidInput("GraphedStep: build the state with DistillConfig(cuda_graph=True)")
        self.state, self.warmup, self.done = state, int(warmup), 0
        self.graph, self.stats = None, None

    def _eager(self, step):
        side = torch.cuda.Stream(self.state.device)
        side.wait_stream(torch.cuda.current_stream(self.state.device))
        with torch.cuda.stream(side):
            stats = train_step(self.state, step)
        torch.cuda.current_stream(self.state.device).wait_stream(side)
        return stats

    def _capture(self, step):
        st = self.state
        graph = torch.cuda.CUDAGraph()
        for key in st.draw_keys():
            graph.register_generator_state(st.rng(step, *key))
        st.opt_g.zero_grad(set_to_none=True)  # the captured backward allocates the gradients
        st.opt_f.zero_grad(set_to_none=True)
        st.capturing = True
        try:
            with torch.cuda.graph(graph):
                self.stats = train_step(st, step)
        finally:
            st.capturing = False
        self.graph = graph

    def __call__(self, step):
        st = self.state
        if self.done < self.warmup:
            self.done += 1
            return self._eager(step)
        if self.graph is None:
            self._capture(step)  # records only: the replay below runs this iteration
        for phase, micro in st.draw_keys():
            st.rng(step, phase, micro)  # reseeds
        st.ema_weight.fill_(1.0 - st.ema.beta(step))
        self.graph.replay()
        self.done += 1
        return self.stats


def step_runner(state):
    """``fn(step)`` running one iteration: :class:`GraphedStep` when the state was built
    with ``cuda_graph``, else :func:`train_step`."""
    return GraphedStep(state) if state.graphed else functools.partial(train_step, state)


class StepStats:
    """The statistics of the iterations since the last read, summed on the device; :meth:`read`
    is the loop's one host sync per log window. Also counts, across windows, the iterations
    in a row with a skipped update (``run``), for ``max_bad_steps``."""

    MEANS = ("fake_loss", "gen_loss", "fake_grad_norm", "gen_grad_norm")  # over the finite values

    def __init__(self, device, run=0):
        self.device = device
        self.run = torch.full((), int(run), dtype=torch.long, device=device)
        self.reset()

    def reset(self):
        z = functools.partial(torch.zeros, device=self.device)
        self.sums, self.finite = z(len(self.MEANS), dtype=torch.float64), z(len(self.MEANS), dtype=torch.long)
        self.masked, self.skipped, self.worst_run = (z((), dtype=torch.long) for _ in range(3))
        self.n = 0

    def add(self, stats):
        vals = torch.stack([stats[k].float() for k in self.MEANS])
        ok = torch.isfinite(vals)
        self.sums += torch.where(ok, vals, 0.0)
        self.finite += ok
        skipped = stats["fake_skipped"].long() + stats["gen_skipped"].long()
        self.skipped += skipped
        self.masked += stats["masked_rows"]
        self.run = torch.where(skipped > 0, self.run + 1, 0)
        self.worst_run = torch.maximum(self.worst_run, self.run)
        self.n += 1

    def read(self):
        """{mean of each of MEANS (NaN if none was finite), "masked_rows", "skipped",
        "worst_run", "run", "iterations"}; starts a new window."""
        ints = torch.stack([self.masked, self.skipped, self.worst_run, self.run]).tolist()
        sums, finite = self.sums.tolist(), self.finite.tolist()
        out = {k: (s / c if c else math.nan) for k, s, c in zip(self.MEANS, sums, finite)}
        out.update(zip(("masked_rows", "skipped", "worst_run", "run"), ints), iterations=self.n)
        self.reset()
        return out


# --------------------------------------------------------------------------------------
# sampling and scoring the generator
# --------------------------------------------------------------------------------------


@torch.no_grad()
def generate(model, num, shape, D, sigma_init=2.5, *, seed=0, device="cpu", batch=2000, autocast=None):
    """``num`` one-step samples G(z) = model(z, sigma_init), z ~ prior(sigma_init, D) drawn
    in one call from a generator seeded with ``seed`` (deterministic whatever ``batch``)."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(int(seed))
    z = ipf.sample_prior((num, *shape), sigma_init, D, device=device, dtype=torch.float32, generator=g)
    out = []
    for i in range(0, num, batch):
        with (autocast() if autocast else contextlib.nullcontext()):
            out.append(model(z[i:i + batch], sigma_init).float())
    return torch.cat(out)


class SelectionScorer:
    """FD of 1-NFE samples against the *training* split (for picking the best
    checkpoint) and against the test split (for the training curve), with the metrics'
    cached classifier."""

    def __init__(self, data, cache_dir, device, log=None):
        from ipfm_fast.metrics import Evaluator, extract, gaussian_stats

        self.ev = Evaluator(data, cache_dir, device=device, log=log)
        self.train_stats = gaussian_stats(extract(self.ev.net, data.train.floats(), device=device))
        self._extract, self._stats = extract, gaussian_stats

    def score(self, x):
        from ipfm_fast.metrics import frechet_distance

        x = x.detach().float().cpu().clamp(-1, 1)
        st = self._stats(self._extract(self.ev.net, x, device=self.ev.device))
        return {"fd_train": frechet_distance(*st, *self.train_stats), "fd_test": frechet_distance(*st, *self.ev.test_stats)}


def evaluate_generator(model, data, D, sigma_init, cache_dir, *, num=None, seeds=(0, 1, 2, 3, 4), device="cpu",
                       precision="fp32", log=print, grid=None, evaluator=None, grid_upscale=None):
    """Score a one-step generator over several seeds against the test split (as
    :func:`ipfm_fast.train.teacher.evaluate_denoiser` does for the teacher at 35 NFE)."""
    from ipfm_fast.metrics import Evaluator, summarize

    device = torch.device(device)
    t0 = time.perf_counter()
    ev = evaluator or Evaluator(data, cache_dir, device=device, log=log)
    num = num or len(data.train)
    per_seed = []
    for seed in seeds:
        x = generate(model, num, data.shape, D, sigma_init, seed=seed, device=device,
                     autocast=lambda: common.autocast(device, precision))
        per_seed.append(dict(seed=seed, **ev.score(x)))
        if grid and seed == seeds[0]:
            save_grid(x[:100], grid, nrow=10, upscale=grid_upscale)
    res = {"fd": summarize([r["fd"] for r in per_seed]), "sw": summarize([r["sw"] for r in per_seed]),
           "nn_ratio": summarize([r["nn_ratio"] for r in per_seed]), "baseline_fd": ev.baseline["baseline_fd"],
           "baseline_sw": ev.baseline["baseline_sw"], "nfe": 1, "num_samples": num, "n_test": len(data.test),
           "seconds": time.perf_counter() - t0, "per_seed": per_seed}
    fd = res["fd"]
    res.update(features=ev.info["features"], classifier_test_accuracy=ev.info["test_accuracy"])
    log(f"FD at 1 NFE: {fd['mean']:.3f} +- {fd['std']:.3f} (std over {len(seeds)} seeds) in {ev.feature_space()}; "
        f"data baseline {res['baseline_fd']:.3f} | SW {res['sw']['mean']:.4f} | nearest-train-image distance ratio "
        f"{res['nn_ratio']['mean']:.2f}")
    ev.warn_sample_count(num, log)
    return res


# --------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------


def load_teacher(path, device, trust_pickle=False):
    """The frozen teacher (EMA weights) and its metadata; a one-step generator is refused
    (distilling one as if it were a teacher gives a generator of nothing)."""
    mf = ckpt.load_model(path, device=device, which="ema", trust_pickle=trust_pickle)
    if mf.role != "teacher":
        raise InvalidInput(f"{mf.path} is a one-step generator (role {mf.role!r}), not a teacher: distill a PFGM++ "
                           f"teacher (the teacher.safetensors of a train-teacher run)")
    return mf.model.eval().requires_grad_(False), mf.meta


def distill(cfg, *, resume=False, overwrite=False, skip_bad_images=False, progress=None, log=print, teacher=None,
            teacher_meta=None, init=None):
    """Run (or, with ``resume``, continue) a distillation; returns the summary dict (rank 0;
    other ranks return {"rank", "stopped"}). ``teacher``: an already loaded denoiser to use instead of
    ``cfg.teacher`` (with ``teacher_meta`` holding at least its "model" config and "D");
    ``init``: the module whose weights G and the fake network start from (default: the
    teacher). A folder that holds a run is refused unless ``resume`` or ``overwrite``;
    ``summary["stopped"]`` names the signal when SIGINT/SIGTERM ended the run early (after a
    checkpoint)."""
    cfg.validate()
    with DistributedRun(cfg.device) as (dctx, device), contextlib.ExitStack() as stack:
        return _distill(cfg, dctx=dctx, device=device, resume=resume, overwrite=overwrite,
                        skip_bad_images=skip_bad_images, progress=progress, log=log, teacher=teacher,
                        teacher_meta=teacher_meta, init=init, stack=stack)


def _is_conv(module):
    return any(p.dim() == 4 for p in module.parameters())


def _build(cfg, teacher, meta, device, precision, dctx, init=None):
    model_cfg = cfg.model or meta.get("model")
    init = teacher if init is None else init
    if model_cfg:
        gen_net = build_denoiser(model_cfg)
        gen_net.load_state_dict(init.state_dict())
    else:  # e.g. a trusted pickle: copy the module itself
        gen_net = copy.deepcopy(init)
    gen_net = gen_net.to(device).train().requires_grad_(True)
    # cuDNN's bf16 convolutions run natively in NHWC; the EMA and the fake network copy the layout
    channels_last = _switch(cfg.channels_last, device.type == "cuda") and _is_conv(gen_net)
    if channels_last:
        gen_net = gen_net.to(memory_format=torch.channels_last)
        teacher = teacher.to(memory_format=torch.channels_last)
    fake_net = copy.deepcopy(gen_net)
    ema = common.EMA(gen_net, cfg.ema)
    lr_fake = cfg.lr_fake or cfg.lr
    # fused Adam: one kernel per step on CUDA (a loop of ~10 ops per tensor otherwise, 5x slower on
    # CPU too) and the only Adam that skips an update on the device (found_inf, see _finish_update)
    if cfg.cuda_graph and (device.type != "cuda" or dctx.enabled):
        raise InvalidInput("--cuda-graph needs a CUDA device and a single process (DDP's all-reduces are not "
                           f"captured); got device {device} with {dctx.world} process(es)")
    opt_kw = dict(betas=(0.0, cfg.beta2), eps=cfg.eps, fused=True, capturable=bool(cfg.cuda_graph))
    opt_g = torch.optim.Adam(gen_net.parameters(), lr=cfg.lr, **opt_kw)
    opt_f = torch.optim.Adam(fake_net.parameters(), lr=lr_fake, **opt_kw)
    generator, fake, fake_fwd = gen_net, fake_net, fake_net
    if dctx.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        generator = DDP(gen_net, device_ids=ids, broadcast_buffers=False)
        fake = DDP(fake_net, device_ids=ids, broadcast_buffers=False)
    compiled = _switch(cfg.compile, device.type == "cuda")
    if compiled:  # the plain modules keep the parameters; the compiled wrappers share them
        generator, fake, teacher = (torch.compile(m, dynamic=False) for m in (generator, fake, teacher))
        fake_fwd = fake if not dctx.enabled else torch.compile(fake_net, dynamic=False)
    nets = dict(gen_net=gen_net, fake_net=fake_net, generator=generator, fake=fake, fake_fwd=fake_fwd,
                teacher=teacher, ema=ema, opt_g=opt_g, opt_f=opt_f, compiled=compiled, channels_last=channels_last,
                graphed=bool(cfg.cuda_graph))
    return model_cfg, nets


def build_state(cfg, *, teacher=None, teacher_meta=None, init=None, dctx=None, device=None):
    """Load the teacher (unless given), fill in the config's defaults from it (D, data,
    micro_batch, model), and build G, the fake network, the EMA and the optimizers
    (DDP-wrapped when ``dctx`` is distributed); G and the fake network start from
    ``init``'s weights (default: the teacher's). Returns a :class:`DistillState`."""
    dctx = dctx or Dist()
    device = torch.device(device) if device is not None else common.resolve_device(cfg.device)
    precision = common.resolve_precision(cfg.precision, device)
    if teacher is None:
        teacher, teacher_meta = load_teacher(cfg.teacher, device)
    else:
        teacher = teacher.to(device).eval().requires_grad_(False)
    teacher_meta = teacher_meta or {}
    if cfg.D is None:
        if "D" not in teacher_meta:
            raise InvalidInput(f"--D is needed: the teacher {cfg.teacher!r} does not record its D")
        cfg.D = ckpt.decode_D(teacher_meta["D"])
    if cfg.data is None:
        cfg.data = teacher_meta.get("data") or "digits"
    if cfg.micro_batch is None:
        if cfg.batch % dctx.world:
            raise InvalidInput(f"--batch ({cfg.batch}) must be divisible by the number of processes ({dctx.world})")
        cfg.micro_batch = cfg.batch // dctx.world
    per_process = cfg.batch // dctx.world
    if cfg.batch % (cfg.micro_batch * dctx.world):
        raise InvalidInput(f"--batch ({cfg.batch}) must be a multiple of --micro-batch x processes "
                           f"({cfg.micro_batch} x {dctx.world})")
    accum = per_process // cfg.micro_batch

    model_cfg, nets = _build(cfg, teacher, teacher_meta, device, precision, dctx, init=init)
    cfg.model = model_cfg or {}
    shape = list(cfg.model.get("shape") or teacher_meta.get("shape") or [])
    if not shape:
        raise InvalidInput("distill: the teacher does not record its sample shape")
    return DistillState(cfg=cfg, D=float(cfg.D), shape=shape, device=device, precision=precision, dctx=dctx,
                        accum=accum, micro=cfg.micro_batch, teacher_meta=teacher_meta, **nets)


def _distill(cfg, *, dctx, device, resume, overwrite, skip_bad_images, progress, log, teacher, teacher_meta, init,
             stack):
    main = dctx.main
    say = log if main else (lambda *a, **k: None)
    precision = common.resolve_precision(cfg.precision, device)
    out = cfg.out
    ckpt_path = os.path.join(out, "checkpoint.safetensors")
    if main:
        check_writable(out, folder=True, what="--out")
    common.check_run_folder(out, ckpt_path, resume=resume, overwrite=overwrite, main=main)

    if resume:
        saved = DistillConfig.from_json(ckpt.read_meta(ckpt_path)["config"])
        for keep in RESUMABLE:
            setattr(saved, keep, getattr(cfg, keep))
        cfg = saved.validate()

    asked_D = cfg.D
    state = build_state(cfg, teacher=teacher, teacher_meta=teacher_meta, init=init, dctx=dctx, device=device)
    cfg, gen_net, fake_net, ema, opt_g, opt_f, shape = (state.cfg, state.gen_net, state.fake_net, state.ema,
                                                       state.opt_g, state.opt_f, state.shape)
    accum = state.accum
    threads = common.resolve_threads(cfg.threads, device, count_params(gen_net))
    stack.enter_context(common.num_threads(threads))
    say(f"distill: generator and fake = {describe(gen_net, cfg.model)} from the teacher's EMA; D = {cfg.D:g}"
        f"{' (SiD)' if math.isinf(cfg.D) else ''}, alpha = {cfg.alpha}, sigma_init = {cfg.sigma_init}, "
        f"{cfg.fake_steps} fake step(s) per iteration, {cfg.steps} iterations x batch {cfg.batch} "
        f"({dctx.world} process(es) x {accum} micro-batch(es) of {cfg.micro_batch}), lr {cfg.lr:g}, "
        f"EMA {cfg.ema}, device {device} ({precision}"
        f"{f', {torch.get_num_threads()} CPU threads' if device.type == 'cpu' else ''}"
        f"{', channels_last' if state.channels_last else ''}"
        f"{', torch.compile: the first iterations compile the networks' if state.compiled else ''}"
        f"{', CUDA graph of the whole iteration' if state.graphed else ''})")
    teacher_D = state.teacher_meta.get("D")
    if asked_D is not None and teacher_D is not None and ckpt.decode_D(teacher_D) != float(asked_D) and not resume:
        say(f"warning: the teacher was trained at D = {ckpt.decode_D(teacher_D):g}; distilling at D = "
            f"{float(asked_D):g} as asked (the generator's prior and the perturbations use D = {float(asked_D):g})")

    start, best, elapsed0, bad_run = 0, {"fd_train": math.inf, "step": None}, 0.0, 0
    if resume:
        meta = ckpt.load_state(ckpt_path, modules={"generator": gen_net, "generator_ema": ema.model,
                                                   "fake": fake_net},
                               optimizers={"opt_g": opt_g, "opt_fake": opt_f}, generators={}, device=device)
        start = meta["step"]
        best = meta.get("best", best)
        best["fd_train"] = float(best["fd_train"])
        elapsed0 = float(meta.get("train_seconds", 0.0))
        bad_run = int(meta.get("bad_run", 0))
        say(f"resumed from {ckpt_path} at iteration {start}")
    log_path = os.path.join(out, "log.jsonl")
    if main:
        common.write_json(os.path.join(out, "config.json"), cfg.to_json())
        common.truncate_jsonl(log_path, start if resume else -1)

    scorer = None
    data = None
    if main and cfg.eval_every:
        from ipfm_fast.data import load_dataset

        data = load_dataset(cfg.data, test_fraction=cfg.test_fraction, skip_bad_images=skip_bad_images, log=say)
        if data.shape != list(shape):
            raise InvalidInput(f"the teacher makes samples of shape {list(shape)} but the evaluation data "
                               f"{data.name} has images of {data.shape}: give the data it was trained on (--data)")
        cache = cfg.teacher if isinstance(cfg.teacher, str) and os.path.isdir(cfg.teacher) else out
        with common.num_threads(1 if device.type == "cpu" else None):
            scorer = SelectionScorer(data, cache, device, log=say)
    eval_n = cfg.eval_samples or (len(data.train) if data is not None else 0)
    data_id = data.identity() if data is not None and cfg.data == state.teacher_meta.get("data") else \
        state.teacher_meta.get("data_id")

    def save_checkpoint(step, elapsed):
        if main:
            ckpt.save_state(ckpt_path, modules={"generator": gen_net, "generator_ema": ema.model, "fake": fake_net},
                            optimizers={"opt_g": opt_g, "opt_fake": opt_f}, generators={}, step=step,
                            config=cfg.to_json(), model_cfg=cfg.model,
                            extra={"best": best, "train_seconds": elapsed, "bad_run": bad_run, "role": "generator",
                                   "sigma_init": cfg.sigma_init, "data_id": data_id})

    def save_generator(name, module, step, **extra):
        return ckpt.save_denoiser(os.path.join(out, name), module, cfg.model, D=ckpt._encode_D(float(cfg.D)),
                                  sigma_init=cfg.sigma_init, data=cfg.data, data_id=data_id, steps=step,
                                  role="generator", recipe=cfg.to_json(), **extra)

    def evaluate(step):
        x = generate(ema.model, eval_n, shape, state.D, cfg.sigma_init, seed=cfg.eval_seed, device=device,
                     autocast=state.autocast)
        with common.num_threads(1 if device.type == "cpu" else None):
            return scorer.score(x)

    curve = []
    if resume and main and os.path.exists(log_path):  # the curve so far, from the (truncated) log
        import json

        with open(log_path, encoding="utf-8") as f:
            curve = [{k: r[k] for k in ("step", "fd_train", "fd_test")} for r in map(json.loads, f) if "fd_test" in r]
    if scorer is not None and start == 0:
        s0 = evaluate(0)
        curve.append(dict(step=0, **s0))
        best = {"fd_train": s0["fd_train"], "step": 0}
        save_generator("generator.safetensors", ema.model, 0, fd_train=s0["fd_train"])
        jl0 = common.JSONLLogger(log_path)
        jl0.log(step=0, images_seen=0, train_seconds=0.0, **s0)
        jl0.close()
        say(f"initial generator (the teacher at 1 NFE): FD vs train {s0['fd_train']:.2f}, vs test {s0['fd_test']:.2f}")

    bar = common.progress(cfg.steps, initial=start, desc="distill", enabled=progress if main else False)
    signals = stack.enter_context(common.StopSignals())
    t0 = time.perf_counter()
    step, stop_reason = start, None
    # A steady-state iteration never waits for the device: the statistics stay there and are
    # read once per log window; the processes agree to stop (an all-reduce) at those reads too.
    window = StepStats(device, run=bad_run)
    window_start, t_last, n_last = start, t0, 0
    jl = stack.enter_context(common.JSONLLogger(log_path)) if main else None
    warned = 0
    run_step = step_runner(state)
    for step in range(start, cfg.steps):
        window.add(run_step(step))
        done = step + 1
        n_last += cfg.batch
        bar.update(1)
        elapsed = elapsed0 + time.perf_counter() - t0
        read_now = done % cfg.log_every == 0 or done == cfg.steps
        stop_here = signals.received is not None or (cfg.time_budget is not None and elapsed >= cfg.time_budget)
        stop = (_any(stop_here, dctx, device) if read_now else False) if dctx.enabled else stop_here
        read_now = read_now or stop
        if read_now:
            w = window.read()
            bad_run = w["run"]
            first, window_start = window_start + 1, done
            if (w["skipped"] or w["masked_rows"]) and warned < 20:
                msg = (f"distill: iteration{'s' if first < done else ''} {first}{f'-{done}' if first < done else ''}: "
                       + (f"skipped {w['skipped']} update(s) with a non-finite loss or gradient; " if w["skipped"] else "")
                       + f"{w['masked_rows']} generator row(s) with NaN/Inf masked")
                if main:
                    warnings.warn(msg, RuntimeWarning, stacklevel=1)
                warned += 1
            if w["worst_run"] >= cfg.max_bad_steps:
                save_checkpoint(done, elapsed)
                raise TrainingDiverged(
                    f"distill: {w['worst_run']} iterations in a row had non-finite losses or gradients (seen at "
                    f"iteration {done}: mean finite fake loss {w['fake_loss']}, generator loss {w['gen_loss']}, "
                    f"{w['masked_rows']} masked rows since iteration {first}). The teacher or the networks produce "
                    f"NaN/Inf: check the teacher checkpoint, lower --lr, or use --precision fp32. The last good "
                    f"state is in {ckpt_path}.")
            if main:
                now = time.perf_counter()
                ips = n_last / max(now - t_last, 1e-9)
                rec = dict(step=done, fake_loss=w["fake_loss"], gen_loss=w["gen_loss"], masked_rows=w["masked_rows"],
                           skipped=w["skipped"], fake_grad_norm=w["fake_grad_norm"], gen_grad_norm=w["gen_grad_norm"],
                           images_per_second=ips, images_seen=done * cfg.batch, train_seconds=elapsed)
                bar.set_postfix(fake=f"{rec['fake_loss']:.3f}", gen=f"{rec['gen_loss']:.3f}", img_s=f"{ips:.0f}")
                jl.log(**rec)
                t_last, n_last = now, 0
        last = done == cfg.steps or stop
        if scorer is not None and (done % cfg.eval_every == 0 or last):
            s = evaluate(done)
            curve.append(dict(step=done, **s))
            jl.log(step=done, images_seen=done * cfg.batch, train_seconds=elapsed, **s)
            if s["fd_train"] < best["fd_train"]:
                best = {"fd_train": s["fd_train"], "step": done}
                save_generator("generator.safetensors", ema.model, done, fd_train=s["fd_train"])
            bar.set_postfix(fd=f"{s['fd_test']:.2f}", best=f"{best['fd_train']:.2f}@{best['step']}")
        if done % cfg.checkpoint_every == 0 or last:
            if not read_now:
                bad_run = int(window.run)  # a checkpoint syncs anyway
            save_checkpoint(done, elapsed)
        if stop:
            stop_reason = signals.received or "time budget"
            break
    bar.close()
    train_seconds = time.perf_counter() - t0
    if not main:
        return {"rank": dctx.rank, "stopped": stop_reason}
    done = step + 1 if cfg.steps > start else start
    save_generator("generator_last.safetensors", ema.model, done)
    if scorer is None:  # no selection: the last EMA is the result
        save_generator("generator.safetensors", ema.model, done)
    iters = done - start
    kept, _, _, _ = load_generator(out, device)  # every run folder shows its samples
    grid = save_grid(generate(kept, GRID_SAMPLES, shape, state.D, cfg.sigma_init, seed=cfg.eval_seed, device=device,
                              autocast=state.autocast), os.path.join(out, "samples.png"), nrow=10)
    summary = {
        "generator": os.path.join(out, "generator.safetensors"), "samples": grid, "steps": done,
        "resumed_from": start if resume else None,
        "stopped": stop_reason, "train_seconds": train_seconds, "total_train_seconds": elapsed0 + train_seconds,
        "images_per_second": iters * cfg.batch / max(train_seconds, 1e-9),
        "best_step": best["step"], "best_fd_train": best["fd_train"], "parameters": count_params(gen_net),
        "device": str(device), "precision": precision, "world_size": dctx.world, "D": ckpt._encode_D(float(cfg.D)),
        "data": cfg.data, "curve": curve,
    }
    common.write_json(os.path.join(out, "summary.json"), summary)
    how = f"stopped by {stop_reason}" if stop_reason else "done"
    kept_what = (f"best EMA generator (iteration {best['step']}, FD vs train {best['fd_train']:.2f})"
                 if scorer is not None else f"EMA generator of the last iteration ({done}; --eval-every 0: no scores "
                                            f"to choose by)")
    say(f"distilled {iters} iterations in {train_seconds:.1f} s ({summary['images_per_second']:.0f} images/s, {how}); "
        f"{kept_what} -> {summary['generator']}; samples -> {grid}")
    if stop_reason in ("SIGTERM", "SIGINT"):
        say(f"interrupted by {stop_reason}: checkpoint at iteration {done} in {ckpt_path}; continue with --resume")
    return summary


def load_generator(path, device="cpu"):
    """A saved one-step generator (``generator.safetensors`` or a run folder holding
    one): (model, D, sigma_init, metadata)."""
    if os.path.isdir(path):
        path = os.path.join(path, "generator.safetensors")
    model, meta = ckpt.load_denoiser(path, device=device)
    return model, ckpt.decode_D(meta["D"]), float(meta["sigma_init"]), meta


def final_evaluation(out, *, seeds=5, device="auto", precision="auto", num=None, log=print, grid=None,
                     skip_bad_images=False):
    """Score ``out``/generator.safetensors at 1 NFE over seeds 0..seeds-1 against the test
    split; writes ``out``/eval.json and returns it."""
    from ipfm_fast.data import load_dataset

    device = common.resolve_device(device)
    precision = common.resolve_precision(precision, device)
    model, D, sigma_init, meta = load_generator(out, device)
    cfg = DistillConfig.from_json(json_load(os.path.join(out, "config.json")))
    data = load_dataset(meta.get("data") or cfg.data or "digits", test_fraction=cfg.test_fraction,
                        skip_bad_images=skip_bad_images, log=log)
    cache = cfg.teacher if os.path.isdir(cfg.teacher) else out
    with common.num_threads(1 if device.type == "cpu" else None):
        res = evaluate_generator(model, data, D, sigma_init, cache, num=num, seeds=list(range(seeds)), device=device,
                                 precision=precision, log=log, grid=grid)
    res["generator"] = os.path.abspath(os.path.join(out, "generator.safetensors"))
    res["generator_step"] = meta.get("steps")
    common.write_json(os.path.join(out, "eval.json"), res)
    return res


def json_load(path):
    import json

    with open(path, encoding="utf-8") as f:
        return json.load(f)
