"""Flat training state (ipfm_fast.train.flat): parameters as views of one buffer, Adam
bitwise equal to torch.optim.Adam(fused=True) with torch's checkpoint format both ways,
and the one-pass EMA bitwise equal to the torch ops it replaces."""

import copy

import pytest
import torch

from ipfm_fast.errors import InvalidInput
from ipfm_fast.models import build_denoiser, model_config
from ipfm_fast.train import host_memory
from ipfm_fast.train.common import EMA
from ipfm_fast.testing import cpu_isa, cpu_isa_paths
from ipfm_fast.train import flat as flat_module
from ipfm_fast.train.flat import ALIGN, FlatAdam, FlatParams, ema_step_, grad_norm, norm_and_skip


def _unet(seed=0):
    torch.manual_seed(seed)
    return build_denoiser(model_config("unet", [1, 8, 8], width=8))


def _grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g) for p in params]


def test_parameters_become_aligned_views_with_their_values_and_layouts():
    net = _unet().to(memory_format=torch.channels_last)
    before = {n: (p.detach().clone(), p.stride()) for n, p in net.named_parameters()}
    ids = [id(p) for p in net.parameters()]
    flat = FlatParams(net)
    assert [id(p) for p in net.parameters()] == ids  # the same Parameter objects (optimizers, DDP)
    base = flat.data.data_ptr()
    covered = torch.zeros(flat.data.numel(), dtype=torch.bool)
    for (n, p), (shape, strides, offset) in zip(net.named_parameters(), flat.layout):
        value, stride = before[n]
        assert torch.equal(p, value) and p.stride() == stride  # channels_last weights stay channels_last
        assert p.untyped_storage().data_ptr() == flat.data.untyped_storage().data_ptr()
        assert (p.data_ptr() - base) % (ALIGN * 4) == 0 and p.data_ptr() - base == 4 * offset
        covered[offset:offset + p.numel()] = True
    assert not flat.data[~covered].any()  # the padding is zero
    # training through the views: the module and the buffer are one
    x, sigma = torch.randn(3, 1, 8, 8), torch.tensor([0.3, 1.0, 5.0])
    net(x, sigma).square().sum().backward()
    with torch.no_grad():
        for p in net.parameters():
            p.sub_(0.1 * p.grad)
    assert all(torch.equal(p, v) for p, v in zip(net.parameters(), flat.views(flat.data)))


def test_mixed_dtypes_and_parameterless_modules_are_refused():
    mixed = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).double())
    with pytest.raises(InvalidInput, match="one dtype"):
        FlatParams(mixed)
    with pytest.raises(InvalidInput, match="no parameters"):
        FlatParams(torch.nn.ReLU())


def _torch_adam(params, lr=1e-3):
    return torch.optim.Adam(params, lr=lr, betas=(0.0, 0.999), eps=1e-8, fused=True)


def test_flat_adam_is_bitwise_torch_fused_adam_including_skipped_steps():
    net, ref = _unet(1), _unet(1)
    ours, theirs = FlatAdam(FlatParams(net), lr=1e-3, betas=(0.0, 0.999), eps=1e-8), _torch_adam(list(ref.parameters()))
    for step in range(6):
        skip = torch.tensor(1.0 if step == 2 else 0.0)
        for p, q, g in zip(net.parameters(), ref.parameters(), _grads(list(ref.parameters()), step)):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step(found_inf=skip)
        theirs.found_inf = skip
        theirs.step()
    for p, q in zip(net.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    for mine, other in zip(ours.state_dict()["state"].values(), theirs.state_dict()["state"].values()):
        assert mine.keys() == other.keys() and all(torch.equal(mine[k], other[k]) for k in mine)
    assert float(ours.steps) == 5  # the skipped step does not count
    # parameters without a gradient are left alone, as torch leaves them
    ours.zero_grad()
    biases = [p for p in net.parameters() if p.dim() == 1]
    before = [p.detach().clone() for p in biases]
    for p, g in zip(net.parameters(), _grads(list(net.parameters()), 9)):
        if p.dim() > 1:
            p.grad = g
    ours.step()
    assert all(torch.equal(p, b) for p, b in zip(biases, before))


@pytest.mark.parametrize("isa", cpu_isa_paths() or ["none"])
def test_beta1_zero_kernel_with_its_ema_is_bitwise_torch_fused_adam_then_the_ema(isa):
    """The extension's beta1 = 0 Adam (m read only where a gradient is zero or huge, the EMA in
    the same pass) against torch's fused Adam followed by the EMA step: same bits for the
    parameters, both moments, the step count and the EMA, on every instruction-set path,
    through a skipped step, zero gradients of both signs and a reloaded state."""
    if isa == "none":
        pytest.skip("no extension")
    with cpu_isa(isa):
        assert flat_module.own_adam_matches_torch()
        net, ref = _unet(4).to(memory_format=torch.channels_last), _unet(4).to(memory_format=torch.channels_last)
        ours = FlatAdam(FlatParams(net), lr=3e-3, betas=(0.0, 0.99), eps=1e-8)
        theirs = torch.optim.Adam(list(ref.parameters()), lr=3e-3, betas=(0.0, 0.99), eps=1e-8, fused=True)
        ref_flat = FlatParams(ref)
        ema_ours, ema_ref = torch.zeros_like(ours.flat.data), torch.zeros_like(ref_flat.data)
        taken = []
        step_cpu = ours._step_cpu
        ours._step_cpu = lambda *a: (taken.append(True), step_cpu(*a))
        for step in range(8):
            skip = torch.tensor(1.0 if step == 3 else 0.0)
            grads = [torch.empty_like(p).copy_(g) for p, g in zip(ref.parameters(), _grads(list(ref.parameters()), step))]
            for g in grads:  # (laid out as their parameters, as autograd makes them)
                g.as_strided((g.numel(),), (1,))[::3] = 0.0 if step % 2 else -0.0
            for p, q, g in zip(net.parameters(), ref.parameters(), grads):
                p.grad, q.grad = g.clone(), g.clone()  # (clone keeps the layout)
            ours.step(found_inf=skip, ema=(ema_ours, 0.125))
            theirs.found_inf = skip
            theirs.step()
            ema_step_(ema_ref, ref_flat.data, 0.125, skip > 0)
            if step == 5:  # a state moved through a checkpoint: the next step reads every moment again
                ours.load_state_dict(copy.deepcopy(ours.state_dict()))
        assert len(taken) == 8
        bits = lambda t: t.detach().contiguous().view(torch.int32)  # noqa: E731
        for p, q in zip(net.parameters(), ref.parameters()):
            assert torch.equal(bits(p), bits(q))
        for mine, other in zip(ours.state_dict()["state"].values(), theirs.state_dict()["state"].values()):
            assert all(torch.equal(bits(mine[k]), bits(other[k])) for k in ("exp_avg", "exp_avg_sq"))
            assert float(mine["step"]) == float(other["step"]) == 7
        assert torch.equal(bits(ema_ours), bits(ema_ref))


def test_adam_keeps_torchs_kernel_where_the_extensions_does_not_apply(monkeypatch):
    """beta1 != 0, a gradient laid out unlike its parameter, or a kernel found unequal on this
    machine: torch's fused Adam, with the same results."""
    calls = []
    monkeypatch.setattr(FlatAdam, "_step_cpu", lambda self, *a: calls.append(a))
    net = _unet(5)
    adam = FlatAdam(FlatParams(net), lr=1e-3, betas=(0.9, 0.999))
    for p, g in zip(net.parameters(), _grads(list(net.parameters()), 0)):
        p.grad = g
    adam.step()
    assert not calls and float(adam.steps) == 1
    adam = FlatAdam(FlatParams(_unet(6).to(memory_format=torch.channels_last)), lr=1e-3, betas=(0.0, 0.999))
    params = adam.flat.params
    for p, g in zip(params, _grads(params, 1)):
        p.grad = g.contiguous()  # 4-d weights: contiguous gradients of channels_last parameters
    adam.step()
    assert not calls and float(adam.steps) == 1
    monkeypatch.setattr(flat_module, "own_adam_matches_torch", lambda: False)
    for p, g in zip(params, _grads(params, 2)):
        p.grad = g.contiguous(memory_format=torch.channels_last) if g.dim() == 4 else g
    adam.step()
    assert not calls and float(adam.steps) == 2


def test_checkpoints_move_between_torch_adam_and_flat_adam_and_continue_bitwise():
    """An optimizer state written before the flat buffers (torch.optim.Adam) resumes in
    FlatAdam, and FlatAdam's state resumes in torch.optim.Adam: both continue identically."""
    a, b = _unet(2), _unet(2)
    adam_a = _torch_adam(list(a.parameters()))
    for step in range(3):
        for p, g in zip(a.parameters(), _grads(list(a.parameters()), step)):
            p.grad = g
        adam_a.step()
    b.load_state_dict(a.state_dict())
    adam_b = FlatAdam(FlatParams(b), lr=5.0)  # the hyperparameters come from the state, as in torch
    adam_b.load_state_dict(adam_a.state_dict())
    assert adam_b.lr == 1e-3 and adam_b.betas == (0.0, 0.999)
    c = _unet(3)
    c.load_state_dict(a.state_dict())
    adam_c = _torch_adam(list(c.parameters()), lr=7.0)
    adam_c.load_state_dict(copy.deepcopy(adam_b.state_dict()))  # torch keeps the tensors it is given (so do we)
    for step in range(3, 5):
        gs = _grads(list(a.parameters()), step)
        for p, q, r, g in zip(a.parameters(), b.parameters(), c.parameters(), gs):
            p.grad, q.grad, r.grad = g.clone(), g.clone(), g.clone()
        adam_a.step()
        adam_b.step()
        adam_c.step()
    for p, q, r in zip(a.parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q) and torch.equal(p, r)


def test_optimizer_state_of_another_network_is_a_value_error():
    small = torch.nn.Linear(3, 2)
    adam = _torch_adam(list(small.parameters()))
    for p in small.parameters():
        p.grad = torch.ones_like(p)
    adam.step()
    flat = FlatAdam(FlatParams(_unet()), lr=1e-3)
    with pytest.raises(ValueError, match="parameters"):
        flat.load_state_dict(adam.state_dict())
    wide = torch.nn.Linear(3, 4)
    with pytest.raises(ValueError, match="shape"):
        FlatAdam(FlatParams(wide), lr=1e-3).load_state_dict(adam.state_dict())
    fresh = FlatAdam(FlatParams(torch.nn.Linear(3, 2)), lr=1e-3)
    fresh.load_state_dict(_torch_adam([torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.ones(2))])
                          .state_dict())  # a state saved before any step: zeros, no step yet
    assert not fresh.started and fresh.state_dict()["state"] == {}


def test_one_pass_ema_step_is_bitwise_the_torch_ops():
    g = torch.Generator().manual_seed(0)
    for n in (1, 17, 100_003):  # the vector body, its tail, and two threads
        ema, src = torch.randn(n, generator=g), torch.randn(n, generator=g) * 3
        for w in (torch.tensor(0.013), torch.tensor(0.0), torch.tensor(1.0)):
            expected = ema.clone()
            expected.add_(torch.sub(src, expected).mul_(w))
            got = ema.clone()
            ema_step_(got, src, w)
            assert torch.equal(got, expected), (n, float(w))
            for skip in (torch.tensor(True), torch.tensor(False)):  # the flag read in the kernel
                expected = ema.clone()
                expected.add_(torch.sub(src, expected).mul_((~skip).to(torch.float32) * w))
                got = ema.clone()
                ema_step_(got, src, w, skip)
                assert torch.equal(got, expected), (n, float(w), bool(skip))
    ema, src = torch.tensor([-0.0, 1.0, 2.0]), torch.tensor([-0.0, float("nan"), 3.0])
    for w in (0.25, torch.tensor(0.25)):  # a number, as the torch ops round a scalar operand; zero keeps its sign
        for skip in (None, torch.tensor(True), torch.tensor(False)):
            weight = w if skip is None else (~skip).to(torch.float32) * w
            expected = ema.clone()
            expected.add_(torch.sub(src, expected).mul_(weight))
            got = ema.clone()
            ema_step_(got, src, w, skip)
            assert torch.equal(got.view(torch.int32), expected.view(torch.int32)), (w, skip)


def test_ema_of_flat_parameters_needs_the_trained_models_flat_parameters():
    net = _unet(4)
    ema = EMA(net, 0.9)
    flat = FlatParams(net)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    expected = [torch.lerp(e, p, 1 - ema.beta(3)) for e, p in zip(ema.model.parameters(), net.parameters())]
    ema.update(flat, 3)
    for e, x in zip(ema.model.parameters(), expected):
        assert torch.equal(e, x)
    with pytest.raises(InvalidInput, match="FlatParams"):
        ema.update(net, 4)
    with pytest.raises(InvalidInput, match="do not match"):
        ema.update(FlatParams(torch.nn.Linear(2, 2)), 4)


def test_gradient_norm_is_the_float64_norm_rounded_for_any_thread_count():
    g = torch.Generator().manual_seed(3)
    shapes = [(128, 768), (1,), (3, 5, 7), (2, 3, 4, 5), (100_003,)]  # chunks, tails, a lone element
    params = [torch.nn.Parameter(torch.empty(s)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 3
    params[3].grad = params[3].grad.contiguous(memory_format=torch.channels_last)
    params.append(torch.nn.Parameter(torch.ones(4)))  # no gradient: not counted
    exact = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params if p.grad is not None))
    got = grad_norm(params)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert torch.equal(got, exact.float())  # the float64 norm, rounded once
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(grad_norm(params), got)
    finally:
        torch.set_num_threads(threads)
    params[2].grad[0, 0, 0] = float("inf")
    assert grad_norm(params) == float("inf")
    params[2].grad[0, 0, 0] = float("nan")
    assert grad_norm(params).isnan()
    doubles = [torch.nn.Parameter(torch.ones(3, dtype=torch.float64))]  # not float32: torch's norm
    doubles[0].grad = torch.full((3,), 2.0, dtype=torch.float64)
    assert float(grad_norm(doubles)) == pytest.approx(12 ** 0.5)
    assert float(grad_norm([torch.nn.Parameter(torch.ones(2))])) == 0.0


def _torch_skip(params, loss, masked=None, rows=None):
    """distill._finish_update's decision as torch ops (what the one-call kernel replaces)."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
    bad = ~(torch.isfinite(loss) & torch.isfinite(norm))
    return bad | (masked >= rows) if masked is not None else bad


@pytest.mark.parametrize("kernel", [True, False], ids=["cpu-kernel", "torch-ops"])
def test_norm_and_skip_decides_as_the_torch_ops(kernel):
    g = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.empty(s)) for s in [(64, 33), (7,), (100_003,)]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    if not kernel:  # float64 gradients take the torch path
        params = [torch.nn.Parameter(p.detach().double()) for p in params]
        for p, q in zip(params, [torch.randn(p.shape, generator=g) for p in params]):
            p.grad = q.double()
    exact = grad_norm(params)
    cases = []
    for loss in (torch.tensor(0.5), torch.tensor(float("nan")), torch.tensor(float("inf")), torch.tensor(-0.0)):
        for masked in (None, torch.tensor(3), torch.tensor(4), torch.tensor(9)):
            cases.append((loss, masked))
    for loss, masked in cases:
        norm, bad, found_inf = norm_and_skip(params, loss, masked, 4)
        assert torch.equal(norm, exact)
        assert bad.dtype == torch.bool and found_inf.dtype == torch.float32 and bad.dim() == found_inf.dim() == 0
        assert bool(bad) == bool(_torch_skip(params, loss, masked, 4)), (float(loss), masked)
        assert float(found_inf) == float(bad)
    params[2].grad[17] = float("nan")  # a non-finite gradient: skipped whatever the loss
    norm, bad, found_inf = norm_and_skip(params, torch.tensor(0.5))
    assert norm.isnan() and bool(bad) and float(found_inf) == 1.0


def test_flat_buffers_are_zeroed_huge_page_aligned_views(monkeypatch):
    """Buffers of 1 MiB or more start on a 2 MiB boundary where the kernel lends huge pages;
    every buffer is zeroed and sized as asked, whatever the policy."""
    for numel, dtype in [(3, torch.float32), (300_000, torch.float32), (1_000_003, torch.float64)]:
        buf = host_memory.zeros(numel, dtype, "cpu")
        assert buf.shape == (numel,) and buf.dtype == dtype and buf.is_contiguous() and not buf.any()
        big = numel * buf.element_size() >= host_memory.HUGE_PAGE_MIN_BYTES
        if big and host_memory._libc() is not None and host_memory.transparent_huge_pages() in ("madvise", "always"):
            assert buf.data_ptr() % host_memory.HUGE_PAGE == 0
        elif not big:
            assert buf.data_ptr() % 64 == 0  # torch's own alignment
    monkeypatch.setenv(host_memory.ENV, "default")
    assert host_memory.zeros(1_000_000, torch.float32, "cpu").data_ptr() % 64 == 0
    monkeypatch.setenv(host_memory.ENV, "maybe")
    with pytest.raises(InvalidInput, match="IPFM_FAST_HOST_MEMORY"):
        host_memory.zeros(1_000_000, torch.float32, "cpu")
    net = torch.nn.Linear(1024, 512)  # 2 MiB of parameters: the flat buffer and Adam's moments
    monkeypatch.delenv(host_memory.ENV)
    flat = FlatParams(net)
    adam = FlatAdam(flat, lr=1e-3)
    assert torch.equal(flat.data[:512 * 1024].view(512, 1024), net.weight) and not adam.exp_avg_sq.any()
    for t in (flat.data, adam.exp_avg, adam.exp_avg_sq):
        if host_memory._libc() is not None and host_memory.transparent_huge_pages() in ("madvise", "always"):
            assert t.data_ptr() % host_memory.HUGE_PAGE == 0
