"""Writing files so that readers and crashes never see half of one."""

import contextlib
import os


@contextlib.contextmanager
def replacing(path, suffix=""):
    """Yields a temporary name next to ``path`` (ending in ``suffix``, for writers that pick
    the format from it); when the block ends without an error the temporary replaces
    ``path`` in one step (``os.replace``). The folder is created; an error leaves the old
    file and no temporary behind."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}{suffix}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
