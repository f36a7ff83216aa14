"""Denoisers: EDM preconditioning, shapes, configs, parameter counts."""

import copy
import math

import pytest
import torch

from ipfm_fast import models
from ipfm_fast.models import (EDMPrecond, MLPNet, UNet, build_denoiser, count_params, describe, model_config)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one thread is faster



class _Recorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = None

    def forward(self, x, c_noise):
        self.seen = (x.clone(), c_noise.clone())
        return torch.full_like(x, 0.3)


def test_edm_preconditioning_coefficients():
    net = _Recorder()
    model = EDMPrecond(net)
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    sigma = torch.tensor([0.002, 0.1, 0.5, 2.0, 80.0])
    out = model(x, sigma)
    sd = 0.5
    s = sigma.double().view(-1, 1, 1, 1)
    c_skip = sd**2 / (s**2 + sd**2)
    c_out = s * sd / (s**2 + sd**2).sqrt()
    c_in = 1 / (s**2 + sd**2).sqrt()
    torch.testing.assert_close(out, c_skip * x + c_out * 0.3, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(net.seen[0].double(), c_in * x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(net.seen[1], sigma.log() / 4)
    assert out.dtype == x.dtype


@pytest.mark.parametrize("arch,shape", [("mlp", [1, 8, 8]), ("mlp", [7]), ("unet", [1, 8, 8]), ("unet", [3, 4, 4])])
def test_shapes_and_sigma_forms(arch, shape):
    torch.manual_seed(0)
    cfg = model_config(arch, shape, width=8 if arch == "unet" else 16, depth=1)
    model = build_denoiser(cfg)
    x = torch.randn(3, *shape)
    assert model(x, torch.rand(3) + 0.1).shape == x.shape
    assert model(x, 0.7).shape == x.shape
    assert model(x, torch.tensor(0.7)).shape == x.shape
    with pytest.raises(ValueError, match="sigma"):
        model(x, torch.ones(2))


def test_small_sigma_is_identity():
    torch.manual_seed(0)
    model = build_denoiser(model_config("mlp", [1, 8, 8], width=16, depth=1))
    for p in model.parameters():  # a trained-looking (non-zero) output layer
        p.data.normal_(0, 0.1)
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(model(x, 1e-6), x, atol=1e-4, rtol=0)


def test_config_roundtrip_and_counts():
    cfg = model_config("unet", [1, 8, 8], width=8, depth=2, mults=[1, 2])
    a, b = build_denoiser(cfg), build_denoiser(dict(cfg))
    b.load_state_dict(a.state_dict())
    assert count_params(a) == sum(p.numel() for p in a.parameters()) > 0
    assert f"{count_params(a):,} parameters" in describe(a, cfg)
    mlp = build_denoiser(model_config("mlp", [1, 8, 8]))
    assert isinstance(mlp.net, MLPNet) and count_params(mlp) > count_params(build_denoiser(model_config("mlp", [1, 8, 8], width=16)))


def test_auto_arch_and_default_mults():
    assert model_config("auto", [1, 8, 8])["arch"] == "mlp"
    big = model_config("auto", [3, 32, 32])
    assert big["arch"] == "unet" and big["mults"] == [1, 2, 2, 2]
    assert model_config("unet", [3, 12, 12])["mults"] == [1, 2, 2]
    assert model_config("unet", [1, 6, 6])["mults"] == [1, 2]
    assert model_config("unet", [1, 5, 5])["mults"] == [1]
    build_denoiser(model_config("unet", [1, 5, 5], width=4))(torch.randn(2, 1, 5, 5), 1.0)


def test_bad_configs():
    with pytest.raises(ValueError, match="arch"):
        model_config("resnet", [1, 8, 8])
    with pytest.raises(ValueError, match="U-Net needs image rows"):
        model_config("unet", [64])
    with pytest.raises(ValueError, match="width"):
        model_config("mlp", [64], width=0)
    net = UNet(1, width=8, mults=(1, 2, 2))
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.randn(2, 1, 6, 6), torch.zeros(2))


def test_gradients_flow():
    torch.manual_seed(0)
    model = build_denoiser(model_config("unet", [1, 8, 8], width=8, depth=1))
    x = torch.randn(2, 1, 8, 8)
    model(x, torch.tensor([0.5, 3.0])).square().sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and math.isfinite(float(g.abs().sum())) for g in grads)


# --- Linear: oneDNN GEMMs inside compiled graphs ---------------------------------------------
needs_onednn = pytest.mark.skipif(not models.HAS_ONEDNN_LINEAR, reason="this torch build has no oneDNN linear")


def _graph_ops(fn, *args):
    """Run fn compiled by dynamo alone (no inductor: fast) and return the op names its
    graphs call, with fn's outputs."""
    seen = []

    def capture(gm, example_inputs):  # (an autograd.Function's bodies are sub-GraphModules)
        seen.extend(str(n.target) for m in gm.modules() if isinstance(m, torch.fx.GraphModule)
                    for n in m.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(fn, backend=capture, fullgraph=True)(*args)
    return seen, out


@needs_onednn
@pytest.mark.parametrize("batch_shape,k,n,bias,frozen,sliced", [
    ((1,), 1, 1, True, False, False), ((7,), 13, 5, True, False, True), ((2, 5), 13, 5, False, False, False),
    ((33,), 300, 517, True, True, False), ((64,), 24, 9, True, False, True)])
def test_linear_compiled_onednn_matches_float64(monkeypatch, batch_shape, k, n, bias, frozen, sliced):
    monkeypatch.setattr(models.Linear, "onednn", True)
    torch.manual_seed(0)
    lin = models.Linear(k, n, bias=bias).requires_grad_(not frozen)
    x = torch.randn(*batch_shape, 2 * k)[..., ::2] if sliced else torch.randn(*batch_shape, k)
    x.requires_grad_(True)
    seen, y = _graph_ops(lambda t: lin(t), x)
    assert any("ipfm_fast.onednn_linear" in s for s in seen), seen
    g = torch.randn_like(y)
    y.backward(g)
    w64 = lin.weight.detach().double().requires_grad_(not frozen)
    b64 = lin.bias.detach().double().requires_grad_(not frozen) if bias else None
    x64 = x.detach().double().requires_grad_(True)
    y64 = torch.nn.functional.linear(x64, w64, b64)
    y64.backward(g.double())
    tol = dict(rtol=1e-5, atol=1e-5 * math.sqrt(k))  # float32 sums of k products
    torch.testing.assert_close(y.double(), y64, **tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol)
    if not frozen:
        torch.testing.assert_close(lin.weight.grad.double(), w64.grad, rtol=1e-5, atol=1e-5 * math.sqrt(x.numel() / k))
        if bias:
            torch.testing.assert_close(lin.bias.grad.double(), b64.grad, rtol=1e-5,
                                       atol=1e-5 * math.sqrt(y.numel() / n))
    else:
        assert lin.weight.grad is None


@needs_onednn
def test_linear_onednn_only_when_compiled_float32_cpu(monkeypatch):
    """Eager runs are F.linear bit for bit (`make demo` unchanged); compiled float64, bf16
    autocast, empty batches and torch.export stay on F.linear too."""
    monkeypatch.setattr(models.Linear, "onednn", True)
    torch.manual_seed(0)
    lin = models.Linear(40, 24)
    x = torch.randn(16, 40)
    assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
    lin64 = copy.deepcopy(lin).double()
    for fn, arg in [(lambda t: lin64(t), x.double()), (lambda t: lin(t), x[:0])]:
        seen, _ = _graph_ops(fn, arg)
        assert not any("onednn" in s for s in seen), seen

    def autocast_fn(t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return lin(t)
    seen, _ = _graph_ops(autocast_fn, x)
    assert not any("onednn" in s for s in seen), seen
    exported = torch.export.export(lin, (x,))  # an exported program loads without ipfm_fast
    assert not any("onednn" in str(n.target) for n in exported.graph.nodes)
    monkeypatch.setattr(models.Linear, "onednn", False)
    seen, _ = _graph_ops(lambda t: lin(t), x)
    assert not any("onednn" in s for s in seen), seen


@needs_onednn
def test_compiled_denoiser_on_onednn_matches_eager(monkeypatch):
    """The real path: an MLP denoiser compiled by inductor, forward and backward, against its
    eager (F.linear) self."""
    monkeypatch.setattr(models.Linear, "onednn", True)
    torch.manual_seed(0)
    net = build_denoiser(model_config("mlp", [2, 4, 4], width=32, depth=2))
    torch.nn.init.normal_(net.net.out.weight, std=0.1)  # (zero-initialised: its gradient is the test)
    x, sigma = torch.randn(9, 2, 4, 4), torch.rand(9) * 3 + 0.1
    eager = [p.detach().clone() for p in net.parameters()]
    loss = net(x, sigma).square().sum()
    loss.backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(net)
    loss_c = compiled(x, sigma).square().sum()
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-5)
    for p, g in zip(net.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5 * g.abs().max().item())
    assert all(torch.equal(a, b) for a, b in zip(eager, net.parameters()))


def test_linear_backend_choice(monkeypatch):
    for value in ("torch", "onednn"):
        monkeypatch.setenv(models.LINEAR_ENV, value)
        backend, why = models.linear_backend()
        assert why == "this torch build has no oneDNN linear" or (backend, why) == (value, f"IPFM_FAST_LINEAR={value}")
    monkeypatch.setenv(models.LINEAR_ENV, "mkl")
    backend, why = models.linear_backend()
    assert backend in ("torch", "onednn") and ("ignored" in why or "no oneDNN" in why)
    monkeypatch.setattr(models, "_cpu_vendor", lambda: "GenuineIntel")
    monkeypatch.delenv(models.LINEAR_ENV)
    assert models.linear_backend()[0] == "torch"


@needs_onednn
def test_onednn_linear_op_opcheck():
    torch.manual_seed(0)
    for args in [(torch.randn(5, 7), torch.randn(3, 7), torch.randn(3)),
                 (torch.randn(7, 5).t(), torch.randn(3, 7), None)]:
        torch.library.opcheck(torch.ops.ipfm_fast.onednn_linear.default, args)
