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
well), one torch.Generator for every random draw, so ``--resume`` continues bit-identically
on CPU.

Run folder (``out``): ``config.json``, ``checkpoint.safetensors`` (resume state),
``teacher.safetensors`` (EMA weights + model config: what ``sample``/``evaluate``/``distill``
load), ``log.jsonl``, ``summary.json`` and, with evaluation on, ``samples.png`` and the
cached FD classifier.
"""

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field

import torch

import ipfm_fast as ipf
from ipfm_fast import checkpoint as ckpt
from ipfm_fast._files import check_writable
from ipfm_fast.data import load_dataset
from ipfm_fast.errors import InvalidInput, TrainingDiverged
from ipfm_fast.models import build_denoiser, count_params, describe, model_config
from ipfm_fast.reference import sample_sigma_train
from ipfm_fast.train import common

# The fused ops (the fake-field loss is the teacher's loss); the same names exist in
# ipfm_fast.reference, so `_ops = reference` runs the pure-PyTorch spec instead.
_ops = ipf


@dataclass
class TeacherConfig:
    """Every setting of a teacher run (saved as config.json; the defaults are the tuned
    digits recipe: ~1-2 minutes on 2 CPU cores)."""

    data: str = "digits"
    out: str = "runs/teacher"
    D: float = 128.0
    arch: str = "auto"
    width: int | None = None
    depth: int | None = None
    mults: list | None = None
    steps: int = 3000
    batch: int = 256
    lr: float = 2e-3
    warmup: int = 200
    ema: float = 0.998
    grad_clip: float = 1.0
    p_mean: float = -1.2
    p_std: float = 1.2
    target: str = "x"
    ref_batch: int = 1024
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    threads: str = "auto"
    checkpoint_every: int = 1000
    log_every: int = 50
    eval_samples: int | None = None  # None: the training split's size; 0: no evaluation
    eval_steps: int = 18
    eval_seed: int = 0
    test_fraction: float = 0.1
    model: dict = field(default_factory=dict)  # filled in: the model config

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


def _lr_at(cfg, step):
    return cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1))


def teacher_loss(model, x, cfg, generator, train=None, autocast=None):
    """One step's loss (a 0-dim fp32 tensor) and the sigmas drawn. ``train`` (a
    :class:`ipfm_fast.data.Split` on x's device) supplies the extra reference images for
    ``target="field"``."""
    b = x.shape[0]
    sigma = sample_sigma_train(b, p_mean=cfg.p_mean, p_std=cfg.p_std, device=x.device, generator=generator)
    y = ipf.perturb(x, sigma, cfg.D, generator=generator)
    if cfg.target == "field":
        extra = torch.randint(len(train), (cfg.ref_batch - b,), generator=generator, device=x.device)
        x_ref = torch.cat([x, train.floats(extra)])
        target = _ops.field_target(y, sigma, x_ref, cfg.D)
    else:
        target = x
    with autocast or common.autocast(x.device, "fp32"):
        out = model(y, sigma)
    return _ops.ipfm_fake_loss(out.float(), target, sigma), sigma


# What --resume may change: the budget, the device and the outputs; the recipe comes from the checkpoint.
RESUMABLE = ("steps", "device", "precision", "threads", "checkpoint_every", "log_every", "eval_samples", "eval_steps",
             "eval_seed", "out")


def train_teacher(cfg, *, resume=False, overwrite=False, skip_bad_images=False, progress=None, log=print):
    """Train (or, with ``resume``, continue) a teacher; returns the summary dict
    (``summary["stopped"]`` names the signal when SIGINT/SIGTERM ended it early, after a
    checkpoint). A folder that holds a run is refused unless ``resume`` or ``overwrite``.
    ``progress``: show a tqdm bar (None: when stderr is a terminal); ``log``: where the
    one-line messages go."""
    cfg.validate()
    with contextlib.ExitStack() as stack:
        return _train_teacher(cfg, resume=resume, overwrite=overwrite, skip_bad_images=skip_bad_images,
                              progress=progress, log=log, stack=stack)


def _train_teacher(cfg, *, resume, overwrite, skip_bad_images, progress, log, stack):
    device = common.resolve_device(cfg.device)
    precision = common.resolve_precision(cfg.precision, device)
    out = cfg.out
    check_writable(out, folder=True, what="--out")
    ckpt_path = os.path.join(out, "checkpoint.safetensors")
    common.check_run_folder(out, ckpt_path, resume=resume, overwrite=overwrite)

    if resume:
        saved = TeacherConfig.from_json(ckpt.read_meta(ckpt_path)["config"])
        for keep in RESUMABLE:
            setattr(saved, keep, getattr(cfg, keep))
        cfg = saved.validate()

    data = load_dataset(cfg.data, test_fraction=cfg.test_fraction, skip_bad_images=skip_bad_images, log=log)
    log(data.describe())
    train = data.train.to(device)

    cfg.model = cfg.model or model_config(cfg.arch, data.shape, width=cfg.width, depth=cfg.depth, mults=cfg.mults)
    if list(cfg.model["shape"]) != data.shape:
        raise InvalidInput(f"the model expects rows of shape {cfg.model['shape']} but {cfg.data} has {data.shape}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_denoiser(cfg.model)
    model.to(device).train()
    threads = common.resolve_threads(cfg.threads, device, count_params(model))
    stack.enter_context(common.num_threads(threads))
    ema = common.EMA(model, cfg.ema)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    gen = common.make_generator(device, cfg.seed + 1)
    log(f"teacher: {describe(model, cfg.model)}; D = {cfg.D:g}, target = {cfg.target}, "
        f"{cfg.steps} steps x batch {cfg.batch}, device {device} ({precision}"
        f"{f', {torch.get_num_threads()} CPU threads' if device.type == 'cpu' else ''})")

    start = 0
    if resume:
        meta = ckpt.load_training(ckpt_path, model=model, ema=ema, optimizer=opt, generators={"train": gen},
                                  device=device)
        start = meta["step"]
        log(f"resumed from {ckpt_path} at step {start}")
    common.write_json(os.path.join(out, "config.json"), cfg.to_json())
    log_path = os.path.join(out, "log.jsonl")
    common.truncate_jsonl(log_path, start if resume else -1)

    amp = common.autocast(device, precision)
    order = common.BatchOrder(cfg.batch, len(train), cfg.seed, device)
    bar = common.progress(cfg.steps, initial=start, desc="train-teacher", enabled=progress)
    signals = stack.enter_context(common.StopSignals())
    t0 = time.perf_counter()
    t_last, n_last, loss_acc, loss_n = t0, 0, torch.zeros((), device=device), 0
    step, done = start, start

    def save_checkpoint(step):
        ckpt.save_training(ckpt_path, model=model, ema=ema.model, optimizer=opt, generators={"train": gen},
                           step=step, config=cfg.to_json(), extra={"role": "teacher", "data_id": data.identity()})

    with common.JSONLLogger(log_path) as jl:
        for step in range(start, cfg.steps):
            lr = _lr_at(cfg, step)
            for group in opt.param_groups:
                group["lr"] = lr
            x = train.floats(order(step))
            loss, _ = teacher_loss(model, x, cfg, gen, train=train, autocast=amp)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            ema.update(model, step)
            loss_acc += loss.detach()
            loss_n += 1
            n_last += cfg.batch
            bar.update(1)
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                now = time.perf_counter()
                mean_loss = float(loss_acc) / loss_n
                ips = n_last / max(now - t_last, 1e-9)
                bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{ips:.0f}")
                jl.log(step=done, loss=mean_loss, images_per_second=ips, lr=lr, images_seen=done * cfg.batch)
                if not math.isfinite(mean_loss):
                    raise TrainingDiverged(f"train-teacher: loss became {mean_loss} at step {done}; lower --lr")
                t_last, n_last, loss_acc, loss_n = now, 0, torch.zeros((), device=device), 0
            if done % cfg.checkpoint_every == 0 or done == cfg.steps or signals.received:
                save_checkpoint(done)
            if signals.received:
                break
    bar.close()
    train_seconds = time.perf_counter() - t0
    summary = {
        "steps": done, "resumed_from": start if resume else None, "stopped": signals.received,
        "train_seconds": train_seconds, "images_per_second": (done - start) * cfg.batch / max(train_seconds, 1e-9),
        "parameters": count_params(model), "device": str(device), "precision": precision,
        "D": ckpt._encode_D(float(cfg.D)), "data": cfg.data,
    }
    if signals.received:  # no teacher.safetensors from an unfinished run
        common.write_json(os.path.join(out, "summary.json"), summary)
        log(f"interrupted by {signals.received} after {done - start} steps: checkpoint at step {done} in "
            f"{ckpt_path}; continue with --resume")
        return summary
    teacher_path = ckpt.save_denoiser(os.path.join(out, "teacher.safetensors"), ema.model, cfg.model,
                                      D=ckpt._encode_D(float(cfg.D)), data=cfg.data, data_id=data.identity(),
                                      steps=cfg.steps, role="teacher", recipe=cfg.to_json())
    summary["teacher"] = teacher_path
    log(f"trained {cfg.steps - start} steps in {train_seconds:.1f} s "
        f"({summary['images_per_second']:.0f} images/s); EMA weights -> {teacher_path}")

    eval_n = len(data.train) if cfg.eval_samples is None else cfg.eval_samples
    grid = os.path.join(out, "samples.png")
    if eval_n:
        summary["eval"] = evaluate_denoiser(ema.model, data, cfg.D, out, num=eval_n, steps=cfg.eval_steps,
                                            seeds=[cfg.eval_seed], device=device, precision=precision, log=log,
                                            grid=grid)
    else:  # every run folder shows its samples
        from ipfm_fast.data import save_grid
        from ipfm_fast.sampling import sample

        x = sample(ema.model, GRID_SAMPLES, data.shape, cfg.D, seed=cfg.eval_seed, steps=cfg.eval_steps,
                   device=device, autocast=lambda: common.autocast(device, precision))
        save_grid(x, grid, nrow=10)
    summary["samples"] = grid
    common.write_json(os.path.join(out, "summary.json"), summary)
    return summary


GRID_SAMPLES = 100  # images in a run folder's samples.png


def evaluate_denoiser(model, data, D, cache_dir, *, num, steps=18, seeds=(0,), device="cpu", precision="fp32",
                      log=print, grid=None, evaluator=None, batch=1000):
    """Sample ``num`` images per seed with the Heun sampler and score them; returns
    {"fd": summary over seeds, "sw": ..., "baseline_fd", "baseline_sw", "nfe", "per_seed": [...]}."""
    from ipfm_fast.data import save_grid
    from ipfm_fast.metrics import Evaluator, summarize
    from ipfm_fast.sampling import nfe, sample

    device = torch.device(device)
    t0 = time.perf_counter()
    ev = evaluator or Evaluator(data, cache_dir, device=device, log=log)
    per_seed = []
    amp = (lambda: common.autocast(device, precision))
    for seed in seeds:
        x = sample(model, num, data.shape, D, seed=seed, steps=steps, device=device, autocast=amp, batch=batch)
        per_seed.append(dict(seed=seed, **ev.score(x)))
        if grid and seed == seeds[0]:
            save_grid(x[:100], grid, nrow=10)
    fd = summarize([r["fd"] for r in per_seed])
    sw = summarize([r["sw"] for r in per_seed])
    nn_ratio = summarize([r["nn_ratio"] for r in per_seed])
    res = {"fd": fd, "sw": sw, "nn_ratio": nn_ratio, "baseline_fd": ev.baseline["baseline_fd"], "baseline_sw": ev.baseline["baseline_sw"],
           "nfe": nfe(steps), "steps": steps, "num_samples": num, "n_test": len(data.test),
           "features": ev.info["features"], "classifier_test_accuracy": ev.info["test_accuracy"],
           "seconds": time.perf_counter() - t0, "per_seed": per_seed}
    spread = f" +- {fd['std']:.3f} (std over {len(seeds)} seeds)" if len(seeds) > 1 else f" (seed {seeds[0]})"
    log(f"FD at {res['nfe']} NFE: {fd['mean']:.3f}{spread} in {ev.feature_space()}; data baseline (train vs "
        f"test): {res['baseline_fd']:.3f}; ratio {fd['mean'] / max(res['baseline_fd'], 1e-12):.2f}x | "
        f"SW: {sw['mean']:.4f} vs baseline {res['baseline_sw']:.4f} | nearest-train-image distance ratio "
        f"{nn_ratio['mean']:.2f} (1 = as novel as test images)")
    ev.warn_sample_count(num, log)
    return res
