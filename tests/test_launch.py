"""Launch robustness of the GPU backends: the device of a Triton launch, and the size
limits of the GPU kernels (32-bit column indices, 2^31 - 1 programs per 1-D grid), which
the public ops reject with InvalidInput before anything is allocated."""

import math
import types

import pytest
import torch

import ipfm_fast as ipf
from ipfm_fast import _checks, backends
from ipfm_fast.errors import InvalidInput
from ipfm_fast.ops import _launch
from ipfm_fast.ops import field_target as field_op
from ipfm_fast.ops import losses as losses_op
from ipfm_fast.ops import perturb as perturb_op

from conftest import fused_backends

HAS_TRITON_CPU = backends.why_not("triton", "cpu", torch.float32) is None


# --------------------------------------------------------------------------------------
# device of a Triton launch
# --------------------------------------------------------------------------------------


def test_triton_device_guard_picks_the_tensor_device():
    """Triton launches on the current device: the guard must make the tensor's current."""
    fake = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
    guard = _launch.triton_device(fake)
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    cpu_guard = _launch.triton_device(torch.empty(1))
    assert not isinstance(cpu_guard, torch.cuda.device)
    with cpu_guard:  # a no-op for CPU tensors (the interpreter)
        pass


@pytest.mark.skipif(not HAS_TRITON_CPU, reason="needs the Triton interpreter")
def test_every_triton_launch_is_inside_the_device_guard(monkeypatch):
    from ipfm_fast.kernels import field_target, losses, perturb

    depth = [0]
    outside = []

    class Recorder:
        def __init__(self, t):
            assert isinstance(t, torch.Tensor)

        def __enter__(self):
            depth[0] += 1

        def __exit__(self, *exc):
            depth[0] -= 1

    monkeypatch.setattr(_launch, "triton_device", Recorder)
    launched = set()
    for module in (perturb, losses, field_target):
        for name, kernel in vars(module).items():
            if name.endswith("_kernel") and hasattr(kernel, "run"):
                def spy(*args, _run=kernel.run, _name=name, **kwargs):
                    launched.add(_name)
                    if depth[0] == 0:
                        outside.append(_name)
                    return _run(*args, **kwargs)

                monkeypatch.setattr(kernel, "run", spy)
    x = torch.randn(2, 5)
    sigma = torch.rand(2, requires_grad=True)
    ipf.perturb(x, sigma, 8.0, backend="triton").sum().backward()  # backward regenerates the noise
    ipf.sample_prior((2, 3), 1.0, 8.0, backend="triton")
    a, b, xx = (torch.randn(2, 5, requires_grad=True) for _ in range(3))
    ipf.ipfm_generator_loss(a, b, xx, backend="triton").backward()
    ipf.ipfm_fake_loss(b, xx, 0.5, backend="triton").backward()
    ipf.field_target(torch.randn(2, 5), 0.5, torch.randn(3, 5), 8.0, backend="triton")
    assert launched == {"perturb_kernel", "gen_partial_kernel", "gen_finalize_kernel", "gen_backward_kernel",
                        "fake_partial_kernel", "fake_finalize_kernel", "fake_backward_kernel", "_norms_kernel",
                        "_screen_kernel", "_finalize_kernel", "_combine_kernel"}
    assert outside == []


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_ops_run_on_the_tensors_device_not_the_current_one(backend):
    """Tensors on cuda:1 while cuda:0 is current: the same results as on cuda:0."""
    if backend not in fused_backends("cuda"):
        pytest.skip(backends.why_not(backend, "cuda", torch.float32))
    assert torch.cuda.current_device() == 0
    x = torch.randn(6, 3, 40)
    sigma = torch.rand(6) + 0.1
    a, b = x + 0.1 * torch.randn_like(x), x + torch.randn_like(x)
    x_ref = torch.randn(9, 3, 40)

    def run(device):
        g = torch.Generator(device=device).manual_seed(11)
        on = [t.to(device) for t in (x, sigma, a, b, x_ref)]
        xd, sd, ad, bd, rd = on
        out = [ipf.perturb(xd, sd, 64.0, generator=g, backend=backend),
               ipf.ipfm_generator_loss(ad, bd, xd, reduction="none", backend=backend),
               ipf.ipfm_fake_loss(bd, xd, sd, reduction="none", backend=backend),
               ipf.field_target(xd, sd, rd, 64.0, backend=backend)]
        torch.cuda.synchronize(device)
        return [t.cpu() for t in out]

    want = run(torch.device("cuda", 0))
    got = run(torch.device("cuda", 1))
    assert torch.cuda.current_device() == 0
    for u, v in zip(got, want):
        torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------
# size limits of the GPU kernels
# --------------------------------------------------------------------------------------


def _huge(rows, n, dtype=torch.float32):
    """A [rows, n] tensor without memory: every element aliases one."""
    return torch.empty(1, dtype=dtype).expand(rows, n)


def test_gpu_size_limits_helper():
    _checks.check_gpu_sizes("op", "cuda", 2**31 - 1, {"x": 2**31 - 1})  # at the limit: fine
    for backend in ("cpu", "reference"):
        _checks.check_gpu_sizes("op", backend, 2**40, {"x": 2**40})  # no limit there
    with pytest.raises(InvalidInput, match=r"op: the cuda backend takes at most 2\^31 - 1 elements per row"):
        _checks.check_gpu_sizes("op", "cuda", 2**31, {})
    with pytest.raises(InvalidInput, match=r"op: x need 2147483648 programs in one triton launch"):
        _checks.check_gpu_sizes("op", "triton", 8, {"x": 2**31})


def test_perturb_grid_limits_per_backend():
    # CUDA: one block per row (and per 2048 elements); Triton packs short rows 256 to a program
    with pytest.raises(InvalidInput, match="programs in one cuda launch"):
        perturb_op._check_gpu_sizes("perturb", "cuda", 2**31, 1)
    perturb_op._check_gpu_sizes("perturb", "triton", 2**32 - 1, 1)  # 2^24 programs
    with pytest.raises(InvalidInput, match="programs in one triton launch"):
        perturb_op._check_gpu_sizes("perturb", "triton", 2**22, 2**20)  # 2^22 * 1024 programs
    perturb_op._check_gpu_sizes("perturb", "cuda", 2**20, 2**21)  # 2^30 blocks: fine


@pytest.mark.skipif(not HAS_TRITON_CPU, reason="needs the Triton interpreter")
def test_public_ops_reject_sizes_past_the_gpu_limits():
    """Rejected before any allocation or launch (the inputs are zero-stride views)."""
    long_rows = _huge(2, 2**31)
    with pytest.raises(InvalidInput, match=r"perturb: the triton backend takes at most 2\^31 - 1 elements per row"):
        ipf.perturb(long_rows, 0.5, 8.0, backend="triton")
    with pytest.raises(InvalidInput, match=r"sample_prior: the triton backend takes at most 2\^31 - 1"):
        ipf.sample_prior((1, 2**31), 0.5, 8.0, backend="triton")
    with pytest.raises(InvalidInput, match=r"ipfm_generator_loss: .* at most 2\^31 - 1 elements per row"):
        ipf.ipfm_generator_loss(long_rows, long_rows, long_rows, backend="triton")
    with pytest.raises(InvalidInput, match=r"ipfm_fake_loss: .* at most 2\^31 - 1 elements per row"):
        ipf.ipfm_fake_loss(long_rows, long_rows, 0.5, backend="triton")
    many = _huge(2**21, 2**21)  # 2^21 rows x 2^10 chunks of 2048 = 2^31 programs
    with pytest.raises(InvalidInput, match="ipfm_generator_loss: 2097152 rows of 2097152 elements need 2147483648"):
        ipf.ipfm_generator_loss(many, many, many, backend="triton")
    with pytest.raises(InvalidInput, match="perturb: 2097152 rows of 2097152 elements need 4294967296"):
        ipf.perturb(many, 0.5, math.inf, backend="triton")
    with pytest.raises(InvalidInput, match=r"field_target: the triton backend takes at most 2\^31 - 1 elements"):
        ipf.field_target(long_rows, 0.5, _huge(1, 2**31), 8.0, backend="triton")
    with pytest.raises(InvalidInput, match=r"field_target: B = 2147483648 rows of y \(one program each\) need"):
        ipf.field_target(_huge(2**31, 1), 0.5, _huge(3, 1), 8.0, backend="triton")
    with pytest.raises(InvalidInput, match=r"field_target: the \[B, M\] = \[4194304, 4194304\] tiles need"):
        ipf.field_target(_huge(2**22, 1), 0.5, _huge(2**22, 1), 8.0, backend="triton")  # 2^32 tiles
    assert issubclass(InvalidInput, ValueError)


def test_field_target_tile_limits():
    field_op._check_gpu_sizes("field_target", "cuda", 2**31 - 1, 64, 64)  # one tile column: fine
    with pytest.raises(InvalidInput, match=r"the \[B, N\] = \[2147483647, 2048\] tiles need"):
        field_op._check_gpu_sizes("field_target", "cuda", 2**31 - 1, 1, 2048)
    field_op._check_gpu_sizes("field_target", "cpu", 2**40, 2**40, 2**40)


def test_loss_programs_match_the_kernel_grid():
    # the limit counts what the Triton launcher launches: rows x chunks
    for n in (1, 2047, 2048, 2049, 10**6):
        block, chunks, _ = losses_op._triton_grid(n)
        assert chunks == -(-n // losses_op._TRITON_BLOCK)
