"""Pieces every training loop shares: EMA, device and bf16 autocast, a deterministic
batch order that needs no saved state, tqdm progress and JSONL logs."""

import contextlib
import copy
import json
import math
import os
import signal
import sys
import time

import torch

from ipfm_fast._files import replacing
from ipfm_fast.errors import InvalidInput, MissingFile
from ipfm_fast.train.flat import FlatParams, ema_step_

# --------------------------------------------------------------------------------------
# device and precision
# --------------------------------------------------------------------------------------


def resolve_device(device):
    """``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"`` (CUDA when available) -> torch.device,
    with a clear error when CUDA is asked for but absent or the index does not exist."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):  # torch's message lists every device type it knows
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise InvalidInput(f"--device must be cpu, cuda, cuda:N or auto, got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInput(f"--device {device}: no CUDA device is available in this environment (torch "
                               f"{torch.__version__}, CUDA build {torch.version.cuda}); use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise InvalidInput(f"--device {device}: there {'is' if count == 1 else 'are'} {count} CUDA device(s) "
                               f"here (cuda:0{f' .. cuda:{count - 1}' if count > 1 else ''})")
    return dev


def resolve_precision(precision, device):
    """``"auto"`` = bf16 autocast on CUDA, fp32 on CPU; or ``"fp32"`` / ``"bf16"``."""
    if precision in (None, "auto"):
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16"):
        raise InvalidInput(f"--precision must be auto, fp32 or bf16, got {precision!r}")
    return precision


def autocast(device, precision, cache=True):
    """Context manager: bf16 autocast of the networks' forward passes, or nothing.
    Losses are computed in fp32 outside it (the denoisers return x's dtype). ``cache=False``
    inside CUDA-graph capture (cached weight casts would outlive the capture)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


SMALL_MODEL_PARAMS = 2_000_000


@contextlib.contextmanager
def num_threads(n):
    """Run a block with ``torch.set_num_threads(n)`` (None: unchanged), then restore."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def resolve_threads(threads, device, params):
    """CPU threads for a loop: ``"auto"`` = 1 for models under 2M parameters (their ops are
    too small to split; on a shared machine extra OpenMP threads spin and run ~5x slower),
    else torch's default; or an explicit count. Ignored (None) on CUDA."""
    if device.type != "cpu":
        return None
    if threads in (None, "auto", 0, "0"):
        return 1 if params < SMALL_MODEL_PARAMS else None
    threads = int(threads)
    if threads < 1:
        raise InvalidInput(f"--threads must be >= 1 or auto, got {threads}")
    return threads


def check_run_folder(out, ckpt_path, *, resume, overwrite, main=True):
    """A run folder is continued only with ``resume`` and replaced only with ``overwrite``:
    a folder holding a checkpoint is never silently started over. ``overwrite`` removes
    the old checkpoint (``main`` process only), so an interrupted new run cannot be
    resumed from the old one."""
    if resume:
        if not os.path.exists(ckpt_path):
            raise MissingFile(f"--resume: no checkpoint at {ckpt_path}")
        return
    if not os.path.exists(ckpt_path):
        return
    if not overwrite:
        from ipfm_fast.checkpoint import read_meta
        from ipfm_fast.errors import BadFile

        try:
            step = read_meta(ckpt_path, kind="training").get("step")
        except BadFile as err:
            raise BadFile(f"{err}: start the run over with --overwrite, or choose another --out") from err
        raise InvalidInput(f"{out} already holds a run (checkpoint at step {step}): continue it with --resume, "
                           f"start it over with --overwrite, or choose another --out")
    if main:
        os.remove(ckpt_path)


def make_rng(device, seed):
    """A torch.Generator on ``device`` seeded with ``seed``: every random draw of a loop
    goes through it, so saving its state makes a resumed run identical."""
    return torch.Generator(device=device).manual_seed(int(seed))


# --------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------


class EMA:
    r"""Exponential moving average of a model's parameters (buffers copied):
    :math:`\bar\theta \leftarrow \beta \bar\theta + (1 - \beta)\theta` with
    :math:`\beta = \min(\text{decay}, (1 + s) / (10 + s))` at step s (a warm-up, so the
    average is not dominated by the random init in short runs). The average's parameters
    are a :class:`~ipfm_fast.train.flat.FlatParams`, so one update is a pass over one flat
    buffer; the source is the trained model's FlatParams (the same layout)."""

    def __init__(self, model, decay=0.999, warmup=True):
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.flat = FlatParams(self.model)
        self._source = None  # the FlatParams last checked against the average's layout
        self._buffers = []  # (average's buffer, source's buffer) pairs of that source

    def beta(self, step):
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, source, step, skip=None, weight=None):
        """One EMA step towards ``source`` (the trained model's :class:`FlatParams`).
        ``skip``: an optional 0-dim bool tensor; where it is True the average stays put
        (decided on the device: no host sync). ``weight``: an optional 0-dim tensor
        holding 1 - beta(step) (a CUDA graph replays it)."""
        ema, src = self.buffer_for(source), source.data
        if skip is None and weight is None:
            ema.lerp_(src, 1.0 - self.beta(step))
        else:  # not lerp_: its fused multiply-add rounds differently from the update runs have always made
            w = 1.0 - self.beta(step) if weight is None else weight
            ema_step_(ema, src, w, skip)
        self.copy_buffers()

    def buffer_for(self, source):
        """The average's flat buffer, checked against ``source``'s layout (once per source):
        what an update fused into the source's optimizer step (FlatAdam.step's ``ema``)
        moves; :meth:`copy_buffers` then copies the module buffers."""
        if source is not self._source:  # checked once per source, not every step
            if not isinstance(source, FlatParams):
                raise InvalidInput(f"EMA.update takes the trained model's FlatParams, got {type(source).__name__} "
                                   "(build ipfm_fast.train.flat.FlatParams(model) once, before training)")
            if source.layout != self.flat.layout:
                raise InvalidInput("EMA.update: the source's parameters do not match the average's (another network?)")
            self._source = source
            self._buffers = list(zip(self.model.buffers(), source.module.buffers()))  # (walking modules: ~15 us)
        return self.flat.data

    @torch.no_grad()
    def copy_buffers(self):
        """The last source's module buffers (batch-norm statistics...) copied into the average's."""
        for eb, b in self._buffers:
            eb.copy_(b)

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state):
        self.model.load_state_dict(state)


# --------------------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------------------


def epoch_permutation(epoch, n, seed):
    """The order of the ``n`` training rows in ``epoch``: ``randperm(n)`` seeded by (seed, epoch)."""
    rng = torch.Generator().manual_seed(int(seed) * 1_000_003 + epoch)
    return torch.randperm(n, generator=rng)


def batch_indices(step, batch, n, seed, device=None):
    """Indices of the training rows of ``step``: the stream of per-epoch permutations
    (:func:`epoch_permutation`) cut into consecutive batches. A pure function of its
    arguments, so resuming needs no data-loader state; :class:`BatchOrder` gives the same
    indices without a host-to-device copy per step."""
    return BatchOrder(batch, n, seed, device)(step)


class BatchOrder:
    """``order(step)`` = :func:`batch_indices` of ``step`` as a tensor on ``device``, built
    by slicing device tensors: each epoch's permutation is drawn on the host and copied to
    the device once (from pinned memory, without blocking the host), so a training step
    never waits for a copy (``torch.tensor(list, device="cuda")`` would, every step)."""

    def __init__(self, batch, n, seed, device=None):
        self.batch, self.n, self.seed = int(batch), int(n), int(seed)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._perms = {}  # epoch -> permutation on the device (the current and the next)

    def _perm(self, epoch):
        perm = self._perms.get(epoch)
        if perm is None:
            perm = epoch_permutation(epoch, self.n, self.seed)
            if self.device.type == "cuda":
                perm = perm.pin_memory().to(self.device, non_blocking=True)
            else:
                perm = perm.to(self.device)
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = perm
        return perm

    def __call__(self, step):
        start, parts, taken = step * self.batch, [], 0
        while taken < self.batch:
            epoch, pos = divmod(start + taken, self.n)
            part = self._perm(epoch)[pos: pos + self.batch - taken]
            parts.append(part)
            taken += part.shape[0]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


# --------------------------------------------------------------------------------------
# progress and logs
# --------------------------------------------------------------------------------------


def progress(total, initial=0, desc="", enabled=None):
    """A tqdm bar (to stderr; disabled automatically when stderr is not a terminal, unless
    ``enabled`` is True). Falls back to a no-op object if tqdm is missing."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        enabled = False
    if not enabled:
        return _NoBar()
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, smoothing=0.1, leave=True)


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, *a, **k):
        pass

    def close(self):
        pass

    def write(self, msg):
        print(msg, file=sys.stderr)


class JSONLLogger:
    """Appends one JSON object per line to ``path`` (flushed every write; safe to tail)."""

    def __init__(self, path):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._f = open(path, "a", encoding="utf-8")

    def log(self, **record):
        record.setdefault("time", round(time.time(), 3))
        self._f.write(json.dumps(_jsonable(record)) + "\n")
        self._f.flush()

    def close(self):
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def truncate_jsonl(path, max_step):
    """Drop log lines with ``step > max_step`` (a resumed run rewrites them)."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("step", -1) <= max_step:
                keep.append(line if line.endswith("\n") else line + "\n")
    with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(keep)


def _jsonable(v):
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def write_json(path, obj):
    """Atomic JSON write (write a temporary file, then rename)."""
    with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(_jsonable(obj), f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


class StopSignals:
    """SIGTERM/SIGINT set a flag (the loop saves a checkpoint and returns at the end of the
    iteration, and the CLI exits with 128 + the signal's number); a second SIGINT raises
    KeyboardInterrupt as usual. Only in the main thread."""

    def __init__(self):
        self.received = None
        self._old = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}  # 128 + the signal's number, as shells report it
