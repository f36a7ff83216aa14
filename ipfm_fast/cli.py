"""Command line: ``ipfm-fast <command>`` (also ``python -m ipfm_fast <command>``).

Each command is a function ``cmd_<name>(args)`` plus an ``add_<name>(subparsers)`` that
declares its arguments; COMMANDS lists them in help order.
"""

import argparse
import json
import math
import os
import sys
import time

import torch

from ipfm_fast.errors import Interrupted, InvalidInput, IpfmError, MissingFile
from ipfm_fast.train.knobs import (INT_LIST, add_options, add_runtime_options, from_args, nonneg_int, parse_D,
                                   positive_int)


def add_info(sub):
    p = sub.add_parser("info", help="versions, build flags, backends available and why not",
                       description="Print versions, build flags and which backend serves which device.")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def cmd_info(args):
    from ipfm_fast.info import collect, format_report

    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


# --------------------------------------------------------------------------------------
# shared options (argument types and the runtime texts live in ipfm_fast.train.knobs)
# --------------------------------------------------------------------------------------


def _add_progress(p):
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="tqdm progress bars (default: when stderr is a terminal)")


def _add_runtime(p):
    """The runtime options of a command without a config (sample, evaluate)."""
    _add_progress(add_runtime_options(p))


def _add_run_flags(p):
    """The options of a training command that are not part of its config."""
    g = p.add_argument_group("run folder")
    g.add_argument("--resume", action="store_true",
                   help="continue from --out/checkpoint.safetensors (bit-identical on CPU); the recipe comes from the "
                        "checkpoint: only the budget, the device and the output settings may be given")
    g.add_argument("--overwrite", action="store_true",
                   help="start over in an --out folder that already holds a run (its checkpoint is deleted)")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="leave out unreadable image files of a --data folder (each is named) instead of stopping")
    _add_progress(g)


def _log(msg):
    print(msg, flush=True)


def _exit_code(summary):
    """0 for a finished run; 128 + the signal's number (130 SIGINT, 143 SIGTERM) for one a
    signal stopped after its checkpoint, so a script can tell the two apart."""
    from ipfm_fast.train.common import EXIT_CODES

    return EXIT_CODES.get((summary or {}).get("stopped"), 0)


def _check_resume_flags(args, ckpt_path, resumable):
    """--resume continues the saved recipe: a recipe flag (a config field a resume may not
    change) given with another value than the checkpoint's would be ignored, so it is
    refused, naming each one."""
    from ipfm_fast.checkpoint import decode_D, read_meta

    if not os.path.exists(ckpt_path):
        return  # the run says there is nothing to resume
    saved = read_meta(ckpt_path, kind="training").get("config", {})
    conflicts = []
    for dest in sorted(args.given - set(resumable)):
        if dest not in saved:
            continue
        value, was = getattr(args, dest), saved[dest]
        if dest == "D":
            was = decode_D(was)
        if value != was:
            conflicts.append(f"--{dest.replace('_', '-')} {_shown(value)} (saved: {_shown(was)})")
    if conflicts:
        raise InvalidInput(f"--resume continues the recipe saved in {ckpt_path}; these flags differ from it and "
                           f"would be ignored: {', '.join(conflicts)}. Drop them, or start a new run (another --out, "
                           f"or --overwrite)")


def _shown(v):
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    if isinstance(v, (list, tuple)):
        return " ".join(map(str, v))
    return str(v)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where there is a default and the help does not already
    say what it is (a default of None is "chosen at run time", which the help explains)."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


# --------------------------------------------------------------------------------------
# train-teacher
# --------------------------------------------------------------------------------------


def add_train_teacher(sub):
    from ipfm_fast.train.teacher import TeacherConfig

    p = sub.add_parser(
        "train-teacher", help="train a PFGM++ teacher (default: digits, D=128, ~2 min on 2 CPU cores)",
        description="Train a PFGM++ denoiser D(y, sigma) -> x with ln sigma ~ N(P_mean, P_std^2), "
                    "y = perturb(x, sigma, D) and loss lambda(sigma)||D(y, sigma) - target||^2. Writes "
                    "config.json, checkpoint.safetensors (resume state), teacher.safetensors (EMA weights), "
                    "log.jsonl, summary.json and samples.png into --out, then (unless --eval-samples 0) "
                    "scores it at --eval-steps NFE next to the train-vs-test data baseline.",
        formatter_class=HelpFormatter)
    add_options(p, TeacherConfig)
    _add_run_flags(p)


def cmd_train_teacher(args):
    from ipfm_fast.train.teacher import RESUMABLE, TeacherConfig, train_teacher

    if args.resume:
        _check_resume_flags(args, os.path.join(args.out, "checkpoint.safetensors"), RESUMABLE)
    summary = train_teacher(from_args(TeacherConfig, args), resume=args.resume, overwrite=args.overwrite,
                            skip_bad_images=args.skip_bad_images, progress=args.progress, log=_log)
    print(f"summary: {os.path.join(args.out, 'summary.json')}")
    return _exit_code(summary)


# --------------------------------------------------------------------------------------
# sample
# --------------------------------------------------------------------------------------


TRUST_PICKLE_HELP = "allow loading a pickle (.pkl/.pt): this EXECUTES CODE from the file; only for trusted files"


def _add_model_source(p, source=None):
    """The options naming a model file (sample, evaluate); ``source``: the group --teacher
    belongs to (evaluate's, where --samples is the alternative), else required."""
    (source or p).add_argument(
        "--teacher", required=source is None,
        help="the model: a run folder (teacher or distill run), teacher.safetensors, generator.safetensors, a "
             "training checkpoint, or (with --trust-pickle) a .pkl/.pt network")
    p.add_argument("--weights", default="ema",
                   help="which weights of a training checkpoint: ema (samples well) or model (the online "
                        "weights, which do not)")
    p.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE_HELP)
    p.add_argument("--D", type=parse_D, default=None,
                   help="augmentation dimension: only for files that do not record it (pickles); default: the "
                        "file's")
    p.add_argument("--shape", **INT_LIST, default=None,
                   help="one sample's shape C H W: only for files that do not record it (pickles)")


def _load_model(args, device, path=None, role=None):
    """The model file (:class:`ipfm_fast.checkpoint.ModelFile`) at ``path`` (default
    --teacher) with its D and shape: taken from the file; --D / --shape only fill in what a
    foreign pickle does not record, and are refused when they contradict the file.
    ``role``: refuse a file that is not one ("generator" for `generate`)."""
    from ipfm_fast.checkpoint import load_model
    from ipfm_fast.models import count_params

    path = path or args.teacher
    mf = load_model(path, device=device, which=args.weights, trust_pickle=args.trust_pickle)
    if role is not None and mf.role != role:
        raise InvalidInput(f"{mf.path} is a {mf.role}, not a {role}: "
                           + ("sample or evaluate a teacher with `sample --teacher` / `evaluate --teacher`"
                              if role == "generator" else "give a teacher"))
    if args.D is not None:
        if mf.D is not None and args.D != mf.D:
            raise InvalidInput(f"--D {args.D:g} contradicts {mf.path}, which was trained at D = {mf.D:g} (its prior "
                               f"and its field depend on D); drop --D")
        mf.D = args.D
    if mf.D is None:
        raise InvalidInput(f"--D is needed: {path!r} does not record its augmentation dimension")
    if args.shape is not None:
        if mf.shape is not None and list(args.shape) != mf.shape:
            raise InvalidInput(f"--shape {' '.join(map(str, args.shape))} contradicts {mf.path}, whose samples are "
                               f"{mf.shape}; drop --shape")
        mf.shape = list(args.shape)
    if mf.shape is None:
        raise InvalidInput("--shape C H W is needed: the model does not record its sample shape")
    arch = (mf.meta.get("model") or {}).get("arch", type(getattr(mf.model, "net", mf.model)).__name__)
    _log(f"model: {mf.describe()}; {arch}, {count_params(mf.model):,} parameters")
    return mf


def _refuse_sampler_flags(args, mf, flags=("steps", "sigma_max", "sigma_min", "rho")):
    """A one-step generator has no sampler settings: refuse them rather than ignore them."""
    given = [f"--{f.replace('_', '-')}" for f in flags if f in args.given]
    if mf.role == "generator" and given:
        raise InvalidInput(f"{mf.path} is a one-step generator: it samples in 1 NFE from its sigma_init = "
                           f"{mf.sigma_init:g}; {', '.join(given)} (the teacher's ODE sampler) do not apply")


def add_sample(sub):
    p = sub.add_parser(
        "sample", help="sample a teacher (Heun ODE, 18 steps = 35 NFE) or a one-step generator (1 NFE); PNG grid "
                       "and/or .npz",
        description="A teacher (teacher.safetensors, a train-teacher run) is sampled with EDM's Heun ODE in sigma "
                    "from the PFGM++ prior at --sigma-max; a one-step generator (generator.safetensors, a distill "
                    "run) is evaluated once at its recorded sigma_init, from the prior at that level. Deterministic "
                    "for a seed.",
        formatter_class=HelpFormatter)
    _add_model_source(p)
    p.add_argument("--num", type=positive_int, default=100, help="number of samples")
    p.add_argument("--seed", type=int, default=0, help="seed of the prior draw (same seed, same samples)")
    g = p.add_argument_group("teacher sampler (not for one-step generators)")
    g.add_argument("--steps", type=positive_int, default=18, help="Heun steps (NFE = 2 steps - 1)")
    g.add_argument("--sigma-max", type=float, default=80.0, help="noise level of the prior the ODE starts from")
    g.add_argument("--sigma-min", type=float, default=0.002, help="last noise level before the final step to 0")
    g.add_argument("--rho", type=float, default=7.0, help="EDM's time-step spacing exponent")
    p.add_argument("--batch", type=positive_int, default=1000, help="samples per network batch")
    p.add_argument("--png", default=None, help="write a grid of (up to 400) samples here")
    p.add_argument("--npz", default=None, help="write all samples here (uint8 x [N, H, W, C] and float x_float)")
    _add_runtime(p)


def _generate_or_sample(mf, num, *, seed, device, precision, batch, progress=None, steps=18, sigma_max=80.0,
                        sigma_min=0.002, rho=7.0):
    """num samples of a model file: 1 NFE from sigma_init for a generator, the Heun ODE for a
    teacher. Returns (samples, NFE)."""
    from ipfm_fast.sampling import nfe, sample
    from ipfm_fast.train import common
    from ipfm_fast.train.evaluation import generate

    amp = lambda: common.autocast(device, precision)  # noqa: E731
    if mf.role == "generator":
        x = generate(mf.model, num, mf.shape, mf.D, mf.sigma_init, seed=seed, device=device, batch=batch, autocast=amp)
        if progress is not None:
            progress.update(num)
        return x, 1
    return sample(mf.model, num, mf.shape, mf.D, seed=seed, steps=steps, batch=batch, device=device,
                  sigma_max=sigma_max, sigma_min=sigma_min, rho=rho, autocast=amp, progress=progress), nfe(steps)


def cmd_sample(args):
    from ipfm_fast._files import check_writable
    from ipfm_fast.data import save_grid
    from ipfm_fast.models import count_params
    from ipfm_fast.sampling import nfe, save_npz
    from ipfm_fast.train import common

    if not args.png and not args.npz:
        raise InvalidInput("nothing to write: give --png PATH and/or --npz PATH")
    if not (0 < args.sigma_min < args.sigma_max):
        raise InvalidInput(f"need 0 < --sigma-min < --sigma-max, got {args.sigma_min}, {args.sigma_max}")
    for path, name in ((args.png, "--png"), (args.npz, "--npz")):
        if path:
            check_writable(path, what=name)
    device = common.resolve_device(args.device)
    precision = common.resolve_precision(args.precision, device)
    mf = _load_model(args, device)
    _refuse_sampler_flags(args, mf)
    steps = 1 if mf.role == "generator" else args.steps
    with common.num_threads(common.resolve_threads(args.threads, device, count_params(mf.model))):
        label = "1 NFE" if mf.role == "generator" else f"{nfe(steps)} NFE"
        bar = common.progress(args.num, desc=f"sample ({label})", enabled=args.progress)
        t0 = time.perf_counter()
        x, n_fe = _generate_or_sample(mf, args.num, seed=args.seed, device=device, precision=precision,
                                      batch=args.batch, progress=bar, steps=steps, sigma_max=args.sigma_max,
                                      sigma_min=args.sigma_min, rho=args.rho)
        bar.close()
        dt = time.perf_counter() - t0
    how = f"from sigma_init = {mf.sigma_init:g}" if mf.role == "generator" else f"from sigma_max = {args.sigma_max:g}"
    _log(f"{args.num} samples at {n_fe} NFE {how} in {dt:.1f} s ({args.num / max(dt, 1e-9):.0f} images/s)")
    if args.png:
        _log(f"grid -> {save_grid(x[:400], args.png)}")
    if args.npz:
        saved = save_npz(args.npz, x, seed=args.seed, nfe=n_fe, D=mf.D, role=mf.role, model=mf.path, data=mf.data)
        _log(f"samples -> {saved}")
    return 0


# --------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------


def add_generate(sub):
    p = sub.add_parser(
        "generate", help="images from a one-step generator (1 NFE): PNG grid, .npz and/or a folder of PNGs",
        description="Evaluate a distilled one-step generator (generator.safetensors or a distill run folder) "
                    "once at its recorded sigma_init on prior draws, in batches; deterministic for a seed "
                    "whatever --batch.",
        formatter_class=HelpFormatter)
    p.add_argument("--generator", required=True, help="generator.safetensors, a distill run folder or checkpoint")
    p.add_argument("--weights", default="ema", help="which weights of a training checkpoint: ema or model")
    p.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE_HELP)
    p.add_argument("--num", type=positive_int, default=100, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="seed of the prior draws (same seed, same images)")
    p.add_argument("--batch", type=positive_int, default=2000, help="images per network batch")
    p.add_argument("--png", default=None, help="write a grid of (up to 400) images here")
    p.add_argument("--npz", default=None, help="write all images here (uint8 x [N, H, W, C], as `sample --npz`)")
    p.add_argument("--folder", default=None, help="write each image as a PNG into this folder (000000.png, ...)")
    p.set_defaults(D=None, shape=None)
    _add_runtime(p)


def _save_pngs(x, folder, start=0):
    """Images in [-1, 1] ([B, C, H, W]) as folder/<index>.png, numbered from ``start``."""
    from PIL import Image

    from ipfm_fast._files import replacing
    from ipfm_fast.data import to_uint8

    for i, img in enumerate(to_uint8(x)):
        path = os.path.join(folder, f"{start + i:06d}.png")
        with replacing(path, ".png") as tmp:
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(tmp)


def cmd_generate(args):
    from ipfm_fast._files import check_writable
    from ipfm_fast.data import save_grid
    from ipfm_fast.sampling import save_npz
    from ipfm_fast.train import common
    from ipfm_fast.train.evaluation import iter_generate

    if not (args.png or args.npz or args.folder):
        raise InvalidInput("nothing to write: give --png PATH, --npz PATH and/or --folder DIR")
    for path, name in ((args.png, "--png"), (args.npz, "--npz")):
        if path:
            check_writable(path, what=name)
    if args.folder:
        check_writable(args.folder, folder=True, what="--folder")
    device = common.resolve_device(args.device)
    precision = common.resolve_precision(args.precision, device)
    mf = _load_model(args, device, path=args.generator, role="generator")
    bar = common.progress(args.num, desc="generate (1 NFE)", enabled=args.progress)
    t0, kept, written = time.perf_counter(), [], 0
    for x in iter_generate(mf.model, args.num, mf.shape, mf.D, mf.sigma_init, seed=args.seed, device=device,
                           batch=args.batch, autocast=lambda: common.autocast(device, precision)):
        x = x.cpu()
        if args.folder:
            _save_pngs(x, args.folder, start=written)
        if args.png or args.npz:
            kept.append(x if args.npz else x[:max(0, 400 - written)])
        written += len(x)
        bar.update(len(x))
    bar.close()
    dt = time.perf_counter() - t0
    _log(f"{written} images at 1 NFE from sigma_init = {mf.sigma_init:g} in {dt:.1f} s ({written / max(dt, 1e-9):.0f} "
         f"images/s)")
    x = torch.cat(kept) if kept else None
    if args.png:
        _log(f"grid -> {save_grid(x[:400], args.png)}")
    if args.npz:
        saved = save_npz(args.npz, x, seed=args.seed, nfe=1, D=mf.D, role="generator", model=mf.path, data=mf.data)
        _log(f"images -> {saved}")
    if args.folder:
        _log(f"{written} PNGs -> {args.folder}")
    return 0


# --------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------


def add_evaluate(sub):
    p = sub.add_parser(
        "evaluate", help="score a model's samples (or an .npz) against the test split; --fid: FID/KID as the papers",
        description="Score a teacher (sampled with the Heun ODE), a one-step generator (1 NFE from its sigma_init) "
                    "or an .npz of samples against the data set's held-out test split, one sample set per seed: the "
                    "score (KID x 1e3, unbiased, in pixel space for images of at most 1024 values, else in standardized "
                    "classifier features) and the FD in that space, the FD in the features of a small classifier "
                    "trained on the "
                    "training split (cached in --cache-dir; a data set without labels only has random-network "
                    "features, which every score then says) and pixel-space sliced Wasserstein-2, always next to the "
                    "train-vs-test data baseline. --fid instead computes FID and KID in the standard FID Inception "
                    "features (torch-fidelity) against reference statistics.",
        formatter_class=HelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--samples", help=".npz of samples (uint8 x [N, H, W, C], as `sample --npz` writes)")
    src.add_argument("--generator", help="a one-step generator (generator.safetensors or a distill run folder)")
    _add_model_source(p, source=src)
    p.add_argument("--data", default=None,
                   help="data set to compare with (default: the one the model or the samples record, else digits)")
    p.add_argument("--test-fraction", type=float, default=0.1, help="as in train-teacher")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave out unreadable image files of a --data folder (each is named) instead of stopping")
    p.add_argument("--seeds", type=positive_int, default=5, help="sampling seeds 0..N-1 (mean and spread reported)")
    p.add_argument("--num", type=positive_int, default=None,
                   help="samples per seed (default: the training split's size, the baseline's sample count; "
                        "with --fid 50000)")
    p.add_argument("--steps", type=positive_int, default=18, help="teacher's Heun steps (NFE = 2 steps - 1)")
    p.add_argument("--cache-dir", default=None,
                   help="where the FD classifier is cached (default: the model's run folder, or next to --samples)")
    p.add_argument("--json", dest="json_out", default=None, help="also write the results as JSON here")
    f = p.add_argument_group("FID (the papers' metric, for real data sets)")
    f.add_argument("--fid", action="store_true",
                   help="FID and KID in the FID Inception features (torch-fidelity), seed 0's --num samples")
    f.add_argument("--inception-weights", default=None,
                   help="the FID Inception weights file pt_inception-2015-12-05-6726825d.pth (default: "
                        "$IPFM_FAST_INCEPTION_WEIGHTS; never downloaded)")
    f.add_argument("--fid-ref", default=None,
                   help="reference statistics .npz (mu, sigma; EDM/PFGM++ format), e.g. cifar10-32x32.npz "
                        "(default: computed from --data's training split)")
    f.add_argument("--save-ref", default=None, help="write the reference statistics computed from --data here")
    _add_runtime(p)


def _check_data_matches(data, shape, what, recorded=None):
    """Scores compare like with like: the samples' shape must be the data's, and a model
    scored against other data than it was trained on is said so."""
    if list(shape) != data.shape:
        raise InvalidInput(f"{what} makes samples of shape {list(shape)} but the data set {data.name} has images of "
                           f"{data.shape}: give the data it was trained on (--data)")
    if recorded and recorded.get("fingerprint") not in (None, data.fingerprint()):
        _log(f"warning: {what} was trained on {recorded.get('name')} (fingerprint {recorded.get('fingerprint')}) "
             f"but is scored against {data.name} ({data.fingerprint()})")


def cmd_evaluate(args):
    from ipfm_fast._files import check_writable
    from ipfm_fast.train import common

    for path, name in ((args.json_out, "--json"), (args.save_ref, "--save-ref")):
        if path:
            check_writable(path, what=name)
    if (args.fid_ref or args.save_ref or args.inception_weights) and not args.fid:
        raise InvalidInput("--fid-ref, --save-ref and --inception-weights go with --fid")
    if args.fid_ref and args.save_ref:
        raise InvalidInput("--save-ref writes the statistics computed from --data; with --fid-ref none are computed")
    device = common.resolve_device(args.device)
    precision = common.resolve_precision(args.precision, device)
    load = dict(test_fraction=args.test_fraction, skip_bad_images=args.skip_bad_images, log=_log)
    if args.samples:
        res, data = _evaluate_samples(args, device, load)
    else:
        res, data = _evaluate_model(args, device, precision, load)
    res["data"] = data.describe()
    if args.json_out:
        from ipfm_fast.train.common import write_json

        write_json(args.json_out, res)
        _log(f"results -> {args.json_out}")
    return 0


def _evaluate_samples(args, device, load):
    from ipfm_fast.data import load_dataset, load_images
    from ipfm_fast.metrics import Evaluator, summarize
    from ipfm_fast.sampling import read_npz_meta
    from ipfm_fast.train import common

    if not os.path.exists(args.samples):
        raise MissingFile(f"--samples: {args.samples!r} does not exist")
    x = load_images(args.samples)  # before the data and its classifier: a wrong shape fails at once
    made = read_npz_meta(args.samples) if os.path.isfile(args.samples) else {}
    data = load_dataset(args.data or made.get("data") or "digits", **load)
    _check_data_matches(data, x.shape[1:], f"--samples {args.samples}")
    if args.fid:
        return _fid(args, x, data, device), data
    cache = args.cache_dir or os.path.dirname(os.path.abspath(args.samples))
    with common.num_threads(1 if device.type == "cpu" else None):
        ev = Evaluator(data, cache, device=device, log=_log)
        res = ev.score(x)
    res.update({k: summarize([res[k]]) for k in ("score", "space_fd", "fd", "sw")})
    _log(f"{ev.score_name}: {res['score']['mean']:.3f} (data baseline {res['baseline_score']:.3f}) | "
         f"{ev.space_fd_name}: {res['space_fd']['mean']:.4f} (baseline {res['baseline_space_fd']:.4f}) | FD in "
         f"{ev.feature_space()}: {res['fd']['mean']:.3f} (baseline {res['baseline_fd']:.3f}) | SW: "
         f"{res['sw']['mean']:.4f} (baseline {res['baseline_sw']:.4f}) | {res['n']} samples vs {res['n_test']} "
         f"test images")
    ev.warn_sample_count(res["n"], _log)
    return res, data


def _evaluate_model(args, device, precision, load):
    from ipfm_fast.data import load_dataset
    from ipfm_fast.models import count_params
    from ipfm_fast.train import common
    from ipfm_fast.train.evaluation import evaluate_denoiser, evaluate_generator

    path = args.generator or args.teacher
    mf = _load_model(args, device, path=path, role="generator" if args.generator else None)
    _refuse_sampler_flags(args, mf, flags=("steps",))
    data = load_dataset(args.data or mf.data or "digits", **load)
    _check_data_matches(data, mf.shape, mf.path, mf.data_id)
    with common.num_threads(common.resolve_threads(args.threads, device, count_params(mf.model))):
        if args.fid:
            x, _ = _generate_or_sample(mf, args.num or 50_000, seed=0, device=device, precision=precision,
                                       batch=1000, steps=args.steps)
            res = _fid(args, x, data, device)
        else:
            cache = args.cache_dir or (path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)))
            kw = dict(num=args.num or len(data.train), seeds=list(range(args.seeds)), device=device,
                      precision=precision, log=_log)
            res = (evaluate_generator(mf.model, data, mf.D, mf.sigma_init, cache, **kw) if mf.role == "generator"
                   else evaluate_denoiser(mf.model, data, mf.D, cache, steps=args.steps, **kw))
    res.update(model=mf.path, role=mf.role, D="inf" if math.isinf(mf.D) else mf.D)
    return res, data


def _fid(args, x, data, device):
    """FID (and KID where the reference features exist) of samples x in the FID Inception features."""
    from ipfm_fast import fid
    from ipfm_fast.train import common

    net = fid.inception(args.inception_weights, device=device)  # fails fast on a missing package or file
    bar = common.progress(len(x), desc="Inception features", enabled=args.progress)
    feats = fid.features(net, x, device=device, progress=bar)
    res = {"fid_samples": len(x), "fid_reference": args.fid_ref or f"{data.name} training split"}
    if args.fid_ref:
        ref_stats, ref_feats = fid.load_reference(args.fid_ref), None
    else:
        ref_feats = fid.features(net, data.train.floats(), device=device, progress=bar)
        ref_stats = fid.statistics(ref_feats)
        if args.save_ref:
            _log(f"reference statistics -> {fid.save_reference(args.save_ref, *ref_stats)}")
    bar.close()
    res["fid"] = fid.fid(fid.statistics(feats), ref_stats)
    res["kid"] = fid.kid(feats, ref_feats) if ref_feats is not None else None
    kid = f"{res['kid']:.5f}" if res["kid"] is not None else "n/a (reference statistics only, no features)"
    _log(f"FID: {res['fid']:.3f} | KID: {kid} ({len(x)} samples vs {res['fid_reference']}; FID Inception features)")
    return res


# --------------------------------------------------------------------------------------
# distill
# --------------------------------------------------------------------------------------


def add_distill(sub):
    from ipfm_fast.train.distill import DistillConfig

    p = sub.add_parser(
        "distill", help="distil a teacher into a one-step generator with IPFM (D = inf: SiD)",
        description="IPFM distillation: generator G(z) = D_theta(z, sigma_init) and fake network start from the "
                    "teacher's EMA weights; each iteration makes --fake-steps fake updates (field-matching loss on "
                    "perturbed generator samples) and one generator update (IPFM loss with alpha, teacher and fake "
                    "frozen). Writes config.json, checkpoint.safetensors (resume state), generator.safetensors "
                    "(the best EMA generator by 1-NFE FD against the training split), generator_last.safetensors, "
                    "log.jsonl and summary.json into --out. Multi-process: torchrun --nproc_per_node=P -m ipfm_fast "
                    "distill ... (DDP; gloo on CPU, nccl on CUDA); results do not depend on P for a fixed "
                    "--micro-batch.",
        formatter_class=HelpFormatter)
    groups = add_options(p, DistillConfig)
    groups["checkpoints, logs and evaluation"].add_argument(
        "--final-eval-seeds", type=nonneg_int, default=5,
        help="score the kept generator against the test split over this many seeds at the end (0: skip)")
    p.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE_HELP + " (a teacher snapshot)")
    _add_run_flags(p)


def cmd_distill(args):
    from ipfm_fast.train.distill import RESUMABLE, DistillConfig, distill, final_evaluation

    if args.resume:
        _check_resume_flags(args, os.path.join(args.out, "checkpoint.safetensors"), RESUMABLE)
    summary = distill(from_args(DistillConfig, args), resume=args.resume, overwrite=args.overwrite,
                      skip_bad_images=args.skip_bad_images, trust_pickle=args.trust_pickle, progress=args.progress,
                      log=_log)
    if "rank" in summary:  # not rank 0: nothing to report
        return _exit_code(summary)
    if args.final_eval_seeds and summary.get("stopped") not in ("SIGTERM", "SIGINT"):
        final_evaluation(args.out, seeds=args.final_eval_seeds, device=args.device, log=_log,
                         skip_bad_images=args.skip_bad_images, trust_pickle=args.trust_pickle)
    print(f"summary: {os.path.join(args.out, 'summary.json')}")
    return _exit_code(summary)


# --------------------------------------------------------------------------------------
# demo and study
# --------------------------------------------------------------------------------------


def add_demo(sub):
    from ipfm_fast.train.demo import DEMO_DISTILL_SECONDS, DEMO_DISTILL_STEPS, DEMO_SAMPLES, DEMO_SEEDS

    p = sub.add_parser(
        "demo", help="the main job: teacher (cached) -> IPFM distillation -> 1-NFE generator, scored (~6 min on CPU)",
        description="Train (or reuse the cached) digits teacher at D = 128, score it at 35 NFE, distil it with IPFM "
                    "into a one-step generator, score the generator before and after at 1 NFE over several seeds "
                    "against the test split, and write metrics.json, report.md, sample grids and the training "
                    "curve into --out.",
        formatter_class=HelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output folder (the teacher is cached in OUT/teacher)")
    p.add_argument("--teacher-dir", default=None, help="where the teacher is trained/reused (default: OUT/teacher)")
    p.add_argument("--seeds", type=positive_int, default=DEMO_SEEDS, help="sampling seeds per score (paired)")
    p.add_argument("--samples", type=positive_int, default=DEMO_SAMPLES, help="samples per seed and model")
    p.add_argument("--distill-steps", type=positive_int, default=DEMO_DISTILL_STEPS,
                   help="distillation iterations (fixed, so the numbers are reproducible)")
    p.add_argument("--distill-seconds", type=float, default=DEMO_DISTILL_SECONDS,
                   help="safety cap on the distillation time (keeps a heavily loaded machine under 10 minutes)")
    p.add_argument("--publish", default=None,
                   help="also copy metrics.json, report.md and the PNGs to this folder (e.g. docs/demo)")
    _add_runtime(p)


def cmd_demo(args):
    from ipfm_fast.train.demo import run_demo

    if args.threads != "auto":
        raise InvalidInput("demo: --threads is chosen per step (1 thread for the small digits networks)")
    m = run_demo(args.out, seeds=args.seeds, distill_seconds=args.distill_seconds, distill_steps=args.distill_steps,
                 device=args.device, progress=args.progress, log=_log, publish=args.publish,
                 teacher_dir=args.teacher_dir, num_samples=args.samples)
    lo, hi = m["paired_diff_ci95"]
    print(f"generator - teacher ({m['score_name']}, paired over {len(m['seeds'])} seeds): {m['paired_diff_mean']:+.4f}, "
          f"95% interval [{lo:+.4f}, {hi:+.4f}]; target (upper end <= 0, half-width <= 0.2 x the teacher's excess "
          f"{m['teacher_excess']:.4f}): {'met' if m['targets_met'] else 'NOT met'}")
    print(f"metrics: {os.path.join(args.out, 'metrics.json')}; report: {os.path.join(args.out, 'report.md')}")
    return 0


def add_study(sub):
    p = sub.add_parser(
        "study", help="finite D vs D = inf (SiD): teachers and distillations under equal budgets (~12 min on CPU)",
        description="For each D: a digits teacher with the default recipe, then distillations with the default "
                    "recipe for the same number of iterations and several seeds; the EMA generator's 1-NFE score "
                    "(its excess over the data baseline) against the test split every --eval-every iterations, "
                    "against generator images seen. Writes "
                    "study.json, study.md and study.png into --out.",
        formatter_class=HelpFormatter)
    p.add_argument("--out", default="runs/study", help="output folder (teachers and runs inside; study.md/json/png)")
    p.add_argument("--D", dest="Ds", type=parse_D, nargs="+", default=[128.0, math.inf], help="values of D to compare")
    p.add_argument("--distill-steps", type=positive_int, default=3000, help="iterations per distillation")
    p.add_argument("--distill-seeds", type=positive_int, default=3, help="distillations per D (seeds 0..N-1)")
    p.add_argument("--teacher-seeds", type=positive_int, default=3,
                   help="sampling seeds of the teachers' 35-NFE score (the first is the curves' seed)")
    p.add_argument("--eval-every", type=positive_int, default=100, help="iterations between scores of each run")
    p.add_argument("--publish", default=None, help="also copy study.json, study.md and study.png to this folder")
    _add_runtime(p)


def cmd_study(args):
    import shutil

    from ipfm_fast.train.demo import run_study

    run_study(args.out, Ds=args.Ds, distill_steps=args.distill_steps, distill_seeds=list(range(args.distill_seeds)),
              eval_every=args.eval_every, teacher_seeds=args.teacher_seeds, device=args.device,
              progress=args.progress, log=_log)
    if args.publish:
        os.makedirs(args.publish, exist_ok=True)
        for name in ("study.json", "study.md", "study.png"):
            shutil.copy(os.path.join(args.out, name), os.path.join(args.publish, name))
    print(f"study: {os.path.join(args.out, 'study.md')}")
    return 0


COMMANDS = [
    ("info", add_info, cmd_info),
    ("train-teacher", add_train_teacher, cmd_train_teacher),
    ("sample", add_sample, cmd_sample),
    ("generate", add_generate, cmd_generate),
    ("evaluate", add_evaluate, cmd_evaluate),
    ("distill", add_distill, cmd_distill),
    ("demo", add_demo, cmd_demo),
    ("study", add_study, cmd_study),
]


def build_parser():
    """The argument parser and its sub-parsers by command name."""
    parser = argparse.ArgumentParser(prog="ipfm-fast", description="Fused kernels and training loops for IPFM.")
    sub = parser.add_subparsers(dest="command", metavar="command")
    sub.required = True
    for _, add, _ in COMMANDS:
        add(sub)
    return parser, sub.choices


def given_options(subparser, argv):
    """The destinations of the options written on the command line (not left at their
    defaults): commands refuse flags that would be ignored, e.g. a recipe flag with --resume."""
    given = set()
    for action in subparser._actions:
        for opt in action.option_strings:
            if any(a == opt or (opt.startswith("--") and a.startswith(opt + "=")) for a in argv):
                given.add(action.dest)
    return given


def main(argv=None):
    from ipfm_fast.train.common import EXIT_CODES

    parser, commands = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.given = given_options(commands[args.command], argv)
    handler = dict((name, cmd) for name, _, cmd in COMMANDS)[args.command]
    try:
        return handler(args)
    except Interrupted as err:
        print(f"ipfm-fast {args.command}: {err}", file=sys.stderr)
        return EXIT_CODES[err.signal]
    except KeyboardInterrupt:  # Ctrl-C in a command without a checkpoint to save (sample, evaluate, ...)
        print(f"ipfm-fast {args.command}: interrupted (SIGINT)", file=sys.stderr)
        return EXIT_CODES["SIGINT"]
    except IpfmError as err:  # a user's mistake: one line; anything else is a bug and keeps its traceback
        print(f"ipfm-fast {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a torchrun process: its exit is bounded
            from ipfm_fast.train.parallel import arm_exit_watchdog

            arm_exit_watchdog()


if __name__ == "__main__":
    sys.exit(main())
