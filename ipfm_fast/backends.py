"""Backends and dispatch.

Every op takes ``backend=`` one of ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"``,
``"reference"``. Each backend declares what it serves (devices, dtypes, whether it is
built); :func:`resolve` picks one or raises :class:`BackendUnavailable` with every reason.

``auto``: CUDA tensors go to the GPU backends in :data:`GPU_PREFERENCE` order, CPU tensors to
``cpu`` when the extension is built; float64 inputs and anything else go to ``reference``.
"""

import contextvars
import os

import torch

from ipfm_fast import _ext
from ipfm_fast.errors import BackendUnavailable  # noqa: F401 - re-exported: ipfm_fast.backends.BackendUnavailable
from ipfm_fast.errors import InvalidInput, InvalidType

BACKENDS = ("triton", "cuda", "cpu", "reference")
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Order tried by "auto" for CUDA tensors. The C++ launch path costs less host time than
# Triton's launcher, which decides at training sizes (a few MB per call); the GPU check
# script (benchmarks/gpu_check.sh) measures both.
GPU_PREFERENCE = ("cuda", "triton")


def triton_interpreter():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# True inside ipfm_fast.testing.hopper_compile_only(): Triton then takes CPU tensors as
# stand-ins for device tensors, compiles each launch for sm_90 and runs nothing.
triton_compile_only = contextvars.ContextVar("ipfm_fast_triton_compile_only", default=False)


_triton_error = None


def triton_import_error():
    """None when Triton imports, else the reason."""
    global _triton_error
    if _triton_error is None:
        try:
            import triton  # noqa: F401

            _triton_error = ""
        except Exception as err:  # ImportError, or a broken install
            _triton_error = f"triton not importable ({type(err).__name__}: {err})"
    return _triton_error or None


def why_not(backend, device, dtype, dtypes=FUSED_DTYPES):
    """Returns None if ``backend`` can serve a tensor of ``device``/``dtype``, else why not."""
    device = torch.device(device)
    if backend == "reference":
        return None if dtype.is_floating_point else f"reference: dtype {dtype} is not floating point"
    if dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        return f"{backend}: dtype {str(dtype).replace('torch.', '')} not supported (supports {names}; use backend='reference')"
    if backend == "cpu":
        if _ext._C is None:
            return f"cpu: extension not loaded ({_ext.load_error})"
        if device.type != "cpu":
            return f"cpu: serves CPU tensors, got a {device.type} tensor"
        return None
    if backend == "cuda":
        reason = _ext.why_no_cuda_build()
        if reason:
            return f"cuda: {reason}"
        if device.type != "cuda":
            return f"cuda: serves CUDA tensors, got a {device.type} tensor"
        return None
    if backend == "triton":
        reason = triton_import_error()
        if reason:
            return f"triton: {reason}"
        if device.type == "cuda":
            return None
        if device.type == "cpu":
            if triton_interpreter() or triton_compile_only.get():
                return None
            return "triton: CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 before importing ipfm_fast)"
        return f"triton: serves CUDA tensors, got a {device.type} tensor"
    raise InvalidInput(f"backend must be one of 'auto', {', '.join(repr(b) for b in BACKENDS)}; got {backend!r}")


def resolve(op, backend, device, dtype, dtypes=FUSED_DTYPES):
    """The backend that runs ``op`` for this device/dtype; raises BackendUnavailable."""
    if not isinstance(backend, str):
        raise InvalidType(f"{op}: backend must be a string, got {type(backend).__name__}")
    device = torch.device(device)
    if backend == "auto":
        order = GPU_PREFERENCE if device.type == "cuda" else ("cpu",)
        for candidate in order:
            if why_not(candidate, device, dtype, dtypes) is None:
                return candidate
        return "reference"
    reason = why_not(backend, device, dtype, dtypes)
    if reason:
        raise BackendUnavailable(f"{op}: {reason}")
    return backend


def report(devices=None):
    """{device: {backend: None or reason}} for each backend, fp32 tensors."""
    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {str(d): {b: why_not(b, d, torch.float32) for b in BACKENDS} for d in devices}
