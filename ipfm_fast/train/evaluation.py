"""Scoring models, shared by the teacher and distillation loops and the CLI: one-step
samples of a generator, multi-seed scores of a teacher (ODE) or a generator (1 NFE) against
the test split, and the periodic score of the EMA generator against the *training* split
that picks the best one (the test split stays for the final report)."""

import contextlib
import json
import math
import os
import time

import torch

import ipfm_fast as ipf
from ipfm_fast import checkpoint as ckpt
from ipfm_fast._files import read_json
from ipfm_fast.data import save_grid
from ipfm_fast.train import common


PRIOR_CHUNK = 10_000  # prior rows drawn per call: bounded memory, and the draws do not depend on the batch


@torch.no_grad()
def iter_generate(model, num, shape, D, sigma_init=2.5, *, seed=0, device="cpu", batch=2000, autocast=None,
                  backend="auto"):
    """One-step samples G(z) = model(z, sigma_init), z ~ prior(sigma_init, D), yielded in
    batches of ``batch`` rows: the prior is drawn :data:`PRIOR_CHUNK` rows at a time from one
    generator seeded with ``seed``, so the samples are a function of the seed alone
    (whatever ``batch``), and memory stays bounded for any ``num``."""
    device = torch.device(device)
    rng = torch.Generator(device=device).manual_seed(int(seed))
    for start in range(0, num, PRIOR_CHUNK):
        rows = min(PRIOR_CHUNK, num - start)
        z = ipf.sample_prior((rows, *shape), sigma_init, D, device=device, dtype=torch.float32, generator=rng,
                             backend=backend)
        for i in range(0, rows, batch):
            with (autocast() if autocast else contextlib.nullcontext()):
                yield model(z[i:i + batch], sigma_init).float()


def generate(model, num, shape, D, sigma_init=2.5, **kw):
    """All of :func:`iter_generate`'s samples in one tensor [num, *shape]."""
    return torch.cat(list(iter_generate(model, num, shape, D, sigma_init, **kw)))


def score_seeds(make_samples, data, cache_dir, *, seeds, num, nfe, device, log=print, grid=None, evaluator=None,
                grid_upscale=None):
    """Scores ``make_samples(num, seed)`` for each seed against the test split; returns
    {"fd", "sw", "nn_ratio" (summaries over seeds), the data baseline, "nfe", "num_samples",
    "n_test", the feature space, "seconds", "per_seed"} and logs one line. ``grid``: a PNG of
    the first seed's first 100 samples."""
    from ipfm_fast.metrics import Evaluator, summarize

    t0 = time.perf_counter()
    ev = evaluator or Evaluator(data, cache_dir, device=device, log=log)
    per_seed = []
    for seed in seeds:
        x = make_samples(num, seed)
        per_seed.append(dict(seed=seed, **ev.score(x)))
        if grid and seed == seeds[0]:
            save_grid(x[:100], grid, nrow=10, upscale=grid_upscale)
    score, space_fd, fd, sw, nn_ratio = (summarize([r[k] for r in per_seed])
                                         for k in ("score", "space_fd", "fd", "sw", "nn_ratio"))
    res = {"score": score, "score_name": ev.score_name, "baseline_score": ev.baseline["baseline_score"],
           "space_fd": space_fd, "space_fd_name": ev.space_fd_name,
           "baseline_space_fd": ev.baseline["baseline_space_fd"],
           "fd": fd, "sw": sw, "nn_ratio": nn_ratio, "baseline_fd": ev.baseline["baseline_fd"],
           "baseline_sw": ev.baseline["baseline_sw"], "nfe": nfe, "num_samples": num, "n_test": len(data.test),
           "features": ev.info["features"], "classifier_test_accuracy": ev.info["test_accuracy"],
           "seconds": time.perf_counter() - t0, "per_seed": per_seed}
    spread = (lambda v, f: f" +- {v['std']:{f}} (std over {len(seeds)} seeds)" if len(seeds) > 1 else "")
    log(f"{ev.score_name} at {nfe} NFE: {score['mean']:.3f}{spread(score, '.3f')}; data baseline (train vs test) "
        f"{res['baseline_score']:.3f}, excess {score['mean'] - res['baseline_score']:.3f} | {ev.space_fd_name}: "
        f"{space_fd['mean']:.4f} (baseline {res['baseline_space_fd']:.4f}) | FD in {ev.feature_space()}: "
        f"{fd['mean']:.3f}{spread(fd, '.3f')} (baseline {res['baseline_fd']:.3f}) | SW: {sw['mean']:.4f} (baseline "
        f"{res['baseline_sw']:.4f}) | nearest-train-image distance ratio {nn_ratio['mean']:.2f} (1 = as novel as "
        f"test images)")
    ev.warn_sample_count(num, log)
    return res


def evaluate_denoiser(model, data, D, cache_dir, *, num, steps=18, seeds=(0,), device="cpu", precision="fp32",
                      log=print, grid=None, evaluator=None, batch=1000, backend="auto"):
    """A teacher's scores (:func:`score_seeds`) on ``num`` Heun-ODE samples per seed."""
    from ipfm_fast.sampling import nfe, sample

    device = torch.device(device)
    amp = (lambda: common.autocast(device, precision))  # noqa: E731

    def make(n, seed):
        return sample(model, n, data.shape, D, seed=seed, steps=steps, device=device, autocast=amp, batch=batch,
                      backend=backend)

    res = score_seeds(make, data, cache_dir, seeds=list(seeds), num=num, nfe=nfe(steps), device=device, log=log,
                      grid=grid, evaluator=evaluator)
    res["steps"] = steps
    return res


def evaluate_generator(model, data, D, sigma_init, cache_dir, *, num=None, seeds=(0, 1, 2, 3, 4), device="cpu",
                       precision="fp32", log=print, grid=None, evaluator=None, grid_upscale=None, backend="auto"):
    """A one-step generator's scores (:func:`score_seeds`) at 1 NFE (``num`` default: the
    training split's size)."""
    device = torch.device(device)

    def make(n, seed):
        return generate(model, n, data.shape, D, sigma_init, seed=seed, device=device, backend=backend,
                        autocast=lambda: common.autocast(device, precision))

    return score_seeds(make, data, cache_dir, seeds=list(seeds), num=num or len(data.train), nfe=1, device=device,
                       log=log, grid=grid, evaluator=evaluator, grid_upscale=grid_upscale)


class SelectionScorer:
    """The score (the metrics' score space, e.g. pixel FD) of 1-NFE samples against the
    *training* split (for picking the best checkpoint: the test split stays for the final
    report) and against the test split (for the training curve)."""

    def __init__(self, data, cache_dir, device, log=None):
        from ipfm_fast.metrics import Evaluator

        self.ev = Evaluator(data, cache_dir, device=device, log=log)

    def score(self, x):
        from ipfm_fast.metrics import kernel_distance

        emb = self.ev.embed(x.detach().float().cpu().clamp(-1, 1))
        return {"score_train": 1e3 * kernel_distance(emb, self.ev.train_emb),
                "score_test": 1e3 * kernel_distance(emb, self.ev.test_emb)}


class BestGenerator:
    """Scores the EMA generator (``score(step)`` -> {"score_train", "score_test"}) and keeps
    the best by the training-split score: ``save(step, score_train)`` writes it when it is
    better. ``best`` is {"score_train", "step"} (restored on resume); ``curve`` the scores so
    far."""

    def __init__(self, score, save, best=None, curve=None):
        self._score, self._save = score, save
        best = best if best and "score_train" in best else None  # a run of the classifier-FD era starts over
        self.best = best or {"score_train": math.inf, "step": None}
        self.best["score_train"] = float(self.best["score_train"])
        self.curve = curve or []

    def evaluate(self, step):
        s = self._score(step)
        self.curve.append(dict(step=step, **s))
        if s["score_train"] < self.best["score_train"]:
            self.best = {"score_train": s["score_train"], "step": step}
            self._save(step, s["score_train"])
        return s


def curve_from_log(path):
    """The scores a (truncated) log.jsonl holds: the curve of a resumed run so far."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [{k: r[k] for k in ("step", "score_train", "score_test")} for r in map(json.loads, f)
                if "score_test" in r]


def generator_file(path):
    """The generator a run folder keeps: ``generator.safetensors``, or ``generator.pkl``
    for a run distilled from a pickled snapshot; a file path is returned as it is."""
    if not os.path.isdir(path):
        return path
    for name in ("generator.safetensors", "generator.pkl"):
        if os.path.exists(os.path.join(path, name)):
            return os.path.join(path, name)
    return os.path.join(path, "generator.safetensors")  # missing: load_denoiser names it


def load_generator(path, device="cpu", trust_pickle=False):
    """A saved one-step generator (a generator file or a run folder holding one):
    (model, D, sigma_init, metadata). A ``.pkl`` generator needs ``trust_pickle``."""
    model, meta = ckpt.load_denoiser(generator_file(path), device=device, trust_pickle=trust_pickle)
    return model, ckpt.decode_D(meta["D"]), float(meta["sigma_init"]), meta


def final_evaluation(out, *, seeds=5, device="auto", precision="auto", num=None, log=print, grid=None,
                     skip_bad_images=False, trust_pickle=False):
    """Score the generator ``out`` keeps at 1 NFE over seeds 0..seeds-1 against the test
    split; writes ``out``/eval.json and returns it."""
    from ipfm_fast.data import load_dataset

    device = common.resolve_device(device)
    precision = common.resolve_precision(precision, device)
    model, D, sigma_init, meta = load_generator(out, device, trust_pickle=trust_pickle)
    cfg = read_json(os.path.join(out, "config.json"), what="distill run config")
    data = load_dataset(meta.get("data") or cfg.get("data") or "digits", test_fraction=cfg.get("test_fraction", 0.1),
                        skip_bad_images=skip_bad_images, log=log)
    cache = cfg["teacher"] if os.path.isdir(cfg.get("teacher", "")) else out
    with common.num_threads(1 if device.type == "cpu" else None):
        res = evaluate_generator(model, data, D, sigma_init, cache, num=num, seeds=list(range(seeds)), device=device,
                                 precision=precision, log=log, grid=grid, backend=cfg.get("backend", "auto"))
    res["generator"] = os.path.abspath(generator_file(out))
    res["generator_step"] = meta.get("steps")
    common.write_json(os.path.join(out, "eval.json"), res)
    return res
