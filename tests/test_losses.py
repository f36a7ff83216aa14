"""IPFM distillation losses: every fused backend against autograd on the float64
reference, low precision against plain eager PyTorch, masking, layouts, determinism,
bad input, torch.library (opcheck, torch.compile). Sizes stay small: without a GPU the
Triton kernels run in the interpreter (their sm_90 build: tests/test_hopper_compile.py)."""

import math
import os
import sys

import pytest
import torch

import ipfm_fast as ipf
from ipfm_fast import _ext
from ipfm_fast import reference as ref
from ipfm_fast.errors import InvalidInput, InvalidType
from ipfm_fast.ops import losses as losses_op

sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import baselines  # noqa: E402 - plain eager PyTorch as the SiD / EDM loops write the losses

ALPHAS = [0.5, 1.0, 1.2]
REDUCTIONS = ["mean", "sum", "none"]


def make_inputs(shape, dtype=torch.float32, device="cpu", seed=None):
    """Random a (teacher), b (fake, near a) and x (generator): the shape of real batches."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    a = torch.randn(shape, generator=g, dtype=torch.float64)
    b = a + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
    x = a + torch.randn(shape, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (a, b, x)]


def rel_err(out, want):
    out, want = out.double(), want.double()
    return ((out - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def leaves(tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in tensors]


def fused_and_reference(fn_fused, fn_ref, inputs, grad_out_shape_from_ref=True):
    """(fused loss, fused grads, reference loss, reference grads) with one random upstream
    gradient shared by both; the reference runs in float64."""
    fused_in = leaves(inputs)
    ref_in = leaves(inputs, torch.float64)
    loss_ref = fn_ref(*ref_in)
    upstream = torch.rand_like(loss_ref) + 0.5
    grads_ref = torch.autograd.grad(loss_ref, ref_in, upstream)
    loss = fn_fused(*fused_in)
    grads = torch.autograd.grad(loss, fused_in, upstream.to(loss.dtype))
    return loss, grads, loss_ref, grads_ref


# --------------------------------------------------------------------------------------
# accuracy against the float64 reference
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("given_weight", [False, True], ids=["adaptive", "given"])
def test_generator_loss_matches_reference(device_backend, alpha, reduction, given_weight):
    device, backend = device_backend
    a, b, x = make_inputs((4, 3, 25, 40), device=device)  # N = 3000: two chunks, ragged tail
    inputs = [a, b, x]
    if given_weight:
        inputs.append(torch.rand(4, device=device) + 0.5)

    def fused(a, b, x, w="adaptive"):
        return ipf.ipfm_generator_loss(a, b, x, alpha=alpha, weight=w, reduction=reduction, backend=backend)

    def reference(a, b, x, w="adaptive"):
        return ref.ipfm_generator_loss(a, b, x, alpha=alpha, weight=w, reduction=reduction)

    loss, grads, loss_ref, grads_ref = fused_and_reference(fused, reference, inputs)
    assert loss.dtype == torch.float32 and loss.shape == loss_ref.shape
    assert rel_err(loss, loss_ref) <= 1e-5
    for g, g_ref in zip(grads, grads_ref):
        assert g.shape == g_ref.shape
        assert rel_err(g, g_ref) <= 1e-5


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("sigma_kind", ["float", "tensor"])
def test_fake_loss_matches_reference(device_backend, reduction, sigma_kind):
    device, backend = device_backend
    _, b, x = make_inputs((5, 3, 700), device=device)
    sigma = 0.002 + 80 * torch.rand(5, device=device) ** 7 if sigma_kind == "tensor" else 1.7
    inputs = [b, x] + ([sigma] if sigma_kind == "tensor" else [])

    def fused(b, x, s=sigma):
        return ipf.ipfm_fake_loss(b, x, s, sigma_data=0.5, reduction=reduction, backend=backend)

    def reference(b, x, s=sigma):
        return ref.ipfm_fake_loss(b, x, s, sigma_data=0.5, reduction=reduction)

    loss, grads, loss_ref, grads_ref = fused_and_reference(fused, reference, inputs)
    assert loss.dtype == torch.float32 and loss.shape == loss_ref.shape
    assert rel_err(loss, loss_ref) <= 1e-5
    for g, g_ref in zip(grads, grads_ref):  # b, x (and sigma)
        assert rel_err(g, g_ref) <= 1e-5


def test_fake_loss_x_detached_gets_no_gradient(device_backend):
    device, backend = device_backend
    _, b, x = make_inputs((3, 50), device=device)
    b = b.requires_grad_()
    loss = ipf.ipfm_fake_loss(b, x, 0.3, backend=backend)
    (gb,) = torch.autograd.grad(loss, [b])
    b_ref = b.detach().double().requires_grad_()
    (gb_ref,) = torch.autograd.grad(ref.ipfm_fake_loss(b_ref, x.double(), 0.3), [b_ref])
    assert rel_err(gb, gb_ref) <= 1e-5


@pytest.mark.parametrize("needed", ["a", "b", "x", "ab", "bx"])
def test_generator_loss_only_needed_gradients(device_backend, needed):
    device, backend = device_backend
    a, b, x = make_inputs((3, 300), device=device)
    fused = [t.clone().requires_grad_(name in needed) for t, name in zip((a, b, x), "abx")]
    refs = [t.double().requires_grad_(name in needed) for t, name in zip((a, b, x), "abx")]
    loss = ipf.ipfm_generator_loss(*fused, alpha=1.2, backend=backend)
    loss_ref = ref.ipfm_generator_loss(*refs, alpha=1.2)
    wanted = [t for t in fused if t.requires_grad]
    grads = torch.autograd.grad(loss, wanted)
    grads_ref = torch.autograd.grad(loss_ref, [t for t in refs if t.requires_grad])
    for g, g_ref in zip(grads, grads_ref):
        assert rel_err(g, g_ref) <= 1e-5


# --------------------------------------------------------------------------------------
# low precision: within 2x of plain eager PyTorch's own error
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss_name", ["generator", "fake"])
def test_low_precision_within_2x_of_eager(device_backend, dtype, loss_name):
    device, backend = device_backend
    rows = 4
    a, b, x = make_inputs((rows, 3, 20, 50), dtype=dtype, device=device)
    sigma = torch.tensor([0.05, 0.5, 2.0, 20.0], device=device)
    if loss_name == "generator":
        inputs = [a, b, x]

        def fused(a, b, x):
            return ipf.ipfm_generator_loss(a, b, x, alpha=1.2, backend=backend)

        def eager(a, b, x):
            return baselines.ipfm_generator_loss_sid_style(a, b, x, alpha=1.2)

        def exact(a, b, x):
            return ref.ipfm_generator_loss(a, b, x, alpha=1.2)
    else:
        inputs = [b, x]

        def fused(b, x):
            return ipf.ipfm_fake_loss(b, x, sigma, backend=backend)

        def eager(b, x):
            return baselines.ipfm_fake_loss_edm_style(b, x, sigma)

        def exact(b, x):
            return ref.ipfm_fake_loss(b, x, sigma.double())

    exact_in = leaves(inputs, torch.float64)
    loss_exact = exact(*exact_in)
    grads_exact = torch.autograd.grad(loss_exact, exact_in)
    results = {}
    for name, fn in (("fused", fused), ("eager", eager)):
        ins = leaves(inputs)
        loss = fn(*ins)
        results[name] = (loss, torch.autograd.grad(loss, ins))
    (loss, grads), (loss_eager, grads_eager) = results["fused"], results["eager"]
    assert grads[0].dtype == dtype
    assert rel_err(loss, loss_exact) <= 2 * rel_err(loss_eager, loss_exact) + 1e-6
    for g, g_eager, g_exact in zip(grads, grads_eager, grads_exact):
        assert rel_err(g, g_exact) <= 2 * rel_err(g_eager, g_exact)


# --------------------------------------------------------------------------------------
# masking, shapes, layouts, determinism
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nan_and_inf_rows_are_masked(device_backend, reduction):
    device, backend = device_backend
    a, b, x = make_inputs((5, 2, 40), device=device)
    a[1, 0, 3] = float("nan")
    x[3, 1, 39] = float("inf")
    b[3, 0, 0] = -float("inf")
    a, b, x = leaves([a, b, x])
    loss, masked = ipf.ipfm_generator_loss(a, b, x, reduction=reduction, backend=backend, return_masked=True)
    loss_ref, masked_ref = ref.ipfm_generator_loss(*leaves([a, b, x], torch.float64), reduction=reduction,
                                                   return_masked=True)
    assert masked.dtype == torch.int64 and masked.shape == () and masked.device == a.device
    assert int(masked) == int(masked_ref) == 2
    assert torch.isfinite(loss).all()
    assert rel_err(loss, loss_ref) <= 1e-5
    upstream = torch.ones_like(loss)
    if reduction == "none":
        upstream[1] = float("nan")  # whatever flows into a masked row, its gradient is 0
    grads = torch.autograd.grad(loss, [a, b, x], upstream)
    for g in grads:
        assert torch.isfinite(g).all()
        assert torch.equal(g[1], torch.zeros_like(g[1])) and torch.equal(g[3], torch.zeros_like(g[3]))
        assert g[0].abs().sum() > 0


def test_masked_count_without_nan_is_zero(device_backend):
    device, backend = device_backend
    loss, masked = ipf.ipfm_generator_loss(*make_inputs((3, 10), device=device), backend=backend, return_masked=True)
    assert int(masked) == 0


@pytest.mark.parametrize("shape", [(1, 1), (1, 5000), (7, 1), (3, 2049), (2, 3, 5, 7), (6,)],
                         ids=["B1-N1", "B1-N5000", "B7-N1", "B3-N2049", "B2-3x5x7", "1d"])
def test_odd_shapes(device_backend, shape):
    device, backend = device_backend
    inputs = make_inputs(shape, device=device)
    w = torch.rand(shape[0], device=device) + 0.5
    for weight in ("adaptive", w):
        loss, grads, loss_ref, grads_ref = fused_and_reference(
            lambda a, b, x: ipf.ipfm_generator_loss(a, b, x, weight=weight, reduction="none", backend=backend),
            lambda a, b, x: ref.ipfm_generator_loss(a, b, x, weight=weight.double() if torch.is_tensor(weight)
                                                    else weight, reduction="none"),
            inputs)
        assert rel_err(loss, loss_ref) <= 1e-5
        for g, g_ref in zip(grads, grads_ref):
            assert g.shape == g_ref.shape and rel_err(g, g_ref) <= 1e-5
    loss, grads, loss_ref, grads_ref = fused_and_reference(
        lambda b, x: ipf.ipfm_fake_loss(b, x, 0.7, reduction="none", backend=backend),
        lambda b, x: ref.ipfm_fake_loss(b, x, 0.7, reduction="none"), inputs[1:])
    assert rel_err(loss, loss_ref) <= 1e-5
    for g, g_ref in zip(grads, grads_ref):
        assert rel_err(g, g_ref) <= 1e-5


def test_empty_batch_falls_back_to_reference(device_backend):
    device, backend = device_backend
    a, b, x = make_inputs((0, 4), device=device)
    assert ipf.ipfm_generator_loss(a, b, x, reduction="sum", backend=backend).item() == 0.0
    assert ipf.ipfm_fake_loss(b, x, 1.0, reduction="none", backend=backend).shape == (0,)


def _layouts(a, b, x):
    """(name, a, b, x) with the same values in other memory layouts."""
    big = [torch.cat([t, torch.randn_like(t)], dim=3) for t in (a, b, x)]
    return [
        ("channels_last", *(t.contiguous(memory_format=torch.channels_last) for t in (a, b, x))),
        ("sliced_rows", *(t[..., : a.shape[3]] for t in big)),  # dense rows, row stride 2N
        ("transposed", *(t.transpose(2, 3).contiguous().transpose(2, 3) for t in (a, b, x))),
        ("mixed", a.contiguous(memory_format=torch.channels_last), b, x.transpose(2, 3).contiguous().transpose(2, 3)),
        ("expanded_x", a, b, x[:1].expand_as(x)),
    ]


def test_non_contiguous_inputs(device_backend):
    device, backend = device_backend
    a, b, x = make_inputs((3, 4, 6, 5), device=device)
    for name, a_l, b_l, x_l in _layouts(a, b, x):
        loss, grads, loss_ref, grads_ref = fused_and_reference(
            lambda a, b, x: ipf.ipfm_generator_loss(a, b, x, reduction="none", backend=backend),
            lambda a, b, x: ref.ipfm_generator_loss(a, b, x, reduction="none"), [a_l, b_l, x_l])
        assert rel_err(loss, loss_ref) <= 1e-5, name
        for g, g_ref in zip(grads, grads_ref):
            assert rel_err(g, g_ref) <= 1e-5, name
        # strided views fed straight in (no leaf copies): the kernels walk them in place
        views = [t.detach().requires_grad_() for t in (a_l, b_l, x_l)] if name != "expanded_x" else None
        if views:
            loss = ipf.ipfm_generator_loss(*views, reduction="sum", backend=backend)
            loss_f = ipf.ipfm_fake_loss(views[1], views[2], 0.5, reduction="sum", backend=backend)
            loss_r = ref.ipfm_generator_loss(*(t.double() for t in views), reduction="sum")
            assert rel_err(loss, loss_r) <= 1e-5, name
            assert rel_err(loss_f, ref.ipfm_fake_loss(views[1].double(), views[2].double(), 0.5,
                                                      reduction="sum")) <= 1e-5, name
            (loss + loss_f).backward()
            assert views[0].grad.shape == a.shape


def test_kernel_views_keep_shared_layouts():
    a, b, x = make_inputs((2, 3, 4, 5))
    cl = [t.contiguous(memory_format=torch.channels_last) for t in (a, b, x)]
    assert all(v is t for v, t in zip(losses_op._kernel_inputs(*cl), cl))
    big = torch.randn(2, 3, 4, 10)
    sliced = big[..., :5]
    assert not losses_op._launch.rows_dense(sliced)  # inner dims not dense: copied
    rows = torch.randn(2, 120)[:, :60]
    assert losses_op._kernel_inputs(rows, rows)[0] is rows  # dense rows with a row stride


@pytest.mark.parametrize("loss_name", ["generator", "fake"])
def test_deterministic(device_backend, loss_name):
    device, backend = device_backend
    a, b, x = make_inputs((3, 2500), device=device)
    a[2, 7] = float("nan")

    def run():
        ins = leaves([a, b, x])
        if loss_name == "generator":
            loss = ipf.ipfm_generator_loss(*ins, alpha=1.2, backend=backend)
        else:
            loss = ipf.ipfm_fake_loss(ins[1], ins[2], torch.tensor([0.1, 1.0, 9.0], device=device), backend=backend)
        return [loss.detach(), *torch.autograd.grad(loss, ins, allow_unused=True, materialize_grads=True)]

    first, second = run(), run()
    assert all(torch.equal(u, v) for u, v in zip(first, second))


def test_cpu_result_does_not_depend_on_thread_count():
    if losses_op.backends.why_not("cpu", "cpu", torch.float32):
        pytest.skip("cpu backend not built")
    a, b, x = make_inputs((5, 9000))
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            ins = leaves([a, b, x])
            loss = ipf.ipfm_generator_loss(*ins, backend="cpu")
            outs.append([loss.detach(), *torch.autograd.grad(loss, ins)])
    finally:
        torch.set_num_threads(threads)
    for other in outs[1:]:
        assert all(torch.equal(u, v) for u, v in zip(outs[0], other))


def test_auto_backend():
    a, b, x = make_inputs((2, 8))
    expected = "cpu" if losses_op.backends.why_not("cpu", "cpu", torch.float32) is None else "reference"
    assert losses_op.backends.resolve("ipfm_generator_loss", "auto", a.device, a.dtype) == expected
    a64, b64, x64 = (t.double() for t in (a, b, x))
    loss = ipf.ipfm_generator_loss(a64, b64, x64)  # float64 -> reference
    assert loss.dtype == torch.float64
    assert ipf.ipfm_fake_loss(b64, x64, 1.0).dtype == torch.float64


# --------------------------------------------------------------------------------------
# gradcheck of the reference (float64)
# --------------------------------------------------------------------------------------


def test_reference_gradcheck():
    a, b, x = leaves(make_inputs((3, 2, 5), dtype=torch.float64))
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    for alpha in ALPHAS:
        # the adaptive weight is taken without gradient (it depends on a and x): check through b
        assert torch.autograd.gradcheck(lambda b: ref.ipfm_generator_loss(a, b, x, alpha=alpha), (b,))
        assert torch.autograd.gradcheck(
            lambda a, b, x, w: ref.ipfm_generator_loss(a, b, x, alpha=alpha, weight=w, reduction="none"),
            (a, b, x, w))
    sigma = (torch.rand(3, dtype=torch.float64) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda b, x, s: ref.ipfm_fake_loss(b, x, s, reduction="none"), (b, x, sigma))


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_bad_input(impl):
    gen = ipf.ipfm_generator_loss if impl == "fused" else ref.ipfm_generator_loss
    fake = ipf.ipfm_fake_loss if impl == "fused" else ref.ipfm_fake_loss
    a, b, x = make_inputs((3, 4))
    cases = [
        (InvalidInput, "shape", lambda: gen(a, b, x[:, :3])),
        (InvalidInput, "shape", lambda: gen(a, b[:2], x)),
        (InvalidInput, "is on meta", lambda: gen(a, b.to("meta"), x)),
        (InvalidType, "dtype|is torch.float16", lambda: gen(a, b.half(), x)),
        (InvalidType, "floating point", lambda: gen(a.long(), b.long(), x.long())),
        (InvalidType, "torch.Tensor", lambda: gen(a, b, [1.0])),
        (InvalidInput, r"weight must have shape \[3\]", lambda: gen(a, b, x, weight=torch.ones(4))),
        (InvalidInput, r"weight must have shape \[3\]", lambda: gen(a, b, x, weight=torch.ones(3, 2))),
        (InvalidInput, "adaptive", lambda: gen(a, b, x, weight="uniform")),
        (InvalidType, "weight must be a floating-point", lambda: gen(a, b, x, weight=torch.ones(3, dtype=torch.int64))),
        (InvalidInput, "alpha must be finite", lambda: gen(a, b, x, alpha=float("nan"))),
        (InvalidInput, "alpha must be finite", lambda: gen(a, b, x, alpha=math.inf)),
        (InvalidType, "alpha must be a Python float", lambda: gen(a, b, x, alpha=torch.tensor(1.0))),
        (InvalidInput, "reduction", lambda: gen(a, b, x, reduction="avg")),
        (InvalidInput, "sigma must be positive", lambda: fake(b, x, 0.0)),
        (InvalidInput, "sigma must be positive", lambda: fake(b, x, -1.0)),
        (InvalidInput, "sigma must be positive", lambda: fake(b, x, torch.tensor([1.0, 0.0, 2.0]))),
        (InvalidInput, "sigma must be a float or a tensor of shape", lambda: fake(b, x, torch.ones(2))),
        (InvalidInput, "sigma_data must be positive", lambda: fake(b, x, 1.0, sigma_data=0.0)),
        (InvalidInput, "shape", lambda: fake(b, x[:, :2], 1.0)),
        (InvalidInput, "reduction", lambda: fake(b, x, 1.0, reduction=None)),
    ]
    for err, match, call in cases:
        with pytest.raises(err, match=match):
            call()


@pytest.mark.skipif(_ext._C is None, reason="extension not built")
def test_cpu_kernel_rejects_bad_sigma_as_invalid_input():
    """The C++ kernel checks sigma while it reads it (std::invalid_argument): it arrives as
    ipfm_fast.errors.InvalidInput, still a ValueError, with the kernel's message."""
    b, x = make_inputs((3, 5))[1:]
    message = r"ipfm_fake_loss: sigma must be positive and finite, got (nan in row 1|-1\.0+ in row 2)"
    for sigma in (torch.tensor([1.0, float("nan"), 2.0]), torch.tensor([1.0, 2.0, -1.0])):
        with pytest.raises(InvalidInput, match=message) as caught:
            ipf.ipfm_fake_loss(b, x, sigma, backend="cpu")
        assert isinstance(caught.value, ValueError)


def test_bad_backend():
    a, b, x = make_inputs((2, 3))
    with pytest.raises(InvalidInput, match="backend must be one of"):
        ipf.ipfm_generator_loss(a, b, x, backend="tpu")
    with pytest.raises(ipf.BackendUnavailable, match="cuda"):
        ipf.ipfm_fake_loss(b, x, 1.0, backend="cuda")
    with pytest.raises(ipf.BackendUnavailable, match="float64"):
        ipf.ipfm_generator_loss(a.double(), b.double(), x.double(), backend="cpu")


# --------------------------------------------------------------------------------------
# torch.library: opcheck, torch.compile
# --------------------------------------------------------------------------------------


def test_opcheck(device_backend):
    """The leaves (forward and backward custom ops; autograd is the Functions' job, tested
    through torch.compile below and in test_op_shape.py)."""
    device, backend = device_backend
    a, b, x = make_inputs((3, 2, 9), device=device)
    w = torch.rand(3, device=device) + 0.5
    sigma = torch.rand(3, device=device) + 0.2
    a_cl = torch.randn(3, 4, 2, 2, device=device).contiguous(memory_format=torch.channels_last)
    gen, fake = torch.ops.ipfm_fast.ipfm_generator_loss, torch.ops.ipfm_fast.ipfm_fake_loss
    cases = [
        (gen, (a, b, x, None, 1.2, "mean", backend)),
        (gen, (a, b, x, w, 0.5, "none", backend)),
        (gen, (a_cl, a_cl + 1, a_cl * 2, None, 1.0, "sum", backend)),
        (fake, (b, x, sigma, 0.0, 0.5, "mean", backend)),
        (fake, (b, x, None, 2.0, 0.5, "none", backend)),
    ]
    if backend == "triton":  # the interpreter is slow; the registration is the same
        cases = cases[:1]
    for op, args in cases:
        torch.library.opcheck(op, args)
    stats = gen(a, b, x, None, 1.0, "mean", backend)[2]
    torch.library.opcheck(torch.ops.ipfm_fast.ipfm_generator_loss_backward,
                          (torch.tensor(1.0, device=device), a, b, x, stats, 1.0, "mean", True, False, True, backend))
    fake_stats = fake(b, x, sigma, 0.0, 0.5, "none", backend)[1]
    torch.library.opcheck(torch.ops.ipfm_fast.ipfm_fake_loss_backward,
                          (torch.rand(3, device=device), b, x, fake_stats, "none", True, True, backend))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(device_backend, compiler):
    device, backend = device_backend
    if backend == "triton" and device == "cpu" and compiler == "inductor":
        pytest.skip("the interpreter run adds nothing to the aot_eager case")

    def step(a, b, x, sigma):
        loss_g, masked = ipf.ipfm_generator_loss(a, b, x, alpha=1.2, backend=backend, return_masked=True)
        loss_f = ipf.ipfm_fake_loss(b, x.detach(), sigma, backend=backend)
        return loss_g + loss_f, masked

    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    a, b, x = make_inputs((4, 3, 8, 8), device=device)
    a[2, 0, 0, 0] = float("nan")
    sigma = torch.rand(4, device=device) + 0.1
    eager_in, comp_in = leaves([a, b, x]), leaves([a, b, x])
    loss, masked = step(*eager_in, sigma)
    loss_c, masked_c = compiled(*comp_in, sigma)
    loss.backward()
    loss_c.backward()
    assert torch.equal(loss, loss_c) and int(masked_c) == int(masked) == 1
    for u, v in zip(eager_in, comp_in):
        assert torch.equal(u.grad, v.grad)
