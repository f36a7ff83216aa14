r"""PFGM++ teacher training (``ipfm-fast train-teacher``).

Each step, for a batch x of training images:

.. math::
    \ln\sigma \sim \mathcal N(P_{mean}, P_{std}^2), \quad y = \mathrm{perturb}(x, \sigma, D), \quad
    \mathcal L = \tfrac1B\sum_i \lambda(\sigma_i)\,\lVert D_\theta(y_i, \sigma_i) - t_i\rVert^2,
    \quad \lambda(\sigma) = \frac{\sigma^2 + \sigma_d^2}{(\sigma\sigma_d)^2}

with the target t = x (``target="x"``, PFGM++'s objective; D = inf is EDM) or the
reference-batch field target t = field_target(y, sigma, x_ref, D) (``target="field"``,
PFGM++'s STF variance reduction): x_ref = the batch plus ``ref_batch - batch`` other
training images. Adam with a linear warm-up, EMA of the weights (the EMA is what samples
well), one torch.Generator (``rng``) for every random draw, so ``--resume`` continues
bit-identically on CPU.

Run folder (``out``): ``config.json``, ``checkpoint.safetensors`` (resume state),
``teacher.safetensors`` (EMA weights + model config: what ``sample``/``evaluate``/``distill``
load), ``log.jsonl``, ``summary.json``, ``samples.png`` and, with evaluation on, the cached
FD classifier.
"""

import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass

import torch

import ipfm_fast as ipf
from ipfm_fast import checkpoint as ckpt
from ipfm_fast._files import check_writable
from ipfm_fast.data import load_dataset, save_grid
from ipfm_fast.errors import InvalidInput, TrainingDiverged
from ipfm_fast.models import build_denoiser, count_params, describe, model_config
from ipfm_fast.schedules import sample_sigma_train
from ipfm_fast.train import common, host_memory
from ipfm_fast.train.evaluation import evaluate_denoiser
from ipfm_fast.train.flat import FlatParams
from ipfm_fast.train.knobs import INT_LIST, knob, nonneg_int, parse_D, positive_int, resumable, runtime_knob
from ipfm_fast.train.runbook import RunBook

GRID_SAMPLES = 100  # images in a run folder's samples.png
MODEL, OPT, RUN = "model", "optimisation", "checkpoints, logs and evaluation"


@dataclass
class TeacherConfig:
    """Every setting of a teacher run (saved as config.json; the defaults are the tuned
    digits recipe: ~1-2 minutes on 2 CPU cores). Each field is also its CLI option."""

    data: str = knob("digits", "'digits', a folder of PNG/JPEG images or an .npz of uint8 images")
    test_fraction: float = knob(0.1, "held-out fraction for folder/.npz data without a given split (digits: 360 "
                                     "images)", type=float)
    out: str = knob("runs/teacher", "run folder", resume=True)
    D: float = knob(128.0, "augmentation dimension: a positive number or inf (EDM)", type=parse_D)
    arch: str = knob("auto", "raw network inside EDM preconditioning; auto = MLP for images of <= 1024 values (e.g. "
                             "8x8 digits), U-Net for larger ones", group=MODEL, choices=("auto", "mlp", "unet"))
    width: int | None = knob(None, "MLP width (default 128) or U-Net base channels (default 32)", group=MODEL,
                             type=positive_int)
    depth: int | None = knob(None, "MLP residual blocks (default 3) or U-Net blocks per resolution (default 1)",
                             group=MODEL, type=positive_int)
    mults: list | None = knob(None, "U-Net channel multipliers, one per resolution, e.g. --mults 1 2 2 (default by "
                                    "image size: 1 2 up to 8x8, 1 2 2 up to 16x16, 1 2 2 2 above)", group=MODEL,
                              **INT_LIST)
    steps: int = knob(3000, "training steps (one batch each)", group=OPT, resume=True, type=positive_int)
    batch: int = knob(256, "images per step", group=OPT, type=positive_int)
    lr: float = knob(2e-3, "Adam learning rate (after a linear warm-up)", group=OPT, type=float)
    warmup: int = knob(200, "warm-up steps", group=OPT, type=nonneg_int)
    ema: float = knob(0.998, "EMA decay per step (with a short warm-up)", group=OPT, type=float)
    grad_clip: float = knob(1.0, "gradient-norm clip (0: off)", group=OPT, type=float)
    p_mean: float = knob(-1.2, "mean of ln sigma", group=OPT, type=float)
    p_std: float = knob(1.2, "std of ln sigma", group=OPT, type=float)
    target: str = knob("x", "regression target: the clean batch x, or the reference-batch field target (STF)",
                       group=OPT, choices=("x", "field"))
    ref_batch: int = knob(1024, "reference batch size M for --target field (the batch plus M - batch other images)",
                          group=OPT, type=positive_int)
    seed: int = knob(0, "seed of the initial weights, batch order and noise", group=OPT, type=int)
    checkpoint_every: int = knob(1000, "steps between checkpoints (one is also written at the end and on "
                                       "SIGINT/SIGTERM)", group=RUN, resume=True, type=positive_int)
    log_every: int = knob(50, "steps per log.jsonl line", group=RUN, resume=True, type=positive_int)
    eval_samples: int | None = knob(None, "samples for the final evaluation (default: the training split's size; 0: "
                                          "skip)", group=RUN, resume=True, type=nonneg_int)
    eval_steps: int = knob(18, "Heun steps of the final evaluation and samples.png (NFE = 2 steps - 1)", group=RUN,
                           resume=True, type=positive_int)
    eval_seed: int = knob(0, "seed of the final evaluation's samples", resume=True, cli=False)
    device: str = runtime_knob("device")
    precision: str = runtime_knob("precision")
    threads: str = runtime_knob("threads")
    backend: str = runtime_knob("backend")
    model: dict = knob(None, "the model config (filled in)", cli=False, default_factory=dict)

    def validate(self):
        if not (isinstance(self.D, (int, float)) and (self.D > 0)):
            raise InvalidInput(f"--D must be a positive number or inf, got {self.D}")
        for name in ("steps", "batch", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise InvalidInput(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise InvalidInput(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.ema < 1:
            raise InvalidInput(f"--ema must be in [0, 1), got {self.ema}")
        if self.target not in ("x", "field"):
            raise InvalidInput(f"--target must be 'x' or 'field', got {self.target!r}")
        if self.target == "field" and self.ref_batch < self.batch:
            raise InvalidInput(f"--ref-batch ({self.ref_batch}) must be >= --batch ({self.batch}): the reference "
                               f"batch holds the batch itself plus ref_batch - batch other images")
        if self.eval_samples is not None and self.eval_samples < 0:
            raise InvalidInput(f"--eval-samples must be >= 0, got {self.eval_samples}")
        return self

    def to_json(self):
        d = dataclasses.asdict(self)
        d["D"] = ckpt._encode_D(float(self.D))
        return d

    @classmethod
    def from_json(cls, d):
        d = dict(d)
        d["D"] = ckpt.decode_D(d["D"])
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


RESUMABLE = resumable(TeacherConfig)  # what --resume may change; the recipe comes from the checkpoint


def _lr_at(cfg, step):
    return cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1))


def teacher_loss(model, x, cfg, rng, train=None, autocast=None):
    """One step's loss (a 0-dim fp32 tensor) and the sigmas drawn (every draw from the
    torch.Generator ``rng``). ``train`` (a :class:`ipfm_fast.data.Split` on x's device)
    supplies the extra reference images for ``target="field"``."""
    b = x.shape[0]
    sigma = sample_sigma_train(b, p_mean=cfg.p_mean, p_std=cfg.p_std, device=x.device, generator=rng)
    y = ipf.perturb(x, sigma, cfg.D, generator=rng, backend=cfg.backend)
    if cfg.target == "field":
        extra = torch.randint(len(train), (cfg.ref_batch - b,), generator=rng, device=x.device)
        x_ref = torch.cat([x, train.floats(extra)])
        target = ipf.field_target(y, sigma, x_ref, cfg.D, backend=cfg.backend)
    else:
        target = x
    with autocast or common.autocast(x.device, "fp32"):
        out = model(y, sigma)
    return ipf.ipfm_fake_loss(out.float(), target, sigma, backend=cfg.backend), sigma


def train_teacher(cfg, *, resume=False, overwrite=False, skip_bad_images=False, progress=None, log=print):
    """Train (or, with ``resume``, continue) a teacher; returns the summary dict
    (``summary["stopped"]`` names the signal when SIGINT/SIGTERM ended it early, after a
    checkpoint). A folder that holds a run is refused unless ``resume`` or ``overwrite``.
    ``progress``: show a tqdm bar (None: when stderr is a terminal); ``log``: where the
    one-line messages go."""
    cfg.validate()
    with contextlib.ExitStack() as stack:
        run = TeacherRun(cfg, resume=resume, overwrite=overwrite, skip_bad_images=skip_bad_images, log=log,
                         stack=stack)
        run.train(progress, stack)
        return run.finish()


class TeacherRun:
    """One teacher run, in named steps: set up (or resume) in ``__init__``, :meth:`train`
    (the loop), :meth:`finish` (teacher file, evaluation, grid, summary)."""

    def __init__(self, cfg, *, resume, overwrite, skip_bad_images, log, stack):
        self.device = common.resolve_device(cfg.device)
        self.precision = common.resolve_precision(cfg.precision, self.device)
        self.log, self.resume = log, resume
        check_writable(cfg.out, folder=True, what="--out")
        self.ckpt_path = os.path.join(cfg.out, "checkpoint.safetensors")
        common.check_run_folder(cfg.out, self.ckpt_path, resume=resume, overwrite=overwrite)
        if resume:
            saved = TeacherConfig.from_json(ckpt.read_meta(self.ckpt_path, kind="training")["config"])
            for keep in RESUMABLE:
                setattr(saved, keep, getattr(cfg, keep))
            cfg = saved.validate()
        self.cfg = cfg
        self.data = load_dataset(cfg.data, test_fraction=cfg.test_fraction, skip_bad_images=skip_bad_images, log=log)
        log(self.data.describe())
        self.train_split = self.data.train.to(self.device)
        cfg.model = cfg.model or model_config(cfg.arch, self.data.shape, width=cfg.width, depth=cfg.depth,
                                              mults=cfg.mults)
        if list(cfg.model["shape"]) != self.data.shape:
            raise InvalidInput(f"the model expects rows of shape {cfg.model['shape']} but {cfg.data} has "
                               f"{self.data.shape}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.net = build_denoiser(cfg.model)
        self.net.to(self.device).train()
        stack.enter_context(common.num_threads(common.resolve_threads(cfg.threads, self.device,
                                                                      count_params(self.net))))
        if self.device.type == "cpu":
            host_memory.keep_freed()
        self.params = FlatParams(self.net)  # the EMA's source: the parameters in one buffer
        self.ema = common.EMA(self.net, cfg.ema)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
        self.rng = common.make_rng(self.device, cfg.seed + 1)
        log(f"teacher: {describe(self.net, cfg.model)}; D = {cfg.D:g}, target = {cfg.target}, {cfg.steps} steps x "
            f"batch {cfg.batch}, device {self.device} ({self.precision}"
            f"{f', {torch.get_num_threads()} CPU threads' if self.device.type == 'cpu' else ''})")
        self.start = 0
        if resume:
            self.start = ckpt.load_state(self.ckpt_path, **self._state(), device=self.device)["step"]
            log(f"resumed from {self.ckpt_path} at step {self.start}")
        common.write_json(os.path.join(cfg.out, "config.json"), cfg.to_json())
        self.log_path = os.path.join(cfg.out, "log.jsonl")
        common.truncate_jsonl(self.log_path, self.start if resume else -1)

    def _state(self):
        """What a checkpoint holds (the names are the file format: old checkpoints resume)."""
        return dict(modules={"model": self.net, "ema": self.ema.model}, optimizers={"opt": self.opt},
                    rngs={"train": self.rng})

    def save_checkpoint(self, step):
        ckpt.save_state(self.ckpt_path, **self._state(), step=step, config=self.cfg.to_json(),
                        extra={"role": "teacher", "data_id": self.data.identity()})

    def train(self, progress, stack):
        cfg, net = self.cfg, self.net
        amp = common.autocast(self.device, self.precision)
        order = common.BatchOrder(cfg.batch, len(self.train_split), cfg.seed, self.device)
        book = self.book = RunBook(steps=cfg.steps, start=self.start, batch=cfg.batch, log_every=cfg.log_every,
                                   checkpoint_every=cfg.checkpoint_every, log_path=self.log_path, stack=stack,
                                   desc="train-teacher", progress=progress)
        loss_sum, loss_n = torch.zeros((), device=self.device), 0
        for step in range(self.start, cfg.steps):
            lr = _lr_at(cfg, step)
            for group in self.opt.param_groups:
                group["lr"] = lr
            x = self.train_split.floats(order(step))
            loss, _ = teacher_loss(net, x, cfg, self.rng, train=self.train_split, autocast=amp)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            self.opt.step()
            self.ema.update(self.params, step)
            loss_sum += loss.detach()
            loss_n += 1
            tick = book.tick()
            if tick.read:
                mean_loss = float(loss_sum) / loss_n
                book.log(loss=mean_loss, lr=lr, postfix={"loss": f"{mean_loss:.4f}"})
                if not math.isfinite(mean_loss):
                    raise TrainingDiverged(f"train-teacher: loss became {mean_loss} at step {tick.done}; lower --lr")
                loss_sum, loss_n = torch.zeros((), device=self.device), 0
            if tick.checkpoint:
                self.save_checkpoint(tick.done)
            if tick.stop:
                break
        book.close()

    def finish(self):
        cfg, book, out = self.cfg, self.book, self.cfg.out
        done, seconds = book.done, book.seconds
        summary = {
            "steps": done, "resumed_from": self.start if self.resume else None, "stopped": book.stop_reason,
            "train_seconds": seconds, "images_per_second": (done - self.start) * cfg.batch / max(seconds, 1e-9),
            "parameters": count_params(self.net), "device": str(self.device), "precision": self.precision,
            "D": ckpt._encode_D(float(cfg.D)), "data": cfg.data,
        }
        if book.stop_reason:  # no teacher.safetensors from an unfinished run
            common.write_json(os.path.join(out, "summary.json"), summary)
            self.log(f"interrupted by {book.stop_reason} after {done - self.start} steps: checkpoint at step {done} "
                     f"in {self.ckpt_path}; continue with --resume")
            return summary
        summary["teacher"] = ckpt.save_denoiser(os.path.join(out, "teacher.safetensors"), self.ema.model, cfg.model,
                                                D=ckpt._encode_D(float(cfg.D)), data=cfg.data,
                                                data_id=self.data.identity(), steps=cfg.steps, role="teacher",
                                                recipe=cfg.to_json())
        self.log(f"trained {cfg.steps - self.start} steps in {seconds:.1f} s ({summary['images_per_second']:.0f} "
                 f"images/s); EMA weights -> {summary['teacher']}")
        summary["samples"] = self._score_or_grid(summary)
        common.write_json(os.path.join(out, "summary.json"), summary)
        return summary

    def _score_or_grid(self, summary):
        """The final evaluation (it writes samples.png), or without one just the grid."""
        cfg, grid = self.cfg, os.path.join(self.cfg.out, "samples.png")
        eval_n = len(self.data.train) if cfg.eval_samples is None else cfg.eval_samples
        if eval_n:
            summary["eval"] = evaluate_denoiser(self.ema.model, self.data, cfg.D, cfg.out, num=eval_n,
                                                steps=cfg.eval_steps, seeds=[cfg.eval_seed], device=self.device,
                                                precision=self.precision, log=self.log, grid=grid,
                                                backend=cfg.backend)
            return grid
        from ipfm_fast.sampling import sample

        x = sample(self.ema.model, GRID_SAMPLES, self.data.shape, cfg.D, seed=cfg.eval_seed, steps=cfg.eval_steps,
                   device=self.device, autocast=lambda: common.autocast(self.device, self.precision),
                   backend=cfg.backend)
        return save_grid(x, grid, nrow=10)
