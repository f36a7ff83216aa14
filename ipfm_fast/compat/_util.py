"""What the compat modules share: D as the originals write it, the clip default, the
per-element form of per-row losses, and sigma as a [B, 1, ...] tensor."""

import math

import torch

from ipfm_fast._checks import check_D, check_sigma
from ipfm_fast.errors import InvalidInput

CLIP_BETA = (1e-3, 1 - 1e-3)  # np.clip / torch.clamp of the Beta draw in pfgmpp and pfgmpp-idmd


def as_D(D):
    """D as the original codebases pass it -- the string ``"inf"`` (pfgmpp-idmd's EDM case),
    an int (``--aug_dim``), a float, ``math.inf``, or a numeric string -- as a float."""
    if isinstance(D, str):
        try:
            D = float(D.strip())
        except ValueError:
            raise InvalidInput(f"as_D: D must be a positive number or 'inf', got {D!r}") from None
    return check_D(D, "as_D")


def resolve_clip(clip_beta, D):
    """The clip_beta argument of ipfm_fast.perturb for a compat call: None (the default) is
    the original's :data:`CLIP_BETA`; False is no clip; a pair is used as given. D = inf has
    no Beta draw, hence no clip."""
    if math.isinf(D) or clip_beta is False:
        return None
    if clip_beta is None or clip_beta is True:
        return CLIP_BETA
    return clip_beta


def row_shape(t):
    """[B, 1, ...] with t's number of dimensions."""
    return (t.shape[0],) + (1,) * (t.dim() - 1)


def per_element(per_row, like):
    """A [B] tensor of row losses as ``like``'s shape: each element row_loss / N, so that
    ``.sum()`` (and its gradient) is that of the rows. A broadcast view: no memory."""
    n = max(1, like[0].numel()) if like.shape[0] else 1
    return (per_row / n).reshape(row_shape(like)).expand(like.shape)


def common_dtype(*tensors):
    """The fused losses take one dtype: the promoted one of the inputs."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return [t if t.dtype == dtype else t.to(dtype) for t in tensors]


def sigma_rows(sigma, like, op):
    """sigma as the originals accept it (a Python number, [B], [B, 1, 1, 1] or 0-dim; the
    rules are the ops', :func:`ipfm_fast._checks.check_sigma`) as a tensor of ``like``'s row
    shape, a number built as pfgmpp_kernel.sample_noise builds it (``torch.tensor([sigma] *
    B)`` in like's dtype), so that ``like * sigma`` is the original's product."""
    tensor, number = check_sigma(sigma, like.shape[0], like.device, op, values=False)
    if tensor is not None:
        return tensor.reshape(row_shape(like))
    return torch.tensor([number] * like.shape[0], device=like.device, dtype=like.dtype).reshape(row_shape(like))
