"""The shape every op shares (ipfm_fast/ops/_op.py): each custom op is a leaf with a fake
implementation and no autograd of its own; one autograd.Function per op runs the leaves'
Python bodies directly when eager and the custom ops whenever the call is traced (Dynamo,
AOTAutograd's joint graph, make_fx, compiled autograd, fake tensors) -- checked here for
every public op, forward and backward, against the eager results."""

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import ipfm_fast as ipf
from ipfm_fast import backends
from ipfm_fast.ops import _op
from ipfm_fast.ops import field_target as field_op
from ipfm_fast.ops import losses as losses_op
from ipfm_fast.ops import perturb as perturb_op

# the cpu kernels when built (fast), else Triton in the interpreter
BACKEND = next((b for b in ("cpu", "triton") if backends.why_not(b, "cpu", torch.float32) is None), None)
pytestmark = pytest.mark.skipif(BACKEND is None, reason="no fused backend for CPU tensors here")


def _cases():
    """name -> (inputs, fn(*inputs) -> a tensor to differentiate, the leaves a traced forward
    + backward must call). Tiny sizes, fresh random inputs each time."""
    x = torch.randn(3, 2, 5)
    sigma = torch.rand(3) + 0.5
    a = torch.randn(3, 7)
    b, gx = a + 0.3 * torch.randn(3, 7), a + torch.randn(3, 7)
    y, x_ref = torch.randn(3, 6), torch.randn(5, 6)
    be = BACKEND
    return {
        "perturb": ([x, sigma], lambda x, s: ipf.perturb(x, s, 16.0, backend=be),
                    {"perturb", "perturb_noise"}),  # the backward regenerates the noise
        "perturb_return_noise": ([x, sigma], lambda x, s: ipf.perturb(x, s, math.inf, return_noise=True,
                                                                      backend=be)[0], {"perturb"}),
        "sample_prior": ([sigma], lambda s: ipf.sample_prior((3, 4), s, 8.0, backend=be), {"perturb_noise"}),
        "field_target": ([y, sigma, x_ref], lambda y, s, r: ipf.field_target(y, s, r, 128.0, backend=be),
                         {"field_target"}),
        "ipfm_generator_loss": ([a, b, gx], lambda a, b, x: ipf.ipfm_generator_loss(a, b, x, alpha=1.2,
                                                                                    backend=be),
                                {"ipfm_generator_loss", "ipfm_generator_loss_backward"}),
        "ipfm_fake_loss": ([b, gx, sigma], lambda b, x, s: ipf.ipfm_fake_loss(b, x, s, reduction="none",
                                                                              backend=be),
                           {"ipfm_fake_loss", "ipfm_fake_loss_backward"}),
    }


CASES = list(_cases())


def _grads(fn, inputs, seed=0):
    """fn's output and the gradients of <output, fixed weights> w.r.t. the inputs."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    torch.manual_seed(seed)  # the same Philox key in every run
    out = fn(*leaves)
    weights = torch.linspace(0.5, 1.5, out.numel()).reshape(out.shape)
    return out.detach(), torch.autograd.grad((out * weights).sum(), leaves)


def _ipfm_ops(graph):
    return {str(n.target).split(".")[1] for n in graph.nodes
            if n.op == "call_function" and str(n.target).startswith("ipfm_fast.")}


# --------------------------------------------------------------------------------------
# registrations
# --------------------------------------------------------------------------------------


def test_every_custom_op_is_a_leaf_with_a_fake_and_no_autograd():
    names = {leaf.op._qualname for leaf in _op.LEAVES}
    assert names == {f"ipfm_fast::{n}" for n in ("perturb", "perturb_noise", "field_target", "ipfm_generator_loss",
                                                 "ipfm_generator_loss_backward", "ipfm_fake_loss",
                                                 "ipfm_fake_loss_backward")}
    for leaf in _op.LEAVES:
        assert leaf.op._abstract_fn is not None, leaf.op._qualname
        assert leaf.op._backward_fn is None and leaf.op._setup_context_fn is None, leaf.op._qualname
    # one Function per op (their autograd nodes are what profile_step.py counts as op time)
    assert set(_op.FUNCTIONS) == {perturb_op._PerturbFunction, perturb_op._NoiseFunction, field_op._FieldTarget,
                                  losses_op._GenLoss, losses_op._FakeLoss}
    assert all(f.leaf in _op.LEAVES for f in _op.FUNCTIONS)


def test_traced_tells_eager_calls_from_traced_ones():
    t = torch.randn(2)
    assert not _op.traced((1.0, [2], t, "cpu")) and not _op.traced((torch.nn.Parameter(t),)) and not _op.traced(())
    with FakeTensorMode() as mode:
        fake = torch.randn(2)
        assert _op.traced((t,))  # a mode is active
    assert _op.traced((None, fake))  # a fake tensor outside its mode
    assert mode is not None

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Spy():  # a user's dispatch mode sees the op, not raw-pointer launches
        assert _op.traced((t,))
    seen = []
    torch.func.functionalize(lambda u: seen.append(_op.traced((u,))) or u)(t)
    assert seen == [True]


def _nodes(node):
    """The class names of an autograd graph's nodes."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n is not None and type(n).__name__ not in seen:
            seen.add(type(n).__name__)
            todo += [m for m, _ in n.next_functions]
    return seen


# --------------------------------------------------------------------------------------
# eager: the Python bodies, never the dispatcher
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_eager_calls_skip_the_dispatcher(case, monkeypatch):
    inputs, fn, _ = _cases()[case]

    def refuse(*args):
        raise AssertionError("an eager call went through the custom op")

    for leaf in _op.LEAVES:
        monkeypatch.setattr(leaf, "op", refuse)
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    assert _nodes(out.grad_fn) & {f.__name__ + "Backward" for f in _op.FUNCTIONS}
    torch.autograd.grad(out.sum(), leaves)
    with torch.no_grad():  # no grad: the leaf alone, no autograd node
        assert fn(*inputs).grad_fn is None
    assert fn(*inputs).grad_fn is None  # nothing requires grad


# --------------------------------------------------------------------------------------
# traced: the custom ops, forward and backward, with the eager results
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_aot_autograd_traces_the_leaves_forward_and_backward(case):
    """AOTAutograd without Dynamo: its joint trace runs the Functions' forward and backward
    on functional fake tensors with torch.compiler.is_compiling() False."""
    from functorch.compile import aot_function

    inputs, fn, want_ops = _cases()[case]
    graphs = []

    def keep(gm, _):
        graphs.append(gm.graph)
        return gm

    compiled = aot_function(fn, fw_compiler=keep, bw_compiler=keep)
    out, grads = _grads(fn, inputs)
    out_c, grads_c = _grads(compiled, inputs)
    assert len(graphs) == 2
    assert set().union(*map(_ipfm_ops, graphs)) == want_ops
    assert torch.equal(out, out_c)
    for g, g_c in zip(grads, grads_c):
        assert torch.equal(g, g_c)


@pytest.mark.parametrize("case", CASES)
def test_make_fx_records_the_leaves(case):
    inputs, fn, want_ops = _cases()[case]
    from torch.fx.experimental.proxy_tensor import make_fx

    def joint(*leaves):
        out = fn(*leaves)
        return torch.autograd.grad(out.sum(), leaves)

    leaves = [t.clone().requires_grad_() for t in inputs]
    gm = make_fx(joint, tracing_mode="fake")(*leaves)
    assert _ipfm_ops(gm.graph) == want_ops


@pytest.mark.parametrize("case", ["perturb", "ipfm_generator_loss", "field_target"])
def test_compiled_autograd_traces_an_eager_forward_s_backward(case):
    inputs, fn, _ = _cases()[case]
    out, grads = _grads(fn, inputs)
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    torch.manual_seed(0)
    out_c = fn(*leaves)
    weights = torch.linspace(0.5, 1.5, out_c.numel()).reshape(out_c.shape)
    torch._dynamo.reset()
    with torch._dynamo.compiled_autograd._enable(torch.compile(backend="aot_eager", fullgraph=True)):
        (out_c * weights).sum().backward()
    torch._dynamo.reset()
    assert torch.equal(out, out_c.detach())
    for g, leaf in zip(grads, leaves):
        assert torch.equal(g, leaf.grad)


@pytest.mark.parametrize("case", CASES)
def test_torch_compile_fullgraph_matches_eager(case):
    inputs, fn, _ = _cases()[case]
    torch._dynamo.reset()
    out, grads = _grads(fn, inputs)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out_c, grads_c = _grads(compiled, inputs)
    assert torch.equal(out, out_c)
    for g, g_c in zip(grads, grads_c):
        assert torch.equal(g, g_c)
    with torch.no_grad():  # inference: the Function's forward alone
        torch.manual_seed(0)
        assert torch.equal(compiled(*inputs), out)
