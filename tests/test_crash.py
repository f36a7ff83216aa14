"""Crash safety: `train-teacher` and `distill` killed with SIGKILL at random instants
(seeded), one kill inside a checkpoint write, each time continued with --resume (or
started again when no checkpoint was left), end bit-identical to an uninterrupted run; the
checkpoint on disk always reads back verified, and no temporary file is left at the end.

A kill inside the write is made certain with the test-only hook
``IPFM_FAST_TEST_PAUSE_IN_WRITE`` (ipfm_fast.checkpoint.TEST_PAUSE_ENV): every checkpoint
write then sleeps after its temporary file is written and before it is verified and renamed,
and the test kills the process while that temporary exists."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from ipfm_fast import checkpoint as ckpt
from ipfm_fast.train.distill import DistillConfig, distill
from ipfm_fast.train.teacher import TeacherConfig, train_teacher

pytestmark = pytest.mark.usefixtures("one_thread")

RUNTIME = ["--device", "cpu", "--threads", "1", "--no-progress"]
TEACHER = ["--arch", "mlp", "--width", "16", "--depth", "1", "--batch", "16", "--steps", "64", "--log-every", "1",
           "--checkpoint-every", "8", "--eval-samples", "0", "--eval-steps", "2"]
DISTILL = ["--batch", "16", "--steps", "48", "--log-every", "1", "--checkpoint-every", "6", "--eval-every", "0",
           "--final-eval-seeds", "0", "--compile", "off"]
# The uninterrupted runs, in this process (the same recipe as the flags above).
TEACHER_CFG = dict(arch="mlp", width=16, depth=1, batch=16, steps=64, log_every=1, checkpoint_every=8, eval_samples=0,
                   eval_steps=2, device="cpu", threads="1")
DISTILL_CFG = dict(batch=16, steps=48, log_every=1, checkpoint_every=6, eval_every=0, compile="off", device="cpu",
                   threads="1")
SEED = 20261201  # the kill plan's randomness
DEADLINE = 120  # seconds for one process


def _quiet(*a, **k):
    pass


def _env(pause=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop(ckpt.TEST_PAUSE_ENV, None)
    if pause:
        env[ckpt.TEST_PAUSE_ENV] = str(pause)
    return env


def run(argv):
    r = subprocess.run([sys.executable, "-m", "ipfm_fast", *map(str, argv), *RUNTIME], capture_output=True, text=True,
                       timeout=DEADLINE, env=_env())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def last_logged_step(out):
    """The step of the last complete line of log.jsonl (0 before any)."""
    try:
        lines = (out / "log.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return 0


def temporaries(out, name="checkpoint.safetensors"):
    return sorted(p.name for p in out.glob(f"{name}.tmp-*"))


def checkpoint_step(out):
    path = out / "checkpoint.safetensors"
    return ckpt.read(path)[1]["step"] if path.exists() else None  # verified: a torn file would raise


def wait_for(proc, cond, what):
    deadline = time.time() + DEADLINE
    while not cond():
        if proc.poll() is not None:
            return False  # it finished (or failed) before the instant came
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)
    return True


def crash_and_resume(argv, out, steps, rng, plan):
    """Runs ``argv`` (a training command writing into ``out``) through ``plan``: each entry
    "write" (kill during a checkpoint write that replaces an older one), "first-write" (during
    the first one) or "random" (at a random later step plus a random delay); then runs to the
    end. Each start continues with --resume when a checkpoint exists. Returns what happened."""
    events = []
    for kind in [*plan, "finish"]:
        start = checkpoint_step(out)
        resume = ["--resume"] if start is not None else []
        if kind == "finish":
            run([*argv, *resume])
            events.append(("finish", start))
            break
        with open(out.parent / f"{out.name}-stderr.txt", "a") as stderr:
            proc = subprocess.Popen([sys.executable, "-m", "ipfm_fast", *map(str, argv), *resume, *RUNTIME],
                                    stdout=subprocess.DEVNULL, stderr=stderr,
                                    env=_env(pause=0.5 if kind.endswith("write") else None))
        try:
            if kind.endswith("write"):
                want_old = kind == "write"
                mine = f"checkpoint.safetensors.tmp-{proc.pid}"  # this process's write (not a stale temporary)
                hit = wait_for(proc, lambda: mine in temporaries(out)
                               and (out / "checkpoint.safetensors").exists() == want_old, "a checkpoint write")
            else:
                last = steps - 16  # room left: the kill lands before the run ends (unless the machine stalls us)
                target = rng.randint(min((start or 0) + 1, last), last)
                hit = wait_for(proc, lambda: last_logged_step(out) >= target, f"step {target}")
                time.sleep(rng.uniform(0.0, 0.03))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=DEADLINE)
        finally:
            if proc.poll() is None:
                proc.kill()
        stderr_tail = (out.parent / f"{out.name}-stderr.txt").read_text()[-3000:]
        if not hit and kind == "random" and proc.returncode == 0:
            events.append(("missed", start, checkpoint_step(out), temporaries(out)))  # it finished first: no kill
            continue
        assert hit and proc.returncode == -signal.SIGKILL, (kind, proc.returncode, stderr_tail)
        after = checkpoint_step(out)  # the file left behind is whole: it reads back verified
        events.append((kind, start, after, temporaries(out)))
        if kind == "write":  # killed mid-write: its temporary is left, the old checkpoint stands
            assert f"checkpoint.safetensors.tmp-{proc.pid}" in temporaries(out) and after is not None
            assert start is None or after == start  # a resumed run: killed in its first write
        if kind == "first-write":
            assert f"checkpoint.safetensors.tmp-{proc.pid}" in temporaries(out) and after is None
    assert not list(out.glob("*.tmp-*")), list(out.glob("*.tmp-*"))  # the next writes removed the stale ones
    return events


def same_tensors(a, b):
    ta, ma = ckpt.read(a)
    tb, mb = ckpt.read(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    return ma, mb


def logged(out, key):
    return [(r["step"], r[key]) for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if key in r]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """An uninterrupted teacher run and the same run killed three times (at random steps
    and inside checkpoint writes), each time resumed."""
    root = tmp_path_factory.mktemp("crash")
    data = root / "squares.npz"  # an .npz rather than digits: no scikit-learn import (~1 s) per process
    x = np.zeros((60, 8, 8), np.uint8)
    x[:, 2:6, 2:6] = np.random.default_rng(0).integers(100, 255, (60, 1, 1), dtype=np.uint8)
    np.savez(data, x=x)
    with torch.random.fork_rng():
        train_teacher(TeacherConfig(data=str(data), out=str(root / "reference"), **TEACHER_CFG), progress=False,
                      log=_quiet)
    rng = random.Random(SEED)
    events = crash_and_resume(["train-teacher", "--data", data, "--out", root / "crashed", *TEACHER], root / "crashed",
                              64, rng, ["random", "write", "random"])
    return root, events


def test_teacher_killed_anywhere_resumes_bit_identically(teachers):
    root, events = teachers
    kinds = [e[0] for e in events]
    assert kinds[1] == "write" and kinds.count("random") >= 1 and kinds[-1] == "finish", events
    ref, crashed = root / "reference", root / "crashed"
    ma, mb = same_tensors(ref / "checkpoint.safetensors", crashed / "checkpoint.safetensors")
    assert ma["step"] == mb["step"] == 64
    same_tensors(ref / "teacher.safetensors", crashed / "teacher.safetensors")
    assert logged(ref, "loss") == logged(crashed, "loss")  # the log was rewound and rewritten alike


def test_distill_killed_anywhere_resumes_bit_identically(teachers, tmp_path):
    root, _ = teachers
    argv = ["distill", "--teacher", root / "reference", *DISTILL]
    with torch.random.fork_rng():
        distill(DistillConfig(teacher=str(root / "reference"), out=str(tmp_path / "reference"), **DISTILL_CFG),
                progress=False, log=_quiet)
    rng = random.Random(SEED + 1)
    events = crash_and_resume([*argv, "--out", tmp_path / "crashed"], tmp_path / "crashed", 48, rng,
                              ["first-write", "random", "write"])
    kinds = [e[0] for e in events]
    assert kinds[0] == "first-write" and kinds[2] == "write" and kinds[-1] == "finish", events
    ref, crashed = tmp_path / "reference", tmp_path / "crashed"
    ma, mb = same_tensors(ref / "checkpoint.safetensors", crashed / "checkpoint.safetensors")
    assert ma["step"] == mb["step"] == 48
    for name in ("generator.safetensors", "generator_last.safetensors"):
        same_tensors(ref / name, crashed / name)
    assert logged(ref, "gen_loss") == logged(crashed, "gen_loss")
