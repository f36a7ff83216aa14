"""The Triton kernels in the interpreter with the tile sizes of a GPU launch.

The launchers may pick larger tiles in the interpreter (fewer programs: each costs
milliseconds there), so the other tests do not run every GPU configuration; here
``ipfm_fast.ops._launch.gpu_tiles()`` forces the exact constexprs a GPU launch uses, each
launch is recorded to prove it, and the results are compared with the float64 reference
(perturb: with the cpu backend, which draws the same Philox numbers). Shapes are small but
cover several programs per row, several rows per program and several output tiles.
"""

import math

import pytest
import torch

import ipfm_fast as ipf
from ipfm_fast import backends
from ipfm_fast import reference as ref
from ipfm_fast.ops import _launch
from ipfm_fast.ops import losses as losses_op
from ipfm_fast.ops import perturb as perturb_op

pytestmark = pytest.mark.skipif(not backends.triton_interpreter() or backends.triton_import_error() is not None,
                                reason="runs the Triton interpreter on CPU tensors")


@pytest.fixture
def launches(monkeypatch):
    """Records (kernel name, grid, keyword arguments) of every Triton launch."""
    from ipfm_fast.kernels import field_target, losses, perturb

    seen = []
    for module in (perturb, losses, field_target):
        for name, kernel in vars(module).items():
            if name.endswith("_kernel") and hasattr(kernel, "run"):
                def spy(*args, grid, warmup, _run=kernel.run, _name=name, **kwargs):
                    seen.append((_name, tuple(grid), kwargs))
                    return _run(*args, grid=grid, warmup=warmup, **kwargs)

                monkeypatch.setattr(kernel, "run", spy)
    return seen


def test_tile_choice_has_an_explicit_override():
    assert _launch.use_gpu_tiles() is False  # the interpreter's tiles by default here
    with _launch.gpu_tiles():
        assert _launch.use_gpu_tiles() is True
        with _launch.gpu_tiles(False):
            assert _launch.use_gpu_tiles() is False
        assert perturb_op.triton_tiles(4, 3000) == (1, 256, 3, 12)
    assert perturb_op.triton_tiles(4, 3000, gpu=True) == (1, 256, 3, 12)  # 1024 elements per program
    assert perturb_op.triton_tiles(4, 3000, gpu=False) == (4, 1024, 1, 1)
    assert perturb_op.triton_tiles(300, 9, gpu=True) == (64, 4, 1, 5)  # short rows: 64 rows per program


@pytest.mark.skipif(backends.why_not("cpu", "cpu", torch.float32) is not None, reason="cpu backend not built")
@pytest.mark.parametrize("shape", [(4, 3000), (300, 9), (1, 1), (5, 7)])
@pytest.mark.parametrize("D", [128.0, math.inf])
def test_perturb_gpu_tiles(launches, shape, D):
    """The same numbers as the cpu backend (and bit-identical to the interpreter tiles)."""
    x = torch.randn(shape)
    sigma = torch.rand(shape[0]) + 0.1
    results = {}
    for name, gpu in [("gpu", True), ("interpreter", False)]:
        torch.manual_seed(7)
        with _launch.gpu_tiles(gpu):
            results[name] = ipf.perturb(x, sigma, D, return_noise=True, backend="triton")
    torch.manual_seed(7)
    want = ipf.perturb(x, sigma, D, return_noise=True, backend="cpu")
    rows_per_program, block_g, _, programs = perturb_op.triton_tiles(*shape, gpu=True)
    name, grid, kwargs = launches[0]
    assert name == "perturb_kernel" and grid == (programs,)
    assert (kwargs["ROWS"], kwargs["BLOCK_G"]) == (rows_per_program, block_g)
    for got, interp, cpu in zip(results["gpu"], results["interpreter"], want):
        assert torch.equal(got, interp)
        torch.testing.assert_close(got, cpu, rtol=2e-5, atol=2e-5)  # log/sin/cos rounding differs, nothing else


def test_sample_prior_gpu_tiles(launches):
    torch.manual_seed(3)
    with _launch.gpu_tiles():
        y = ipf.sample_prior((3, 2100), 2.0, math.inf, backend="triton")
    assert launches[0][1] == (9,) and launches[0][2]["BLOCK_G"] == 256
    z = (y / 2.0).double().flatten()
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1.0) < 0.03


def _tol(dtype):
    return {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight,reduction", [("adaptive", "mean"), ("given", "none")])
def test_generator_loss_gpu_tiles(launches, dtype, weight, reduction):
    shape = (3, 4100)  # three chunks of 2048 per row, ragged tail
    a = torch.randn(shape, dtype=torch.float64)
    b, x = a + 0.3 * torch.randn(shape, dtype=torch.float64), a + torch.randn(shape, dtype=torch.float64)
    inputs = [t.to(dtype) for t in (a, b, x)]
    w = torch.rand(3) + 0.5 if weight == "given" else "adaptive"
    fused = [t.clone().requires_grad_() for t in inputs]
    ref_in = [t.double().requires_grad_() for t in inputs]
    with _launch.gpu_tiles():
        loss = ipf.ipfm_generator_loss(*fused, alpha=1.2, weight=w, reduction=reduction, backend="triton")
        loss.sum().backward()
    want = ref.ipfm_generator_loss(*ref_in, alpha=1.2, weight=w if weight == "adaptive" else w.double(),
                                   reduction=reduction)
    want.sum().backward()
    block, chunks, warps = losses_op._triton_grid(4100)
    names = [(name, grid) for name, grid, _ in launches]
    assert names == [("gen_partial_kernel", (3 * chunks,)), ("gen_finalize_kernel", (1,)),
                     ("gen_backward_kernel", (3 * chunks,))]
    assert all(kw.get("BLOCK", block) == block == 2048 for _, _, kw in launches)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5)
    for g, gw in zip(fused, ref_in):
        torch.testing.assert_close(g.grad.double(), gw.grad, rtol=_tol(dtype), atol=_tol(dtype) * gw.grad.abs().max())


@pytest.mark.parametrize("sigma_kind,reduction", [("scalar", "sum"), ("per-row", "mean")])
def test_fake_loss_gpu_tiles(launches, sigma_kind, reduction):
    b = torch.randn(3, 4100)
    x = b + torch.randn(3, 4100)
    sigma = 0.7 if sigma_kind == "scalar" else torch.rand(3) + 0.1
    fb, fx = b.clone().requires_grad_(), x.clone().requires_grad_()
    rb, rx = b.double().requires_grad_(), x.double().requires_grad_()
    with _launch.gpu_tiles():
        loss = ipf.ipfm_fake_loss(fb, fx, sigma, reduction=reduction, backend="triton")
        loss.backward()
    want = ref.ipfm_fake_loss(rb, rx, sigma if sigma_kind == "scalar" else sigma.double(), reduction=reduction)
    want.backward()
    assert [name for name, _, _ in launches] == ["fake_partial_kernel", "fake_finalize_kernel", "fake_backward_kernel"]
    assert launches[0][1] == (9,) and launches[0][2]["BLOCK"] == 2048
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=0)
    torch.testing.assert_close(fb.grad.double(), rb.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fx.grad.double(), rx.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("D", [128.0, math.inf])
def test_field_target_gpu_tiles(launches, D):
    """B = 66, M = 70, N = 130: 2 x 2 screen tiles and 3 x 2 combine tiles on the 1-D grids."""
    from ipfm_fast.kernels.field_target import COMBINE_TILE, SCREEN_TILE

    g = torch.Generator().manual_seed(0)
    x = torch.randn(70, 130, generator=g)
    sigma = torch.rand(66, generator=g) * 0.5 + 0.3
    y = x[torch.randint(0, 70, (66,), generator=g)] + 0.3 * torch.randn(66, 130, generator=g)
    with _launch.gpu_tiles():
        t, logz = ipf.field_target(y, sigma, x, D, return_logz=True, backend="triton")
    t64, logz64 = ref.field_target(y.double(), sigma.double(), x.double(), D, return_logz=True)
    grids = {name: (grid, kw) for name, grid, kw in launches}
    assert grids["_screen_kernel"][0] == (2 * 2,)
    assert grids["_combine_kernel"][0] == (3 * 2,)
    assert tuple(grids["_screen_kernel"][1][k] for k in ("BM", "BN", "BK")) == SCREEN_TILE
    assert tuple(grids["_combine_kernel"][1][k] for k in ("BM", "BN", "BK")) == COMBINE_TILE
    assert grids["_finalize_kernel"][0] == (66,)
    err = ((t.double() - t64).norm(dim=1) / t64.norm(dim=1)).max().item()
    assert err < 1e-5, err
    torch.testing.assert_close(logz.double(), logz64, rtol=1e-6, atol=1e-4)
