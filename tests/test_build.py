"""Packaging and build: the extension, the CUDA build, the wheel's contents, a missing
extension, and `ipfm-fast info`. (Hopper compilation of every Triton kernel variant:
tests/test_hopper_compile.py.)"""

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

import ipfm_fast
from ipfm_fast import _ext, backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(_ext._C is None, reason=f"extension not loaded: {_ext.load_error}")
def test_extension_reports_its_build():
    C = _ext._C
    assert C.openmp
    if shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc"):
        # nvcc was there at build time: CUDA sources compiled, linked, and import without a GPU
        assert C.has_cuda, C.cuda_skip_reason
        assert C.cuda_archs
        assert C.cuda_device_count() == torch.cuda.device_count()
    else:
        assert not C.has_cuda and C.cuda_skip_reason


def test_import_without_extension_warns_and_falls_back():
    code = (
        "import sys, warnings; sys.modules['ipfm_fast._C'] = None\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import ipfm_fast as ipf, torch\n"
        "print([str(x.message) for x in w if 'ipfm_fast._C' in str(x.message)][:1])\n"
        "y = ipf.perturb(torch.randn(3, 4), 0.5, 8.0)\n"
        "print(y.shape)\n"
        "from ipfm_fast import backends\n"
        "print(backends.why_not('cpu', 'cpu', torch.float32))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert "could not be loaded" in out and "'reference' and 'triton' still work" in out
    assert "torch.Size([3, 4])" in out
    assert "cpu: extension not loaded" in out


def test_info_command():
    out = subprocess.run([sys.executable, "-m", "ipfm_fast", "info"], capture_output=True, text=True, check=True).stdout
    assert f"ipfm_fast {ipfm_fast.__version__}" in out
    assert "cpu tensors (auto -> " in out and "reference  yes" in out
    data = json.loads(subprocess.run([sys.executable, "-m", "ipfm_fast", "info", "--json"], capture_output=True,
                                     text=True, check=True).stdout)
    assert set(data["backends"]["cpu"]) == set(backends.BACKENDS)
    assert data["auto"]["cpu"] in ("cpu", "reference")
    assert "CPU training: Adam: " in out and "host memory: " in out
    assert set(data["training_cpu"]) == {"adam", "host_memory"}
    if _ext._C is not None:  # the extension's Adam is bitwise torch's on the machines this runs on
        assert data["training_cpu"]["adam"].startswith("the extension's kernel")
    help_text = subprocess.run([sys.executable, "-m", "ipfm_fast", "--help"], capture_output=True, text=True,
                               check=True).stdout
    assert "info" in help_text


@pytest.mark.slow
def test_wheel_contains_kernels_and_extension(tmp_path):
    """`pip wheel .` (what `pip install .` builds) ships the Triton kernels and _C."""
    src = tmp_path / "src"  # a copy, so the build does not touch the checkout's build/
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", "build", ".git", "*.so", "runs", "*.egg-info",
                                                              "__pycache__", "results"))
    env = dict(os.environ, IPFM_FAST_BUILD_CUDA="0")  # the CPU build is enough to check the contents
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w",
                    str(tmp_path), str(src)], check=True, env=env, capture_output=True)
    (wheel,) = tmp_path.glob("ipfm_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "ipfm_fast/kernels/perturb.py" in names
    assert "ipfm_fast/ops/perturb.py" in names
    assert any(n.startswith("ipfm_fast/_C") and n.endswith(".so") for n in names)
