"""Teacher training: the loss goes down, resume is bit-identical, targets and D = inf."""

import json
import math

import pytest
import torch

from ipfm_fast import checkpoint as ckpt
from ipfm_fast.data import load_dataset
from ipfm_fast.models import build_denoiser
from ipfm_fast.train import common
from ipfm_fast.train.teacher import TeacherConfig, teacher_loss, train_teacher
from ipfm_fast.train.flat import FlatParams

TINY = dict(arch="mlp", width=32, depth=1, batch=32, warmup=5, eval_samples=0, log_every=5, device="cpu")


def _quiet(*a, **k):
    pass


def _fixed_loss(model, cfg, n=256):
    """The training objective on a fixed draw (same x, sigma, noise for every model)."""
    x = load_dataset("digits").train.floats()[:n]
    rng = common.make_rng("cpu", 1234)
    with torch.no_grad():
        return float(teacher_loss(model, x, cfg, rng)[0])


def test_tiny_run_lowers_the_loss(tmp_path):
    cfg = TeacherConfig(out=str(tmp_path), steps=150, lr=3e-3, **TINY)
    summary = train_teacher(cfg, log=_quiet)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        init = build_denoiser(cfg.model)
    trained, meta = ckpt.load_denoiser(tmp_path)
    before, after = _fixed_loss(init, cfg), _fixed_loss(trained, cfg)
    assert after < 0.6 * before, (before, after)
    assert meta["role"] == "teacher" and ckpt.decode_D(meta["D"]) == 128.0
    lines = [json.loads(s) for s in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(5, 151, 5))
    assert all(r["images_per_second"] > 0 and math.isfinite(r["loss"]) for r in lines)
    assert summary["parameters"] > 0 and json.loads((tmp_path / "summary.json").read_text())["steps"] == 150
    assert json.loads((tmp_path / "config.json").read_text())["model"]["arch"] == "mlp"


def _tensors(path):
    return ckpt.read(path)[0]


@pytest.mark.parametrize("target", ["x", "field"])
def test_resume_is_bit_identical(tmp_path, target):
    kw = dict(TINY, steps=12, checkpoint_every=6, log_every=3, target=target, ref_batch=48)
    train_teacher(TeacherConfig(out=str(tmp_path / "full"), **kw), log=_quiet)
    train_teacher(TeacherConfig(out=str(tmp_path / "split"), **dict(kw, steps=6)), log=_quiet)
    # the resumed run takes its recipe from the checkpoint: a different lr here is ignored
    train_teacher(TeacherConfig(out=str(tmp_path / "split"), **dict(kw, lr=1.0)), resume=True, log=_quiet)
    a, b = _tensors(tmp_path / "full" / "checkpoint.safetensors"), _tensors(tmp_path / "split" / "checkpoint.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("opt/optim/") for k in a) and "rng/train" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log_full = [json.loads(s)["loss"] for s in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    log_split = [json.loads(s)["loss"] for s in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert log_full == log_split


def test_d_inf_and_field_target_train(tmp_path):
    s = train_teacher(TeacherConfig(out=str(tmp_path / "inf"), D=math.inf, steps=3, **TINY), log=_quiet)
    assert s["D"] == "inf"
    _, meta = ckpt.read(tmp_path / "inf" / "teacher.safetensors")
    assert meta["D"] == "inf"
    train_teacher(TeacherConfig(out=str(tmp_path / "f"), target="field", ref_batch=64, steps=3, **TINY), log=_quiet)
    unet = dict(TINY, arch="unet", width=8)
    train_teacher(TeacherConfig(out=str(tmp_path / "u"), steps=2, **unet), log=_quiet)
    model, meta = ckpt.load_denoiser(tmp_path / "u")
    assert meta["model"]["arch"] == "unet" and model(torch.zeros(2, 1, 8, 8), 1.0).shape == (2, 1, 8, 8)


def test_field_target_is_close_to_x_at_small_sigma():
    from ipfm_fast import reference

    x = load_dataset("digits").train.floats()[:64]
    ref = torch.cat([x, load_dataset("digits").test.floats()[:64]])
    sigma = torch.full((64,), 0.01)
    y = reference.perturb(x, sigma, 128.0)
    torch.testing.assert_close(reference.field_target(y, sigma, ref, 128.0), x, atol=1e-4, rtol=0)


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="ref-batch"):
        train_teacher(TeacherConfig(out=str(tmp_path), target="field", ref_batch=8, **TINY), log=_quiet)
    with pytest.raises(ValueError, match="target"):
        train_teacher(TeacherConfig(out=str(tmp_path), target="score", **TINY), log=_quiet)
    with pytest.raises(ValueError, match="D must be"):
        train_teacher(TeacherConfig(out=str(tmp_path), D=-1.0, **TINY), log=_quiet)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_teacher(TeacherConfig(out=str(tmp_path / "none"), **TINY), resume=True, log=_quiet)


@pytest.mark.gpu
def test_cuda_bf16_run_and_sampling(tmp_path):
    """On a GPU: bf16 autocast training, checkpoint, resume and sampling on the device."""
    from ipfm_fast.sampling import sample

    kw = dict(TINY, device="cuda", precision="bf16", steps=6, checkpoint_every=3)
    s = train_teacher(TeacherConfig(out=str(tmp_path), **dict(kw, steps=3)), log=_quiet)
    assert s["precision"] == "bf16" and s["device"].startswith("cuda")
    train_teacher(TeacherConfig(out=str(tmp_path), **kw), resume=True, log=_quiet)
    model, _ = ckpt.load_denoiser(tmp_path, device="cuda")
    x = sample(model, 8, [1, 8, 8], 128.0, seed=0, steps=2, device="cuda",
               autocast=lambda: common.autocast(torch.device("cuda"), "bf16"))
    assert x.is_cuda and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert torch.equal(x, sample(model, 8, [1, 8, 8], 128.0, seed=0, steps=2, device="cuda",
                                 autocast=lambda: common.autocast(torch.device("cuda"), "bf16")))


def test_ema_warmup_and_decay():
    m = torch.nn.Linear(2, 2)
    ema = common.EMA(m, 0.99)
    assert ema.beta(0) == pytest.approx(0.1) and ema.beta(10**6) == 0.99
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(FlatParams(m), 0)
    torch.testing.assert_close(ema.model.weight, 0.1 * (m.weight - 1.0) + 0.9 * m.weight)


def test_training_steps_build_no_tensor_from_host_data(tmp_path):
    """A teacher step makes no blocking host-to-device copy (the batch indices are sliced
    from a device copy of the epoch's permutation): more steps, no more such calls."""
    from test_distill import HostCopies

    counts = []
    for steps in (2, 7):  # batch 32 of 1,437 images: within the first epoch
        with HostCopies() as mode:
            train_teacher(TeacherConfig(out=str(tmp_path / str(steps)), steps=steps, **TINY), log=_quiet)
        counts.append(len(mode.calls))
    assert counts[0] == counts[1], mode.calls


def test_batch_order_matches_batch_indices():
    n, b = 10, 4
    order = common.BatchOrder(b, n, 3)
    for step in range(7):  # crosses epochs 0 -> 1 -> 2
        assert torch.equal(order(step), common.batch_indices(step, b, n, seed=3))


def test_batch_indices_are_epoch_permutations():
    n, b = 10, 4
    idx = torch.cat([common.batch_indices(s, b, n, seed=3) for s in range(5)])  # 20 = two epochs
    assert sorted(idx[:10].tolist()) == list(range(10)) and sorted(idx[10:].tolist()) == list(range(10))
    assert torch.equal(common.batch_indices(3, b, n, seed=3), idx[12:16])
