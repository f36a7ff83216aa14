"""Host-side helpers shared by the op launchers: row layouts, raw pointers, streams, seeds,
the device of a Triton launch, and the choice between GPU and interpreter tile sizes."""

import contextlib
import contextvars

import torch

from ipfm_fast import _ext, backends

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # ipfm::DType


def rows_dense(t):
    """True if each row t[b] is one dense block of t[0].numel() elements at b * stride(0),
    the layout the fused kernels walk (contiguous, channels_last, sliced rows...)."""
    if t.dim() == 0:
        return False
    if t.dim() == 1:
        return t.stride(0) >= 1 or t.shape[0] <= 1
    inner = sorted((st, sz) for sz, st in zip(t.shape[1:], t.stride()[1:]) if sz != 1)
    expected = 1
    for stride, size in inner:
        if stride != expected:
            return False
        expected *= size
    return t.shape[0] <= 1 or t.stride(0) >= expected


def row_stride(t):
    return t.stride(0) if t.dim() > 0 else 1


def _nothing():
    pass


def kernel_views(x, *outs):
    """(x, outs) laid out so that element e of row b sits at b * row_stride + e in every
    tensor: the inputs as they are when their row layouts agree, else contiguous copies.
    Returns (x_k, outs_k, copy_back) where copy_back() fills ``outs`` from ``outs_k``."""
    if x.dim() > 0 and x.is_contiguous() and all(o.is_contiguous() and o.shape == x.shape for o in outs):
        return x, outs, _nothing  # the common case, without the stride analysis below
    inner = x.stride()[1:]
    if rows_dense(x) and all(rows_dense(o) and o.stride()[1:] == inner for o in outs):
        return x, outs, _nothing
    x_k = x.contiguous()
    outs_k = tuple(o if o.is_contiguous() else torch.empty(o.shape, dtype=o.dtype, device=o.device) for o in outs)

    def copy_back():
        for o, k in zip(outs, outs_k):
            if o is not k:
                o.copy_(k)

    return x_k, outs_k, copy_back


def num_threads():
    return torch.get_num_threads()


def cuda_stream(device):
    return torch.cuda.current_stream(device).cuda_stream


def draw_seed(generator, device):
    """A 64-bit Philox key drawn from ``generator`` (default: the device's default
    generator) as a 1-element int64 tensor on ``device``: no host sync, reproducible with
    torch.manual_seed, and replayed correctly under CUDA graphs."""
    return torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64, device=device, generator=generator)


def seed_as_uint64(seed):
    return int(seed.item()) & 0xFFFFFFFFFFFFFFFF


def ext():
    return _ext._C


def triton_device(t):
    """Context for a Triton launch on ``t``'s tensors: Triton launches on the *current* CUDA
    device (and its current stream), so a tensor on cuda:1 while cuda:0 is current needs
    cuda:1 made current around the launch. A device switch, no sync; nothing for CPU tensors
    (the interpreter). The CUDA C++ launchers take the index and switch themselves
    (csrc/cuda/cuda_api.h DeviceGuard)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


_GPU_TILES = contextvars.ContextVar("ipfm_fast_gpu_tiles", default=None)


@contextlib.contextmanager
def gpu_tiles(enabled=True):
    """Inside the block the Triton launchers pick the tile sizes of a GPU launch (True) or of
    the interpreter (False), whatever the mode. Outside: the interpreter's under
    TRITON_INTERPRET=1 (larger tiles, fewer programs: each costs ~2 ms there), else the GPU's.
    Tests use it to run the exact GPU constexprs in the interpreter."""
    token = _GPU_TILES.set(bool(enabled))
    try:
        yield
    finally:
        _GPU_TILES.reset(token)


def use_gpu_tiles():
    forced = _GPU_TILES.get()
    return not backends.triton_interpreter() if forced is None else forced
