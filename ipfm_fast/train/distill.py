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
micro-batch draws from its own ``torch.Generator`` (an ``rng``) seeded by :func:`draw_seed`. So

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

Networks: ``*_net`` is a plain module (its parameters, the EMA, checkpoints); ``*_fwd``
is what runs its forward pass (the same module, or its DDP / torch.compile wrapper).

Run folder (``out``): ``config.json``, ``checkpoint.safetensors`` (resume state),
``generator.safetensors`` (best EMA generator; a denoiser file whose metadata records
``sigma_init``), ``generator_last.safetensors`` (EMA at the end), ``log.jsonl``,
``summary.json``, ``samples.png``.

The iteration is :func:`fake_step`, :func:`generator_step` and :func:`train_step` over a
:class:`DistillState`, so a faster step can replace one piece; :class:`DistillRun` is the run
around it (set up, loop, finish), its bookkeeping a :class:`~ipfm_fast.train.runbook.RunBook`.
"""

import contextlib
import copy
import dataclasses
import functools
import hashlib
import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

import ipfm_fast as ipf
from ipfm_fast import checkpoint as ckpt
from ipfm_fast._files import check_writable
from ipfm_fast.data import save_grid
from ipfm_fast.errors import InvalidInput, TrainingDiverged
from ipfm_fast.models import build_denoiser, count_params, describe
from ipfm_fast.schedules import sample_sigma_distill, sample_sigma_train
from ipfm_fast.train import common, host_memory, parallel
from ipfm_fast.train.evaluation import (BestGenerator, SelectionScorer, curve_from_log, evaluate_generator,  # noqa: F401
                                         final_evaluation, generate, generator_file, load_generator)
from ipfm_fast.train.flat import FlatAdam, FlatParams, norm_and_skip
from ipfm_fast.train.knobs import SWITCHES, knob, nonneg_int, parse_D, positive_int, resumable, runtime_knob
from ipfm_fast.train.parallel import Dist, DistributedRun
from ipfm_fast.train.runbook import RunBook

GRID_SAMPLES = 100  # images in a run folder's samples.png
FAKE_PHASE, GEN_PHASE = 0, 1000  # phase ids of draw_seed: fake update k uses FAKE_PHASE + k
IPFM, OPT, SPEED, RUN = "IPFM", "optimisation", "speed", "checkpoints, logs and evaluation"


def _switch(value, auto):
    return auto if value == "auto" else value == "on"


@dataclass
class DistillConfig:
    """Every setting of a distillation run (saved as config.json). The defaults are the
    tuned digits recipe (the `make demo` one): see docs/demo/. Each field is also its CLI
    option."""

    teacher: str = knob("runs/teacher", "teacher run folder or teacher.safetensors (a one-step generator is refused)")
    out: str = knob("runs/distill", "run folder", resume=True)
    D: float | None = knob(None, "augmentation dimension (default: the teacher's; another value, e.g. inf = SiD, is "
                                 "allowed with a warning)", type=parse_D)
    data: str | None = knob(None, "data set for the periodic evaluation (default: the teacher's; must have its "
                                  "image shape)")
    alpha: float = knob(0.5, "generator-loss alpha (1/2: plain IPFM, the IPFM authors' and the best in the "
                             "docs/quality.md sweep; 1.2: SiD's)", group=IPFM, type=float)
    fake_steps: int = knob(1, "fake updates per iteration", group=IPFM, type=positive_int)
    sigma_init: float = knob(2.5, "the generator's noise level and prior", group=IPFM, type=float)
    t_max: float = knob(800.0, "generator-step levels: t ~ U[0, t_max/1000]", group=IPFM, type=float)
    p_mean: float = knob(-1.2, "fake-step ln sigma mean", group=IPFM, type=float)
    p_std: float = knob(1.2, "fake-step ln sigma std", group=IPFM, type=float)
    steps: int = knob(2000, "iterations", group=OPT, resume=True, type=positive_int)
    time_budget: float | None = knob(None, "stop after this many seconds of training", group=OPT, resume=True,
                                     type=float)
    batch: int = knob(256, "global batch (all processes)", group=OPT, type=positive_int)
    micro_batch: int | None = knob(None, "rows per micro-batch (gradient accumulation; default: batch / processes). "
                                         "Part of the recipe: runs with equal --micro-batch match whatever the "
                                         "number of processes", group=OPT, type=positive_int)
    lr: float = knob(1e-4, "generator Adam learning rate (betas 0, 0.999)", group=OPT, type=float)
    lr_fake: float | None = knob(None, "fake-network learning rate (default: --lr)", group=OPT, type=float)
    beta2: float = knob(0.999, "Adam's beta2", cli=False)
    eps: float = knob(1e-8, "Adam's epsilon", cli=False)
    ema: float = knob(0.995, "EMA decay of the generator per iteration (with a warm-up: beta = min(ema, (1 + s) / "
                             "(10 + s)))", group=OPT, type=float)
    grad_clip: float = knob(0.0, "gradient-norm clip (0: off)", group=OPT, type=float)
    seed: int = knob(0, "seed of every random draw of the run", group=OPT, type=int)
    max_bad_steps: int = knob(10, "stop after this many iterations in a row with non-finite losses or gradients "
                                  "(checked at every log line: the loop reads its statistics from the device only "
                                  "then)", group=OPT, resume=True, type=positive_int)
    compile: str = knob("auto", "torch.compile the networks (auto: on CUDA; the first iterations then compile)",
                        group=SPEED, resume=True, choices=SWITCHES)
    channels_last: str = knob("auto", "channels_last memory format for convolutional networks (auto: on CUDA)",
                              group=SPEED, resume=True, choices=SWITCHES)
    cuda_graph: bool = knob(False, "capture the whole iteration in a CUDA graph after 3 warm-up iterations and "
                                   "replay it (CUDA, one process)", group=SPEED, resume=True, action="store_true")
    checkpoint_every: int = knob(500, "iterations between checkpoints (one is also written at the end and on "
                                      "SIGINT/SIGTERM)", group=RUN, resume=True, type=positive_int)
    log_every: int = knob(10, "iterations per log.jsonl line (statistics are read from the device only then)",
                          group=RUN, resume=True, type=positive_int)
    eval_every: int = knob(50, "iterations between 1-NFE scores of the EMA generator (keeps the best; 0: off)",
                           group=RUN, resume=True, type=nonneg_int)
    eval_samples: int | None = knob(5000, "samples per periodic score (1 NFE: cheap; more samples = a less noisy "
                                          "choice of checkpoint)", group=RUN, resume=True, type=positive_int)
    eval_seed: int = knob(1000, "seed of the periodic scores' samples", cli=False)
    test_fraction: float = knob(0.1, "held-out fraction of folder/.npz data without a given split", cli=False)
    device: str = runtime_knob("device")
    precision: str = runtime_knob("precision")
    threads: str = runtime_knob("threads")
    backend: str = runtime_knob("backend")
    model: dict = knob(None, "the model config (filled in: the teacher's)", cli=False, default_factory=dict)

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


RESUMABLE = resumable(DistillConfig)  # what --resume may change; the recipe comes from the checkpoint


# --------------------------------------------------------------------------------------
# randomness
# --------------------------------------------------------------------------------------


def draw_seed(seed, step, phase, micro):
    """63-bit seed of the draws of micro-batch ``micro`` (global index) in ``phase`` of
    iteration ``step``: a hash, so nearby keys give unrelated streams."""
    h = hashlib.blake2b(f"ipfm-distill:{seed}:{step}:{phase}:{micro}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & (2**63 - 1)


def micro_rng(device, seed, step, phase, micro):
    """A fresh torch.Generator holding micro-batch ``micro``'s draws of ``phase`` in iteration ``step``."""
    return torch.Generator(device=device).manual_seed(draw_seed(seed, step, phase, micro))


def region(name):
    """A torch.profiler range around a part of the iteration ("networks", "ipfm_fast ops",
    "optimizer + EMA"; benchmarks/profile_step.py sums them); nothing when no profiler runs."""
    if torch.autograd._profiler_enabled():
        return torch.profiler.record_function(PROFILE_LABEL + name)
    return contextlib.nullcontext()


PROFILE_LABEL = "ipfm_step::"


# --------------------------------------------------------------------------------------
# state
# --------------------------------------------------------------------------------------


@dataclass
class DistillState:
    """Everything one iteration touches. ``gen_fwd`` / ``fake_fwd`` run the forward passes
    that train G and the fake network (DDP-wrapped when distributed, compiled when asked);
    ``fake_frozen_fwd`` runs the frozen fake network of the generator step (never the DDP
    module: its reducer must not see that pass); ``teacher_fwd`` the frozen teacher;
    ``gen_net`` / ``fake_net`` are the plain modules (parameters, EMA, checkpoints)."""

    cfg: DistillConfig
    teacher_fwd: torch.nn.Module
    gen_net: torch.nn.Module
    gen_fwd: torch.nn.Module
    fake_net: torch.nn.Module
    fake_fwd: torch.nn.Module
    fake_frozen_fwd: torch.nn.Module
    ema: common.EMA
    opt_g: FlatAdam  # its .flat: the generator's parameters in one buffer (the EMA's source)
    opt_f: FlatAdam  # its .flat: the fake network's
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
    teacher_meta: dict = dataclasses.field(default_factory=dict)  # what the teacher's file records (D, data, ...)
    _rngs: dict = dataclasses.field(default_factory=dict)
    capturing: bool = False  # inside CUDA-graph capture: the rngs are seeded before each replay

    def __post_init__(self):
        # 1 - beta(step) of the EMA as a device value (a graph replays it; eager fills it too)
        self.ema_weight = torch.zeros((), device=self.device) if self.graphed else None

    def autocast(self):
        return common.autocast(self.device, self.precision, cache=not self.graphed)

    def micro_indices(self):
        """Global indices of this process's micro-batches."""
        return [self.dctx.rank * self.accum + j for j in range(self.accum)]

    def rng(self, step, phase, micro):
        """The torch.Generator of micro-batch ``micro`` in ``phase`` of iteration ``step`` (as
        :func:`micro_rng`): one cached generator per (phase, micro), reseeded."""
        rng = self._rngs.get((phase, micro))
        if rng is None:
            rng = self._rngs[(phase, micro)] = torch.Generator(device=self.device)
        return rng if self.capturing else rng.manual_seed(draw_seed(self.cfg.seed, step, phase, micro))

    def draw_keys(self):
        """The (phase, micro-batch) of every rng one iteration of this process uses."""
        phases = [FAKE_PHASE + k for k in range(self.cfg.fake_steps)] + [GEN_PHASE]
        return [(phase, micro) for phase in phases for micro in self.micro_indices()]

    def _prior(self, rng):
        with region("ipfm_fast ops"):
            return ipf.sample_prior((self.micro, *self.shape), self.cfg.sigma_init, self.D, device=self.device,
                                    dtype=torch.float32, generator=rng, backend=self.cfg.backend)


def _sync_context(module, last):
    """DDP's no_sync for every micro-batch but the last (gradients all-reduced once)."""
    module = getattr(module, "_orig_mod", module)  # torch.compile's wrapper
    if isinstance(module, torch.nn.parallel.DistributedDataParallel) and not last:
        return module.no_sync()
    return contextlib.nullcontext()


def _sum(values):
    """The sum of 0-dim tensors, from zero in order; one value is itself (no op: the
    default loop has one micro-batch and one fake update, and each op costs ~5 us here)."""
    if len(values) == 1:
        return values[0]
    total = torch.zeros_like(values[0])
    for v in values:
        total += v
    return total


def _mean(values):
    return values[0] if len(values) == 1 else _sum(values) / len(values)


def _finish_update(state, opt, loss, masked=None, ema=None):
    """Clip and step, or skip, without a host sync: the Adam kernel skips the update on
    the device (its ``found_inf``) when the loss or the gradient norm is not finite or
    every row was masked (``masked``: this process's masked-row count), on every process
    alike; ``ema``: (buffer, weight) of an EMA moved in the same step (FlatAdam.step).
    Returns (skipped: 0-dim bool tensor, gradient norm: 0-dim tensor)."""
    params = opt.flat.params
    rows = state.micro * state.accum
    norm, bad, found_inf = norm_and_skip(params, loss, masked, rows)
    if state.dctx.enabled:  # the loss differs between processes (the all-reduced gradient does not)
        dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)
        bad = found_inf > 0
    if state.cfg.grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, state.cfg.grad_clip, norm)
    opt.step(found_inf=found_inf, ema=ema)
    opt.zero_grad()
    return bad, norm


def fake_backward(state, step, k=0):
    """Gradients of the fake loss (fake update ``k`` of iteration ``step``) accumulated
    into the fake network, over this process's micro-batches (all-reduced by DDP on the
    last one). Returns the mean loss (a 0-dim tensor)."""
    cfg = state.cfg
    losses = []
    for j, micro in enumerate(state.micro_indices()):
        rng = state.rng(step, FAKE_PHASE + k, micro)
        z = state._prior(rng)
        with torch.no_grad(), state.autocast(), region("networks"):
            x = state.gen_fwd(z, cfg.sigma_init).float()
        sigma = sample_sigma_train(state.micro, p_mean=cfg.p_mean, p_std=cfg.p_std, device=state.device,
                                   generator=rng)
        with region("ipfm_fast ops"):
            y = ipf.perturb(x, sigma, state.D, generator=rng, backend=cfg.backend)
        with _sync_context(state.fake_fwd, j == state.accum - 1):
            with state.autocast(), region("networks"):
                b = state.fake_fwd(y, sigma)
            with region("ipfm_fast ops"):
                loss = ipf.ipfm_fake_loss(b.float(), x, sigma, backend=cfg.backend)
            (loss / state.accum if state.accum > 1 else loss).backward()
        losses.append(loss.detach())
    return _mean(losses)


def fake_step(state, step, k=0):
    """One update of the fake network on fresh generator samples; returns 0-dim device
    tensors {"fake_loss" (mean over this process's micro-batches), "fake_skipped",
    "fake_grad_norm"}."""
    state.opt_f.zero_grad()
    loss = fake_backward(state, step, k)
    with region("optimizer + EMA"):
        skipped, norm = _finish_update(state, state.opt_f, loss)
    return {"fake_loss": loss, "fake_skipped": skipped, "fake_grad_norm": norm}


def generator_backward(state, step):
    """Gradients of the generator loss of iteration ``step`` accumulated into the
    generator (teacher and fake parameters frozen; the gradient flows through y and the
    two networks to x). Returns (mean loss, number of masked rows), 0-dim tensors."""
    cfg = state.cfg
    for p in state.opt_f.flat.params:
        p.requires_grad_(False)
    losses, masked = [], []
    try:
        for j, micro in enumerate(state.micro_indices()):
            rng = state.rng(step, GEN_PHASE, micro)
            z = state._prior(rng)
            sigma = sample_sigma_distill(state.micro, t_max=cfg.t_max, device=state.device, generator=rng)
            with _sync_context(state.gen_fwd, j == state.accum - 1):
                with state.autocast(), region("networks"):
                    x = state.gen_fwd(z, cfg.sigma_init).float()
                with region("ipfm_fast ops"):
                    y = ipf.perturb(x, sigma, state.D, generator=rng, backend=cfg.backend)
                with state.autocast(), region("networks"):
                    a = state.teacher_fwd(y, sigma)
                    b = state.fake_frozen_fwd(y, sigma)
                with region("ipfm_fast ops"):
                    loss, n_masked = ipf.ipfm_generator_loss(a.float(), b.float(), x, alpha=cfg.alpha,
                                                             return_masked=True, backend=cfg.backend)
                (loss / state.accum if state.accum > 1 else loss).backward()
            losses.append(loss.detach())
            masked.append(n_masked)
    finally:
        for p in state.opt_f.flat.params:
            p.requires_grad_(True)
    return _mean(losses), _sum(masked)


def generator_step(state, step, ema=None):
    """One generator update (and the EMA's, ``ema``: (buffer, weight), in the same pass);
    returns 0-dim device tensors {"gen_loss", "masked_rows", "gen_skipped", "gen_grad_norm"}."""
    state.opt_g.zero_grad()
    loss, masked = generator_backward(state, step)
    with region("optimizer + EMA"):
        skipped, norm = _finish_update(state, state.opt_g, loss, masked=masked, ema=ema)
    return {"gen_loss": loss, "masked_rows": masked, "gen_skipped": skipped, "gen_grad_norm": norm}


def train_step(state, step):
    """One IPFM iteration: ``fake_steps`` fake updates, one generator update, EMA (not
    moved when the generator update was skipped). Returns 0-dim device tensors: reading
    one is a host sync, which the loop does once per log window (:class:`StepStats`)."""
    fakes = [fake_step(state, step, k) for k in range(state.cfg.fake_steps)]
    stats = {"fake_loss": _mean([f["fake_loss"] for f in fakes]),
             "fake_skipped": _sum([f["fake_skipped"].long() for f in fakes]),
             "fake_grad_norm": _mean([f["fake_grad_norm"] for f in fakes])}
    if state.ema_weight is not None and not state.capturing:  # a captured fill would replay a stale beta
        state.ema_weight.fill_(1.0 - state.ema.beta(step))
    weight = state.ema_weight if state.ema_weight is not None else 1.0 - state.ema.beta(step)
    # the EMA moves in the generator's Adam pass (skipped with it): one pass over the parameters, not two
    stats.update(generator_step(state, step, ema=(state.ema.buffer_for(state.opt_g.flat), weight)))
    with region("optimizer + EMA"):
        state.ema.copy_buffers()
    return stats


class GraphedStep:
    """:func:`train_step` captured once in a CUDA graph and replayed: one launch per
    iteration instead of thousands. The first ``warmup`` iterations run eagerly on a side
    stream (cuDNN/cuBLAS workspaces, torch.compile's compilation), the next is captured and
    replayed; before each replay the iteration's rngs are reseeded (registered with
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
        st.opt_g.zero_grad()  # the captured backward allocates the gradients
        st.opt_f.zero_grad()
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
# building the state
# --------------------------------------------------------------------------------------


def load_teacher(path, device, trust_pickle=False):
    """The frozen teacher (EMA weights) and its metadata; a one-step generator is refused
    (distilling one as if it were a teacher gives a generator of nothing)."""
    mf = ckpt.load_model(path, device=device, which="ema", trust_pickle=trust_pickle)
    if mf.role != "teacher":
        raise InvalidInput(f"{mf.path} is a one-step generator (role {mf.role!r}), not a teacher: distill a PFGM++ "
                           f"teacher (the teacher.safetensors of a train-teacher run)")
    meta = dict(mf.meta)  # what a snapshot records on its network (a pickle's D and shape) as well
    if mf.D is not None:
        meta.setdefault("D", ckpt._encode_D(mf.D))
    if mf.shape is not None:
        meta.setdefault("shape", mf.shape)
    return mf.model.eval().requires_grad_(False), meta


def _is_conv(module):
    return any(p.dim() == 4 for p in module.parameters())


def _build_nets(cfg, teacher, meta, device, dctx, init=None):
    """(model config, the networks, optimizers and flags of a :class:`DistillState`)."""
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
    if cfg.cuda_graph and (device.type != "cuda" or dctx.enabled):
        raise InvalidInput("--cuda-graph needs a CUDA device and a single process (DDP's all-reduces are not "
                           f"captured); got device {device} with {dctx.world} process(es)")
    # fused Adam (flat.py): one kernel call per step, the only Adam that skips an update on the
    # device (found_inf, see _finish_update); a CUDA graph captures it as it is
    opt_g = FlatAdam(FlatParams(gen_net), lr=cfg.lr, betas=(0.0, cfg.beta2), eps=cfg.eps)
    opt_f = FlatAdam(FlatParams(fake_net), lr=cfg.lr_fake or cfg.lr, betas=(0.0, cfg.beta2), eps=cfg.eps)
    gen_fwd, fake_fwd, fake_frozen_fwd, teacher_fwd = gen_net, fake_net, fake_net, teacher
    if dctx.enabled:
        gen_fwd, fake_fwd = parallel.data_parallel(gen_net, device), parallel.data_parallel(fake_net, device)
    compiled = _switch(cfg.compile, device.type == "cuda")
    if compiled:  # the plain modules keep the parameters; the compiled wrappers share them
        gen_fwd, fake_fwd, teacher_fwd = (torch.compile(m, dynamic=False) for m in (gen_fwd, fake_fwd, teacher))
        fake_frozen_fwd = fake_fwd if not dctx.enabled else torch.compile(fake_net, dynamic=False)
    return model_cfg, dict(gen_net=gen_net, gen_fwd=gen_fwd, fake_net=fake_net, fake_fwd=fake_fwd,
                           fake_frozen_fwd=fake_frozen_fwd, teacher_fwd=teacher_fwd, ema=ema, opt_g=opt_g,
                           opt_f=opt_f, compiled=compiled, channels_last=channels_last, graphed=bool(cfg.cuda_graph))


def _batch_layout(cfg, dctx):
    """(micro-batches per process, rows per micro-batch), filling in cfg.micro_batch."""
    if cfg.micro_batch is None:
        if cfg.batch % dctx.world:
            raise InvalidInput(f"--batch ({cfg.batch}) must be divisible by the number of processes ({dctx.world})")
        cfg.micro_batch = cfg.batch // dctx.world
    if cfg.batch % (cfg.micro_batch * dctx.world):
        raise InvalidInput(f"--batch ({cfg.batch}) must be a multiple of --micro-batch x processes "
                           f"({cfg.micro_batch} x {dctx.world})")
    return cfg.batch // dctx.world // cfg.micro_batch, cfg.micro_batch


def build_state(cfg, *, teacher=None, teacher_meta=None, init=None, dctx=None, device=None, trust_pickle=False):
    """Load the teacher (unless given), fill in the config's defaults from it (D, data,
    micro_batch, model), and build G, the fake network, the EMA and the optimizers
    (DDP-wrapped when ``dctx`` is distributed); G and the fake network start from
    ``init``'s weights (default: the teacher's); ``trust_pickle`` allows a teacher pickle
    (an EDM / PFGM++ snapshot: loading one executes code from it). Returns a :class:`DistillState`."""
    dctx = dctx or Dist()
    device = torch.device(device) if device is not None else common.resolve_device(cfg.device)
    precision = common.resolve_precision(cfg.precision, device)
    if teacher is None:
        teacher, teacher_meta = load_teacher(cfg.teacher, device, trust_pickle=trust_pickle)
    else:
        teacher = teacher.to(device).eval().requires_grad_(False)
    teacher_meta = teacher_meta or {}
    if cfg.D is None:
        if "D" not in teacher_meta:
            raise InvalidInput(f"--D is needed: the teacher {cfg.teacher!r} does not record its D")
        cfg.D = ckpt.decode_D(teacher_meta["D"])
    if cfg.data is None:
        cfg.data = teacher_meta.get("data") or "digits"
    accum, micro = _batch_layout(cfg, dctx)
    model_cfg, nets = _build_nets(cfg, teacher, teacher_meta, device, dctx, init=init)
    cfg.model = model_cfg or {}
    shape = list(cfg.model.get("shape") or teacher_meta.get("shape") or [])
    if not shape:
        raise InvalidInput("distill: the teacher does not record its sample shape")
    return DistillState(cfg=cfg, D=float(cfg.D), shape=shape, device=device, precision=precision, dctx=dctx,
                        accum=accum, micro=micro, teacher_meta=teacher_meta, **nets)


# --------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------


def distill(cfg, *, resume=False, overwrite=False, skip_bad_images=False, trust_pickle=False, progress=None, log=print,
            teacher=None, teacher_meta=None, init=None):
    """Run (or, with ``resume``, continue) a distillation; returns the summary dict (rank 0;
    other ranks return {"rank", "stopped"}). ``teacher``: an already loaded denoiser to use
    instead of ``cfg.teacher`` (with ``teacher_meta`` holding at least its "model" config and
    "D"); ``init``: the module whose weights G and the fake network start from (default: the
    teacher). A folder that holds a run is refused unless ``resume`` or ``overwrite``;
    ``summary["stopped"]`` names the signal when SIGINT/SIGTERM ended the run early (after a
    checkpoint)."""
    cfg.validate()
    with DistributedRun(cfg.device) as (dctx, device), contextlib.ExitStack() as stack:
        run = DistillRun(cfg, dctx=dctx, device=device, resume=resume, overwrite=overwrite, log=log, stack=stack,
                         teacher=teacher, teacher_meta=teacher_meta, init=init, trust_pickle=trust_pickle)
        run.prepare_scoring(skip_bad_images)
        run.train(progress, stack)
        return run.finish()


class DistillRun:
    """One distillation, in named steps: set up or resume (``__init__``), the periodic
    scoring and best-generator selection (:meth:`prepare_scoring`), the loop (:meth:`train`)
    with its log windows (:meth:`log_window`), and :meth:`finish` (files and summary)."""

    def __init__(self, cfg, *, dctx, device, resume, overwrite, log, stack, teacher, teacher_meta, init,
                 trust_pickle=False):
        self.dctx, self.device, self.resume, self.main = dctx, device, resume, dctx.main
        self.say = log if self.main else (lambda *a, **k: None)
        self.ckpt_path = os.path.join(cfg.out, "checkpoint.safetensors")
        if self.main:
            check_writable(cfg.out, folder=True, what="--out")
        common.check_run_folder(cfg.out, self.ckpt_path, resume=resume, overwrite=overwrite, main=self.main)
        if resume:
            saved = DistillConfig.from_json(ckpt.read_meta(self.ckpt_path, kind="training")["config"])
            for keep in RESUMABLE:
                setattr(saved, keep, getattr(cfg, keep))
            cfg = saved.validate()
        asked_D = cfg.D
        self.state = st = build_state(cfg, teacher=teacher, teacher_meta=teacher_meta, init=init, dctx=dctx,
                                      device=device, trust_pickle=trust_pickle)
        self.cfg = cfg = st.cfg
        stack.enter_context(common.num_threads(common.resolve_threads(cfg.threads, device, count_params(st.gen_net))))
        if device.type == "cpu":
            host_memory.keep_freed()
        self.say(self._header())
        teacher_D = st.teacher_meta.get("D")
        if asked_D is not None and teacher_D is not None and ckpt.decode_D(teacher_D) != float(asked_D) and not resume:
            self.say(f"warning: the teacher was trained at D = {ckpt.decode_D(teacher_D):g}; distilling at D = "
                     f"{float(asked_D):g} as asked (the generator's prior and the perturbations use D = "
                     f"{float(asked_D):g})")
        self.start, self.elapsed0, self.bad_run, self.saved_best = 0, 0.0, 0, None
        if resume:
            meta = ckpt.load_state(self.ckpt_path, **self._state_files(), device=device)
            self.start, self.saved_best = meta["step"], meta.get("best")
            self.elapsed0, self.bad_run = float(meta.get("train_seconds", 0.0)), int(meta.get("bad_run", 0))
            self.say(f"resumed from {self.ckpt_path} at iteration {self.start}")
        self.log_path = os.path.join(cfg.out, "log.jsonl")
        if self.main:
            common.write_json(os.path.join(cfg.out, "config.json"), cfg.to_json())
            common.truncate_jsonl(self.log_path, self.start if resume else -1)
        self.data_id = st.teacher_meta.get("data_id")
        self.selector = None

    def _header(self):
        cfg, st = self.cfg, self.state
        return (f"distill: generator and fake = {describe(st.gen_net, cfg.model)} from the teacher's EMA; D = "
                f"{cfg.D:g}{' (SiD)' if math.isinf(cfg.D) else ''}, alpha = {cfg.alpha}, sigma_init = "
                f"{cfg.sigma_init}, {cfg.fake_steps} fake step(s) per iteration, {cfg.steps} iterations x batch "
                f"{cfg.batch} ({self.dctx.world} process(es) x {st.accum} micro-batch(es) of {cfg.micro_batch}), lr "
                f"{cfg.lr:g}, EMA {cfg.ema}, device {self.device} ({st.precision}"
                f"{f', {torch.get_num_threads()} CPU threads' if self.device.type == 'cpu' else ''}"
                f"{', channels_last' if st.channels_last else ''}"
                f"{', torch.compile: the first iterations compile the networks' if st.compiled else ''}"
                f"{', CUDA graph of the whole iteration' if st.graphed else ''})")

    def _state_files(self):
        """What a checkpoint holds (the names are the file format: old checkpoints resume)."""
        st = self.state
        return dict(modules={"generator": st.gen_net, "generator_ema": st.ema.model, "fake": st.fake_net},
                    optimizers={"opt_g": st.opt_g, "opt_fake": st.opt_f}, rngs={})

    def save_checkpoint(self, step):
        if self.main:
            best = self.selector.best if self.selector else {"score_train": math.inf, "step": None}
            ckpt.save_state(self.ckpt_path, **self._state_files(), step=step, config=self.cfg.to_json(),
                            model_cfg=self.cfg.model,
                            extra={"best": best, "train_seconds": self.book.elapsed, "bad_run": self.bad_run,
                                   "role": "generator", "sigma_init": self.cfg.sigma_init, "data_id": self.data_id})

    def save_generator(self, name, step, **extra):
        """``name``.safetensors, or ``name``.pkl for a network without a model config (one
        from a trusted snapshot: only its own code rebuilds it)."""
        cfg = self.cfg
        meta = dict(D=ckpt._encode_D(float(cfg.D)), sigma_init=cfg.sigma_init, data=cfg.data, data_id=self.data_id,
                    steps=step, role="generator", recipe=cfg.to_json(), **extra)
        if not cfg.model:
            return ckpt.save_pickled_denoiser(os.path.join(cfg.out, name + ".pkl"), self.state.ema.model, **meta)
        return ckpt.save_denoiser(os.path.join(cfg.out, name + ".safetensors"), self.state.ema.model, cfg.model,
                                  **meta)

    def prepare_scoring(self, skip_bad_images):
        """Rank 0 with ``eval_every``: the data, the scorer and the best-generator keeper; a
        fresh run scores the initial generator (the teacher at 1 NFE) as iteration 0."""
        cfg, st = self.cfg, self.state
        if not (self.main and cfg.eval_every):
            return
        from ipfm_fast.data import load_dataset

        data = load_dataset(cfg.data, test_fraction=cfg.test_fraction, skip_bad_images=skip_bad_images, log=self.say)
        if data.shape != list(st.shape):
            raise InvalidInput(f"the teacher makes samples of shape {list(st.shape)} but the evaluation data "
                               f"{data.name} has images of {data.shape}: give the data it was trained on (--data)")
        if cfg.data == st.teacher_meta.get("data"):
            self.data_id = data.identity()
        cache = cfg.teacher if isinstance(cfg.teacher, str) and os.path.isdir(cfg.teacher) else cfg.out
        with common.num_threads(1 if self.device.type == "cpu" else None):
            scorer = SelectionScorer(data, cache, self.device, log=self.say)
        num = cfg.eval_samples or len(data.train)

        def score(step):
            x = generate(st.ema.model, num, st.shape, st.D, cfg.sigma_init, seed=cfg.eval_seed, device=self.device,
                         autocast=st.autocast, backend=cfg.backend)
            with common.num_threads(1 if self.device.type == "cpu" else None):
                return scorer.score(x)

        def save(step, score_train):
            self.save_generator("generator", step, score_train=score_train)

        curve = curve_from_log(self.log_path) if self.resume else []
        self.selector = BestGenerator(score, save, best=self.saved_best, curve=curve)
        if self.start == 0:
            s0 = self.selector.evaluate(0)
            with common.JSONLLogger(self.log_path) as jl:
                jl.log(step=0, images_seen=0, train_seconds=0.0, **s0)
            self.say(f"initial generator (the teacher at 1 NFE): {scorer.ev.score_name} vs train "
                     f"{s0['score_train']:.4f}, vs test {s0['score_test']:.4f}")

    def train(self, progress, stack):
        cfg, st = self.cfg, self.state
        self.book = book = RunBook(steps=cfg.steps, start=self.start, batch=cfg.batch, log_every=cfg.log_every,
                                   checkpoint_every=cfg.checkpoint_every, log_path=self.log_path, stack=stack,
                                   desc="distill", progress=progress, time_budget=cfg.time_budget,
                                   elapsed0=self.elapsed0, dctx=self.dctx, device=self.device, main=self.main)
        # A steady-state iteration never waits for the device: the statistics stay there and
        # are read once per log window; the processes agree to stop (an all-reduce) at those reads.
        self.window, self.warned = StepStats(self.device, run=self.bad_run), 0
        run_step = step_runner(st)
        for step in range(self.start, cfg.steps):
            self.window.add(run_step(step))
            tick = book.tick()
            if tick.read:
                self.log_window(tick.done)
            if self.selector is not None and (tick.done % cfg.eval_every == 0 or tick.last):
                s = self.selector.evaluate(tick.done)
                best = self.selector.best
                book.note(postfix={"score": f"{s['score_test']:.4f}",
                                   "best": f"{best['score_train']:.4f}@{best['step']}"}, **s)
            if tick.checkpoint:
                if not tick.read:
                    self.bad_run = int(self.window.run)  # a checkpoint syncs anyway
                self.save_checkpoint(tick.done)
            if tick.stop:
                break
        book.close()

    def log_window(self, done):
        """The log window's one host sync: read the statistics, warn about skipped updates and
        masked rows, stop a run that keeps diverging, and log the window's line."""
        w, book = self.window.read(), self.book
        self.bad_run, first = w["run"], book.window_start + 1
        if (w["skipped"] or w["masked_rows"]) and self.warned < 20:
            span = f"{first}{f'-{done}' if first < done else ''}"
            msg = (f"distill: iteration{'s' if first < done else ''} {span}: "
                   + (f"skipped {w['skipped']} update(s) with a non-finite loss or gradient; " if w["skipped"] else "")
                   + f"{w['masked_rows']} generator row(s) with NaN/Inf masked")
            if self.main:
                warnings.warn(msg, RuntimeWarning, stacklevel=1)
            self.warned += 1
        if w["worst_run"] >= self.cfg.max_bad_steps:
            self.save_checkpoint(done)
            raise TrainingDiverged(
                f"distill: {w['worst_run']} iterations in a row had non-finite losses or gradients (seen at "
                f"iteration {done}: mean finite fake loss {w['fake_loss']}, generator loss {w['gen_loss']}, "
                f"{w['masked_rows']} masked rows since iteration {first}). The teacher or the networks produce "
                f"NaN/Inf: check the teacher checkpoint, lower --lr, or use --precision fp32. The last good state is "
                f"in {self.ckpt_path}.")
        book.log(fake_loss=w["fake_loss"], gen_loss=w["gen_loss"], masked_rows=w["masked_rows"], skipped=w["skipped"],
                 fake_grad_norm=w["fake_grad_norm"], gen_grad_norm=w["gen_grad_norm"],
                 postfix={"fake": f"{w['fake_loss']:.3f}", "gen": f"{w['gen_loss']:.3f}"})

    def finish(self):
        cfg, st, book = self.cfg, self.state, self.book
        if not self.main:
            return {"rank": self.dctx.rank, "stopped": book.stop_reason}
        done, seconds, iters = book.done, book.seconds, book.done - self.start
        self.save_generator("generator_last", done)
        if self.selector is None:  # no selection: the last EMA is the result
            self.save_generator("generator", done)
        kept, _, _, _ = load_generator(cfg.out, self.device, trust_pickle=True)  # ours: written above
        # every run folder shows its samples
        grid = save_grid(generate(kept, GRID_SAMPLES, st.shape, st.D, cfg.sigma_init, seed=cfg.eval_seed,
                                  device=self.device, autocast=st.autocast, backend=cfg.backend),
                         os.path.join(cfg.out, "samples.png"), nrow=10)
        best = self.selector.best if self.selector else {"score_train": math.inf, "step": None}
        summary = {
            "generator": generator_file(cfg.out), "samples": grid,
            "steps": done,
            "resumed_from": self.start if self.resume else None, "stopped": book.stop_reason,
            "train_seconds": seconds, "total_train_seconds": self.elapsed0 + seconds,
            "images_per_second": iters * cfg.batch / max(seconds, 1e-9), "best_step": best["step"],
            "best_score_train": best["score_train"], "parameters": count_params(st.gen_net), "device": str(self.device),
            "precision": st.precision, "world_size": self.dctx.world, "D": ckpt._encode_D(float(cfg.D)),
            "data": cfg.data, "curve": self.selector.curve if self.selector else [],
        }
        common.write_json(os.path.join(cfg.out, "summary.json"), summary)
        how = f"stopped by {book.stop_reason}" if book.stop_reason else "done"
        kept_what = (f"best EMA generator (iteration {best['step']}, score vs train {best['score_train']:.4f})"
                     if self.selector else f"EMA generator of the last iteration ({done}; --eval-every 0: no scores "
                                           f"to choose by)")
        self.say(f"distilled {iters} iterations in {seconds:.1f} s ({summary['images_per_second']:.0f} images/s, "
                 f"{how}); {kept_what} -> {summary['generator']}; samples -> {grid}")
        if book.stop_reason in ("SIGTERM", "SIGINT"):
            self.say(f"interrupted by {book.stop_reason}: checkpoint at iteration {done} in {self.ckpt_path}; "
                     f"continue with --resume")
        return summary
