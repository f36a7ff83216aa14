"""Checkpoints: safetensors weights + JSON config, written atomically; no pickle.

Two kinds of file, both ``.safetensors`` with the JSON in the header metadata (key
``ipfm_fast``) so one file is always self-consistent:

- a **denoiser file** (``teacher.safetensors``): the EMA weights a sampler uses and the
  model config that rebuilds the network (``kind: "denoiser"``);
- a **training checkpoint** (``checkpoint.safetensors``): the online weights
  (``model/...``), the EMA (``ema/...``), the optimizer state (``opt/optim/...``), the random
  generators (``rng/...``) and the step, enough for ``--resume`` to continue a run
  bit-identically on CPU (``kind: "training"``).

Every write goes to a temporary file in the same folder, is fsync'ed and then renamed
over the target (``os.replace``), so a crash leaves the previous file intact.

Pickle files (``.pkl``, ``.pt``, ``.pth``; e.g. an EDM or PFGM++ network snapshot) are
loaded only with ``trust_pickle=True`` (CLI ``--trust-pickle``): unpickling runs
arbitrary code from the file, so only do it for files you trust.
"""

import hashlib
import json
import math
import os
import pickle
import time
from dataclasses import dataclass

import torch

from ipfm_fast._files import replacing
from ipfm_fast.errors import BadFile, CannotWrite, InvalidInput, MissingFile
from ipfm_fast.models import build_denoiser

META_KEY = "ipfm_fast"
DENOISER_FILES = ("teacher.safetensors", "generator.safetensors", "model.safetensors", "generator.pkl")
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth")


class PickleRefused(InvalidInput):
    """A pickle was named without trust_pickle=True (loading one executes code from it)."""


def _atomic_save(tensors, meta, path):
    """Write ``tensors`` + ``meta`` to ``path`` through a temporary file that is fsync'ed,
    re-opened and verified against the SHA-256 digests computed from the tensors in memory,
    and only then renamed over ``path``: a crash, a short write or a file that does not read
    back leaves the previous file in place (the last raises CannotWrite)."""
    from safetensors.torch import save_file

    meta_json = json.dumps(meta, default=_json_default)
    digests = {META_DIGEST: _sha256_meta(meta_json), TENSORS_DIGEST: _sha256_tensors(tensors)}
    with replacing(path) as tmp:
        save_file(tensors, tmp, metadata={META_KEY: meta_json, **digests})
        _test_pause()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        try:
            _read(tmp, tensors=True, finite=False, keep=False)
        except BadFile as err:
            raise CannotWrite(f"cannot write {path}: the file written does not read back intact ({err}); the "
                              f"previous file, if any, is kept") from err
    return path


# Digests recorded in every file this module writes (hex SHA-256): of the ipfm_fast metadata
# JSON, and of every tensor (name, dtype, shape and bytes, in name order). Files written before
# they existed carry none; they are read as before (safetensors still checks header and size).
META_DIGEST, TENSORS_DIGEST = "ipfm_fast_sha256_meta", "ipfm_fast_sha256_tensors"
# Seconds to sleep inside every write, after the temporary file is written and before it is
# verified and renamed: lets tests/test_crash.py kill a run during a checkpoint write. Tests only.
TEST_PAUSE_ENV = "IPFM_FAST_TEST_PAUSE_IN_WRITE"


def _test_pause():
    pause = os.environ.get(TEST_PAUSE_ENV)
    if pause:
        time.sleep(float(pause))


def _sha256_meta(meta_json):
    return hashlib.sha256(meta_json.encode("utf-8")).hexdigest()


def _sha256_tensors(tensors):
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode("utf-8"))
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _json_default(v):
    if isinstance(v, torch.Tensor):
        return v.tolist()
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def _encode_D(D):
    return "inf" if math.isinf(D) else D


def decode_D(D):
    return float(D)  # float("inf") parses "inf"


def _flat(prefix, state):
    return {f"{prefix}/{k}": v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _unflat(prefix, tensors, device=None):
    p = prefix + "/"
    return {k[len(p):]: (v if device is None else v.to(device)) for k, v in tensors.items() if k.startswith(p)}


def _read(path, *, tensors, finite, kind=None, keep=True):
    """(tensors or None, metadata dict) of an ipfm_fast safetensors file, every check
    applied: it exists; safetensors parses its header and finds the size it describes (a
    truncated file fails here); the metadata is ipfm_fast's JSON object; the digests it
    records match (the metadata's always, the tensors' when they are read); with
    ``finite``, no floating-point tensor holds NaN/Inf; with ``kind``, meta["kind"] is it.
    ``keep=False`` verifies the tensors without keeping them (a write's check)."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.exists(path):
        raise MissingFile(f"checkpoint: {path!r} does not exist")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            if tensors:
                digest = hashlib.sha256() if TENSORS_DIGEST in header else None
                loaded = {}
                for name in sorted(f.keys()):
                    t = f.get_tensor(name)
                    if keep:
                        loaded[name] = t
                    if digest is not None:
                        digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode("utf-8"))
                        digest.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own types for truncated or foreign files
        raise BadFile(f"checkpoint: cannot read {path!r} as safetensors ({type(err).__name__}: {err}); the file is "
                      f"truncated, damaged or not a safetensors file") from err
    if META_KEY not in header:
        raise BadFile(f"checkpoint: {path!r} has no ipfm_fast metadata (not written by ipfm_fast)")
    meta_json = header[META_KEY]
    if META_DIGEST in header and _sha256_meta(meta_json) != header[META_DIGEST]:
        raise BadFile(f"checkpoint: {path!r} is corrupted: its metadata does not match the SHA-256 recorded when it "
                      f"was written")
    try:
        meta = json.loads(meta_json)
    except ValueError as err:
        raise BadFile(f"checkpoint: {path!r} is corrupted: its ipfm_fast metadata is not valid JSON ({err})") from err
    if not isinstance(meta, dict):
        raise BadFile(f"checkpoint: {path!r} is corrupted: its ipfm_fast metadata is a {type(meta).__name__}, not an "
                      f"object")
    if kind is not None and meta.get("kind") != kind:
        raise BadFile(f"checkpoint: {path!r} is not a {kind} file (its kind is {meta.get('kind')!r})")
    if not tensors:
        return None, meta
    if digest is not None and digest.hexdigest() != header[TENSORS_DIGEST]:
        raise BadFile(f"checkpoint: {path!r} is corrupted: its tensors do not match the SHA-256 recorded when it was "
                      f"written (damaged on disk or in a copy); it cannot be used")
    if finite:
        for name, t in loaded.items():
            if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
                raise BadFile(f"checkpoint: {path!r} holds NaN/Inf in {name!r}: it was saved from a run that had "
                              f"diverged; use an earlier checkpoint")
    return loaded, meta


def read_meta(path, *, kind=None):
    """The metadata dict of an ipfm_fast safetensors file, without reading its tensors
    (checked: header, size, the metadata's digest; ``kind``: what meta["kind"] must be).
    Raises MissingFile or BadFile naming the file and the problem."""
    return _read(path, tensors=False, finite=False, kind=kind)[1]


def read(path, *, finite=True, kind=None):
    """(tensors on CPU, metadata dict) of an ipfm_fast safetensors file, verified: header and
    size, the digests recorded when it was written (files written before digests existed
    are read without), and with ``finite`` no NaN/Inf in a floating-point tensor. Raises
    MissingFile or BadFile (one line naming the file and the problem): a torn or damaged
    file is never half-read."""
    return _read(path, tensors=True, finite=finite, kind=kind)


# --------------------------------------------------------------------------------------
# denoiser files
# --------------------------------------------------------------------------------------


def save_denoiser(path, model, model_cfg, **meta):
    """Write a denoiser's weights (pass the EMA model) and its config."""
    meta = dict(meta, kind="denoiser", model=model_cfg)
    return _atomic_save(_flat("net", model.state_dict()), meta, path)


def resolve_denoiser_path(path):
    if os.path.isdir(path):
        for name in DENOISER_FILES:
            cand = os.path.join(path, name)
            if os.path.exists(cand):
                return cand
        raise MissingFile(f"{path!r} is a folder without a denoiser file (looked for {', '.join(DENOISER_FILES)})")
    if not os.path.exists(path):
        raise MissingFile(f"denoiser: {path!r} does not exist")
    return path


# A distillation checkpoint's modules under the names the teacher's use ("ema": what samples well).
_GENERATOR_WEIGHTS = {"ema": "generator_ema", "model": "generator"}


def load_denoiser(path, *, device="cpu", which="ema", trust_pickle=False):
    """Load a denoiser ``forward(x, sigma) -> x0`` in eval mode, and its metadata.

    ``path``: a run folder (uses its teacher/generator/model.safetensors), a denoiser
    file, a training checkpoint (``which`` = "ema" or "model" picks the weights; in a
    distillation checkpoint they are the generator's), or with ``trust_pickle=True`` a
    pickle holding an EDM-style network (see :func:`load_pickle`).
    """
    path = resolve_denoiser_path(os.fspath(path))
    if path.lower().endswith(PICKLE_SUFFIXES):
        return load_pickle(path, trust_pickle=trust_pickle, device=device)
    tensors, meta = read(path)
    if "model" not in meta:
        raise BadFile(f"checkpoint: {path!r} has no model config")
    model = build_denoiser(meta["model"])
    if meta.get("kind") == "training":
        names = meta.get("modules", ["model", "ema"])
        if which not in names and "generator_ema" in names:
            which = _GENERATOR_WEIGHTS.get(which, which)
        if which not in names:
            raise InvalidInput(f"{path!r} holds the weights {names}; {which!r} is not one of them")
        state = _unflat(which, tensors)
    else:
        state = _unflat("net", tensors)
    model.load_state_dict(state)
    return model.to(device).eval().requires_grad_(False), meta


ROLES = ("teacher", "generator")


@dataclass
class ModelFile:
    """A loaded denoiser and what its file says it is. ``role``: "teacher" (a PFGM++
    denoiser, sampled with the ODE) or "generator" (a one-step generator, evaluated once
    at ``sigma_init``); ``D`` / ``shape`` / ``data`` are None where the file does not record
    them (foreign pickles)."""

    model: torch.nn.Module
    meta: dict
    path: str
    role: str
    D: float | None
    shape: list | None
    sigma_init: float | None
    data: str | None
    data_id: dict | None

    def describe(self):
        what = (f"one-step generator (sigma_init {self.sigma_init:g})" if self.role == "generator"
                else "PFGM++ teacher")
        D = "unknown" if self.D is None else f"{self.D:g}"
        return f"{what}, D = {D}, sample shape {self.shape or 'unknown'}, trained on {self.data or 'unknown data'}"


def load_model(path, *, device="cpu", which="ema", trust_pickle=False):
    """:func:`load_denoiser` plus what the file records about the model, as a :class:`ModelFile`."""
    path = resolve_denoiser_path(os.fspath(path))
    model, meta = load_denoiser(path, device=device, which=which, trust_pickle=trust_pickle)
    config = meta.get("config") or {}
    if meta.get("kind") == "training":
        generator = "generator_ema" in meta.get("modules", [])
        role = meta.get("role") or ("generator" if generator else "teacher")
    else:
        role = meta.get("role") or ("generator" if "sigma_init" in meta else "teacher")
    if role not in ROLES:
        raise BadFile(f"{path!r}: unknown role {role!r} in its metadata (expected one of {ROLES})")
    D = meta.get("D", config.get("D"))
    sigma_init = meta.get("sigma_init", config.get("sigma_init")) if role == "generator" else None
    shape = (meta.get("model") or {}).get("shape")
    if meta.get("kind") == "pickle":  # what an EDM / PFGM++ snapshot's network records (load_pickle)
        shape = meta.get("shape")
    if role == "generator" and sigma_init is None:
        raise BadFile(f"{path!r} is a generator file without its sigma_init")
    return ModelFile(model=model, meta=meta, path=path, role=role, D=None if D is None else decode_D(D),
                     shape=None if shape is None else [int(v) for v in shape],
                     sigma_init=None if sigma_init is None else float(sigma_init),
                     data=meta.get("data", config.get("data")), data_id=meta.get("data_id"))


# --------------------------------------------------------------------------------------
# training checkpoints
# --------------------------------------------------------------------------------------


def optimizer_tensors(optimizer):
    """Optimizer state as flat tensors + a JSON part (param_groups without params)."""
    sd = optimizer.state_dict()
    tensors = {}
    scalars = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim/{pid}/{k}"] = v.detach().to("cpu").contiguous().clone()
            else:
                scalars[f"{pid}/{k}"] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer(optimizer, tensors, meta, device, prefix="optim/"):
    state = {}
    for k, v in tensors.items():
        if k.startswith(prefix):
            pid, name = k[len(prefix):].split("/", 1)
            state.setdefault(int(pid), {})[name] = v.to(device) if name != "step" else v
    for k, v in meta.get("scalars", {}).items():
        pid, name = k.split("/", 1)
        state.setdefault(int(pid), {})[name] = v
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_state(path, *, modules, optimizers, rngs, step, config, model_cfg=None, extra=None):
    """Write the training checkpoint of a loop (the teacher's and distillation's alike):
    ``modules`` name -> nn.Module (e.g. {"model": ..., "ema": ...} or {"generator": ...,
    "generator_ema": ..., "fake": ...}), ``optimizers`` name -> torch.optim.Optimizer,
    ``rngs`` name -> torch.Generator.
    ``model_cfg`` (default ``config["model"]``) lets :func:`load_denoiser` rebuild the nets."""
    tensors, opt_meta = {}, {}
    for name, module in modules.items():
        tensors.update(_flat(name, module.state_dict()))
    for name, opt in optimizers.items():
        t, m = optimizer_tensors(opt)
        tensors.update({f"{name}/{k}": v for k, v in t.items()})
        opt_meta[name] = m
    for name, rng in rngs.items():
        tensors[f"rng/{name}"] = rng.get_state().to("cpu").clone()
    meta = dict(kind="training", step=int(step), config=config,
                model=model_cfg if model_cfg is not None else config.get("model"),
                modules=sorted(modules), optimizers=opt_meta, **(extra or {}))
    return _atomic_save(tensors, meta, path)


def load_state(path, *, modules, optimizers, rngs, device):
    """Restore what :func:`save_state` wrote, in place; returns the metadata (``["step"]``).
    The file is verified first (:func:`read`: a torn, damaged or diverged checkpoint is
    refused before anything is restored); state that does not fit the modules, optimizers
    or generators given is a BadFile naming the part, not a traceback."""
    tensors, meta = read(path)
    if meta.get("kind") != "training":
        raise BadFile(f"--resume: {path!r} is not a training checkpoint (kind {meta.get('kind')!r})")
    for name, module in modules.items():
        state = _unflat(name, tensors, device)
        if not state:
            raise BadFile(f"--resume: {path!r} has no weights for {name!r} (it holds {meta.get('modules')})")
        with _restoring(path, f"the weights of {name!r}"):
            module.load_state_dict(state)
    optimizer_meta = meta.get("optimizers") if isinstance(meta.get("optimizers"), dict) else {}
    for name, opt in optimizers.items():
        if name not in optimizer_meta:
            raise BadFile(f"--resume: {path!r} has no optimizer state {name!r}")
        with _restoring(path, f"the optimizer state {name!r}"):
            load_optimizer(opt, _unflat(name, tensors), optimizer_meta[name], device, prefix="optim/")
    for name, rng in rngs.items():
        key = f"rng/{name}"
        if key not in tensors:
            raise BadFile(f"--resume: {path!r} lacks the random state {name!r}")
        with _restoring(path, f"the random state {name!r}"):
            rng.set_state(tensors[key])
    return meta


class _restoring:
    """Turns the errors torch raises for state of the wrong shape or layout into a BadFile
    naming the file and the part (its first line: torch's messages list every key)."""

    def __init__(self, path, what):
        self.path, self.what = path, what

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if kind is not None and issubclass(kind, (RuntimeError, KeyError, ValueError, TypeError)) \
                and not isinstance(err, BadFile):
            first = str(err).strip().splitlines()[0] if str(err).strip() else kind.__name__
            raise BadFile(f"--resume: {self.path!r}: {self.what} do not fit this run ({first})") from err
        return False


# --------------------------------------------------------------------------------------
# pickles (opt-in)
# --------------------------------------------------------------------------------------


class ExternalDenoiser(torch.nn.Module):
    """Adapts a network with EDM's signature ``net(x, sigma, class_labels=None)`` (EDM,
    PFGM++ snapshots) to ``forward(x, sigma) -> x0`` in x's dtype."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, sigma):
        if not isinstance(sigma, torch.Tensor):
            sigma = torch.full((x.shape[0],), float(sigma), device=x.device)
        return self.net(x.float(), sigma.float().reshape(-1)).to(x.dtype)


def snapshot_facts(net):
    """(D, [C, H, W]) as an EDM / PFGM++ ``EDMPrecond`` records them, each None where it does
    not: PFGM++'s network has ``D`` and ``pfgmpp`` (False: trained as EDM, D = inf, whatever
    ``D`` says); a network with ``D`` only is taken at that D; EDM's (and SiD's) has neither.
    The shape from ``img_channels`` and ``img_resolution``."""
    D = None
    raw = getattr(net, "D", None)
    if getattr(net, "pfgmpp", None) is False:
        D = math.inf
    elif raw is not None and not isinstance(raw, bool):
        try:
            D = math.inf if str(raw).strip() == "inf" else float(raw)
        except (TypeError, ValueError):
            D = None
        if D is not None and not D > 0:
            D = None
    shape = None
    if hasattr(net, "img_channels") and hasattr(net, "img_resolution"):
        shape = [int(net.img_channels), int(net.img_resolution), int(net.img_resolution)]
    return D, shape


_ORIGINAL_REPOS = "NVlabs/edm, Newbeeer/pfgmpp, mingyuanzhou/SiD or daniil-shlenskii/pfgmpp-idmd"


def _unpickle(path, device):
    """The object in a pickle, with the failures a foreign snapshot meets as BadFile: code the
    pickle names that cannot be imported here (EDM-style snapshots name ``torch_utils`` and
    ``dnnlib`` of the repository that wrote them, and their embedded class sources import
    more), and files that are not pickles."""
    try:
        if path.lower().endswith((".pt", ".pth")):
            return torch.load(path, map_location=device, weights_only=False)
        with open(path, "rb") as f:
            return pickle.load(f)  # noqa: S301 - explicitly trusted by the caller
    except ModuleNotFoundError as err:
        raise BadFile(f"{path!r}: unpickling it needs the module {err.name!r}, which is not importable here: put the "
                      f"original repository (the code that wrote the snapshot, e.g. {_ORIGINAL_REPOS}) on PYTHONPATH"
                      ) from err
    except (ImportError, AttributeError) as err:  # a module or class the pickle names is missing or moved
        raise BadFile(f"{path!r}: unpickling it failed ({type(err).__name__}: {err}): the classes it names must be "
                      f"importable as they were when it was written; put the original repository (e.g. "
                      f"{_ORIGINAL_REPOS}) on PYTHONPATH") from err
    except (pickle.UnpicklingError, EOFError) as err:
        raise BadFile(f"{path!r}: not a readable pickle ({type(err).__name__}: {err})") from err


def load_pickle(path, *, trust_pickle=False, device="cpu"):
    """Load a network from a pickle (an EDM/PFGM++ ``.pkl`` dict with an ``ema`` entry, or
    a pickled ``nn.Module`` in ``.pt``/``.pth``). **Unpickling executes code from the
    file**: refused unless ``trust_pickle=True``. The classes the pickle names (e.g. EDM's
    ``torch_utils`` and ``dnnlib``) must be importable: put the repository that wrote it on
    PYTHONPATH (BadFile says which module is missing). The metadata records the D and
    sample shape the network carries (:func:`snapshot_facts`)."""
    if not trust_pickle:
        raise PickleRefused(
            f"{path!r} is a pickle: loading it can execute arbitrary code from the file. Pass --trust-pickle "
            f"(trust_pickle=True) only if you trust its source, or convert it to a safetensors denoiser file.")
    obj = raw = _unpickle(path, device)
    if isinstance(obj, dict):
        for key in ("ema", "net", "model"):
            if isinstance(obj.get(key), torch.nn.Module):
                obj = obj[key]
                break
    if not isinstance(obj, torch.nn.Module):
        raise BadFile(f"{path!r}: expected an nn.Module or a dict with an 'ema' module, got {type(obj).__name__}")
    recorded = raw.get(PICKLE_META_KEY, {}) if isinstance(raw, dict) else {}
    model = ExternalDenoiser(obj).to(device).eval().requires_grad_(False)
    meta = {**recorded, "kind": "pickle", "source": os.path.abspath(path)}
    D, shape = snapshot_facts(obj)
    if D is not None:
        meta.setdefault("D", _encode_D(D))
    if shape is not None:
        meta.setdefault("shape", shape)
    return model, meta


PICKLE_META_KEY = "ipfm_fast"  # what ipfm_fast records in the pickles it writes (save_pickled_denoiser)


def save_pickled_denoiser(path, model, **meta):
    """Write a denoiser without a model config (a network from a trusted snapshot, wrapped in
    :class:`ExternalDenoiser`) the way snapshots are written: a pickle of {"ema": network,
    "ipfm_fast": metadata}, loadable by the code that wrote the snapshot and, with
    ``trust_pickle``, by :func:`load_model` (which reads the metadata back)."""
    net = model.net if isinstance(model, ExternalDenoiser) else model
    with replacing(path, ".pkl") as tmp, open(tmp, "wb") as f:
        pickle.dump({"ema": net, PICKLE_META_KEY: meta}, f)
    return path
