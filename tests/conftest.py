"""Test setup: without a CUDA device, Triton kernels run in the interpreter on CPU
tensors (TRITON_INTERPRET must be set before triton or ipfm_fast is imported)."""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import ipfm_fast  # noqa: E402
from ipfm_fast import backends  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


def fused_backends(device):
    """Backends that can serve fp32 tensors on ``device`` in this environment."""
    return [b for b in ("triton", "cuda", "cpu") if backends.why_not(b, device, torch.float32) is None]


DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
FUSED = [(d, b) for d in DEVICES for b in fused_backends(d)]


@pytest.fixture(params=FUSED, ids=[f"{d}-{b}" for d, b in FUSED])
def device_backend(request):
    return request.param


@pytest.fixture
def one_thread():
    """Run a test on one CPU thread (tiny networks are faster so, and the machine is shared)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def ipf():
    return ipfm_fast
