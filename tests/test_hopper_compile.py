"""Every Triton kernel variant the ops launch compiles for Hopper (sm_90), without a GPU.

The sweep calls the public ops with ``backend="triton"`` on CPU tensors inside
``ipfm_fast.testing.hopper_compile_only()``: each launch goes through the real launcher
(grid, constexprs, dtypes, strides, ``do_not_specialize``) and Triton's own argument
specialization, compiles exactly what a GPU would compile for it (an integer argument
equal to 1 becomes a constexpr and one divisible by 16 an alignment hint, as they would on
the device), and is recorded, not run.

The sweep runs in a subprocess without TRITON_INTERPRET (in interpreter mode @triton.jit
returns interpreter functions) and with an empty TRITON_CACHE_DIR, so the time measured is
that of a clean machine. Run this file directly to see the specializations:
``python tests/test_hopper_compile.py``.
"""

import json
import math
import os
import subprocess
import sys
import time

import pytest

SWEEP_SECONDS = 180  # CI budget for the cold sweep on a 2-core machine


def _losses(ipf, torch, shape, dtype, needs, reduction, weight, sigma_kind):
    """A forward and backward of both losses; needs: which of (a, b, x) require grad."""
    a, b, x = (torch.randn(shape, dtype=dtype).requires_grad_(need) for need in needs)
    if weight == "given":
        weight = torch.rand(shape[0]) + 0.5
    loss = ipf.ipfm_generator_loss(a, b, x, weight=weight, reduction=reduction, backend="triton")
    if any(needs):
        loss.sum().backward()
    fake_b, fake_x = a.detach().requires_grad_(needs[0]), x.detach().requires_grad_(needs[2])
    sigma = torch.rand(shape[0]) + 0.1 if sigma_kind == "per-row" else 0.7
    fake = ipf.ipfm_fake_loss(fake_b, fake_x, sigma, reduction=reduction, backend="triton")
    if needs[0] or needs[2]:
        fake.sum().backward()


def sweep():
    """The launches of every op variant; returns the JSON-able CompileLog."""
    import torch

    import ipfm_fast as ipf
    from ipfm_fast.ops.perturb import noise_from_gaussian
    from ipfm_fast.testing import hopper_compile_only, jit_functions, launched_kernels

    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    with hopper_compile_only() as log:
        # perturb / sample_prior: long rows (several programs per row), short rows (several
        # rows per program), N = 1 with one row, odd N; D finite and inf; sigma scalar and
        # per row (with its gradient, which regenerates the noise: fp32, no x, no sigma)
        for shape, dtype, D, sigma_kind, return_noise in [
            ((4, 3000), f32, 128.0, "per-row", True),
            ((37, 9), bf16, math.inf, "scalar", False),
            ((1, 1), f16, 3.5, "scalar", True),
            ((5, 7), f32, math.inf, "per-row-grad", False),
            ((3, 2, 11), bf16, 64.0, "per-row", False),
        ]:
            x = torch.randn(shape, dtype=dtype)
            sigma = 0.5 if sigma_kind == "scalar" else (torch.rand(shape[0]) + 0.1)
            if sigma_kind == "per-row-grad":
                sigma.requires_grad_()
            out = ipf.perturb(x, sigma, D, return_noise=return_noise, backend="triton")
            if sigma_kind == "per-row-grad":
                out.float().sum().backward()
        for shape, dtype, D, sigma in [((3, 4100), f32, 128.0, 80.0), ((2, 5), f16, math.inf, torch.rand(2) + 1)]:
            ipf.sample_prior(shape, sigma, D, dtype=dtype, backend="triton")
        # the Beta clip (norm pre-pass + CLIP: rows spanning several programs read several
        # partials, short rows several rows per program) and a given gaussian (GIVEN_G), with
        # and without the clip; the clipped sigma gradient regenerates the noise clipped
        for shape, dtype, D, sigma_kind in [((4, 3000), f32, 4.0, "per-row-grad"), ((37, 9), bf16, 128.0, "scalar"),
                                            ((1, 1), f16, 3.5, "per-row")]:
            x = torch.randn(shape, dtype=dtype)
            sigma = 0.5 if sigma_kind == "scalar" else (torch.rand(shape[0]) + 0.1)
            if sigma_kind == "per-row-grad":
                sigma.requires_grad_()
            out = ipf.perturb(x, sigma, D, clip_beta=(1e-3, 1 - 1e-3), return_noise=dtype == f16, backend="triton")
            if sigma_kind == "per-row-grad":
                out.float().sum().backward()
        ipf.sample_prior((3, 4100), 80.0, 128.0, clip_beta=(1e-3, 1 - 1e-3), backend="triton")
        noise_from_gaussian(torch.randn(4, 3000), torch.rand(4) + 0.1, 128.0, backend="triton")
        noise_from_gaussian(torch.randn(37, 9, dtype=bf16), 0.5, 16.0, clip_beta=(0.1, 0.9), backend="triton")
        noise_from_gaussian(torch.randn(2, 3, 6, 6, dtype=f16).to(memory_format=torch.channels_last), 0.5,
                            math.inf, backend="triton")
        noise_from_gaussian(torch.randn(3, 5000), 0.5, 8.0, clip_beta=(0.1, 0.9), backend="triton")

        # layouts the launchers keep as they are: channels_last rows, sliced rows (odd row
        # strides), a 0-dim sigma tensor
        x = torch.randn(4, 3, 6, 6).to(memory_format=torch.channels_last)
        ipf.perturb(x, torch.tensor(0.3), 16.0, return_noise=True, backend="triton")
        ipf.perturb(torch.randn(5, 21)[:, :19], 0.3, 16.0, backend="triton")

        # losses: every gradient combination autograd can ask for (a, b, x), adaptive and
        # given weight, every reduction, sigma scalar and per row; one row of one element;
        # rows of three chunks (several programs per row); fp16 / bf16
        combos = [(True, True, True), (True, False, False), (False, True, False), (False, False, True),
                  (True, True, False), (True, False, True), (False, True, True), (False, False, False)]
        for i, needs in enumerate(combos):
            reduction = ("mean", "sum", "none")[i % 3]
            _losses(ipf, torch, (3, 4100), f32, needs, reduction, ("adaptive", "given")[i % 2],
                    ("scalar", "per-row")[i % 2])
        _losses(ipf, torch, (1, 1), f32, (True, True, True), "mean", "adaptive", "scalar")
        _losses(ipf, torch, (6, 3, 5, 7), bf16, (True, True, True), "sum", "given", "per-row")
        _losses(ipf, torch, (2, 2049), f16, (True, False, True), "none", "adaptive", "scalar")
        a, b, x = (torch.randn(4, 37)[:, 1:34].requires_grad_() for _ in range(3))  # row stride 37, N = 33
        ipf.ipfm_generator_loss(a, b, x, backend="triton").backward()

        # field target: D finite and inf, N = 1, M = 1, B = 1, odd sizes, several tiles of
        # both GEMM-shaped kernels (B > 64 rows, M > 64, N > 128)
        for rows, m, n, D, sigma_kind in [(3, 5, 1, 128.0, "scalar"), (1, 1, 37, math.inf, "per-row"),
                                          (70, 130, 200, 2048.0, "per-row"), (5, 3, 200, math.inf, "scalar")]:
            y, x_ref = torch.randn(rows, n), torch.randn(m, n)
            sigma = torch.rand(rows) + 0.1 if sigma_kind == "per-row" else 0.3
            ipf.field_target(y, sigma, x_ref, D, backend="triton")
        ipf.field_target(torch.randn(4, 3, 5, dtype=bf16), 0.5, torch.randn(6, 3, 5, dtype=bf16), 16.0,
                         backend="triton")

        # the training sizes: Triton compiles another variant when an integer argument is a
        # multiple of 16 (and a pointer 16-byte aligned), the one a GPU meets first -- rows
        # of 3x32x32 (CIFAR-10) and 1x8x8 (digits), a reference batch of 32
        for shape, dtype in [((4, 3, 32, 32), f32), ((16, 1, 8, 8), f32), ((4, 3, 32, 32), bf16)]:
            sigma = (torch.rand(shape[0]) + 0.1).requires_grad_()
            ipf.perturb(torch.randn(shape, dtype=dtype), sigma, 128.0, backend="triton").float().sum().backward()
            ipf.perturb(torch.randn(shape, dtype=dtype), 0.5, 128.0, clip_beta=(1e-3, 1 - 1e-3), backend="triton")
            ipf.sample_prior(shape, 80.0, math.inf, dtype=dtype, backend="triton")
            _losses(ipf, torch, shape, dtype, (True, True, True), "mean", "adaptive", "per-row")
        for D in (128.0, math.inf):
            ipf.field_target(torch.randn(16, 1, 8, 8), torch.rand(16) + 0.1, torch.randn(32, 1, 8, 8), D,
                             backend="triton")

    unspecialized = {name: [fn.arg_names[a] if isinstance(a, int) else a for a in fn.do_not_specialize]
                     for name, fn in jit_functions().items()}
    return {"launches": [vars(launch) | {"grid": list(launch.grid)} for launch in log.launches],
            "compiles": [vars(c) for c in log.compiles], "kernels": launched_kernels(),
            "unspecialized": unspecialized}


def _jsonable(value):
    return value if isinstance(value, (bool, int, float, str, type(None))) else str(value)


def run_sweep(cache_dir):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache_dir)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                          timeout=2 * SWEEP_SECONDS, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stderr[-6000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), seconds


def _spec(c):
    args = ", ".join(f"{k}: {v}" for k, v in c["signature"].items() if v != "constexpr")
    consts = ", ".join(f"{k}={v}" for k, v in c["constexprs"].items())
    return f"{c['kernel'].rsplit('.', 1)[1]}[warps={c['num_warps']}]({args}; {consts})"


def test_every_kernel_variant_compiles_for_hopper(tmp_path):
    pytest.importorskip("triton")
    log, seconds = run_sweep(tmp_path / "triton-cache")
    compiles = log["compiles"]
    print(f"\nsweep: {len(log['launches'])} launches, {len(compiles)} distinct specializations, {seconds:.0f} s cold")
    for c in sorted(compiles, key=_spec):
        print("  ", _spec(c))

    # every kernel of ipfm_fast.kernels was compiled, for sm_90 (the "a" variant: wgmma / TMA)
    assert len(log["kernels"]) >= 11  # the kernels of kernels/*.py, jit helpers left out
    assert {c["kernel"] for c in compiles} == set(log["kernels"])
    assert all(c["ptx_target"] == "sm_90a" and c["cubin_bytes"] > 0 for c in compiles)
    assert {launch["kernel"] for launch in log["launches"]} == set(log["kernels"])
    assert all(launch["grid"][1:] == [1, 1] for launch in log["launches"])  # 1-D grids: no 65535 cap

    def variants(kernel, *names):
        return {tuple(c["constexprs"].get(n) for n in names) for c in compiles if c["kernel"].endswith("." + kernel)}

    def types(kernel, arg):
        return {c["signature"][arg] for c in compiles if c["kernel"].endswith("." + kernel)}

    # the integer-equals-1 specializations a GPU meets: N = 1 (field target's finalize
    # failed to compile on it), one row, one program per row
    assert ("n", 1) not in {kv for c in compiles if c["kernel"].endswith("._finalize_kernel")
                            for kv in c["constexprs"].items()}  # n kept at runtime: do_not_specialize
    assert any(c["signature"]["n"] == "i32" and c["constexprs"].get("N_LOOP") == 1 for c in compiles
               if c["kernel"].endswith("._finalize_kernel"))
    assert {1} <= {c["constexprs"].get("n") for c in compiles if c["kernel"].endswith(".perturb_kernel")}
    assert variants("_finalize_kernel", "FINITE_D") == {(True,), (False,)}
    assert types("_finalize_kernel", "D") == {"fp64"}  # a Python float would be passed as fp32
    assert any(c["constexprs"].get("M_LOOP") == 1 for c in compiles if c["kernel"].endswith("._combine_kernel"))

    # perturb: every flag both ways, short rows (ROWS > 1) and long (several programs per row)
    for flag in ("HAS_X", "SIGMA_PER_ROW", "WRITE_NOISE", "FINITE_D"):
        assert {v for (v,) in variants("perturb_kernel", flag)} == {True, False}, flag
    for flag in ("GIVEN_G", "CLIP"):  # the opt-in variants, next to the default path
        assert {v for (v,) in variants("perturb_kernel", flag)} == {True, False}, flag
    assert {v for (v,) in variants("perturb_norm_kernel", "GIVEN_G")} == {True, False}
    assert {r > 1 for (r,) in variants("perturb_norm_kernel", "ROWS")} == {True, False}
    assert any(clip and p_loop > 1 for clip, p_loop in variants("perturb_kernel", "CLIP", "P_LOOP"))
    assert not any(clip and not finite for clip, finite in variants("perturb_kernel", "CLIP", "FINITE_D"))
    rows_per_program = {r for (r,) in variants("perturb_kernel", "ROWS")}
    assert 1 in rows_per_program and max(rows_per_program) > 1
    assert any(launch["kernel"].endswith(".perturb_kernel") and launch["constexprs"]["ROWS"] == 1
               and launch["constexprs"]["BLOCK_G"] == 256 and launch["grid"][0] >= 12 for launch in log["launches"])
    assert types("perturb_kernel", "y_ptr") == {"*fp32", "*bf16", "*fp16"}

    # losses: every NEED_* combination, adaptive and given weight, every reduction
    assert variants("gen_backward_kernel", "NEED_A", "NEED_B", "NEED_X") == {
        (a, b, x) for a in (True, False) for b in (True, False) for x in (True, False)} - {(False, False, False)}
    assert variants("fake_backward_kernel", "NEED_B", "NEED_X") == {(True, True), (True, False), (False, True)}
    assert variants("gen_finalize_kernel", "ADAPTIVE", "REDUCTION") == {
        (adaptive, r) for adaptive in (True, False) for r in (0, 1, 2)}
    assert variants("fake_finalize_kernel", "SIGMA_PER_ROW", "REDUCTION") == {
        (per_row, r) for per_row in (True, False) for r in (0, 1, 2)}
    for kernel, arg in [("gen_partial_kernel", "a_ptr"), ("gen_backward_kernel", "ga_ptr"),
                        ("fake_partial_kernel", "b_ptr"), ("fake_backward_kernel", "gb_ptr")]:
        assert types(kernel, arg) == {"*fp32", "*bf16", "*fp16"}, kernel

    # every kernel whose row length n is specialized compiled both ways: n a multiple of 16
    # (the training sizes) and not (odd sizes)
    for kernel in log["kernels"]:
        n_aligned = [c["aligned"].count("n") for c in compiles if c["kernel"] == kernel and "n" in c["signature"]]
        if "n" in log["unspecialized"][kernel]:
            assert not any(n_aligned), kernel
        elif n_aligned:
            assert any(n_aligned) and not all(n_aligned), kernel

    # field target: several tiles on the 1-D grids of both GEMM-shaped kernels
    for kernel in ("._screen_kernel", "._combine_kernel"):
        assert max(launch["grid"][0] for launch in log["launches"] if launch["kernel"].endswith(kernel)) >= 6
    assert seconds < SWEEP_SECONDS, f"cold sweep took {seconds:.0f} s"


if __name__ == "__main__":
    result = sweep()
    for c in result["compiles"]:
        c["constexprs"] = {k: _jsonable(v) for k, v in c["constexprs"].items()}
    for launch in result["launches"]:
        launch["constexprs"] = {k: _jsonable(v) for k, v in launch["constexprs"].items()}
    print(json.dumps(result))
