"""Writing files so that readers and crashes never see half of one, and saying so in one
line when a file cannot be written."""

import contextlib
import errno
import os
import shutil
import tempfile

from ipfm_fast.errors import CannotWrite

# Below this much free space an output folder is refused before the work starts: a run's
# files (checkpoints, sample grids) are a few MB for the digits models, far more for a U-Net.
MIN_FREE_BYTES = 64 * 2**20


def _cannot_write(path, err):
    reason = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
              errno.EACCES: "permission denied", errno.EPERM: "permission denied",
              errno.EDQUOT: "the disk quota is exceeded"}.get(err.errno, err.strerror or str(err))
    return CannotWrite(f"cannot write {path}: {reason}")


@contextlib.contextmanager
def replacing(path, suffix=""):
    """Yields a temporary name next to ``path`` (ending in ``suffix``, for writers that pick
    the format from it); when the block ends without an error the temporary replaces
    ``path`` in one step (``os.replace``). The folder is created; an error leaves the old
    file and no temporary behind. An OSError of the file system (read-only, full,
    permission) becomes :class:`ipfm_fast.errors.CannotWrite`."""
    tmp = f"{path}.tmp-{os.getpid()}{suffix}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except CannotWrite:
        raise
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT):
            raise _cannot_write(path, err) from err
        raise
    finally:
        with contextlib.suppress(OSError):
            if os.path.exists(tmp):
                os.remove(tmp)


def check_writable(path, *, folder=False, what="output"):
    """Refuses, before any work, an output that could not be written: ``path`` is a file
    (its folder is checked) or, with ``folder=True``, a folder. Creates the folder, writes
    and removes a probe file, and checks for :data:`MIN_FREE_BYTES` of free space."""
    where = os.path.abspath(path if folder else os.path.dirname(os.path.abspath(path)) or ".")
    if not folder and os.path.isdir(path):
        raise CannotWrite(f"{what} {path}: is a folder, expected a file name")
    try:
        os.makedirs(where, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=where, prefix=".ipfm-write-check-"):
            pass
    except OSError as err:
        raise _cannot_write(where, err) from err
    free = shutil.disk_usage(where).free
    if free < MIN_FREE_BYTES:
        raise CannotWrite(f"cannot write {where}: only {free / 2**20:.1f} MB free (at least "
                          f"{MIN_FREE_BYTES // 2**20} MB needed)")
    return where
