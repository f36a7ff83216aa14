"""IPFM distillation loop: SiD's gradient at D = inf, bit-identical resume, NaN handling,
signals, the CLI, and equivalence of micro-batch layouts (the basis of multi-process runs)."""

import functools
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import ipfm_fast as ipf
from ipfm_fast import checkpoint as ckpt
from ipfm_fast.models import build_denoiser, model_config
from ipfm_fast.schedules import sample_sigma_distill
from ipfm_fast.train import common, host_memory
from ipfm_fast.train import distill as dl
from ipfm_fast.train.distill import DistillConfig, build_state, distill
from ipfm_fast.train.flat import FlatParams

TINY = dict(batch=16, log_every=2, eval_every=0, device="cpu", threads="1")


def _quiet(*a, **k):
    pass


def tiny_teacher(seed=0, width=16):
    """A small random MLP denoiser (its zero-initialised output layer made random, so the
    teacher, the fake network and the generator differ once trained)."""
    cfg = model_config("mlp", [1, 8, 8], width=width, depth=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_denoiser(cfg)
        with torch.no_grad():
            model.net.out.weight.normal_(0, 0.05)
            model.net.out.bias.normal_(0, 0.05)
    return model.eval().requires_grad_(False), {"model": cfg, "D": 128.0, "data": "digits"}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher")
    model, meta = tiny_teacher()
    ckpt.save_denoiser(folder / "teacher.safetensors", model, meta["model"], D=128.0, data="digits", role="teacher")
    return str(folder)


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_d_inf_generator_gradient_is_sids_formula():
    """At D = inf the generator gradient equals SiD's loss written out in eager PyTorch
    (same z, sigma and noise), alpha = 1.2 as in SiD."""
    teacher, meta = tiny_teacher(0)
    cfg = DistillConfig(teacher="-", D=math.inf, alpha=1.2, **TINY)
    state = build_state(cfg, teacher=teacher, teacher_meta=meta, device="cpu")
    with torch.no_grad():  # make the fake network differ from the teacher
        for p in state.fake_net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    step = 3
    state.opt_g.zero_grad()
    loss, masked = dl.generator_backward(state, step)
    got = [p.grad.clone() for p in state.gen_net.parameters()]
    assert int(masked) == 0 and all(p.grad is None for p in state.fake_net.parameters())

    # SiD, written out: y = x + sigma eps; loss = (y_real - y_fake)((y_real - x) - alpha(y_real - y_fake)) / w
    rng = dl.micro_rng("cpu", cfg.seed, step, dl.GEN_PHASE, 0)
    z = ipf.sample_prior((16, 1, 8, 8), 2.5, math.inf, generator=rng)
    sigma = sample_sigma_distill(16, t_max=800, generator=rng)
    _, eps = ipf.perturb(torch.zeros_like(z), sigma, math.inf, generator=rng, return_noise=True)
    gen = build_denoiser(meta["model"])
    gen.load_state_dict(teacher.state_dict())
    x = gen(z, 2.5)
    y = x + sigma.view(-1, 1, 1, 1) * eps
    y_real, y_fake = teacher(y, sigma), state.fake_net(y, sigma)
    weight_factor = (x - y_real).abs().mean(dim=(1, 2, 3), keepdim=True).detach()
    sid = (y_real - y_fake) * ((y_real - x) - 1.2 * (y_real - y_fake)) / weight_factor
    sid.sum(dim=(1, 2, 3)).mean().backward()
    torch.testing.assert_close(loss, sid.detach().sum(dim=(1, 2, 3)).mean(), rtol=1e-5, atol=1e-6)
    for a, b in zip(got, [p.grad for p in gen.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert any(a.abs().max() > 0 for a in got)


def _params(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def test_micro_batches_equal_one_batch_layout():
    """P micro-batches of b rows == what P processes of b rows each compute: the draws are
    a function of (seed, step, micro index), so micro_batch (not the layout) is the recipe."""
    teacher, meta = tiny_teacher(1)
    outs = []
    for accum_layout in (1, 2):
        cfg = DistillConfig(teacher="-", micro_batch=8, lr=1e-3, **TINY)
        state = build_state(cfg, teacher=teacher, teacher_meta=meta, device="cpu")
        assert state.accum == 2 and state.micro == 8
        for step in range(3):
            dl.train_step(state, step)
        outs.append((_params(state.gen_net), _params(state.fake_net)))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)
    # and the loop moves the generator away from the teacher
    assert not torch.equal(outs[0][0], _params(teacher))


def test_tiny_run_writes_everything(teacher_dir, tmp_path, monkeypatch):
    from ipfm_fast import metrics

    monkeypatch.setattr(metrics, "train_classifier", functools.partial(metrics.train_classifier, steps=20))
    kept = []
    monkeypatch.setattr(host_memory, "keep_freed", lambda: kept.append(True))
    out = tmp_path / "run"
    s = distill(DistillConfig(teacher=teacher_dir, out=str(out), steps=6, lr=1e-3, **dict(TINY, eval_every=3),
                              eval_samples=200), log=_quiet)
    for name in ("config.json", "checkpoint.safetensors", "generator.safetensors", "generator_last.safetensors",
                 "log.jsonl", "summary.json"):
        assert (out / name).exists(), name
    assert s["steps"] == 6 and s["D"] == 128.0 and s["images_per_second"] > 0
    assert [c["step"] for c in s["curve"]] == [0, 3, 6] and all(math.isfinite(c["score_test"]) for c in s["curve"])
    model, D, sigma_init, meta = dl.load_generator(str(out))
    assert D == 128.0 and sigma_init == 2.5 and meta["role"] == "generator" and meta["steps"] == s["best_step"]
    x = dl.generate(model, 5, [1, 8, 8], D, sigma_init, seed=0)
    assert x.shape == (5, 1, 8, 8) and torch.equal(x, dl.generate(model, 5, [1, 8, 8], D, sigma_init, seed=0))
    recs = [json.loads(s) for s in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "gen_loss" in r] == [2, 4, 6]
    assert kept == [True]  # a CPU run sets the host-memory policy


_HOST_MEMORY_SCRIPT = """
import ctypes, resource, torch
from ipfm_fast.train import host_memory
print(host_memory.keep_freed())
libc = ctypes.CDLL("libc.so.6")
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_long]
block = torch.empty(24 << 20, dtype=torch.uint8)  # glibc's defaults: a fresh mmap; kept: from the heap
print(block.data_ptr() < libc.sbrk(0))
del block
def step():  # a training step's pattern: 12 x 8 MiB allocated, filled and all freed again
    blocks = [torch.ones(2 << 20) for _ in range(12)]
    del blocks
for _ in range(4):
    step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 8)
"""
STEP_PAGES = 12 * (8 << 20) // 4096


def _host_memory_child(policy):
    """(what keep_freed said, whether a 24 MiB block came from the heap, page faults per step)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env[host_memory.ENV] = policy
    out = subprocess.run([sys.executable, "-c", _HOST_MEMORY_SCRIPT], env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return out[0], out[1] == "True", float(out[2])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_host_memory_is_reused_without_page_faults():
    """Under glibc's defaults a 24 MiB block is a fresh mmap and freed blocks may go back to
    the kernel (whether a step faults its pages in again depends on the process's allocation
    history: up to all ~24,600 of them here); with the training loops' policy the block comes
    from the heap and a step faults next to none of its pages."""
    said, from_heap, _ = _host_memory_child("default")
    assert "default" in said and not from_heap
    said, from_heap, faults = _host_memory_child("keep")
    assert "kept for reuse" in said and from_heap
    assert faults < 0.05 * STEP_PAGES, faults
    with pytest.raises(subprocess.CalledProcessError):
        _host_memory_child("sometimes")  # a bad value: InvalidInput, not silently ignored


def test_resume_is_bit_identical(teacher_dir, tmp_path):
    kw = dict(TINY, teacher=teacher_dir, lr=1e-3, checkpoint_every=3, fake_steps=2)
    kw["log_every"] = 1
    distill(DistillConfig(out=str(tmp_path / "full"), steps=6, **kw), log=_quiet)
    distill(DistillConfig(out=str(tmp_path / "split"), steps=3, **kw), log=_quiet)
    # the recipe comes from the checkpoint: a different lr here is ignored
    distill(DistillConfig(out=str(tmp_path / "split"), steps=6, **dict(kw, lr=1.0)), resume=True, log=_quiet)
    a = ckpt.read(tmp_path / "full" / "checkpoint.safetensors")[0]
    b = ckpt.read(tmp_path / "split" / "checkpoint.safetensors")[0]
    assert a.keys() == b.keys() and any(k.startswith("opt_fake/") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = [json.loads(s) for s in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(s) for s in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["gen_loss"], r["fake_loss"]) for r in la] == [(r["step"], r["gen_loss"], r["fake_loss"])
                                                                        for r in lb]


class _NaNAfter(torch.nn.Module):
    """A teacher that returns NaN from its ``after``-th call on (every ``every``-th call
    when ``every`` is set)."""

    def __init__(self, inner, after=0, every=None):
        super().__init__()
        self.inner, self.after, self.every, self.calls = inner, after, every, 0

    def forward(self, y, sigma):
        self.calls += 1
        out = self.inner(y, sigma)
        hit = self.calls > self.after if self.every is None else self.calls % self.every == 0
        return out * float("nan") if hit else out


def test_nan_steps_are_skipped_with_a_warning(tmp_path):
    teacher, meta = tiny_teacher(2)
    cfg = DistillConfig(teacher="-", out=str(tmp_path), steps=6, lr=1e-3, **TINY)
    with pytest.warns(RuntimeWarning, match="skipped 1 update"):
        s = distill(cfg, teacher=_NaNAfter(teacher, every=3), teacher_meta=meta, init=teacher, log=_quiet)
    assert s["steps"] == 6
    recs = [json.loads(s) for s in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert sum(r["skipped"] for r in recs) == 2 and sum(r["masked_rows"] for r in recs) == 32
    assert all(torch.isfinite(p).all() for p in dl.load_generator(str(tmp_path))[0].parameters())


def test_persistent_nans_stop_with_a_message(tmp_path):
    teacher, meta = tiny_teacher(3)
    cfg = DistillConfig(teacher="-", out=str(tmp_path), steps=50, max_bad_steps=4, **TINY)
    with pytest.warns(RuntimeWarning), pytest.raises(FloatingPointError, match="4 iterations in a row"):
        distill(cfg, teacher=_NaNAfter(teacher, after=2), teacher_meta=meta, init=teacher, log=_quiet)
    _, m = ckpt.read(tmp_path / "checkpoint.safetensors")
    assert m["step"] == 6  # saved: two good iterations, then four skipped ones
    t = ckpt.read(tmp_path / "checkpoint.safetensors")[0]
    assert all(torch.isfinite(v).all() for k, v in t.items() if v.is_floating_point())


def test_cli_sigterm_saves_and_exits_143(teacher_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ipfm_fast", "distill", "--teacher", teacher_dir, "--out", str(out), "--steps",
           "100000", "--batch", "16", "--eval-every", "0", "--checkpoint-every", "100000", "--log-every", "1",
           "--final-eval-seeds", "0", "--device", "cpu", "--threads", "1", "--no-progress",
           "--compile", "off", "--channels-last", "auto"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    log = out / "log.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr  # 128 + SIGTERM: a script can tell it from a finished run
    assert "interrupted by SIGTERM" in stdout and "Traceback" not in stderr
    _, meta = ckpt.read(out / "checkpoint.safetensors")
    assert meta["step"] >= 3 and json.loads((out / "summary.json").read_text())["stopped"] == "SIGTERM"
    # and it resumes from there (in-process: one interpreter start less)
    distill(DistillConfig(teacher=teacher_dir, out=str(out), steps=meta["step"] + 2, checkpoint_every=100000,
                          **dict(TINY, log_every=1)), resume=True, log=_quiet)
    assert ckpt.read(out / "checkpoint.safetensors")[1]["step"] == meta["step"] + 2


def test_config_errors(teacher_dir, tmp_path):
    with pytest.raises(ValueError, match="micro-batch"):
        distill(DistillConfig(teacher=teacher_dir, out=str(tmp_path), micro_batch=5, **TINY), log=_quiet)
    with pytest.raises(ValueError, match="ema"):
        distill(DistillConfig(teacher=teacher_dir, out=str(tmp_path), ema=1.5, **TINY), log=_quiet)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        distill(DistillConfig(teacher=teacher_dir, out=str(tmp_path / "x"), **TINY), resume=True, log=_quiet)
    with pytest.raises(FileNotFoundError):
        distill(DistillConfig(teacher=str(tmp_path / "missing"), out=str(tmp_path), **TINY), log=_quiet)


@pytest.mark.gpu
def test_cuda_bf16_distill_resume_and_sampling(teacher_dir, tmp_path):
    """On a GPU: bf16 autocast, fused Adam, the periodic evaluation, resume, 1-NFE sampling."""
    kw = dict(teacher=teacher_dir, out=str(tmp_path), batch=16, eval_every=2, eval_samples=100, log_every=1,
              checkpoint_every=2, device="cuda", precision="bf16")
    s = distill(DistillConfig(steps=2, **kw), log=_quiet)
    assert s["precision"] == "bf16" and s["device"].startswith("cuda")
    s = distill(DistillConfig(steps=4, **kw), resume=True, log=_quiet)
    assert s["steps"] == 4 and s["resumed_from"] == 2
    model, D, sigma_init, _ = dl.load_generator(str(tmp_path), device="cuda")
    x = dl.generate(model, 8, [1, 8, 8], D, sigma_init, device="cuda",
                    autocast=lambda: common.autocast(torch.device("cuda"), "bf16"))
    assert x.is_cuda and x.dtype == torch.float32 and torch.isfinite(x).all()


# --------------------------------------------------------------------------------------
# the steady-state iteration: no host reads, updates skipped on the device
# --------------------------------------------------------------------------------------

# aten ops that read a value back to the host (a sync on a GPU)
HOST_READS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "repeat_interleave", "equal", "is_nonzero")


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the host reads made from the training loop's own code (ipfm_fast/train):
    the ops' CPU-only argument checks read CPU tensors, which is no sync. ``tolist`` and
    ``numpy`` bypass the dispatcher, so they are patched for the duration."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def _record(self, what):
        import traceback

        frames = [f for f in traceback.extract_stack() if f"{os.sep}ipfm_fast{os.sep}" in f.filename]
        if frames and f"{os.sep}train{os.sep}" in frames[-1].filename:
            self.reads.append(f"{what} at {frames[-1].filename}:{frames[-1].lineno}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in HOST_READS:
            self._record(func.__name__)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._patched = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}
        for name, orig in self._patched.items():
            def read(t, *a, _orig=orig, _name=name, **k):
                self._record(_name)
                return _orig(t, *a, **k)
            setattr(torch.Tensor, name, read)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, orig in self._patched.items():
            setattr(torch.Tensor, name, orig)
        return super().__exit__(*exc)


def test_steady_state_iteration_reads_nothing_back():
    """train_step + the statistics accumulation never read a tensor back (the GPU twin of
    this test runs under torch.cuda.set_sync_debug_mode("error"))."""
    teacher, meta = tiny_teacher(4)
    state = build_state(DistillConfig(teacher="-", micro_batch=8, grad_clip=1.0, **TINY), teacher=teacher,
                        teacher_meta=meta, device="cpu")
    stats = dl.StepStats(state.device)
    stats.add(dl.train_step(state, 0))
    with _HostReads() as mode:
        for step in (1, 2):
            stats.add(dl.train_step(state, step))
    assert mode.reads == []
    w = stats.read()
    assert w["iterations"] == 3 and w["skipped"] == 0 and math.isfinite(w["gen_loss"])
    # and the detector does see a read in the loop's code
    with _HostReads() as mode:
        stats.add(dl.train_step(state, 3))
        stats.read()
    assert mode.reads and "distill.py" in mode.reads[0]


class HostCopies(torch.overrides.TorchFunctionMode):
    """Records tensors built from Python data straight onto a device by ipfm_fast's own code
    (``torch.tensor(v, device=...)``, ``as_tensor``, ``new_tensor``...): on CUDA each is a
    blocking host-to-device copy, which breaks set_sync_debug_mode("error") and CUDA-graph
    capture. Recorded on CPU too, where the same call is harmless, so a CPU test sees it."""

    FACTORIES = ("tensor", "as_tensor", "asarray", "scalar_tensor")
    PACKAGE = os.path.dirname(os.path.abspath(ipf.__file__)) + os.sep

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        from_data = bool(args) and not isinstance(args[0], torch.Tensor)
        if (name in self.FACTORIES and from_data and kwargs.get("device") is not None) or name == "new_tensor":
            import traceback

            frames = [f for f in traceback.extract_stack()[:-1] if f.filename.startswith(self.PACKAGE)]
            if frames:
                self.calls.append(f"torch.{name} at {frames[-1].filename}:{frames[-1].lineno}")
        return func(*args, **kwargs)


def test_steady_state_iteration_builds_no_tensor_from_host_data():
    """No blocking host-to-device copy in an iteration: every per-step tensor is made on the
    device (torch.full, torch.rand with a device generator, ...)."""
    teacher, meta = tiny_teacher(4)
    state = build_state(DistillConfig(teacher="-", micro_batch=8, **TINY), teacher=teacher, teacher_meta=meta,
                        device="cpu")
    stats = dl.StepStats(state.device)
    stats.add(dl.train_step(state, 0))
    with HostCopies() as mode:
        for step in (1, 2):
            stats.add(dl.train_step(state, step))
    assert mode.calls == []
    # the detector does see such a call made from the package's code
    probe = {}
    exec(compile("import torch\ndef make(): return torch.tensor([2.5], device='cpu')",
                 os.path.join(HostCopies.PACKAGE, "_probe.py"), "exec"), probe)
    with HostCopies() as mode:
        probe["make"]()
    assert len(mode.calls) == 1 and "_probe.py:2" in mode.calls[0]


def test_skipped_update_leaves_weights_optimizer_and_ema_untouched():
    """A non-finite generator loss skips the update inside fused Adam (its found_inf) and
    the EMA, with no host read; the next good iteration updates again."""
    teacher, meta = tiny_teacher(5)
    nan_teacher = _NaNAfter(teacher, after=1)
    state = build_state(DistillConfig(teacher="-", lr=1e-3, **TINY), teacher=nan_teacher, teacher_meta=meta,
                        init=teacher, device="cpu")
    first = dl.train_step(state, 0)  # good
    assert not bool(first["gen_skipped"])
    before = (_params(state.gen_net), _params(state.ema.model), state.opt_g.steps.clone())
    bad = dl.train_step(state, 1)
    assert bool(bad["gen_skipped"]) and int(bad["masked_rows"]) == 16
    assert torch.equal(_params(state.gen_net), before[0]) and torch.equal(_params(state.ema.model), before[1])
    assert torch.equal(state.opt_g.steps, before[2]) and int(before[2]) == 1  # Adam's step count rolled back
    nan_teacher.after = 10**9  # good again
    assert not bool(dl.train_step(state, 2)["gen_skipped"])
    assert not torch.equal(_params(state.gen_net), before[0])


def test_ema_skip_mask_matches_lerp():
    model = torch.nn.Linear(3, 4)
    ema, params = common.EMA(model, 0.9), FlatParams(model)
    start = ema.model.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    expected = torch.lerp(start, model.weight, 1 - ema.beta(50))
    ema.update(params, 50, skip=torch.tensor(True))
    assert torch.equal(ema.model.weight, start)
    ema.update(params, 50, skip=torch.tensor(False))
    torch.testing.assert_close(ema.model.weight, expected, rtol=1e-6, atol=1e-7)


def test_speed_switches_validate_and_resolve():
    teacher, meta = tiny_teacher(6)
    with pytest.raises(ValueError, match="--compile must be one of"):
        DistillConfig(compile="yes").validate()
    with pytest.raises(ValueError, match="--channels-last must be one of"):
        DistillConfig(channels_last=True).validate()
    state = build_state(DistillConfig(teacher="-", **TINY), teacher=teacher, teacher_meta=meta, device="cpu")
    assert not state.compiled and not state.channels_last  # auto on CPU: eager, and an MLP has no convolutions


def test_channels_last_conv_networks_match_the_default_layout(tmp_path):
    """channels_last changes the memory layout only: a U-Net iteration gives the same
    weights up to float reassociation, and checkpoints come out in the standard layout."""
    cfg = model_config("unet", [1, 8, 8], width=8)
    torch.manual_seed(0)
    teacher = build_denoiser(cfg).eval().requires_grad_(False)
    with torch.no_grad():
        teacher.net.out.weight.normal_(0, 0.05)
    meta = {"model": cfg, "D": 128.0, "data": "digits"}
    outs = []
    for layout in ("off", "on"):
        t = build_denoiser(cfg).eval().requires_grad_(False)
        t.load_state_dict(teacher.state_dict())
        state = build_state(DistillConfig(teacher="-", channels_last=layout, lr=1e-3, **TINY), teacher=t,
                            teacher_meta=meta, device="cpu")
        assert state.channels_last == (layout == "on")
        for step in range(2):
            dl.train_step(state, step)
        outs.append(_params(state.gen_net))
        if layout == "on":
            w = state.gen_net.net.down[0].conv1.weight
            assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
            ckpt.save_denoiser(tmp_path / "g.safetensors", state.ema.model, cfg, D=128.0, role="generator")
            loaded, _ = ckpt.load_denoiser(tmp_path / "g.safetensors")
            assert torch.equal(_params(loaded), _params(state.ema.model))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)


def _gpu_state(compile_mode, teacher=None):
    cfg = model_config("unet", [3, 16, 16], width=16)
    torch.manual_seed(0)
    plain = build_denoiser(cfg).eval().requires_grad_(False)
    return build_state(DistillConfig(teacher="-", batch=32, micro_batch=16, compile=compile_mode, grad_clip=1.0,
                                     device="cuda", eval_every=0), teacher=teacher or plain, init=plain,
                       teacher_meta={"model": cfg, "D": 128.0, "data": "digits"}, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("compile_mode", ["off", "on"])
def test_cuda_steady_state_iterations_never_sync(compile_mode):
    """bf16, channels_last U-Net, fused Adam, 2 micro-batches, gradient clipping: after
    warm-up (compilation included) iterations run under set_sync_debug_mode("error")."""
    state = _gpu_state(compile_mode)
    assert state.precision == "bf16" and state.channels_last and state.compiled == (compile_mode == "on")
    stats = dl.StepStats(state.device)
    for step in range(3):
        stats.add(dl.train_step(state, step))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(3, 6):
            stats.add(dl.train_step(state, step))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    w = stats.read()
    assert w["iterations"] == 6 and w["skipped"] == 0 and math.isfinite(w["gen_loss"])


@pytest.mark.gpu
def test_cuda_bad_update_is_skipped_without_a_sync():
    cfg = model_config("unet", [3, 16, 16], width=16)
    torch.manual_seed(0)
    nan_teacher = _NaNAfter(build_denoiser(cfg).eval().requires_grad_(False), after=10**9).cuda()
    state = _gpu_state("off", teacher=nan_teacher)
    dl.train_step(state, 0)
    before = (_params(state.gen_net), _params(state.ema.model))
    nan_teacher.after = 0
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = dl.train_step(state, 1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bool(stats["gen_skipped"])
    assert torch.equal(_params(state.gen_net), before[0]) and torch.equal(_params(state.ema.model), before[1])


def test_cuda_graph_needs_cuda_and_one_process():
    teacher, meta = tiny_teacher(7)
    with pytest.raises(ValueError, match="--cuda-graph needs a CUDA device"):
        build_state(DistillConfig(teacher="-", cuda_graph=True, **TINY), teacher=teacher, teacher_meta=meta,
                    device="cpu")
    state = build_state(DistillConfig(teacher="-", micro_batch=8, fake_steps=2, **TINY), teacher=teacher,
                        teacher_meta=meta, device="cpu")
    with pytest.raises(ValueError, match="cuda_graph=True"):
        dl.GraphedStep(state)
    # the keys a graph registers are exactly the rngs an iteration draws from
    dl.step_runner(state)(0)
    assert sorted(state._rngs) == sorted(state.draw_keys()) and len(state.draw_keys()) == 3 * 2


def test_ema_weight_tensor_matches_the_float_weight():
    model = torch.nn.Linear(3, 4)
    a, b, params = common.EMA(model, 0.9), common.EMA(model, 0.9), FlatParams(model)
    with torch.no_grad():
        model.weight.add_(1.0)
    a.update(params, 7)
    b.update(params, 7, weight=torch.tensor(1.0 - b.beta(7)))
    torch.testing.assert_close(a.model.weight, b.model.weight, rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("compile_mode", ["off", "on"])
def test_cuda_graph_replays_the_eager_iterations(compile_mode):
    """GraphedStep (3 eager warm-up iterations, capture, replays) updates the weights as the
    eager loop does, with the same random draws (the generators are registered with the
    graph and reseeded before each replay); replays never sync."""
    updates, losses = [], []
    for graphed in (False, True):
        cfg = model_config("unet", [3, 16, 16], width=16)
        torch.manual_seed(0)
        plain = build_denoiser(cfg).eval().requires_grad_(False)
        state = build_state(DistillConfig(teacher="-", batch=32, micro_batch=16, compile=compile_mode,
                                          precision="fp32", cuda_graph=graphed, device="cuda", eval_every=0),
                            teacher=plain, init=plain, teacher_meta={"model": cfg, "D": 128.0}, device="cuda")
        start = _params(state.gen_net)
        run = dl.step_runner(state)
        for step in range(4):
            run(step)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if graphed else "default")
        try:
            # copies: a replay overwrites its outputs
            stats = [{k: v.clone() for k, v in run(step).items()} for step in range(4, 7)]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        updates.append(_params(state.gen_net) - start)
        losses.append(stats[-1]["gen_loss"])
    rel = (updates[1] - updates[0]).norm() / updates[0].norm()
    assert updates[0].norm() > 0 and rel < 1e-2, rel
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-3, atol=1e-5)
