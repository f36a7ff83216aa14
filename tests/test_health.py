"""Long-run health (``slow``): memory stays flat -- resident set size (and, on CUDA, the
allocated device memory) grows by less than 1% over the second half -- across 10,000
iterations that call every op (forward and backward) and across a 2,000-iteration
distillation, and torch.compile compiles nothing more once the distillation is in its
steady state (torch._dynamo's frame and graph counters stop moving).

Memory is sampled after gc.collect(), every 250 (resp. 50) iterations; the growth compared
is between the median of five samples around the middle and that of the last five, so a
steady leak of ~1 KB per iteration shows while the allocator's back-and-forth does not.
Each test prints its figures (docs/reliability.md quotes them)."""

import gc
import math
import time

import pytest
import torch
from torch._dynamo.utils import counters

import ipfm_fast as ipf
from conftest import FUSED
from ipfm_fast.train import runbook
from ipfm_fast.train.distill import DistillConfig, distill
from ipfm_fast.train.teacher import TeacherConfig, train_teacher

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

BACKENDS = [(d, b) for d, b in FUSED if not (d == "cpu" and b == "triton")]  # the interpreter: ~2 ms per program
IDS = [f"{d}-{b}" for d, b in BACKENDS]


def rss_bytes():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def memory(device):
    gc.collect()
    return {"rss": rss_bytes(), "cuda": torch.cuda.memory_allocated() if device == "cuda" else 0}


def second_half_growth(samples, key):
    """(growth over the second half as a fraction of the middle, middle, end): the medians of
    five samples around the middle and of the last five. The allocator moves RSS by about
    +-0.4% from sample to sample (measured over 40,000 iterations: no trend); a median of
    five does not see that, a leak moves both medians apart."""
    half = len(samples) // 2
    mid = sorted(s[key] for s in samples[half - 2: half + 3])[2]
    end = sorted(s[key] for s in samples[-5:])[2]
    return (end - mid) / max(mid, 1), mid, end


def op_step(device, backend):
    """One iteration: every op once, forward and backward, on batch-sized inputs."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(64, 3, 32, 32, device=device, generator=g)
    a, b = torch.randn_like(x), torch.randn_like(x)
    sigma = torch.rand(64, device=device, generator=g) + 0.1
    y_small, x_ref = torch.randn(32, 768, device=device, generator=g), torch.randn(256, 768, device=device,
                                                                                     generator=g)

    def step():
        s = sigma.clone().requires_grad_()
        y = ipf.perturb(x, s, 128.0, generator=g, backend=backend)
        z = ipf.sample_prior((64, 3, 32, 32), 2.5, 128.0, device=device, generator=g, backend=backend)
        xg = (y + z).detach().requires_grad_()
        ag, bg = a.clone().requires_grad_(), b.clone().requires_grad_()
        loss = ipf.ipfm_generator_loss(ag, bg, xg, alpha=1.2, backend=backend)
        loss = loss + ipf.ipfm_fake_loss(bg, xg.detach(), s, backend=backend)
        yr = y_small.clone().requires_grad_()
        loss = loss + ipf.field_target(yr, s[:32], x_ref, 128.0, backend=backend).square().mean()
        (loss + y.mean()).backward()  # y: perturb's sigma gradient (the noise regenerated)
        return loss.detach()

    return step


@pytest.mark.parametrize("device,backend", BACKENDS, ids=IDS)
def test_memory_flat_over_10k_op_iterations(device, backend):
    step = op_step(device, backend)
    for _ in range(1000):  # warm-up: caches, allocator pools, thread pools
        step()
    samples, t0 = [], time.perf_counter()
    for i in range(10_000):
        last = step()
        if i % 250 == 249:
            if device == "cuda":
                torch.cuda.synchronize()
            samples.append(memory(device))
    seconds = time.perf_counter() - t0
    assert math.isfinite(float(last))
    rss, rss_mid, rss_end = second_half_growth(samples, "rss")
    print(f"\n10,000 iterations x 5 ops (forward + backward) on {device}-{backend} in {seconds:.1f} s: RSS "
          f"{rss_mid / 2**20:.1f} -> {rss_end / 2**20:.1f} MiB over the second half ({100 * rss:+.3f}%)")
    assert rss < 0.01
    if device == "cuda":
        dev, mid, end = second_half_growth(samples, "cuda")
        print(f"CUDA allocated {mid / 2**20:.1f} -> {end / 2**20:.1f} MiB ({100 * dev:+.3f}%)")
        assert dev < 0.01


def test_distill_2000_iterations_memory_flat_and_no_recompiles(tmp_path, monkeypatch):
    """A 2,000-iteration distillation with torch.compile on (CPU here; CUDA on a GPU machine):
    memory flat over the second half, and no compilation after the warm-up iterations."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.random.fork_rng():
        train_teacher(TeacherConfig(out=str(tmp_path / "teacher"), arch="mlp", width=32, depth=1, batch=64, steps=50,
                                    eval_samples=0, eval_steps=2, device=device, threads="1"), log=lambda *a: None)
    samples, warm = [], {}
    tick = runbook.RunBook.tick

    def sampling_tick(book):
        t = tick(book)
        if t.done == 20:  # compiled (both requires_grad variants of the fake network) by now
            warm.update(frames=counters["frames"]["total"], graphs=counters["stats"]["unique_graphs"])
        if t.done % 50 == 0:
            samples.append(dict(step=t.done, frames=counters["frames"]["total"],
                                graphs=counters["stats"]["unique_graphs"], **memory(device)))
        return t

    monkeypatch.setattr(runbook.RunBook, "tick", sampling_tick)
    counters.clear()
    t0 = time.perf_counter()
    with torch.random.fork_rng():
        summary = distill(DistillConfig(teacher=str(tmp_path / "teacher"), out=str(tmp_path / "distill"), steps=2000,
                                        batch=64, log_every=50, checkpoint_every=500, eval_every=0, compile="on",
                                        device=device, threads="1"), log=lambda *a: None)
    seconds = time.perf_counter() - t0
    assert summary["steps"] == 2000 and len(samples) == 40
    rss, rss_mid, rss_end = second_half_growth(samples, "rss")
    compiled = samples[-1]["frames"] - warm["frames"], samples[-1]["graphs"] - warm["graphs"]
    print(f"\ndistill 2,000 iterations (batch 64, torch.compile on, {device}) in {seconds:.1f} s: RSS "
          f"{rss_mid / 2**20:.1f} -> {rss_end / 2**20:.1f} MiB over the second half ({100 * rss:+.3f}%); "
          f"Dynamo frames/graphs at iteration 20: {warm['frames']}/{warm['graphs']}, compiled after it: "
          f"{compiled[0]} frames, {compiled[1]} graphs")
    assert warm["graphs"] > 0, "nothing was compiled: the test would not see a recompile"
    assert compiled == (0, 0)
    assert rss < 0.01
    if device == "cuda":
        dev, mid, end = second_half_growth(samples, "cuda")
        print(f"CUDA allocated {mid / 2**20:.1f} -> {end / 2**20:.1f} MiB ({100 * dev:+.3f}%)")
        assert dev < 0.01
