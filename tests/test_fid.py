"""`ipfm-fast evaluate --fid`: FID/KID in the FID Inception features through torch-fidelity.
torch-fidelity imports torchvision, which does not load beside this project's pinned CPU
torch, so these tests run in the separate environment `make test-fid` builds (torch 2.14.1
+ torchvision 0.29.1 + torch-fidelity, from requirements-fid.txt); in the main environment
only the clear error for a missing torch-fidelity is tested. The weights are randomly
initialised with the FID network's architecture: the wiring is under test, not the number."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

try:
    import torch_fidelity  # noqa: F401

    HAVE_FIDELITY, FIDELITY_ERROR = True, None
except Exception as e:  # ImportError, or torchvision failing to load beside this torch
    HAVE_FIDELITY, FIDELITY_ERROR = False, e

needs_fidelity = pytest.mark.skipif(not HAVE_FIDELITY, reason="torch-fidelity not importable here (make test-fid)")


def _cli(*argv):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-m", "ipfm_fast", *map(str, argv)], capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small RGB data set (.npz), the same images as samples, a shifted copy, and random
    FID-Inception weights."""
    root = tmp_path_factory.mktemp("fid")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    np.savez(root / "data.npz", x_train=x[:32], x_test=x[32:])
    np.savez(root / "same.npz", x=x[:32])
    np.savez(root / "shifted.npz", x=np.clip(x[:32].astype(int) + 80, 0, 255).astype(np.uint8))
    if HAVE_FIDELITY:
        from torch_fidelity import feature_extractor_inceptionv3 as fe

        load = torch.nn.Module.load_state_dict
        torch.nn.Module.load_state_dict = lambda self, *a, **k: None  # keep the random initialisation
        try:
            fe.load_state_dict_from_url = lambda *a, **k: None
            torch.manual_seed(0)
            net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
        finally:
            torch.nn.Module.load_state_dict = load
        for m in net.modules():  # variance-preserving weights: PyTorch's default init fades to ~0 over ~90 layers
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        torch.save(net.state_dict(), root / "inception.pth")
    return root


@needs_fidelity
def test_fid_is_zero_for_the_reference_images_and_grows_with_a_shift(files):
    common = ["--data", files / "data.npz", "--inception-weights", files / "inception.pth", "--device", "cpu",
              "--no-progress"]
    r = _cli("evaluate", "--fid", "--samples", files / "same.npz", "--save-ref", files / "ref.npz",
             "--json", files / "same.json", *common)
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    same = json.loads((files / "same.json").read_text())
    assert abs(same["fid"]) < 1e-3 and same["kid"] is not None and abs(same["kid"]) < 1e-3
    with np.load(files / "ref.npz") as ref:
        assert ref["mu"].shape == (2048,) and ref["sigma"].shape == (2048, 2048)
    r = _cli("evaluate", "--fid", "--samples", files / "shifted.npz", "--fid-ref", files / "ref.npz",
             "--json", files / "shifted.json", *common)
    assert r.returncode == 0, r.stderr[-3000:]
    shifted = json.loads((files / "shifted.json").read_text())
    assert shifted["fid"] > 1e3 * max(abs(same["fid"]), 1e-9) and shifted["fid"] > 1e-3
    assert shifted["kid"] is None  # reference statistics only: no KID
    assert "FID:" in r.stdout


@needs_fidelity
def test_fid_refuses_a_bad_reference_and_foreign_weights(files, tmp_path):
    np.savez(tmp_path / "bad_ref.npz", mu=np.zeros(3))
    torch.save({"not": torch.zeros(1)}, tmp_path / "foreign.pth")
    common = ["--samples", files / "same.npz", "--data", files / "data.npz", "--device", "cpu", "--no-progress"]
    r = _cli("evaluate", "--fid", "--fid-ref", tmp_path / "bad_ref.npz", "--inception-weights",
             files / "inception.pth", *common)
    assert r.returncode == 2 and "mu [2048]" in r.stderr and "Traceback" not in r.stderr
    r = _cli("evaluate", "--fid", "--inception-weights", tmp_path / "foreign.pth", *common)
    assert r.returncode == 2 and "not the FID Inception weights" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(not os.environ.get("IPFM_FAST_REQUIRE_FIDELITY"), reason="only where FID must be tested")
def test_fidelity_loads_where_fid_is_tested():
    """`make test-fid` sets IPFM_FAST_REQUIRE_FIDELITY: there a broken torch-fidelity /
    torchvision install fails the suite instead of skipping every FID test."""
    assert HAVE_FIDELITY, f"torch-fidelity does not import: {FIDELITY_ERROR!r}"


@needs_fidelity
def test_fid_of_a_generator(files, tmp_path):
    """`evaluate --generator RUN --fid`: the generator's 1-NFE samples at its own shape, against
    statistics computed from --data; the reference is the same with or without a generator."""
    from ipfm_fast import checkpoint as ckpt
    from ipfm_fast.models import build_denoiser, model_config

    cfg = model_config("mlp", [3, 16, 16], width=16, depth=1)
    torch.manual_seed(0)
    ckpt.save_denoiser(str(tmp_path / "generator.safetensors"), build_denoiser(cfg).eval(), cfg, D=128.0,
                       sigma_init=2.5, data="data.npz", role="generator")
    r = _cli("evaluate", "--generator", tmp_path, "--fid", "--num", 24, "--data", files / "data.npz",
             "--inception-weights", files / "inception.pth", "--device", "cpu", "--no-progress",
             "--json", tmp_path / "g.json")
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    res = json.loads((tmp_path / "g.json").read_text())
    assert res["fid"] > 1e-3 and res["fid_samples"] == 24 and res["role"] == "generator"
    assert "one-step generator (sigma_init 2.5)" in r.stdout and "FID:" in r.stdout


@pytest.mark.skipif(HAVE_FIDELITY, reason="torch-fidelity is installed here")
def test_fid_without_torch_fidelity_is_one_clear_line(files):
    r = _cli("evaluate", "--fid", "--samples", files / "same.npz", "--data", files / "data.npz",
             "--inception-weights", files / "data.npz", "--device", "cpu")
    assert r.returncode == 2 and "torch-fidelity" in r.stderr and "Traceback" not in r.stderr


def test_fid_needs_the_weights_file(files):
    r = _cli("evaluate", "--fid", "--samples", files / "same.npz", "--data", files / "data.npz", "--device", "cpu",
             "--inception-weights", files / "missing.pth")
    assert r.returncode == 2 and ("does not exist" in r.stderr or "torch-fidelity" in r.stderr)
