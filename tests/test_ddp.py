"""Multi-process distillation: `torchrun --nproc_per_node=2 -m ipfm_fast distill` (DDP,
gloo on CPU) matches a 1-process run with the same global batch and micro-batch, and a
checkpoint resumes with a different number of processes."""

import os
import subprocess
import sys

import pytest
import torch

from ipfm_fast import checkpoint as ckpt
from ipfm_fast.train.distill import DistillConfig, distill

from test_distill import tiny_teacher

ARGS = ["--batch", "16", "--micro-batch", "8", "--lr", "1e-3", "--eval-every", "0", "--final-eval-seeds", "0",
        "--log-every", "1", "--device", "cpu", "--threads", "1", "--no-progress"]


def _quiet(*a, **k):
    pass


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher-ddp")
    model, meta = tiny_teacher(5)
    ckpt.save_denoiser(folder / "teacher.safetensors", model, meta["model"], D=128.0, data="digits", role="teacher")
    return str(folder)


def _torchrun(teacher_dir, out, steps, *extra, program=("-m", "ipfm_fast"), env_extra=None):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    env["IPFM_FAST_EXIT_WATCHDOG_S"] = "60"  # a hung teardown fails with its stacks, inside the 120 s timeout
    env.update(env_extra or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", *program,
           "distill", "--teacher", teacher_dir, "--out", str(out), "--steps", str(steps), *ARGS, *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    # no deprecated call warns on every run (DDP's broadcast_buffers did; with warnings as errors it failed)
    assert "FutureWarning" not in r.stderr and "DeprecationWarning" not in r.stderr, r.stderr[-4000:]
    return r


def _state(out):
    return ckpt.read(os.path.join(out, "checkpoint.safetensors"))


def _close(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if k.startswith(("generator", "generator_ema", "fake")) or "exp_avg" in k:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_two_processes_match_one_and_resume_across_world_sizes(teacher_dir, tmp_path):
    kw = dict(teacher=teacher_dir, batch=16, micro_batch=8, lr=1e-3, eval_every=0, log_every=1, device="cpu",
              threads="1")
    # 2 processes x 1 micro-batch of 8, 4 iterations
    r = _torchrun(teacher_dir, tmp_path / "ddp", 4)
    assert "2 process(es) x 1 micro-batch(es) of 8" in r.stdout
    # 1 process x 2 micro-batches of 8, same global batch
    distill(DistillConfig(out=str(tmp_path / "one"), steps=4, **kw), log=_quiet)
    (ta, ma), (tb, mb) = _state(tmp_path / "ddp"), _state(tmp_path / "one")
    assert ma["step"] == mb["step"] == 4
    _close(ta, tb)
    moved = (ta["generator/net.out.weight"] - tiny_teacher(5)[0].state_dict()["net.out.weight"]).abs().max()
    assert moved > 1e-4  # the runs did train
    # resume with another world size: 1 process for 2 iterations, then 2 processes to 4
    distill(DistillConfig(out=str(tmp_path / "mixed"), steps=2, **kw), log=_quiet)
    _torchrun(teacher_dir, tmp_path / "mixed", 4, "--resume")
    tc, mc = _state(tmp_path / "mixed")
    assert mc["step"] == 4
    _close(tc, tb)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="lists threads through Linux's /proc")
@pytest.mark.parametrize("mode", ["done", "fail"])
def test_no_collective_thread_outlives_the_run(teacher_dir, tmp_path, mode):
    """After `distill` returns or raises, the process group is freed and its worker threads
    joined: none is left to run (and abort) during interpreter shutdown. Deterministic,
    where the abort it prevents happened about one run in three."""
    probe = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_exit_probe.py")
    program = (probe, "fail") if mode == "fail" else (probe,)
    _torchrun(teacher_dir, tmp_path / mode, 4, program=program, env_extra={"PROBE_DIR": str(tmp_path)})
    for rank in (0, 1):
        line = (tmp_path / f"rank{rank}.txt").read_text()
        assert line.startswith("raised planted failure;" if mode == "fail" else "0;"), line
        assert "gloo" not in line, line  # gloo_tcp_loop / pt_gloo_runloop threads still alive


def test_a_hung_exit_ends_with_the_stacks(tmp_path):
    """The exit watchdog a torchrun process arms after its work: a process still alive
    after it (here a thread that keeps interpreter shutdown waiting) prints every thread's
    stack and exits 1 instead of hanging."""
    code = ("import threading, time; from ipfm_fast.train.parallel import arm_exit_watchdog; "
            "arm_exit_watchdog(2); threading.Thread(target=time.sleep, args=(120,)).start()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Timeout" in r.stderr and "time.sleep" not in r.stdout, r.stderr[-3000:]
    assert "Thread 0x" in r.stderr  # every thread's stack


def test_a_bad_exit_watchdog_setting_is_refused(monkeypatch):
    from ipfm_fast.errors import InvalidInput
    from ipfm_fast.train.parallel import exit_watchdog_seconds

    monkeypatch.setenv("IPFM_FAST_EXIT_WATCHDOG_S", "soon")
    with pytest.raises(InvalidInput, match="IPFM_FAST_EXIT_WATCHDOG_S"):
        exit_watchdog_seconds()
    monkeypatch.setenv("IPFM_FAST_EXIT_WATCHDOG_S", "0")
    assert exit_watchdog_seconds() == 0
