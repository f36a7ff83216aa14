"""Argument checks shared by every op: each error names the argument and what was expected."""

import math
import numbers

import torch

from ipfm_fast.errors import InvalidInput, InvalidType


def _compiling():
    return torch.compiler.is_compiling()


def check_D(D, op):
    """D: a positive Python number or math.inf. Returns it as float."""
    if isinstance(D, torch.Tensor) or isinstance(D, bool) or not isinstance(D, numbers.Real):
        raise InvalidType(f"{op}: D must be a positive Python float or math.inf, got {type(D).__name__}")
    D = float(D)
    if math.isnan(D) or D <= 0:
        raise InvalidInput(f"{op}: D must be > 0 (or math.inf for the diffusion limit), got {D}")
    return D


def check_rows(x, name, op, min_dim=1):
    """x: a floating-point tensor with a leading batch dimension."""
    if not isinstance(x, torch.Tensor):
        raise InvalidType(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise InvalidType(f"{op}: {name} must be floating point (float32, bfloat16, float16 or float64), got {x.dtype}")
    if x.dim() < min_dim:
        raise InvalidInput(f"{op}: {name} must have a leading batch dimension [B, ...], got shape {tuple(x.shape)}")


def check_sigma(sigma, rows, device, op, name="sigma"):
    """sigma: a positive finite number, or a tensor of shape [B] (also [], [B, 1, ...]) on
    ``device``. Returns (tensor [rows] or None, float or None).

    Values of a CPU tensor are checked here; a CUDA tensor's values cannot be checked
    without a host sync, so the kernels turn a row with sigma <= 0 or non-finite into NaN.
    """
    if isinstance(sigma, torch.Tensor):
        if not sigma.dtype.is_floating_point:
            raise InvalidType(f"{op}: {name} must be a floating-point tensor, got {sigma.dtype}")
        if sigma.device != torch.device(device):
            raise InvalidInput(f"{op}: {name} is on {sigma.device} but the input is on {device}")
        if sigma.dim() == 0:
            sigma = sigma.expand(rows)
        elif sigma.shape[0] == rows and all(s == 1 for s in sigma.shape[1:]):
            sigma = sigma.reshape(rows)
        else:
            raise InvalidInput(f"{op}: {name} must be a float or a tensor of shape [{rows}] (one per row), "
                               f"got shape {tuple(sigma.shape)}")
        if sigma.device.type == "cpu" and not _compiling() and rows > 0:
            lo, hi = torch.aminmax(sigma.detach())  # one pass; NaN propagates to both (5 us, not 40 us of mask ops)
            if not (float(lo) > 0 and float(hi) < math.inf):
                bad = ~((sigma > 0) & torch.isfinite(sigma))
                value = sigma[bad][0].item()
                raise InvalidInput(f"{op}: {name} must be positive and finite, got {value} in row "
                                   f"{int(bad.nonzero()[0, 0])}")
        return sigma, None
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
        raise InvalidType(f"{op}: {name} must be a float or a tensor, got {type(sigma).__name__}")
    sigma = float(sigma)
    if not (sigma > 0 and math.isfinite(sigma)):
        raise InvalidInput(f"{op}: {name} must be positive and finite, got {sigma}")
    return None, sigma


def check_generator(generator, device, op):
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise InvalidType(f"{op}: generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != torch.device(device).type:
        raise InvalidInput(f"{op}: generator is on {generator.device} but the input is on {device}; "
                           f"use torch.Generator(device={str(torch.device(device).type)!r})")


INT32_MAX = 2**31 - 1


def check_gpu_sizes(op, backend, n, programs):
    """Sizes the GPU kernels can index: they address the elements of a row with 32-bit
    integers (N <= 2^31 - 1) and launch 1-D grids, whose first axis holds at most 2^31 - 1
    programs. ``programs``: {what: programs of one launch}. Raises InvalidInput naming the
    limit; the CPU and reference backends have none (64-bit indices throughout)."""
    if backend not in ("triton", "cuda"):
        return
    if n > INT32_MAX:
        raise InvalidInput(f"{op}: the {backend} backend takes at most 2^31 - 1 elements per row "
                           f"(32-bit column indices), got N = {n}")
    for what, count in programs.items():
        if count > INT32_MAX:
            raise InvalidInput(f"{op}: {what} need {count} programs in one {backend} launch, more than the "
                               f"2^31 - 1 of a grid; split the batch")
