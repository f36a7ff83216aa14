"""`ipfm-fast demo` (the main job) and `ipfm-fast study` (finite D vs D = inf).

**demo**: trains (or reuses the cached) digits teacher at D = 128 with the default
teacher recipe, scores it at 35 NFE, scores the generator before distillation (the
teacher evaluated once at sigma_init: 1 NFE), distils it with IPFM, scores the distilled
generator at 1 NFE, all over several sampling seeds against the 360-image test split, and
writes into ``out`` (default runs/demo): ``metrics.json``, ``report.md``, sample grids
``data.png``, ``teacher.png``, ``initial_generator.png``, ``generator.png`` and the
training curve ``training_curve.png``. ``--publish DIR`` copies them to DIR (docs/demo).

**study**: for each D (default 128 and inf), a teacher with the same recipe and budget,
then distillations with the same recipe and number of iterations (several seeds); the
EMA generator's score (its excess over the data baseline) against the test split every
``eval_every`` iterations, plotted
against the generator images seen; ``study.json``, ``study.md``, ``study.png`` in ``out``
(default runs/study).
"""

import datetime
import json
import math
import os
import platform
import shutil
import time

import torch

from ipfm_fast import checkpoint as ckpt
from ipfm_fast._files import read_json, replacing
from ipfm_fast.errors import BadFile, Interrupted
from ipfm_fast.train import common

GRID_UPSCALE = 4  # 10 x 10 grids of 8x8 images -> 364 x 364 pixels
# The demo's budget (docs/quality.md): 10 sampling seeds x 10,000 samples put the paired
# generator - teacher interval at 0.06-0.07 x the teacher's excess (the target: <= 0.2);
# with the slower EMA the generator passes the teacher within ~2,000 iterations and still
# improves at 8,000 (trials kept 6.5k-7.5k); 10,000 take ~4.5 min on 2 cores, the demo ~6.
DEMO_SEEDS, DEMO_SAMPLES, DEMO_DISTILL_STEPS, DEMO_DISTILL_SECONDS = 10, 10_000, 10_000, 450.0
DEMO_DISTILL = dict(ema=0.999, eval_every=250)  # over the distill recipe's defaults
ARTIFACTS = ("metrics.json", "report.md", "data.png", "teacher.png", "initial_generator.png", "generator.png",
             "training_curve.png")


def _machine():
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
            + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))


def _now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _file_digest(path):
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def ensure_teacher(folder, *, D=128.0, device="auto", progress=None, log=print, **overrides):
    """The teacher in ``folder``: reused when its teacher.safetensors exists and its
    config.json has the requested recipe, else trained with the default TeacherConfig
    (plus ``overrides``). Returns (path, reused, train_seconds)."""
    from ipfm_fast.train.teacher import TeacherConfig, train_teacher

    cfg = TeacherConfig(out=folder, D=D, device=device, eval_samples=0, **overrides)
    want = {k: v for k, v in cfg.to_json().items() if k not in ("out", "device", "precision", "threads",
                                                                  "eval_samples", "model", "checkpoint_every",
                                                                  "log_every", "eval_steps", "eval_seed")}
    path = os.path.join(folder, "teacher.safetensors")
    cfg_path = os.path.join(folder, "config.json")
    summary_path = os.path.join(folder, "summary.json")
    if os.path.exists(path) and os.path.exists(cfg_path) and os.path.exists(summary_path):
        try:
            have = read_json(cfg_path, what="cached teacher config")
            summary = read_json(summary_path, what="cached teacher summary")
        except BadFile as err:
            raise BadFile(f"{err}; delete {folder} to retrain the demo teacher") from err
        if (all(have.get(k) == v for k, v in want.items()) and summary.get("steps") == cfg.steps
                and isinstance(summary.get("train_seconds"), (int, float))):
            log(f"teacher: reusing {path} (trained {summary['train_seconds']:.0f} s; delete the folder to retrain)")
            return path, True, summary["train_seconds"]
        log(f"teacher: {folder} holds a different recipe; retraining")
    summary = train_teacher(cfg, overwrite=True, progress=progress, log=log)  # a cached teacher of another recipe
    _stop_if_interrupted(summary, folder)
    return path, False, summary["train_seconds"]


def _stop_if_interrupted(summary, folder):
    """A signal ended a training step early (after its checkpoint): the later steps stop too."""
    if summary.get("stopped") in ("SIGINT", "SIGTERM"):
        raise Interrupted(summary["stopped"], f"interrupted by {summary['stopped']}; the run so far is in {folder} "
                                              f"(a rerun starts that step over)")


def _cached_eval(cache_file, key, compute):
    """compute() unless ``cache_file`` holds a result for ``key`` (e.g. the teacher's
    35-NFE score, which depends only on the teacher weights and the seeds)."""
    if os.path.exists(cache_file):
        with open(cache_file) as f:
            saved = json.load(f)
        if saved.get("key") == key:
            return saved["result"], True
    res = compute()
    common.write_json(cache_file, {"key": key, "result": res})
    return res, False


def _fd(res):
    return res["fd"]["mean"], res["fd"]["std"]


def plot_curve(path, curve, *, teacher_score, initial_score, baseline_score, best_step=None, title="",
               score_name="score"):
    """The EMA generator's excess over the data baseline (1 NFE, vs the test split) against
    iterations, with the teacher (35 NFE) and the initial generator as lines. The score
    itself can be negative (an unbiased KID scatters around its mean); its excess over the
    train-vs-test baseline is what ranks models, on a scale linear below a tenth of the
    teacher's so that a single-seed point at or under zero still shows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [c["step"] for c in curve]
    excess = [c["score_test"] - baseline_score for c in curve]
    teacher_excess, initial_excess = teacher_score - baseline_score, initial_score - baseline_score
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot(steps, excess, "o-", ms=3, color="C0", label="distilled generator (EMA), 1 NFE (one sampling seed)")
    ax.axhline(teacher_excess, color="C1", ls="--", label=f"teacher, 35 NFE ({teacher_excess:.3f})")
    ax.axhline(initial_excess, color="C3", ls="-.", label=f"generator before distillation ({initial_excess:.2f})")
    ax.axhline(0.0, color="k", ls=":", label=f"data baseline, train vs test (score {baseline_score:.3f})")
    if best_step is not None:
        ax.axvline(best_step, color="C2", lw=0.8, label=f"kept checkpoint (iteration {best_step})")
    ax.set_yscale("symlog", linthresh=max(abs(teacher_excess) / 10, 1e-6))
    ax.set_ylim(1.5 * min([0.0, *excess]), 1.5 * max([initial_excess, teacher_excess, *excess]))
    ax.set_xlabel("distillation iteration")
    ax.set_ylabel(f"{score_name}: excess over the data baseline")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with replacing(path, ".png") as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return path


def run_demo(out="runs/demo", *, seeds=DEMO_SEEDS, distill_seconds=DEMO_DISTILL_SECONDS,
             distill_steps=DEMO_DISTILL_STEPS, device="auto", progress=None, log=print, publish=None,
             teacher_dir=None, teacher_overrides=None, distill_overrides=None, num_samples=DEMO_SAMPLES):
    """The main job; returns the metrics dict (also written to ``out``/metrics.json)."""
    from ipfm_fast.data import load_dataset, save_grid
    from ipfm_fast.metrics import Evaluator
    from ipfm_fast.train.distill import DistillConfig, distill

    t_start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    dev = common.resolve_device(device)
    precision = common.resolve_precision("auto", dev)
    teacher_dir = teacher_dir or os.path.join(out, "teacher")
    log("== 1/4 teacher (digits, D = 128) ==")
    teacher_path, reused, teacher_seconds = ensure_teacher(teacher_dir, D=128.0, device=device, progress=progress,
                                                           log=log, **(teacher_overrides or {}))
    teacher, tmeta = ckpt.load_denoiser(teacher_path, device=dev)
    run = dict(D=ckpt.decode_D(tmeta["D"]), data=load_dataset(tmeta.get("data") or "digits"), seeds=list(range(seeds)),
               dev=dev, precision=precision, teacher_dir=teacher_dir, out=out, log=log)
    run["num"] = num_samples or len(run["data"].train)
    with common.num_threads(1 if dev.type == "cpu" else None):
        run["ev"] = Evaluator(run["data"], teacher_dir, device=dev, log=log)
        save_grid(run["data"].test.floats()[:100], os.path.join(out, "data.png"), nrow=10, upscale=GRID_UPSCALE)
        teacher_res, initial_res, teacher_eval_seconds = _score_teacher(teacher, teacher_path, run)

    log("== 3/4 IPFM distillation ==")
    dist_dir = os.path.join(out, "distill")
    if os.path.exists(dist_dir):
        shutil.rmtree(dist_dir)
    dcfg = DistillConfig(teacher=teacher_dir, out=dist_dir, steps=distill_steps, time_budget=distill_seconds,
                         device=device, **{**DEMO_DISTILL, **(distill_overrides or {})})
    summary = distill(dcfg, progress=progress, log=log)
    _stop_if_interrupted(summary, dist_dir)

    log(f"== 4/4 scoring the distilled generator at 1 NFE ({seeds} seeds) ==")
    gen_res, speed = _score_generator(teacher, dist_dir, run)
    metrics = _demo_metrics(run, dcfg, summary, teacher_res, initial_res, gen_res, speed,
                            teacher_seconds=teacher_seconds, teacher_reused=reused,
                            teacher_eval_seconds=teacher_eval_seconds, total=time.perf_counter() - t_start)
    plot_curve(os.path.join(out, "training_curve.png"), summary["curve"], teacher_score=metrics["teacher_score"],
               initial_score=metrics["initial_generator_score"], baseline_score=metrics["data_baseline_score"],
               best_step=summary["best_step"], score_name=metrics["score_name"],
               title=f"IPFM on digits, D = {run['D']:g}: EMA generator at 1 NFE (seed {dcfg.eval_seed}) vs test split")
    common.write_json(os.path.join(out, "metrics.json"), metrics)
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write(demo_report(metrics))
    log(demo_report(metrics))
    if publish:
        os.makedirs(publish, exist_ok=True)
        for name in ARTIFACTS:
            shutil.copy(os.path.join(out, name), os.path.join(publish, name))
        log(f"published {', '.join(ARTIFACTS)} -> {publish}")
    return metrics


def _score_teacher(teacher, teacher_path, run):
    """Steps 2/4: the teacher at 35 NFE (cached by the teacher file's digest) and the
    generator before distillation (the teacher at 1 NFE from sigma_init); the grids."""
    from ipfm_fast.data import save_grid
    from ipfm_fast.sampling import sample
    from ipfm_fast.train.evaluation import evaluate_denoiser, evaluate_generator

    data, D, tdir, log = run["data"], run["D"], run["teacher_dir"], run["log"]
    common_kw = dict(num=run["num"], seeds=run["seeds"], device=run["dev"], precision=run["precision"], log=log,
                     evaluator=run["ev"])
    log(f"== 2/4 scoring the teacher at 35 NFE and the generator before distillation at 1 NFE "
        f"({len(run['seeds'])} seeds x {run['num']} samples) ==")
    key = {"teacher": _file_digest(teacher_path), "seeds": run["seeds"], "num": run["num"], "steps": 18}
    t0 = time.perf_counter()
    teacher_res, cached = _cached_eval(
        os.path.join(tdir, "eval_35nfe.json"), key,
        lambda: evaluate_denoiser(teacher, data, D, tdir, steps=18, grid=os.path.join(tdir, "samples_35nfe.png"),
                                  **common_kw))
    seconds = time.perf_counter() - t0
    if cached:
        log(f"teacher FD at 35 NFE (cached): {teacher_res['fd']['mean']:.3f} +- {teacher_res['fd']['std']:.3f}")
    # the grid: the first 100 samples of seed 0 (the generators' grids use the same seed)
    save_grid(sample(teacher, 100, data.shape, D, seed=0, steps=18, device=run["dev"]),
              os.path.join(run["out"], "teacher.png"), nrow=10, upscale=GRID_UPSCALE)
    initial_res = evaluate_generator(teacher, data, D, 2.5, tdir, grid=os.path.join(run["out"], "initial_generator.png"),
                                     grid_upscale=GRID_UPSCALE, **common_kw)
    return teacher_res, initial_res, seconds


def _score_generator(teacher, dist_dir, run):
    """Step 4/4: the distilled generator at 1 NFE, and both models' sampling speed."""
    from ipfm_fast.sampling import sample
    from ipfm_fast.train.evaluation import evaluate_generator, generate, load_generator

    data, D, dev = run["data"], run["D"], run["dev"]
    gen, _, sigma_init, _ = load_generator(dist_dir, dev)
    with common.num_threads(1 if dev.type == "cpu" else None):
        gen_res = evaluate_generator(gen, data, D, sigma_init, run["teacher_dir"], num=run["num"], seeds=run["seeds"],
                                     device=dev, precision=run["precision"], log=run["log"], evaluator=run["ev"],
                                     grid=os.path.join(run["out"], "generator.png"), grid_upscale=GRID_UPSCALE)
        speed = {"generator": _sampling_speed(lambda n: generate(gen, n, data.shape, D, sigma_init, device=dev),
                                              run["num"]),
                 "teacher": _sampling_speed(lambda n: sample(teacher, n, data.shape, D, steps=18, device=dev),
                                            run["num"])}
    return gen_res, speed


def _demo_metrics(run, dcfg, summary, teacher_res, initial_res, gen_res, speed, *, teacher_seconds, teacher_reused,
                  teacher_eval_seconds, total):
    from ipfm_fast.metrics import paired_difference
    from ipfm_fast.sampling import nfe

    t_fd, t_sd = _fd(teacher_res)
    g_fd, g_sd = _fd(gen_res)
    i_fd, i_sd = _fd(initial_res)
    ev = run["ev"]
    base = ev.baseline["baseline_score"]
    t_score, g_score = teacher_res["score"]["mean"], gen_res["score"]["mean"]
    diff, ci = paired_difference(gen_res["score"]["values"], teacher_res["score"]["values"])
    half, excess = (ci[1] - ci[0]) / 2, t_score - base
    return {
        "score_name": ev.score_name, "teacher_score": t_score, "teacher_score_std": teacher_res["score"]["std"],
        "generator_score": g_score, "generator_score_std": gen_res["score"]["std"],
        "initial_generator_score": initial_res["score"]["mean"], "data_baseline_score": base,
        "teacher_excess": excess, "generator_excess": g_score - base, "paired_diff_mean": diff, "paired_diff_ci95": ci,
        "ci_half_width_over_teacher_excess": half / excess if excess > 0 else math.inf,
        "space_fd_name": ev.space_fd_name, "teacher_space_fd": teacher_res["space_fd"]["mean"],
        "generator_space_fd": gen_res["space_fd"]["mean"], "data_baseline_space_fd": ev.baseline["baseline_space_fd"],
        "teacher_fd": t_fd, "teacher_fd_std": t_sd, "generator_fd": g_fd, "generator_fd_std": g_sd,
        "initial_generator_fd": i_fd, "initial_generator_fd_std": i_sd, "data_baseline_fd": ev.baseline["baseline_fd"],
        "teacher_nfe": nfe(18), "generator_nfe": 1,
        "teacher_sw": teacher_res["sw"]["mean"], "generator_sw": gen_res["sw"]["mean"],
        "initial_generator_sw": initial_res["sw"]["mean"], "data_baseline_sw": ev.baseline["baseline_sw"],
        "teacher_nn_ratio": teacher_res["nn_ratio"]["mean"], "generator_nn_ratio": gen_res["nn_ratio"]["mean"],
        "generator_fd_over_teacher_fd": g_fd / t_fd, "generator_fd_over_initial_fd": g_fd / i_fd,
        # the generator at least as good as the teacher with 95% confidence, measured sharply enough to say so
        "targets_met": bool(ci[1] <= 0 and excess > 0 and half <= 0.2 * excess),
        "distill_seconds": summary["train_seconds"], "images_per_second": summary["images_per_second"],
        "distill_iterations": summary["steps"], "distill_batch": dcfg.batch, "kept_iteration": summary["best_step"],
        "teacher_train_seconds": teacher_seconds, "teacher_reused": teacher_reused,
        "teacher_eval_seconds": teacher_eval_seconds,
        "teacher_sampling_images_per_second": speed["teacher"], "generator_sampling_images_per_second": speed["generator"],
        "total_seconds": total, "seeds": run["seeds"], "samples_per_seed": run["num"], "n_test": len(run["data"].test),
        "fd_samples": min(run["num"], ev.baseline["baseline_n"]),
        "score_seeds": {"teacher": teacher_res["score"]["values"], "initial_generator": initial_res["score"]["values"],
                        "generator": gen_res["score"]["values"]},
        "fd_seeds": {"teacher": teacher_res["fd"]["values"], "initial_generator": initial_res["fd"]["values"],
                     "generator": gen_res["fd"]["values"]},
        "D": run["D"], "alpha": dcfg.alpha, "lr": dcfg.lr, "ema": dcfg.ema, "parameters": summary["parameters"],
        "device": summary["device"], "precision": summary["precision"], "machine": _machine(), "date": _now(),
        "command": "make demo (ipfm-fast demo)",
    }


def _sampling_speed(fn, n):
    t0 = time.perf_counter()
    fn(n)
    return n / max(time.perf_counter() - t0, 1e-9)


def demo_report(m):
    ok = "met" if m["targets_met"] else "NOT met"
    teacher = ("reused from a previous run" if m["teacher_reused"] else "trained in this run")
    lo, hi = m["paired_diff_ci95"]
    n = len(m["seeds"])
    return f"""# ipfm_fast demo: IPFM distillation of a digits PFGM++ teacher (D = {m['D']:g})

{m['date']}; {m['machine']}; device {m['device']} ({m['precision']}). Total time {m['total_seconds']:.0f} s.

| model | NFE | {m['score_name']} vs test (mean ± std, {n} seeds) | excess over the data | {m['space_fd_name']} | FD, classifier features | sliced W2 | images/s sampling |
|---|---|---|---|---|---|---|---|
| data baseline (train split vs test split) | - | {m['data_baseline_score']:.3f} | 0 | {m['data_baseline_space_fd']:.4f} | {m['data_baseline_fd']:.2f} | {m['data_baseline_sw']:.4f} | - |
| teacher (PFGM++, Heun) | {m['teacher_nfe']} | {m['teacher_score']:.3f} ± {m['teacher_score_std']:.3f} | {m['teacher_excess']:+.3f} | {m['teacher_space_fd']:.4f} | {m['teacher_fd']:.2f} ± {m['teacher_fd_std']:.2f} | {m['teacher_sw']:.4f} | {m['teacher_sampling_images_per_second']:.0f} |
| generator before distillation (teacher at sigma_init = 2.5) | 1 | {m['initial_generator_score']:.1f} | {m['initial_generator_score'] - m['data_baseline_score']:+.1f} | - | {m['initial_generator_fd']:.2f} ± {m['initial_generator_fd_std']:.2f} | {m['initial_generator_sw']:.4f} | - |
| **distilled generator (IPFM, alpha = {m['alpha']})** | **1** | **{m['generator_score']:.3f} ± {m['generator_score_std']:.3f}** | {m['generator_excess']:+.3f} | {m['generator_space_fd']:.4f} | {m['generator_fd']:.2f} ± {m['generator_fd_std']:.2f} | {m['generator_sw']:.4f} | {m['generator_sampling_images_per_second']:.0f} |

- **Generator − teacher**, paired over the {n} sampling seeds: {m['paired_diff_mean']:+.4f}, 95% interval [{lo:+.4f}, {hi:+.4f}] (half-width {(hi - lo) / 2:.4f} = {m['ci_half_width_over_teacher_excess']:.2f} x the teacher's excess). Target (the 1-NFE generator at least as good as the 35-NFE teacher with 95% confidence: upper end <= 0, half-width <= 0.2 x the teacher's excess): **{ok}**.
- The score: {m['score_name']}, the unbiased kernel distance between the pixels of the samples and of the test images (on 8x8 digits it separates models that the classifier-feature FD cannot: docs/quality.md); {m['samples_per_seed']} samples per seed against the {m['n_test']}-image test split (the FDs use the first {m['fd_samples']}, the baseline's count). Per-seed scores: teacher {', '.join(f'{v:.3f}' for v in m['score_seeds']['teacher'])}; distilled generator {', '.join(f'{v:.3f}' for v in m['score_seeds']['generator'])}.
- Distillation: {m['distill_iterations']} iterations x batch {m['distill_batch']} in {m['distill_seconds']:.0f} s ({m['images_per_second']:.0f} generator images/s, one fake update + one generator update each); alpha {m['alpha']}, lr {m['lr']:g}, EMA {m['ema']}; kept the EMA generator of iteration {m['kept_iteration']} (best 1-NFE score against the *training* split).
- Teacher: {teacher} ({m['teacher_train_seconds']:.0f} s of training); {m['parameters']:,} parameters (teacher, generator and fake network alike).

Pictures: data.png (test images), teacher.png (35 NFE), initial_generator.png, generator.png (1 NFE), training_curve.png.
"""


# --------------------------------------------------------------------------------------
# study
# --------------------------------------------------------------------------------------


def run_study(out="runs/study", *, Ds=(128.0, math.inf), distill_steps=3000, distill_seeds=(0, 1, 2),
              eval_every=100, teacher_seeds=1, device="auto", progress=None, log=print, teacher_overrides=None,
              distill_overrides=None):
    """Teachers and distillations for each D under equal budgets; returns the results."""
    from ipfm_fast.data import load_dataset
    from ipfm_fast.metrics import Evaluator
    from ipfm_fast.train.distill import DistillConfig, distill
    from ipfm_fast.train.evaluation import evaluate_denoiser

    t_start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    dev = common.resolve_device(device)
    precision = common.resolve_precision("auto", dev)
    data = load_dataset("digits")
    over = distill_overrides or {}
    eval_seed = over.get("eval_seed", DistillConfig.eval_seed)
    eval_num = over.get("eval_samples", DistillConfig.eval_samples) or len(data.train)
    rows = []
    for D in Ds:
        name = "Dinf" if math.isinf(D) else f"D{D:g}"
        tdir = os.path.join(out, f"teacher-{name}")
        log(f"== teacher {name} ==")
        tpath, reused, tsec = ensure_teacher(tdir, D=D, device=device, progress=progress, log=log,
                                             **(teacher_overrides or {}))
        teacher, _ = ckpt.load_denoiser(tpath, device=dev)
        with common.num_threads(1 if dev.type == "cpu" else None):
            ev = Evaluator(data, tdir, device=dev, log=log)
            # the curves' sampling seed and count first: the reach threshold compares like with like
            seeds = [eval_seed + k for k in range(teacher_seeds)]
            key = {"teacher": _file_digest(tpath), "seeds": seeds, "num": eval_num, "steps": 18}
            tres, _ = _cached_eval(os.path.join(tdir, "eval_35nfe_study.json"), key,
                                   lambda: evaluate_denoiser(teacher, data, D, tdir, num=eval_num, steps=18,
                                                             seeds=seeds, device=dev, precision=precision, log=log,
                                                             evaluator=ev))
        runs = []
        for seed in distill_seeds:
            log(f"== distill {name}, seed {seed} ==")
            ddir = os.path.join(out, f"distill-{name}-seed{seed}")
            if os.path.exists(ddir):
                shutil.rmtree(ddir)
            kw = dict(dict(steps=distill_steps, seed=seed, eval_every=eval_every, device=device,
                           checkpoint_every=distill_steps), **(distill_overrides or {}))
            cfg = DistillConfig(teacher=tdir, out=ddir, **kw)
            s = distill(cfg, progress=progress, log=log)
            _stop_if_interrupted(s, ddir)
            runs.append({"seed": seed, "curve": s["curve"], "seconds": s["train_seconds"],
                         "images_per_second": s["images_per_second"], "batch": cfg.batch})
        rows.append({"D": "inf" if math.isinf(D) else D, "name": name, "score_name": tres["score_name"],
                     "teacher_score": tres["score"]["mean"], "teacher_score_std": tres["score"]["std"],
                     "teacher_score_curve_seed": tres["score"]["values"][0],
                     "baseline_score": tres["baseline_score"], "teacher_fd": tres["fd"]["mean"],
                     "teacher_train_seconds": tsec, "teacher_reused": reused, "runs": runs})
    res = {"date": _now(), "machine": _machine(), "distill_steps": distill_steps, "distill_seeds": list(distill_seeds),
           "eval_every": eval_every, "rows": rows, "total_seconds": time.perf_counter() - t_start,
           "note": f"{rows[0]['score_name']} of the EMA generator at 1 NFE ({eval_num} samples, sampling seed "
                   f"{eval_seed}) against the {len(data.test)}-image test split; the teacher's at 35 NFE over "
                   f"{teacher_seeds} seed(s) from that one on, the reach threshold from that same seed"}
    res["table"] = study_table(res)
    common.write_json(os.path.join(out, "study.json"), res)
    plot_study(os.path.join(out, "study.png"), res)
    with open(os.path.join(out, "study.md"), "w", encoding="utf-8") as f:
        f.write(study_markdown(res))
    log(study_markdown(res))
    return res


def _mean_curve(runs):
    import numpy as np

    steps = [c["step"] for c in runs[0]["curve"]]
    n = min(len(r["curve"]) for r in runs)
    vals = np.array([[c["score_test"] for c in r["curve"][:n]] for r in runs])
    return steps[:n], vals.mean(0), vals.std(0, ddof=1) if len(runs) > 1 else np.zeros(n)


REACH = 1.1  # the study reports the images a run needs to first come within 10% of its teacher's excess


def study_table(res):
    """Per D, as excesses over the data baseline: the teacher's, the generator's at a few
    budgets (mean over distillation seeds), its best, and the images a run needs to first
    come within REACH x the teacher's excess."""
    import numpy as np

    out = []
    for row in res["rows"]:
        steps, mean, std = _mean_curve(row["runs"])
        base, batch = row["baseline_score"], row["runs"][0]["batch"]
        teacher_excess = row["teacher_score"] - base
        paired_excess = row["teacher_score_curve_seed"] - base  # the curves' seed and sample count
        marks = {}
        for frac in (0.1, 0.25, 0.5, 1.0):
            i = min(range(len(steps)), key=lambda j: abs(steps[j] - frac * steps[-1]))
            marks[str(steps[i] * batch)] = {"mean": float(mean[i] - base), "std": float(std[i])}
        reach = [next((c["step"] * batch for c in r["curve"] if c["score_test"] - base <= REACH * paired_excess),
                      None) for r in row["runs"]]
        best = [min(c["score_test"] for c in r["curve"]) - base for r in row["runs"]]
        out.append({"D": row["D"], "teacher_excess": teacher_excess, "teacher_excess_curve_seed": paired_excess,
                    "excess_at_images": marks,
                    "best_excess_mean": float(np.mean(best)), f"images_to_{REACH}x_teacher": reach,
                    "last_excess_mean": float(mean[-1] - base)})
    return out


def plot_study(path, res):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for k, row in enumerate(res["rows"]):
        steps, mean, std = _mean_curve(row["runs"])
        batch = row["runs"][0]["batch"]
        imgs = [s * batch / 1000 for s in steps]
        label = f"D = {_fmt_D(row['D'])}" + (" (SiD)" if row["D"] == "inf" else "")
        base = row["baseline_score"]
        ax.plot(imgs, mean - base, "-", color=f"C{k}", label=f"{label}: generator, mean of {len(row['runs'])} seeds")
        ax.fill_between(imgs, mean - base - std, mean - base + std, color=f"C{k}", alpha=0.2)
        ax.axhline(row["teacher_score_curve_seed"] - base, color=f"C{k}", ls="--", lw=1,
                   label=f"{label}: teacher at 35 NFE (the curves' seed)")
    teacher_excess = min(r["teacher_score_curve_seed"] - r["baseline_score"] for r in res["rows"])
    ax.axhline(0.0, color="k", ls=":", lw=1, label="data baseline (train split vs test split)")
    ax.set_yscale("symlog", linthresh=max(abs(teacher_excess) / 10, 1e-6))
    ax.set_xlabel("generator images seen (thousands)")
    ax.set_ylabel(f"{res['rows'][0]['score_name']}: excess over the data baseline, 1 NFE")
    ax.set_title("IPFM at finite D vs D = inf (SiD): equal budgets", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with replacing(path, ".png") as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def _fmt_D(D):
    return D if isinstance(D, str) else f"{D:g}"


def study_markdown(res):
    t = res["table"]
    marks = list(t[0]["excess_at_images"].keys())
    head = ["| D | teacher (35 NFE): the curves' seed, mean of all | "
            + " | ".join(f"@ {int(m) // 1000}k images" for m in marks)
            + f" | best | images to reach {REACH} x the teacher's excess (per seed) |",
            "|---" * (4 + len(marks)) + "|"]
    for r in t:
        cells = [f"{r['excess_at_images'][m]['mean']:.3f} ± {r['excess_at_images'][m]['std']:.3f}" for m in marks]
        reach = ", ".join("not reached" if v is None else f"{v // 1000}k" for v in r[f"images_to_{REACH}x_teacher"])
        head.append(f"| {_fmt_D(r['D'])} | {r['teacher_excess_curve_seed']:.3f}, {r['teacher_excess']:.3f} | "
                    + " | ".join(cells)
                    + f" | {r['best_excess_mean']:.3f} | {reach} |")
    return (f"# Finite D vs D = inf (SiD) on digits\n\n{res['date']}; {res['machine']}; whole study "
            f"{res['total_seconds']:.0f} s.\n\nEach D: a teacher with the default recipe (same budget), then "
            f"{len(res['distill_seeds'])} distillations (seeds {res['distill_seeds']}) of {res['distill_steps']} "
            f"iterations with the default distillation recipe. Score: {res['note']}, given as the excess over the "
            f"data baseline (train split vs test split, score {res['rows'][0]['baseline_score']:.4f}; lower is "
            f"better, 0 is as good as held-out data); mean ± std over the distillation seeds.\n\n"
            + "\n".join(head) + "\n\nPlot: study.png.\n")
