"""Teachers from the EDM-style codebases: a persistence-style snapshot pickle
(``network-snapshot-*.pkl``: a dict whose ``ema`` entry is an ``EDMPrecond``) loads with
--trust-pickle when the repository that wrote it is on PYTHONPATH, takes D and the sample
shape from the network, distils from the CLI, and fails with a BadFile that names the
missing module when it is not.

The snapshot is built here from a small network of our own inside a stand-in repository
(``torch_utils/persistence.py`` in the style of EDM's: a persistent class pickles as its
module's source, class name and state, and unpickling re-executes that source), so the test
needs nothing from the original repositories.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from ipfm_fast import checkpoint as ckpt
from ipfm_fast.errors import BadFile

PERSISTENCE = '''
"""Stand-in for EDM's torch_utils/persistence.py (written for ipfm_fast's tests)."""
import inspect
import sys
import types

import dnnlib  # noqa: F401  (EDM's persistence imports it too)

_modules = {}  # source -> module re-created from it
_sources = {}  # name of a re-created module -> its source (inspect cannot read it back)


def persistent_class(orig_class):
    name = orig_class.__module__
    module_src = _sources[name] if name in _sources else inspect.getsource(sys.modules[name])

    class Decorator(orig_class):
        _module_src = module_src
        _class_name = orig_class.__name__

        def __reduce__(self):
            meta = dict(module_src=self._module_src, class_name=self._class_name, state=dict(self.__dict__))
            return _reconstruct_persistent_obj, (meta,)

    Decorator.__name__ = orig_class.__name__
    return Decorator


def _reconstruct_persistent_obj(meta):
    module = _modules.get(meta["module_src"])
    if module is None:
        module = types.ModuleType(f"_imported_module_{len(_modules)}")
        sys.modules[module.__name__] = module
        _modules[meta["module_src"]] = module
        _sources[module.__name__] = meta["module_src"]
        exec(meta["module_src"], module.__dict__)
    cls = getattr(module, meta["class_name"])
    obj = cls.__new__(cls)
    obj.__dict__.update(meta["state"])
    return obj
'''

NETWORKS = '''
"""A small EDM-preconditioned network in the shape of EDM / PFGM++'s training/networks.py."""
import torch
{extra_import}
from torch_utils import persistence


@persistence.persistent_class
class TinyModel(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels + 1, 8, 3, padding=1)
        self.out = torch.nn.Conv2d(8, channels, 3, padding=1)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        t = noise_labels.reshape(-1, 1, 1, 1).expand(x.shape[0], 1, *x.shape[2:])
        return self.out(torch.nn.functional.silu(self.conv(torch.cat([x, t], dim=1))))


@persistence.persistent_class
class EDMPrecond(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim=0, {D_args}sigma_min=0, sigma_max=float("inf"),
                 sigma_data=0.5):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        {D_body}
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data
        self.model = TinyModel(img_channels)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        F_x = self.model(c_in * x, (sigma.log() / 4).flatten(), class_labels=class_labels, **model_kwargs)
        return c_skip * x + c_out * F_x.to(torch.float32)
'''

KINDS = {  # network kind -> (EDMPrecond's D arguments, their body, the D the loader should find)
    "pfgmpp": ("pfgmpp=True, D=128, ", "self.pfgmpp, self.D = pfgmpp, D", 128.0),
    "pfgmpp-trained-as-edm": ("pfgmpp=False, D=128, ", "self.pfgmpp, self.D = pfgmpp, D", float("inf")),
    "edm": ("", "pass", None),
}

BUILD = '''
import pickle, sys, torch
from training.networks import EDMPrecond
torch.manual_seed(0)
net = EDMPrecond(img_resolution=8, img_channels=1).eval().requires_grad_(False)
x, sigma = torch.randn(3, 1, 8, 8), torch.tensor([0.3, 1.0, 5.0])
torch.save({"x": x, "sigma": sigma, "out": net(x, sigma)}, sys.argv[2])
with open(sys.argv[1], "wb") as f:
    pickle.dump({"ema": net, "loss_fn": None, "augment_pipe": None, "dataset_kwargs": {}}, f)
'''


def _write_repo(root, kind, extra_module=False):
    D_args, D_body, _ = KINDS[kind]
    (root / "dnnlib").mkdir(parents=True)
    (root / "dnnlib" / "__init__.py").write_text("")
    (root / "torch_utils").mkdir()
    (root / "torch_utils" / "__init__.py").write_text("")
    (root / "torch_utils" / "persistence.py").write_text(PERSISTENCE)
    (root / "training").mkdir()
    (root / "training" / "__init__.py").write_text("")
    extra = "import snapshot_extras  # noqa: F401" if extra_module else ""
    (root / "training" / "networks.py").write_text(NETWORKS.format(extra_import=extra, D_args=D_args, D_body=D_body))
    if extra_module:
        (root / "snapshot_extras.py").write_text("")


def _env(repo=None):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if repo is not None:
        env["PYTHONPATH"] = str(repo)
    return dict(env, OMP_NUM_THREADS="1")


def _snapshot(tmp_path, kind, extra_module=False):
    """(repo folder, network-snapshot pickle, the network's outputs on fixed inputs)."""
    repo = tmp_path / f"repo-{kind}"
    _write_repo(repo, kind, extra_module)
    pkl, io = tmp_path / f"network-snapshot-{kind}.pkl", tmp_path / f"io-{kind}.pt"
    done = subprocess.run([sys.executable, "-c", BUILD, str(pkl), str(io)], env=_env(repo), cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return repo, pkl, torch.load(io)


LOAD = '''
import json, sys, torch
from ipfm_fast.checkpoint import load_model
mf = load_model(sys.argv[1], trust_pickle=True)
io = torch.load(sys.argv[2])
out = mf.model(io["x"], io["sigma"])
print(json.dumps({"D": mf.D, "shape": mf.shape, "role": mf.role, "max_err": (out - io["out"]).abs().max().item(),
                  "describe": mf.describe()}))
'''


@pytest.mark.parametrize("kind", list(KINDS))
def test_snapshot_loads_with_its_repository_on_pythonpath(tmp_path, kind):
    repo, pkl, _ = _snapshot(tmp_path, kind)
    io = tmp_path / f"io-{kind}.pt"
    done = subprocess.run([sys.executable, "-c", LOAD, str(pkl), str(io)], env=_env(repo), cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["D"] == KINDS[kind][2] and got["shape"] == [1, 8, 8] and got["role"] == "teacher"
    assert got["max_err"] == 0.0  # the same network, called as EDM calls it (sigma [B])
    assert ("D = unknown" in got["describe"]) == (KINDS[kind][2] is None)


def test_snapshot_without_its_repository_is_a_bad_file_naming_the_module(tmp_path, monkeypatch):
    _, pkl, _ = _snapshot(tmp_path, "pfgmpp")
    for name in [m for m in sys.modules if m.split(".")[0] in ("torch_utils", "dnnlib", "training")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(BadFile) as caught:
        ckpt.load_model(pkl, trust_pickle=True)
    message = str(caught.value)
    assert "'torch_utils'" in message and "put the original repository" in message and "PYTHONPATH" in message
    assert "Newbeeer/pfgmpp" in message
    with pytest.raises(ckpt.PickleRefused, match="execute arbitrary code"):
        ckpt.load_model(pkl)  # refused before anything is unpickled


def test_snapshot_whose_class_source_imports_a_missing_module(tmp_path):
    """The embedded class source is executed on load: its own imports must resolve too."""
    repo, pkl, _ = _snapshot(tmp_path, "pfgmpp", extra_module=True)
    (repo / "snapshot_extras.py").unlink()
    code = textwrap.dedent('''
        import sys
        from ipfm_fast.checkpoint import load_model
        from ipfm_fast.errors import BadFile
        try:
            load_model(sys.argv[1], trust_pickle=True)
        except BadFile as err:
            print("BadFile:", err)
    ''')
    done = subprocess.run([sys.executable, "-c", code, str(pkl)], env=_env(repo), cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "BadFile:" in done.stdout and "'snapshot_extras'" in done.stdout and "PYTHONPATH" in done.stdout


def test_a_file_that_is_not_a_pickle(tmp_path):
    bad = tmp_path / "network-snapshot.pkl"
    bad.write_bytes(b"not a pickle at all")
    with pytest.raises(BadFile, match="not a readable pickle"):
        ckpt.load_model(bad, trust_pickle=True)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """`ipfm-fast distill --teacher network-snapshot.pkl --trust-pickle` with the repository on
    PYTHONPATH, and the same without it: (run folder, the two CompletedProcesses)."""
    tmp_path = tmp_path_factory.mktemp("snapshot-distill")
    repo, pkl, _ = _snapshot(tmp_path, "pfgmpp")
    argv = [sys.executable, "-m", "ipfm_fast", "distill", "--teacher", str(pkl), "--trust-pickle", "--batch", "16",
            "--steps", "2", "--log-every", "1", "--eval-every", "0", "--final-eval-seeds", "0", "--compile", "off",
            "--device", "cpu", "--threads", "1", "--no-progress"]
    out = tmp_path / "d"
    run = lambda env, folder: subprocess.run(argv + ["--out", str(folder)], env=env, cwd=tmp_path,  # noqa: E731
                                             capture_output=True, text=True, timeout=300)
    return out, run(_env(repo), out), run(_env(), tmp_path / "e")


def test_distill_cli_trains_from_a_snapshot(distilled):
    """D (128) and the shape come from the snapshot; the iterations run and the generator is
    written. Without the repository on PYTHONPATH: a one-line error naming the module."""
    out, done, without = distilled
    text = done.stdout + done.stderr
    assert "generator and fake = ExternalDenoiser" in text and "; D = 128," in text, text[-3000:]
    with open(out / "config.json") as f:
        assert json.load(f)["D"] == 128.0  # no --D given: the snapshot's
    with open(out / "log.jsonl") as f:  # the 1x8x8 digits batches ran through the snapshot's network
        assert [json.loads(line)["step"] for line in f] == [1, 2]
    assert (out / "generator.pkl").exists()  # no model config to rebuild it from: pickled with its class
    err = without.stderr.strip()
    assert without.returncode == 2 and err.startswith("ipfm-fast distill: error:") and "\n" not in err, err
    assert "torch_utils" in err and "PYTHONPATH" in err


def test_distill_cli_from_a_snapshot_finishes(distilled):
    _, done, _ = distilled
    assert done.returncode == 0, done.stderr[-3000:]
    out, _, _ = distilled
    with open(out / "summary.json") as f:
        assert json.load(f)["generator"] == str(out / "generator.pkl")
    assert (out / "samples.png").exists() and (out / "generator_last.pkl").exists()


def test_a_generator_distilled_from_a_snapshot_samples_at_one_nfe(distilled, tmp_path):
    """The pickled generator records D, sigma_init and its role; sampling it needs --trust-pickle."""
    out, _, _ = distilled
    repo = out.parent / "repo-pfgmpp"
    argv = [sys.executable, "-m", "ipfm_fast", "sample", "--teacher", str(out), "--num", "4", "--npz",
            str(tmp_path / "s.npz"), "--device", "cpu", "--no-progress"]
    run = lambda extra: subprocess.run(argv + extra, env=_env(repo), cwd=tmp_path, capture_output=True,  # noqa: E731
                                       text=True, timeout=300)
    refused, done = run([]), run(["--trust-pickle"])
    assert refused.returncode == 2 and "--trust-pickle" in refused.stderr, refused.stderr
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 NFE" in done.stdout + done.stderr, done.stdout + done.stderr
    with np.load(tmp_path / "s.npz") as z:
        assert z["x"].shape[0] == 4
