"""The networks' linear layers on CPU: torch's GEMMs (MKL sgemm: F.linear / mm) against
oneDNN's (the ``ipfm_fast::onednn_linear`` op that ``ipfm_fast.models.Linear`` runs inside
compiled graphs), each GEMM of a layer alone, then the e2e MLP denoiser compiled, then the
compiled distillation iteration; every pair in interleaved rounds (median and min).

Shapes: the e2e.py default network (MLP, 3x16x16, width 128, batch 128): its layers are
768 -> 128, 128 -> 128, 128 -> 256, 256 -> 128 and 128 -> 768. Modes: ``forward``
(y = x W^T + b), ``grad_x`` (dy W), ``grad_w`` (dy^T x), each as its layer's backward calls
it (transposed views, no copies). Then ``denoiser`` (forward + backward of the compiled
MLP, one call) and ``iteration`` (one ipfm_fast distillation iteration as e2e.py runs it,
compiled), where the speedup is what the choice of GEMM gives the whole loop.
CPU only, and only where this torch build has oneDNN.
"""

import argparse
import copy
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import HAS_CUDA, add_row, loadavg, set_baseline, time_providers

from ipfm_fast import models

OP = "linear"
BATCH = 128
LAYERS = [(768, 128), (128, 128), (128, 256), (256, 128), (128, 768)]  # (in, out) of the e2e MLP's layers
pytestmark = pytest.mark.skipif(HAS_CUDA or not models.HAS_ONEDNN_LINEAR,
                                reason="CPU GEMM choice: needs a CPU run and oneDNN")
set_baseline(OP, "torch")
onednn = torch.ops.ipfm_fast.onednn_linear.default


def _use(module, backend):
    for m in module.modules():
        if isinstance(m, models.Linear):
            m.onednn = backend == "onednn"
    return module


@pytest.mark.parametrize("k,n", LAYERS)
def test_layer_gemms(k, n):
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g) for s in ((BATCH, k), (n, k), (n,)))
    dy = torch.randn(BATCH, n, generator=g)
    cases = {"forward": ({"torch": lambda: F.linear(x, w, b), "onednn": lambda: onednn(x, w, b)}, BATCH * k * n),
             "grad_x": ({"torch": lambda: dy.mm(w), "onednn": lambda: onednn(dy, w.t(), None)}, BATCH * k * n),
             "grad_w": ({"torch": lambda: dy.t().mm(x), "onednn": lambda: onednn(dy.t(), x.t(), None)}, BATCH * k * n)}
    for mode, (fns, macs) in cases.items():
        for name, (med, low, rounds) in time_providers(fns, rounds=15).items():
            add_row(op=OP, size=f"B={BATCH},{k}->{n}", provider=name, mode=mode, median_s=med, min_s=low,
                    rounds=rounds, flops=2 * macs, load_1min=loadavg())


def _mlp():
    torch.manual_seed(0)
    return models.build_denoiser(models.model_config("mlp", [3, 16, 16]))


@pytest.fixture
def fresh_dynamo():
    """Every compiled network shares EDMPrecond.forward's dynamo cache: start it empty and let
    it hold both variants (four entries each in a distillation state), above the default 8."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=16):
        yield
    torch._dynamo.reset()


def test_compiled_denoiser(fresh_dynamo):
    net = _mlp()
    torch.nn.init.normal_(net.net.out.weight, std=0.02)  # a trained-looking last layer (it starts at zero)
    x, sigma = torch.randn(BATCH, 3, 16, 16), torch.rand(BATCH) * 3 + 0.1
    fns = {}
    for backend in ("torch", "onednn"):
        compiled = torch.compile(_use(copy.deepcopy(net), backend))
        fns[backend] = (lambda c: lambda: c(x, sigma).square().sum().backward())(compiled)
        for _ in range(3):  # compile and warm up outside the timed rounds
            fns[backend]()
    for name, (med, low, rounds) in time_providers(fns, rounds=15).items():
        add_row(op=OP, size=f"mlp 3x16x16, B={BATCH}", provider=name, mode="denoiser forward+backward, compiled",
                median_s=med, min_s=low, rounds=rounds, load_1min=loadavg())


def test_compiled_iteration(fresh_dynamo):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import e2e

    p = argparse.ArgumentParser()
    e2e.add_setup_args(p)
    args = p.parse_args(["--compile", "on", "--threads", str(torch.get_num_threads())])
    device, teacher, cfg = e2e.setup(args)
    fns = {}
    for backend in ("torch", "onednn"):
        frozen = _use(copy.deepcopy(teacher), backend)
        frozen.config_dict = cfg
        state = e2e.ipfm_fast_state(frozen, cfg, args, device)
        for net in (state.gen_net, state.fake_net):
            _use(net, backend)
        run = e2e.distill.step_runner(state)
        fns[backend] = (lambda r: lambda: [r(i) for i in range(5)])(run)
        fns[backend]()  # compile and warm up outside the timed rounds
    for name, (med, low, rounds) in time_providers(fns, rounds=9).items():
        add_row(op=OP, size=f"mlp 3x16x16, B={BATCH}", provider=name, mode="5 distillation iterations, compiled",
                median_s=med, min_s=low, rounds=rounds, load_1min=loadavg())
