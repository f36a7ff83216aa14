"""Writing files so that readers and crashes never see half of one, saying so in one line
when a file cannot be written, and reading JSON files with one line naming the file and
the problem when one cannot be used."""

import contextlib
import errno
import glob
import json
import os
import shutil
import tempfile

from ipfm_fast.errors import BadFile, CannotWrite, MissingFile

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
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        _remove_stale_temporaries(path)
        yield tmp
        os.replace(tmp, path)
        _fsync_folder(folder)
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


def _remove_stale_temporaries(path):
    """Temporaries of ``path`` left by writers that were killed (their process is gone) are
    removed before the next write: a run killed during its checkpoint writes leaves no
    growing pile of half-written files. Only files named by :func:`replacing` are touched."""
    prefix = f"{path}.tmp-"
    for tmp in glob.glob(glob.escape(prefix) + "*"):
        digits = tmp[len(prefix):].split(".", 1)[0]
        if not digits.isdigit() or int(digits) == os.getpid():
            continue
        try:
            os.kill(int(digits), 0)
            continue  # the writer is alive (or another user's): not ours to remove
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue
        with contextlib.suppress(OSError):
            os.remove(tmp)


def _fsync_folder(folder):
    """Make a rename durable (the folder's entry), where the file system allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_json(path, what="file", expect=dict):
    """The JSON value in ``path`` (a ``config.json``, ``summary.json``, ...). A missing file
    is MissingFile; an empty, truncated or damaged one, or one whose top level is not an
    ``expect`` (default: an object), BadFile -- one line naming the file and the problem
    (``what`` says what the file is for)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MissingFile(f"{what} {path} does not exist")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise BadFile(f"{what} {path}: cannot read it ({err.strerror or err})") from err
    if not raw.strip():
        raise BadFile(f"{what} {path} is empty (a write that was cut off?)")
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise BadFile(f"{what} {path} is damaged: not UTF-8 text (byte {err.start})") from err
    except json.JSONDecodeError as err:
        raise BadFile(f"{what} {path} is damaged or truncated: not valid JSON ({err.msg} at line {err.lineno}, "
                      f"column {err.colno})") from err
    if expect is not None and not isinstance(value, expect):
        raise BadFile(f"{what} {path} is damaged: expected a JSON {'object' if expect is dict else expect.__name__}, "
                      f"got {type(value).__name__}")
    return value


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
