"""The project's error types: what a user got wrong, as opposed to a bug.

Every error raised for bad input, a bad or missing file, an unavailable backend or a
diverged run is an :class:`IpfmError`; the CLI prints those as one line and exits 2, and
lets anything else (a bug) show its traceback. Each type also subclasses the built-in
exception that code catching errors of ipfm_fast used before (``ValueError``,
``TypeError``, ...), so ``except ValueError`` keeps working.

    IpfmError
    ├── InvalidInput(ValueError)         a value out of range, a bad shape, a wrong device
    ├── InvalidType(TypeError)           an argument of the wrong type
    ├── MissingFile(FileNotFoundError)   a file or folder that does not exist
    ├── BadFile(ValueError)              a file that exists but cannot be used (truncated, foreign, ...)
    ├── CannotWrite(OSError)             an output that cannot be written (read-only, full, no permission)
    ├── BackendUnavailable(RuntimeError) the backend asked for cannot serve this call
    ├── TrainingDiverged(FloatingPointError)  a run that keeps producing NaN/Inf
    └── Interrupted                      SIGINT/SIGTERM stopped a command that has more steps
"""


class IpfmError(Exception):
    """Base of every error ipfm_fast raises on purpose (a user's mistake, not a bug)."""


class InvalidInput(IpfmError, ValueError):
    """An argument's value is out of range, or its shape, dtype or device does not fit."""


class InvalidType(IpfmError, TypeError):
    """An argument has the wrong type."""


class MissingFile(IpfmError, FileNotFoundError):
    """A file or folder that was named does not exist."""


class BadFile(IpfmError, ValueError):
    """A file exists but cannot be used: truncated, corrupted, or not what was expected."""


class CannotWrite(IpfmError, OSError):
    """An output file or folder cannot be written: read-only, full, or no permission."""


class BackendUnavailable(IpfmError, RuntimeError):
    """The requested backend cannot serve this call; the message says why."""


class TrainingDiverged(IpfmError, FloatingPointError):
    """A training run produced non-finite losses or gradients too many times in a row."""


class Interrupted(IpfmError):
    """SIGINT or SIGTERM stopped a multi-step command (the demo, the study) after the running
    step saved what it could; ``signal`` is "SIGINT" or "SIGTERM" (the CLI exits 130 / 143)."""

    def __init__(self, signal, message):
        super().__init__(message)
        self.signal = signal
