"""Checkpoints: safetensors round trips, atomic writes, the pickle opt-in."""

import os
import pickle

import pytest
import torch

from ipfm_fast import checkpoint as ckpt
from ipfm_fast.models import build_denoiser, model_config
from ipfm_fast.train.common import EMA
from ipfm_fast.train.flat import FlatParams


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one thread is faster


def _model(seed=0):
    torch.manual_seed(seed)
    m = build_denoiser(model_config("mlp", [1, 4, 4], width=16, depth=1))
    for p in m.parameters():
        p.data.normal_(0, 0.2)
    return m


def test_denoiser_roundtrip(tmp_path):
    m = _model()
    cfg = model_config("mlp", [1, 4, 4], width=16, depth=1)
    path = ckpt.save_denoiser(tmp_path / "teacher.safetensors", m, cfg, D=ckpt._encode_D(float("inf")), role="teacher")
    for source in (path, tmp_path):  # the file, or the run folder
        loaded, meta = ckpt.load_denoiser(source)
        assert meta["model"] == cfg and ckpt.decode_D(meta["D"]) == float("inf")
        x, s = torch.randn(3, 1, 4, 4), torch.rand(3) + 0.1
        assert torch.equal(loaded(x, s), m(x, s).detach())
        assert not any(p.requires_grad for p in loaded.parameters())
    assert [f for f in os.listdir(tmp_path) if ".tmp" in f] == []


def test_model_files_get_the_umask_mode_not_safetensors_0600(tmp_path):
    old = os.umask(0o027)
    try:
        path = ckpt.save_denoiser(tmp_path / "teacher.safetensors", _model(), model_config("mlp", [1, 4, 4], width=16,
                                                                                           depth=1))
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o640  # 0o666 & ~0o027: readable by the group sharing the run folder


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    cfg = model_config("mlp", [1, 4, 4], width=16, depth=1)
    path = tmp_path / "teacher.safetensors"
    ckpt.save_denoiser(path, _model(0), cfg)
    before = path.read_bytes()

    import safetensors.torch

    def boom(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_denoiser(path, _model(1), cfg)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["teacher.safetensors"]


def test_training_checkpoint_roundtrip(tmp_path):
    m = _model()
    ema, params = EMA(m, 0.9), FlatParams(m)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    for step in range(3):
        m(torch.randn(4, 1, 4, 4), torch.rand(4) + 0.1).square().mean().backward()
        opt.step()
        ema.update(params, step)
    g = torch.Generator().manual_seed(5)
    torch.randn(3, generator=g)
    cfg = {"model": model_config("mlp", [1, 4, 4], width=16, depth=1), "D": 128.0}
    path = ckpt.save_state(tmp_path / "c.safetensors", modules={"model": m, "ema": ema.model},
                           optimizers={"opt": opt}, rngs={"train": g}, step=3, config=cfg)

    m2 = _model(9)
    ema2 = EMA(m2, 0.9)
    opt2 = torch.optim.Adam(m2.parameters(), lr=5.0)
    g2 = torch.Generator()
    meta = ckpt.load_state(path, modules={"model": m2, "ema": ema2.model}, optimizers={"opt": opt2},
                           rngs={"train": g2}, device="cpu")
    assert meta["step"] == 3 and meta["config"] == cfg
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(ema.state_dict().values(), ema2.state_dict().values()):
        assert torch.equal(a, b)
    assert opt2.param_groups[0]["lr"] == 1e-3
    sa, sb = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(sa[k][n], sb[k][n]) for k in sa for n in sa[k])
    assert torch.equal(torch.randn(4, generator=g), torch.randn(4, generator=g2))
    # the EMA weights of a training checkpoint load as a denoiser
    loaded, _ = ckpt.load_denoiser(path, which="ema")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), ema.state_dict().values()))
    with pytest.raises(ValueError, match="not a training checkpoint"):
        ckpt.save_denoiser(tmp_path / "d.safetensors", m, cfg["model"])
        ckpt.load_state(tmp_path / "d.safetensors", modules={"model": m2, "ema": ema2.model},
                        optimizers={"opt": opt2}, rngs={}, device="cpu")


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        ckpt.load_denoiser(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="without a denoiser file"):
        ckpt.load_denoiser(tmp_path)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="cannot read"):
        ckpt.load_denoiser(tmp_path / "junk.safetensors")


def test_pickle_needs_explicit_trust(tmp_path):
    m = _model()
    pkl = tmp_path / "network-snapshot.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"ema": m, "augment_pipe": None}, f)  # the EDM snapshot layout
    with pytest.raises(ckpt.PickleRefused, match="execute arbitrary code"):
        ckpt.load_denoiser(pkl)
    loaded, meta = ckpt.load_denoiser(pkl, trust_pickle=True)
    x, s = torch.randn(2, 1, 4, 4), torch.rand(2) + 0.1
    torch.testing.assert_close(loaded(x, s), m(x, s).detach())
    assert meta["kind"] == "pickle"
    pt = tmp_path / "net.pt"
    torch.save(m, pt)
    with pytest.raises(ckpt.PickleRefused):
        ckpt.load_denoiser(pt)
    loaded, _ = ckpt.load_denoiser(pt, trust_pickle=True)
    torch.testing.assert_close(loaded(x, 0.5), m(x, 0.5).detach())


def test_generic_state_for_other_loops(tmp_path):
    """save_state/load_state hold any set of modules and optimizers (e.g. distillation's
    generator, its EMA and the fake network), and load_denoiser picks one by name."""
    cfg = model_config("mlp", [1, 4, 4], width=16, depth=1)
    nets = {"generator": _model(1), "generator_ema": _model(2), "fake": _model(3)}
    opts = {"opt_g": torch.optim.Adam(nets["generator"].parameters(), betas=(0.0, 0.999)),
            "opt_f": torch.optim.Adam(nets["fake"].parameters())}
    for name in ("generator", "fake"):
        nets[name](torch.randn(2, 1, 4, 4), 1.0).sum().backward()
    for o in opts.values():
        o.step()
    path = ckpt.save_state(tmp_path / "c.safetensors", modules=nets, optimizers=opts, rngs={},
                           step=7, config={"D": "inf"}, model_cfg=cfg)
    fresh = {k: _model(9) for k in nets}
    fresh_opts = {"opt_g": torch.optim.Adam(fresh["generator"].parameters()),
                  "opt_f": torch.optim.Adam(fresh["fake"].parameters())}
    meta = ckpt.load_state(path, modules=fresh, optimizers=fresh_opts, rngs={}, device="cpu")
    assert meta["step"] == 7 and fresh_opts["opt_g"].param_groups[0]["betas"] == (0.0, 0.999)
    for k in nets:
        assert all(torch.equal(a, b) for a, b in zip(nets[k].state_dict().values(), fresh[k].state_dict().values()))
    g, _ = ckpt.load_denoiser(path, which="generator_ema")
    assert all(torch.equal(a, b) for a, b in zip(g.state_dict().values(), nets["generator_ema"].state_dict().values()))
    ema, _ = ckpt.load_denoiser(path, which="ema")  # the teacher's names pick the generator's weights
    assert all(torch.equal(a, b) for a, b in zip(ema.state_dict().values(), g.state_dict().values()))
    with pytest.raises(ValueError, match="not one of them"):
        ckpt.load_denoiser(path, which="online")
