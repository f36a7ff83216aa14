"""Loads the compiled extension ipfm_fast._C once; a missing or broken build warns with
the reason and leaves the reference and Triton backends working."""

import warnings

_C = None
load_error = None

try:
    from ipfm_fast import _C  # noqa: F811
except Exception as err:  # ImportError, or an OSError from a broken shared library
    load_error = f"{type(err).__name__}: {err}"
    warnings.warn(
        f"ipfm_fast: the compiled extension ipfm_fast._C could not be loaded ({load_error}); "
        "the 'cpu' and 'cuda' backends are unavailable, 'reference' and 'triton' still work. "
        "Reinstall with `pip install .` to build it.",
        RuntimeWarning,
        stacklevel=2,
    )


def cuda_built():
    return _C is not None and bool(_C.has_cuda)


def why_no_cuda_build():
    if _C is None:
        return f"extension not loaded ({load_error})"
    if not _C.has_cuda:
        return f"extension built without CUDA: {_C.cuda_skip_reason}"
    return None
