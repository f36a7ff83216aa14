"""Every input rule of the ops, in one module: the public ops (whatever backend serves them)
and the reference (:mod:`ipfm_fast.reference`) call the same functions with the same op
name, so the two cannot disagree on what is valid or say it differently. Each error names
the op and the argument and what was expected: InvalidInput (a ValueError) for values,
shapes and devices, InvalidType (a TypeError) for types.

    per op      check_perturb, check_prior, check_given_gaussian, check_field_target,
                check_generator_loss, check_fake_loss: every rule of the op; returns the
                arguments normalized (+ check_clip_beta: perturb's opt-in Beta clip)
    pieces      check_D, check_rows, check_sigma (+ check_sigma_values), check_generator,
                check_real, check_reduction, check_loss_inputs, check_loss_weight,
                check_finite
    limits      check_philox_rows, check_gpu_sizes: what the fused kernels can index (each
                op's launch code counts its own programs)

Value checks that read a tensor (sigma's entries, the finiteness of the field target's
inputs) can be deferred by the public ops: past their size limits (a pass over a tensor
too large for the GPU grid would be wasted), and skipped where the C++ CPU kernel checks
the same values as it reads them (it raises the same InvalidInput, which saves a pass and a
host sync). CUDA tensors' values are never read here: that would sync; the kernels turn
bad rows into NaN instead (documented per op).
"""

import math
import numbers

import torch

from ipfm_fast.errors import InvalidInput, InvalidType
from ipfm_fast.ops._op import traced

REDUCTIONS = ("mean", "sum", "none")


def _readable(t):
    """A CPU tensor whose values can be read: not a CUDA one (a host sync), not a traced one
    (fake or functional: no values)."""
    return t.device.type == "cpu" and not traced((t,))


# --------------------------------------------------------------------------------------
# pieces
# --------------------------------------------------------------------------------------


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


def check_sigma(sigma, rows, device, op, name="sigma", *, values=True):
    """sigma: a positive finite number, or a tensor of shape [B] (also [], [B, 1, ...]) on
    ``device``. Returns (tensor [rows] or None, float or None).

    values: check a tensor's entries here (:func:`check_sigma_values`); False defers them
    to the caller (a float is always checked)."""
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
        if values:
            check_sigma_values(sigma, op, name)
        return sigma, None
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
        raise InvalidType(f"{op}: {name} must be a float or a tensor, got {type(sigma).__name__}")
    sigma = float(sigma)
    if not (sigma > 0 and math.isfinite(sigma)):
        raise InvalidInput(f"{op}: {name} must be positive and finite, got {sigma}")
    return None, sigma


def check_sigma_values(sigma, op, name="sigma"):
    """The entries of a [B] sigma tensor are positive and finite: checked for CPU tensors
    (a CUDA tensor cannot be read without a host sync; the kernels make its bad rows NaN)."""
    if sigma is None or sigma.shape[0] == 0 or not _readable(sigma):
        return
    lo, hi = torch.aminmax(sigma.detach())  # one pass; NaN propagates to both (5 us, not 40 us of mask ops)
    if not (float(lo) > 0 and float(hi) < math.inf):
        bad = ~((sigma > 0) & torch.isfinite(sigma))
        value = sigma[bad][0].item()
        raise InvalidInput(f"{op}: {name} must be positive and finite, got {value} in row {int(bad.nonzero()[0, 0])}")


def check_generator(generator, device, op):
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise InvalidType(f"{op}: generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != torch.device(device).type:
        raise InvalidInput(f"{op}: generator is on {generator.device} but the input is on {device}; "
                           f"use torch.Generator(device={str(torch.device(device).type)!r})")


def check_real(value, name, op, *, positive=False):
    """A finite Python number (positive if asked), returned as float."""
    if isinstance(value, torch.Tensor) or isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidType(f"{op}: {name} must be a Python float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        raise InvalidInput(f"{op}: {name} must be {'positive and ' if positive else ''}finite, got {value}")
    return value


def check_reduction(reduction, op):
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise InvalidInput(f"{op}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return reduction


def check_loss_inputs(op, **tensors):
    """The loss inputs (name -> tensor): floating-point tensors [B, ...] of one shape, one
    device and one dtype. Returns the number of rows B."""
    (first_name, first), *rest = tensors.items()
    check_rows(first, first_name, op)
    for name, t in rest:
        check_rows(t, name, op)
        if t.shape != first.shape:
            raise InvalidInput(f"{op}: {name} has shape {tuple(t.shape)} but {first_name} has shape "
                               f"{tuple(first.shape)}; they must match")
        if t.device != first.device:
            raise InvalidInput(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}")
        if t.dtype != first.dtype:
            raise InvalidType(f"{op}: {name} is {t.dtype} but {first_name} is {first.dtype}; pass one dtype")
    return first.shape[0]


def check_loss_weight(weight, rows, device, op):
    """weight: "adaptive" (returns None) or a floating-point tensor [B] (also [B, 1, ...]) on
    ``device`` (returned as [B])."""
    if isinstance(weight, str):
        if weight != "adaptive":
            raise InvalidInput(f"{op}: weight must be 'adaptive' or a tensor of shape [{rows}], got {weight!r}")
        return None
    if not isinstance(weight, torch.Tensor):
        raise InvalidType(f"{op}: weight must be 'adaptive' or a tensor of shape [{rows}], got {type(weight).__name__}")
    if not weight.dtype.is_floating_point:
        raise InvalidType(f"{op}: weight must be a floating-point tensor, got {weight.dtype}")
    if weight.device != torch.device(device):
        raise InvalidInput(f"{op}: weight is on {weight.device} but the inputs are on {device}")
    if weight.dim() < 1 or weight.shape[0] != rows or any(s != 1 for s in weight.shape[1:]):
        raise InvalidInput(f"{op}: weight must have shape [{rows}] (one per row), got {tuple(weight.shape)}")
    return weight.reshape(rows)


def check_finite(t, name, op):
    """Raises if a CPU tensor holds NaN/Inf (CUDA tensors are not checked: that would sync)."""
    if t.numel() == 0 or not _readable(t):
        return
    bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(1)
    if bool(bad.any()):
        raise InvalidInput(f"{op}: {name} must be finite (row {int(bad.nonzero()[0, 0])} has NaN or Inf)")


# --------------------------------------------------------------------------------------
# per op
# --------------------------------------------------------------------------------------


def check_perturb(x, sigma, D, generator, op):
    """perturb(x, sigma, D, generator=): returns (D, sigma [B] tensor or None, sigma float or None)."""
    check_rows(x, "x", op)
    D = check_D(D, op)
    check_generator(generator, x.device, op)
    sigma_t, sigma_f = check_sigma(sigma, x.shape[0], x.device, op)
    return D, sigma_t, sigma_f


def check_clip_beta(clip_beta, D, op):
    """clip_beta: None, or (lo, hi) with 0 <= lo < hi <= 1 and D finite (the PFGM++ recipe's
    clip of B ~ Beta(N/2, D/2)). Returns the clip in t = B / (1 - B) = |g|^2 / W:
    (lo / (1 - lo), hi / (1 - hi)); (0, inf) for None (no clip)."""
    if clip_beta is None:
        return 0.0, math.inf
    if isinstance(clip_beta, (str, bytes, torch.Tensor)) or not hasattr(clip_beta, "__len__") or len(clip_beta) != 2:
        raise InvalidType(f"{op}: clip_beta must be None or a pair (lo, hi) of floats, got {clip_beta!r}")
    lo, hi = (check_real(v, "clip_beta", op) for v in clip_beta)
    if not 0.0 <= lo < hi <= 1.0:
        raise InvalidInput(f"{op}: clip_beta = (lo, hi) needs 0 <= lo < hi <= 1 (bounds of a Beta draw), "
                           f"got ({lo}, {hi})")
    if math.isinf(D):
        raise InvalidInput(f"{op}: clip_beta needs a finite D (it clips the Beta(N/2, D/2) draw of the PFGM++ "
                           f"recipe; D = inf has none)")
    return lo / (1.0 - lo), (math.inf if hi == 1.0 else hi / (1.0 - hi))


def check_given_gaussian(g, sigma, D, generator, op):
    """noise_from_gaussian(g, sigma, D, generator=): g a floating-point [B, ...] tensor that
    does not require grad (the op has no gradient for it). Returns (D, sigma tensor or
    None, sigma float or None)."""
    check_rows(g, "g", op)
    if g.requires_grad and torch.is_grad_enabled():
        raise InvalidInput(f"{op}: g requires grad, but the op has no gradient for it (only sigma gets one); "
                           f"pass g.detach()")
    D = check_D(D, op)
    check_generator(generator, g.device, op)
    sigma_t, sigma_f = check_sigma(sigma, g.shape[0], g.device, op)
    return D, sigma_t, sigma_f


def _prior_placement(shape, sigma, device, dtype, op):
    """sample_prior's shape [B, ...] (ints >= 0), device (default: sigma's, else the CPU;
    "cuda" means the current CUDA device) and floating-point dtype (default: torch's)."""
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError) as err:  # a non-sequence, or entries that are not ints
        raise InvalidType(f"{op}: shape must be a sequence of ints, got {shape!r}") from err
    if len(shape) < 1 or any(s < 0 for s in shape):
        raise InvalidInput(f"{op}: shape must be [B, ...] with non-negative sizes, got {shape}")
    if device is None:
        device = sigma.device if isinstance(sigma, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = dtype or torch.get_default_dtype()
    if not dtype.is_floating_point:
        raise InvalidType(f"{op}: dtype must be floating point, got {dtype}")
    return shape, device, dtype


def check_prior(shape, sigma, D, device, dtype, generator, op):
    """sample_prior(shape, sigma, D, device=, dtype=, generator=): returns (shape, device,
    dtype) as :func:`_prior_placement` and (D, sigma tensor or None, sigma float or None)."""
    shape, device, dtype = _prior_placement(shape, sigma, device, dtype, op)
    D = check_D(D, op)
    check_generator(generator, device, op)
    sigma_t, sigma_f = check_sigma(sigma, shape[0], device, op)
    return shape, device, dtype, D, sigma_t, sigma_f


def check_field_target(y, sigma, x_ref, D, op, *, finite=True):
    """field_target(y, sigma, x_ref, D): returns (D, sigma tensor or None, sigma float or None).

    finite: also check that y and x_ref hold no NaN/Inf (a pass over both); False defers it
    to the caller (:func:`check_finite` on each)."""
    check_rows(y, "y", op)
    check_rows(x_ref, "x_ref", op)
    D = check_D(D, op)
    if x_ref.device != y.device:
        raise InvalidInput(f"{op}: x_ref is on {x_ref.device} but y is on {y.device}")
    if tuple(x_ref.shape[1:]) != tuple(y.shape[1:]):
        raise InvalidInput(f"{op}: x_ref must have y's trailing shape {tuple(y.shape[1:])} (x_ref is [M, ...]), "
                           f"got x_ref of shape {tuple(x_ref.shape)}")
    if x_ref.shape[0] == 0:
        raise InvalidInput(f"{op}: x_ref must have at least one row (M >= 1), got shape {tuple(x_ref.shape)}")
    if math.prod(y.shape[1:]) == 0:
        raise InvalidInput(f"{op}: rows must have at least one element, got y of shape {tuple(y.shape)}")
    sigma_t, sigma_f = check_sigma(sigma, y.shape[0], y.device, op)
    if finite:
        check_finite(y, "y", op)
        check_finite(x_ref, "x_ref", op)
    return D, sigma_t, sigma_f


def check_generator_loss(teacher_out, fake_out, x, alpha, weight, reduction, op):
    """ipfm_generator_loss(teacher_out, fake_out, x, alpha=, weight=, reduction=): returns
    (B, alpha as float, weight [B] tensor or None for "adaptive")."""
    rows = check_loss_inputs(op, teacher_out=teacher_out, fake_out=fake_out, x=x)
    alpha = check_real(alpha, "alpha", op)
    weight = check_loss_weight(weight, rows, teacher_out.device, op)
    check_reduction(reduction, op)
    return rows, alpha, weight


def check_fake_loss(fake_out, x, sigma, sigma_data, reduction, op, *, sigma_values=True):
    """ipfm_fake_loss(fake_out, x, sigma, sigma_data=, reduction=): returns (B, sigma_data as
    float, sigma tensor or None, sigma float or None).

    sigma_values: as :func:`check_sigma`'s ``values`` (False: the caller's kernel checks them)."""
    rows = check_loss_inputs(op, fake_out=fake_out, x=x)
    sigma_data = check_real(sigma_data, "sigma_data", op, positive=True)
    check_reduction(reduction, op)
    sigma_t, sigma_f = check_sigma(sigma, rows, fake_out.device, op, values=sigma_values)
    return rows, sigma_data, sigma_t, sigma_f


# --------------------------------------------------------------------------------------
# limits of the fused backends
# --------------------------------------------------------------------------------------


def check_philox_rows(rows, op):
    """At most 2^32 - 1 rows per call: the row index is a Philox counter word."""
    if rows >= 2**32:
        raise InvalidInput(f"{op}: at most 2^32 - 1 rows per call (the row index is a Philox counter word), got {rows}")


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
