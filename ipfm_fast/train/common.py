"""Pieces every training loop shares: EMA, device and bf16 autocast, a deterministic
batch order that needs no saved state, tqdm progress and JSONL logs."""

import contextlib
import copy
import json
import math
import os
import sys
import time

import torch

from ipfm_fast._files import replacing

# --------------------------------------------------------------------------------------
# device and precision
# --------------------------------------------------------------------------------------


def resolve_device(device):
    """``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"`` (CUDA when available) -> torch.device,
    with a clear error when CUDA is asked for but absent."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available in this environment (torch "
                         f"{torch.__version__}, CUDA build {torch.version.cuda}); use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {device!r}")
    return dev


def resolve_precision(precision, device):
    """``"auto"`` = bf16 autocast on CUDA, fp32 on CPU; or ``"fp32"`` / ``"bf16"``."""
    if precision in (None, "auto"):
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"--precision must be auto, fp32 or bf16, got {precision!r}")
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
        raise ValueError(f"--threads must be >= 1 or auto, got {threads}")
    return threads


def make_generator(device, seed):
    """A torch.Generator on ``device`` seeded with ``seed``: every random draw of a loop
    goes through it, so saving its state makes a resumed run identical."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


# --------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------


class EMA:
    r"""Exponential moving average of a model's parameters (buffers copied):
    :math:`\bar\theta \leftarrow \beta \bar\theta + (1 - \beta)\theta` with
    :math:`\beta = \min(\text{decay}, (1 + s) / (10 + s))` at step s (a warm-up, so the
    average is not dominated by the random init in short runs)."""

    def __init__(self, model, decay=0.999, warmup=True):
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def beta(self, step):
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model, step, skip=None, weight=None):
        """One EMA step towards ``model``. ``skip``: an optional 0-dim bool tensor; where it
        is True the average stays put (decided on the device: no host sync). ``weight``: an
        optional 0-dim tensor holding 1 - beta(step) (a CUDA graph replays it)."""
        ema_p = list(self.model.parameters())
        src_p = [p.detach() for p in model.parameters()]
        if skip is None and weight is None:
            torch._foreach_lerp_(ema_p, src_p, 1.0 - self.beta(step))
        else:  # _foreach_lerp_ would read a tensor weight back to the host
            w = 1.0 - self.beta(step) if weight is None else weight
            delta = torch._foreach_sub(src_p, ema_p)
            torch._foreach_mul_(delta, w if skip is None else (~skip).to(delta[0].dtype) * w)
            torch._foreach_add_(ema_p, delta)
        for eb, b in zip(self.model.buffers(), model.buffers()):
            eb.copy_(b)

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state):
        self.model.load_state_dict(state)


# --------------------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------------------


def batch_indices(step, batch, n, seed, device=None):
    """Indices of the training rows of ``step``: the stream of per-epoch permutations
    (epoch e uses ``randperm(n)`` seeded by (seed, e)) cut into consecutive batches.
    A pure function of its arguments, so resuming needs no data-loader state."""
    start = step * batch
    out = []
    while len(out) < batch:
        epoch, pos = divmod(start + len(out), n)
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g)
        out.extend(perm[pos: pos + batch - len(out)].tolist())
    return torch.tensor(out, dtype=torch.long, device=device)


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
