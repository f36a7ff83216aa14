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
EMA generator's FD against the test split every ``eval_every`` iterations, plotted
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


def plot_curve(path, curve, *, teacher_fd, initial_fd, baseline_fd, best_step=None, title=""):
    """FD of the EMA generator (1 NFE, vs the test split) against iterations, with the
    teacher (35 NFE), the initial generator and the data baseline as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [c["step"] for c in curve]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot(steps, [c["fd_test"] for c in curve], "o-", ms=3, color="C0", label="distilled generator (EMA), 1 NFE")
    ax.axhline(teacher_fd, color="C1", ls="--", label=f"teacher, 35 NFE ({teacher_fd:.1f})")
    ax.axhline(baseline_fd, color="k", ls=":", label=f"data baseline, train vs test ({baseline_fd:.1f})")
    ax.axhline(initial_fd, color="C3", ls="-.", label=f"generator before distillation ({initial_fd:.0f})")
    if best_step is not None:
        ax.axvline(best_step, color="C2", lw=0.8, label=f"kept checkpoint (iteration {best_step})")
    ax.set_yscale("log")
    ax.set_xlabel("distillation iteration")
    ax.set_ylabel("Frechet distance vs test split (log)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with replacing(path, ".png") as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return path


def run_demo(out="runs/demo", *, seeds=5, distill_seconds=360.0, distill_steps=1500, device="auto", progress=None,
             log=print, publish=None, teacher_dir=None, teacher_overrides=None, distill_overrides=None,
             num_samples=None):
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
                         device=device, **(distill_overrides or {}))
    summary = distill(dcfg, progress=progress, log=log)
    _stop_if_interrupted(summary, dist_dir)

    log(f"== 4/4 scoring the distilled generator at 1 NFE ({seeds} seeds) ==")
    gen_res, speed = _score_generator(teacher, dist_dir, run)
    metrics = _demo_metrics(run, dcfg, summary, teacher_res, initial_res, gen_res, speed,
                            teacher_seconds=teacher_seconds, teacher_reused=reused,
                            teacher_eval_seconds=teacher_eval_seconds, total=time.perf_counter() - t_start)
    plot_curve(os.path.join(out, "training_curve.png"), summary["curve"], teacher_fd=metrics["teacher_fd"],
               initial_fd=metrics["initial_generator_fd"], baseline_fd=metrics["data_baseline_fd"],
               best_step=summary["best_step"],
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
    from ipfm_fast.sampling import nfe

    t_fd, t_sd = _fd(teacher_res)
    g_fd, g_sd = _fd(gen_res)
    i_fd, i_sd = _fd(initial_res)
    ev = run["ev"]
    return {
        "teacher_fd": t_fd, "teacher_fd_std": t_sd, "generator_fd": g_fd, "generator_fd_std": g_sd,
        "initial_generator_fd": i_fd, "initial_generator_fd_std": i_sd, "data_baseline_fd": ev.baseline["baseline_fd"],
        "teacher_nfe": nfe(18), "generator_nfe": 1,
        "teacher_sw": teacher_res["sw"]["mean"], "generator_sw": gen_res["sw"]["mean"],
        "initial_generator_sw": initial_res["sw"]["mean"], "data_baseline_sw": ev.baseline["baseline_sw"],
        "teacher_nn_ratio": teacher_res["nn_ratio"]["mean"], "generator_nn_ratio": gen_res["nn_ratio"]["mean"],
        "generator_fd_over_teacher_fd": g_fd / t_fd, "generator_fd_over_initial_fd": g_fd / i_fd,
        "targets_met": bool(g_fd <= 1.5 * t_fd and g_fd <= 0.5 * i_fd),
        "distill_seconds": summary["train_seconds"], "images_per_second": summary["images_per_second"],
        "distill_iterations": summary["steps"], "distill_batch": dcfg.batch, "kept_iteration": summary["best_step"],
        "teacher_train_seconds": teacher_seconds, "teacher_reused": teacher_reused,
        "teacher_eval_seconds": teacher_eval_seconds,
        "teacher_sampling_images_per_second": speed["teacher"], "generator_sampling_images_per_second": speed["generator"],
        "total_seconds": total, "seeds": run["seeds"], "samples_per_seed": run["num"], "n_test": len(run["data"].test),
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
    return f"""# ipfm_fast demo: IPFM distillation of a digits PFGM++ teacher (D = {m['D']:g})

{m['date']}; {m['machine']}; device {m['device']} ({m['precision']}). Total time {m['total_seconds']:.0f} s.

| model | NFE | FD vs test (mean ± std over {len(m['seeds'])} seeds) | sliced W2 | images/s sampling |
|---|---|---|---|---|
| data baseline (train split vs test split) | - | {m['data_baseline_fd']:.2f} | {m['data_baseline_sw']:.4f} | - |
| teacher (PFGM++, Heun) | {m['teacher_nfe']} | {m['teacher_fd']:.2f} ± {m['teacher_fd_std']:.2f} | {m['teacher_sw']:.4f} | {m['teacher_sampling_images_per_second']:.0f} |
| generator before distillation (teacher at sigma_init = 2.5) | 1 | {m['initial_generator_fd']:.2f} ± {m['initial_generator_fd_std']:.2f} | {m['initial_generator_sw']:.4f} | - |
| **distilled generator (IPFM, alpha = {m['alpha']})** | **1** | **{m['generator_fd']:.2f} ± {m['generator_fd_std']:.2f}** | {m['generator_sw']:.4f} | {m['generator_sampling_images_per_second']:.0f} |

- Distillation: {m['distill_iterations']} iterations x batch {m['distill_batch']} in {m['distill_seconds']:.0f} s \
({m['images_per_second']:.0f} generator images/s, one fake update + one generator update each); lr {m['lr']:g}, \
EMA {m['ema']}; kept the EMA generator of iteration {m['kept_iteration']} (best 1-NFE FD against the *training* \
split, scored every 50 iterations).
- Teacher: {teacher} ({m['teacher_train_seconds']:.0f} s of training); {m['parameters']:,} parameters \
(teacher, generator and fake network alike).
- Targets (generator FD <= 1.5 x teacher FD and <= 0.5 x initial generator FD): **{ok}** \
(ratios {m['generator_fd_over_teacher_fd']:.2f} and {m['generator_fd_over_initial_fd']:.3f}).
- FD: Frechet distance in the features of a small classifier trained on the training split; \
{m['samples_per_seed']} samples per seed against the {m['n_test']}-image test split. Per-seed FDs: \
teacher {', '.join(f'{v:.2f}' for v in m['fd_seeds']['teacher'])}; \
distilled generator {', '.join(f'{v:.2f}' for v in m['fd_seeds']['generator'])}.

Pictures: data.png (test images), teacher.png (35 NFE), initial_generator.png, generator.png (1 NFE), \
training_curve.png.
"""


# --------------------------------------------------------------------------------------
# study
# --------------------------------------------------------------------------------------


def run_study(out="runs/study", *, Ds=(128.0, math.inf), distill_steps=800, distill_seeds=(0, 1, 2), eval_every=40,
              teacher_seeds=1, device="auto", progress=None, log=print, teacher_overrides=None,
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
            seeds = list(range(teacher_seeds))
            key = {"teacher": _file_digest(tpath), "seeds": seeds, "num": len(data.train), "steps": 18}
            tres, _ = _cached_eval(os.path.join(tdir, f"eval_35nfe_{teacher_seeds}.json"), key,
                                   lambda: evaluate_denoiser(teacher, data, D, tdir, num=len(data.train), steps=18,
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
        rows.append({"D": "inf" if math.isinf(D) else D, "name": name, "teacher_fd": tres["fd"]["mean"],
                     "teacher_fd_std": tres["fd"]["std"], "teacher_train_seconds": tsec, "teacher_reused": reused,
                     "baseline_fd": tres["baseline_fd"], "runs": runs})
    res = {"date": _now(), "machine": _machine(), "distill_steps": distill_steps, "distill_seeds": list(distill_seeds),
           "eval_every": eval_every, "rows": rows, "total_seconds": time.perf_counter() - t_start,
           "note": f"FD of the EMA generator at 1 NFE ({cfg.eval_samples or len(data.train)} samples, sampling seed "
                   f"{cfg.eval_seed}) against the {len(data.test)}-image test split"}
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
    vals = np.array([[c["fd_test"] for c in r["curve"][:n]] for r in runs])
    return steps[:n], vals.mean(0), vals.std(0, ddof=1) if len(runs) > 1 else np.zeros(n)


def study_table(res):
    """Per D: teacher FD, FD at a few budgets (mean over distillation seeds), best FD, and
    the images needed to first reach 1.5 x the teacher's FD."""
    import numpy as np

    out = []
    for row in res["rows"]:
        steps, mean, std = _mean_curve(row["runs"])
        batch = row["runs"][0]["batch"]
        marks = {}
        for frac in (0.1, 0.25, 0.5, 1.0):
            i = min(range(len(steps)), key=lambda j: abs(steps[j] - frac * steps[-1]))
            marks[str(steps[i] * batch)] = {"mean": float(mean[i]), "std": float(std[i])}
        thresh = 1.5 * row["teacher_fd"]
        reach = []
        for r in row["runs"]:
            hit = next((c["step"] * batch for c in r["curve"] if c["fd_test"] <= thresh), None)
            reach.append(hit)
        best = [min(c["fd_test"] for c in r["curve"]) for r in row["runs"]]
        out.append({"D": row["D"], "teacher_fd": row["teacher_fd"], "fd_at_images": marks,
                    "best_fd_mean": float(np.mean(best)), "images_to_1.5x_teacher": reach,
                    "last_fd_mean": float(mean[-1])})
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
        ax.plot(imgs, mean, "-", color=f"C{k}", label=f"{label}: generator, mean of {len(row['runs'])} seeds")
        ax.fill_between(imgs, mean - std, mean + std, color=f"C{k}", alpha=0.2)
        ax.axhline(row["teacher_fd"], color=f"C{k}", ls="--", lw=1, label=f"{label}: teacher at 35 NFE")
    ax.axhline(res["rows"][0]["baseline_fd"], color="k", ls=":", lw=1, label="data baseline")
    ax.set_yscale("log")
    ax.set_xlabel("generator images seen (thousands)")
    ax.set_ylabel("FD vs test split, 1 NFE (log)")
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
    marks = list(t[0]["fd_at_images"].keys())
    head = ["| D | teacher FD (35 NFE) | " + " | ".join(f"FD @ {int(m) // 1000}k images" for m in marks)
            + " | best FD | images to reach 1.5 x teacher FD (per seed) |",
            "|---" * (4 + len(marks)) + "|"]
    for r in t:
        cells = [f"{r['fd_at_images'][m]['mean']:.2f} ± {r['fd_at_images'][m]['std']:.2f}" for m in marks]
        reach = ", ".join("not reached" if v is None else f"{v // 1000}k" for v in r["images_to_1.5x_teacher"])
        head.append(f"| {_fmt_D(r['D'])} | {r['teacher_fd']:.2f} | " + " | ".join(cells) + f" | {r['best_fd_mean']:.2f} | {reach} |")
    return (f"# Finite D vs D = inf (SiD) on digits\n\n{res['date']}; {res['machine']}; whole study "
            f"{res['total_seconds']:.0f} s.\n\nEach D: a teacher with the default recipe (same budget), then "
            f"{len(res['distill_seeds'])} distillations (seeds {res['distill_seeds']}) of {res['distill_steps']} "
            f"iterations with the default distillation recipe. {res['note']}; mean ± std over the distillation "
            f"seeds.\n\n" + "\n".join(head) + "\n\nPlot: study.png.\n")
