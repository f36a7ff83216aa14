"""The CLI as a new user meets it, each case through a subprocess: a one-step generator is
sampled and scored at 1 NFE; mismatched models, data and flags are refused in one line
with exit code 2 before any work; signals exit 130/143 after a checkpoint; nothing is
overwritten without --resume or --overwrite; every run folder has a sample grid."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from ipfm_fast.cli import build_parser
from ipfm_fast.train.distill import DistillConfig, distill
from ipfm_fast.train.teacher import TeacherConfig, train_teacher

pytestmark = pytest.mark.usefixtures("one_thread")

RUNTIME = ["--device", "cpu", "--threads", "1", "--no-progress"]
TEACHER = ["--arch", "mlp", "--width", "16", "--depth", "1", "--batch", "16", "--steps", "4", "--log-every", "2",
           "--eval-samples", "0", "--eval-steps", "2"]
DISTILL = ["--batch", "16", "--steps", "2", "--log-every", "1", "--eval-every", "0", "--final-eval-seeds", "0",
           "--compile", "off"]


def _quiet(*a, **k):
    pass


def cli(*argv, timeout=180):
    """Runs `python -m ipfm_fast ARGV`; returns the CompletedProcess."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "ipfm_fast", *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def one_line_error(r, command, *words):
    """Exit code 2 and a single `ipfm-fast COMMAND: error: ...` line naming ``words``."""
    err = r.stderr.strip()
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert err.startswith(f"ipfm-fast {command}: error:") and "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert w.lower() in err.lower(), (w, err)
    return err


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A user's small RGB data (3x8x8, .npz and a PNG folder without classes), a teacher
    trained on it, a distill run of it, and a digits (1x8x8) teacher."""
    root = tmp_path_factory.mktemp("cli-cases")
    rng = np.random.default_rng(0)
    x = np.zeros((60, 8, 8, 3), np.uint8)
    x[:, 2:6, 2:6, :] = rng.integers(100, 255, (60, 1, 1, 3), dtype=np.uint8)  # coloured squares
    np.savez(root / "rgb.npz", x=x)
    flat = root / "flat_png"
    flat.mkdir()
    for i in range(30):
        Image.fromarray(x[i]).save(flat / f"{i:02d}.png")
    kw = dict(arch="mlp", width=16, depth=1, batch=16, steps=4, log_every=2, eval_samples=0, eval_steps=2,
              device="cpu", threads="1")
    with torch.random.fork_rng():
        train_teacher(TeacherConfig(data=str(root / "rgb.npz"), out=str(root / "t_rgb"), **kw), log=_quiet)
        train_teacher(TeacherConfig(out=str(root / "t_digits"), **kw), log=_quiet)
        distill(DistillConfig(teacher=str(root / "t_rgb"), out=str(root / "d_rgb"), batch=16, steps=2, log_every=1,
                              eval_every=0, device="cpu", threads="1", compile="off"), log=_quiet)
    return root


def test_1_sample_runs_a_generator_at_one_nfe(runs, tmp_path):
    r = cli("sample", "--teacher", runs / "d_rgb", "--num", "8", "--png", tmp_path / "g.png", *RUNTIME)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "8 samples at 1 NFE from sigma_init = 2.5" in r.stdout and "one-step generator" in r.stdout
    assert (tmp_path / "g.png").exists()
    one_line_error(cli("sample", "--teacher", runs / "d_rgb" / "generator.safetensors", "--steps", "18",
                       "--sigma-max", "80", "--png", tmp_path / "h.png", *RUNTIME),
                   "sample", "one-step generator", "--steps", "--sigma-max")
    assert not (tmp_path / "h.png").exists()


def test_2_evaluate_scores_a_generator_at_one_nfe(runs):
    r = cli("evaluate", "--teacher", runs / "d_rgb", "--seeds", "1", "--num", "20", *RUNTIME)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "at 1 NFE:" in r.stdout and "35 NFE" not in r.stdout
    one_line_error(cli("evaluate", "--teacher", runs / "d_rgb", "--steps", "1", *RUNTIME), "evaluate",
                   "one-step generator", "--steps")


def test_3_evaluate_refuses_data_of_another_shape(runs):
    one_line_error(cli("evaluate", "--teacher", runs / "t_rgb", "--data", "digits", "--seeds", "1", *RUNTIME),
                   "evaluate", "[3, 8, 8]", "[1, 8, 8]")


def test_4_and_6_scores_say_their_feature_space_and_sample_count(runs, tmp_path):
    r = cli("sample", "--teacher", runs / "t_rgb", "--num", "20", "--steps", "2", "--npz", tmp_path / "s.npz",
            *RUNTIME)
    assert r.returncode == 0, r.stderr[-3000:]
    r = cli("evaluate", "--samples", tmp_path / "s.npz", "--data", runs / "flat_png", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "RANDOM-network features" in r.stdout
    assert "warning: 20 samples per score but the data baseline uses 27" in r.stdout


def test_5_contradicting_models_and_flags_are_refused(runs, tmp_path):
    one_line_error(cli("distill", "--teacher", runs / "d_rgb", "--out", tmp_path / "x", *DISTILL, *RUNTIME),
                   "distill", "one-step generator", "not a teacher")
    one_line_error(cli("sample", "--teacher", runs / "t_rgb", "--D", "4", "--png", tmp_path / "p.png", *RUNTIME),
                   "sample", "--D 4", "D = 128")
    before = digest(runs / "d_rgb" / "checkpoint.safetensors")
    one_line_error(cli("distill", "--teacher", runs / "t_rgb", "--out", runs / "d_rgb", "--resume", "--D", "inf",
                       "--batch", "64", "--steps", "3", *RUNTIME), "distill", "--d inf (saved: 128", "--batch 64")
    one_line_error(cli("train-teacher", "--out", runs / "t_rgb", "--resume", "--data", runs / "flat_png",
                       "--arch", "unet", "--steps", "6", *RUNTIME), "train-teacher", "--data", "--arch unet")
    assert digest(runs / "d_rgb" / "checkpoint.safetensors") == before
    r = cli("distill", "--teacher", runs / "t_digits", "--out", tmp_path / "sid", "--D", "inf", *DISTILL, *RUNTIME)
    assert r.returncode == 0 and "warning: the teacher was trained at D = 128; distilling at D = inf" in r.stdout


def _run_until_logged(argv, log, lines=2):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "ipfm_fast", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 90
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= lines):
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    return proc


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_7_ctrl_c_during_train_teacher_saves_and_exits_130(tmp_path, sig, code):
    out = tmp_path / "t"
    argv = ["train-teacher", "--out", out, *TEACHER, "--steps", "100000", "--log-every", "1", *RUNTIME]
    proc = _run_until_logged(argv, out / "log.jsonl")
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=90)
    assert proc.returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr and "continue with --resume" in stdout
    assert (out / "checkpoint.safetensors").exists() and not (out / "teacher.safetensors").exists()
    r = cli("train-teacher", "--out", out, "--resume", "--steps", "3", *RUNTIME)
    assert r.returncode == 0 or "resumed from" in r.stdout  # the run continues (or is already past step 3)


def _mounted(folder, options):
    """A tmpfs mounted with ``options`` at ``folder`` in a new mount namespace (root or user
    namespaces): the command prefix, or None where the machine allows neither."""
    folder.mkdir()
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o {options} tmpfs {folder} && echo ok"],
                           capture_output=True, text=True)
    if probe.stdout.strip() != "ok":
        return None
    return ["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o {options} tmpfs {folder} && exec "$@"', "sh"]


@pytest.mark.parametrize("kind", ["read-only", "full"])
def test_8_read_only_or_full_output_fails_before_the_work(runs, tmp_path, kind):
    folder = tmp_path / "mnt"
    prefix = _mounted(folder, "ro" if kind == "read-only" else "size=4m")
    if prefix is None:
        pytest.skip("no tmpfs mount possible here (needs root or user namespaces)")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for command, argv in [
        ("sample", ["--teacher", runs / "t_rgb", "--num", "2", "--steps", "2", "--png", folder / "g.png"]),
        ("evaluate", ["--teacher", runs / "t_rgb", "--seeds", "1", "--json", folder / "e.json"]),
        ("train-teacher", ["--out", folder / "t", *TEACHER]),
        ("distill", ["--teacher", runs / "t_rgb", "--out", folder / "d", *DISTILL]),
    ]:
        r = subprocess.run([*prefix, sys.executable, "-m", "ipfm_fast", command, *map(str, argv), *RUNTIME],
                           capture_output=True, text=True, timeout=120, env=env)
        one_line_error(r, command, "cannot write", "read-only" if kind == "read-only" else "MB free")
        assert "model:" not in r.stdout and "teacher:" not in r.stdout  # refused before loading anything


def test_9_distill_refuses_data_of_another_shape_before_training(runs, tmp_path):
    r = cli("distill", "--teacher", runs / "t_rgb", "--out", tmp_path / "d", "--data", "digits", *DISTILL,
            "--eval-every", "1", *RUNTIME)
    one_line_error(r, "distill", "[3, 8, 8]", "[1, 8, 8]")
    assert not (tmp_path / "d" / "checkpoint.safetensors").exists()


def test_10_and_11_interrupted_distill_exits_130_and_is_not_overwritten(runs, tmp_path):
    out = tmp_path / "d"
    argv = ["distill", "--teacher", runs / "t_rgb", "--out", out, *DISTILL, "--steps", "100000",
            "--checkpoint-every", "100000", *RUNTIME]
    proc = _run_until_logged(argv, out / "log.jsonl")
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 130 and "continue with --resume" in stdout, stderr[-3000:]
    before = digest(out / "checkpoint.safetensors")
    one_line_error(cli("distill", "--teacher", runs / "t_rgb", "--out", out, *DISTILL, *RUNTIME), "distill",
                   "already holds a run", "--resume", "--overwrite")
    assert digest(out / "checkpoint.safetensors") == before
    r = cli("distill", "--teacher", runs / "t_rgb", "--out", out, "--overwrite", *DISTILL, *RUNTIME)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


def test_12_no_evaluation_says_which_generator_it_kept(runs, tmp_path):
    r = cli("distill", "--teacher", runs / "t_rgb", "--out", tmp_path / "d", *DISTILL, *RUNTIME)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "EMA generator of the last iteration (2; --eval-every 0" in r.stdout and "iteration None" not in r.stdout


def test_13_evaluate_checks_the_samples_shape_before_training_a_classifier(runs, tmp_path):
    shutil.copy(runs / "rgb.npz", tmp_path / "s.npz")  # 3x8x8 images, no record of their data: digits by default
    one_line_error(cli("evaluate", "--samples", tmp_path / "s.npz", "--device", "cpu"), "evaluate", "[3, 8, 8]",
                   "digits", "[1, 8, 8]")
    assert not list(tmp_path.glob("fd_classifier-*"))


def test_14_every_option_has_help_and_one_syntax_for_lists():
    parser, commands = build_parser()
    for name, sub in commands.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help" and action.help != "==SUPPRESS==":
                assert action.help, f"{name} {action.option_strings[0]} has no help"
    args = parser.parse_args(["train-teacher", "--mults", "1", "2", "2"])
    assert args.mults == [1, 2, 2] and parser.parse_args(["train-teacher", "--mults", "1,2,2"]).mults == [1, 2, 2]
    assert parser.parse_args(["sample", "--teacher", "x", "--shape", "3", "32", "32"]).shape == [3, 32, 32]
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    assert "--mults 1,2" not in readme
    # as a user sees it: the real defaults, never "(default: None)" beside a stated default
    for command, words in [("train-teacher", ["--mults 1 2 2", "(default: 3000)"]), ("sample", ["generator"]),
                           ("distill", ["--resume"])]:
        r = cli(command, "--help")
        assert r.returncode == 0 and "(default: None)" not in r.stdout, r.stdout
        assert all(w in " ".join(r.stdout.split()) for w in words), (command, r.stdout)


def test_15_every_run_folder_has_a_sample_grid(runs):
    assert (runs / "t_rgb" / "samples.png").exists()  # trained with --eval-samples 0
    assert (runs / "d_rgb" / "samples.png").exists()


def test_16_an_unreadable_image_is_named_and_can_be_skipped(runs, tmp_path):
    data = tmp_path / "imgs"
    shutil.copytree(runs / "flat_png", data)
    (data / "05.png").write_bytes(b"not a png")
    one_line_error(cli("train-teacher", "--data", data, "--out", tmp_path / "t", *TEACHER, *RUNTIME),
                   "train-teacher", "05.png", "--skip-bad-images")
    r = cli("train-teacher", "--data", data, "--out", tmp_path / "t", "--skip-bad-images", *TEACHER, *RUNTIME)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skipping unreadable image" in r.stdout and "05.png" in r.stdout
