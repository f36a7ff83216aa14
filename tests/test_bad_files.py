"""Bad files are refused in one line, never half-read: a truncated or corrupted
checkpoint.safetensors / teacher.safetensors / config.json / summary.json, a checkpoint that
does not fit the run, NaN weights, and .npz files that are damaged or hold NaN/Inf after
loading. Each case goes through the CLI (``ipfm_fast.cli.main`` in this process, one through
a real subprocess for the exit code): exit 2 and one line ``ipfm-fast <command>: error: ...``
naming the file and the problem; a traceback (any other exception) fails the test."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ipfm_fast import checkpoint as ckpt
from ipfm_fast._files import read_json
from ipfm_fast.cli import main
from ipfm_fast.errors import BadFile, CannotWrite, MissingFile
from ipfm_fast.models import build_denoiser, model_config
from ipfm_fast.sampling import read_npz_meta, save_npz
from ipfm_fast.train.distill import DistillConfig, distill
from ipfm_fast.train.evaluation import final_evaluation
from ipfm_fast.train.teacher import TeacherConfig, train_teacher

pytestmark = pytest.mark.usefixtures("one_thread")

RUNTIME = ["--device", "cpu", "--threads", "1", "--no-progress"]


def _quiet(*a, **k):
    pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny digits teacher run and a distillation of it (each test corrupts a copy)."""
    root = tmp_path_factory.mktemp("bad-files")
    kw = dict(arch="mlp", width=16, depth=1, batch=16, steps=4, log_every=2, eval_samples=0, eval_steps=2,
              device="cpu", threads="1")
    with torch.random.fork_rng():
        train_teacher(TeacherConfig(out=str(root / "teacher"), **kw), log=_quiet)
        distill(DistillConfig(teacher=str(root / "teacher"), out=str(root / "distill"), batch=16, steps=2,
                              log_every=1, eval_every=0, device="cpu", threads="1", compile="off"), log=_quiet)
    return root


def copy_run(runs, name, tmp_path):
    return shutil.copytree(runs / name, tmp_path / name)


def cli_error(capsys, command, *argv):
    """Runs ``ipfm-fast COMMAND ARGV`` in this process; returns its one error line (exit 2)."""
    capsys.readouterr()
    code = main([command, *map(str, argv)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith(f"ipfm-fast {command}: error:") and "\n" not in err, err
    return err


def says(err, *words):
    for w in words:
        assert w.lower() in err.lower(), (w, err)


# --------------------------------------------------------------------------------------
# damaging a safetensors file
# --------------------------------------------------------------------------------------


def data_start(path):
    """Offset of the first tensor byte (after the 8-byte length and the JSON header)."""
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def truncate(path, keep=0.6):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: int(len(data) * keep)])


def flip_tensor_byte(path, where=0.5):
    """One byte of the tensor data changed: the header still parses and the size fits, so
    only a checksum can tell."""
    data = bytearray(open(path, "rb").read())
    start = data_start(path)
    i = start + int((len(data) - start) * where)
    data[i] ^= 0x40
    open(path, "wb").write(bytes(data))


def edit_metadata(path, old, new):
    """A same-length edit inside the ipfm_fast metadata (valid JSON either way)."""
    data = open(path, "rb").read()
    assert len(old) == len(new) and data.count(old) >= 1, old
    open(path, "wb").write(data.replace(old, new, 1))


def without_digests(path, meta_json=None):
    """Rewrites ``path`` as the code before digests wrote it (tensors + the ipfm_fast JSON
    only); ``meta_json`` replaces that JSON."""
    tensors, meta = ckpt.read(path, finite=False)
    save_file(tensors, path, metadata={ckpt.META_KEY: meta_json if meta_json is not None else json.dumps(meta)})


# --------------------------------------------------------------------------------------
# checkpoint.safetensors
# --------------------------------------------------------------------------------------


def test_truncated_checkpoint_is_refused_on_resume(runs, tmp_path, capsys):
    run = copy_run(runs, "teacher", tmp_path)
    truncate(run / "checkpoint.safetensors")
    err = cli_error(capsys, "train-teacher", "--out", run, "--resume", *RUNTIME)
    says(err, "checkpoint.safetensors", "truncated")


def test_corrupted_checkpoint_tensors_are_refused_on_resume(runs, tmp_path, capsys):
    for name, argv in (("teacher", ["train-teacher", "--out"]), ("distill", ["distill", "--out"])):
        run = copy_run(runs, name, tmp_path)
        before = (run / "checkpoint.safetensors").read_bytes()
        flip_tensor_byte(run / "checkpoint.safetensors")
        err = cli_error(capsys, argv[0], *argv[1:], run, "--resume", *RUNTIME)
        says(err, "checkpoint.safetensors", "corrupted", "tensors do not match the sha-256")
        assert (run / "checkpoint.safetensors").read_bytes() != before  # refused, not rewritten
        assert not (run / "teacher.safetensors").exists() or name == "teacher"


def test_corrupted_checkpoint_metadata_is_refused(runs, tmp_path, capsys):
    run = copy_run(runs, "teacher", tmp_path)
    edit_metadata(run / "checkpoint.safetensors", b'\\"step\\": 4', b'\\"step\\": 9')  # still valid JSON
    err = cli_error(capsys, "train-teacher", "--out", run, "--resume", *RUNTIME)
    says(err, "checkpoint.safetensors", "corrupted", "metadata")
    with pytest.raises(BadFile, match="metadata does not match"):
        ckpt.read_meta(run / "checkpoint.safetensors")


def test_checkpoint_without_digests_still_resumes_and_bad_json_is_one_line(runs, tmp_path, capsys):
    """Files written before the digests existed are read as before; their broken metadata
    JSON (nothing else can catch it) is a BadFile, not a JSONDecodeError."""
    run = copy_run(runs, "teacher", tmp_path)
    without_digests(run / "checkpoint.safetensors")
    assert main(["train-teacher", "--out", str(run), "--resume", "--steps", "6", *RUNTIME]) == 0
    assert ckpt.read_meta(run / "checkpoint.safetensors")["step"] == 6
    without_digests(run / "checkpoint.safetensors", meta_json='{"kind": "training", "step": ')
    err = cli_error(capsys, "train-teacher", "--out", run, "--resume", *RUNTIME)
    says(err, "checkpoint.safetensors", "not valid JSON")


def test_checkpoint_of_another_network_is_refused_naming_the_part(runs, tmp_path):
    """State that does not fit the modules (a checkpoint of another width) is a BadFile
    naming the file and the module, not torch's RuntimeError."""
    run = copy_run(runs, "teacher", tmp_path)
    net = build_denoiser(model_config("mlp", [1, 8, 8], width=24, depth=1))
    opt = torch.optim.Adam(net.parameters())
    with pytest.raises(BadFile, match=r"checkpoint\.safetensors.*the weights of 'model' do not fit"):
        ckpt.load_state(run / "checkpoint.safetensors", modules={"model": net}, optimizers={"opt": opt},
                        rngs={}, device="cpu")


def test_a_checkpoint_that_does_not_read_back_never_replaces_the_old_one(tmp_path, monkeypatch):
    """Each write is re-opened and checked against the digests of the tensors in memory
    before the rename: a file damaged on its way to the disk leaves the previous one."""
    import safetensors.torch

    net = build_denoiser(model_config("mlp", [1, 4, 4], width=8, depth=1))
    path = tmp_path / "teacher.safetensors"
    ckpt.save_denoiser(path, net, model_config("mlp", [1, 4, 4], width=8, depth=1))
    before = path.read_bytes()
    real = safetensors.torch.save_file

    def damaging(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        flip_tensor_byte(filename, where=0.3)

    monkeypatch.setattr(safetensors.torch, "save_file", damaging)
    with torch.no_grad():
        next(net.parameters()).add_(1.0)
    with pytest.raises(CannotWrite, match="does not read back intact"):
        ckpt.save_denoiser(path, net, model_config("mlp", [1, 4, 4], width=8, depth=1))
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["teacher.safetensors"]


def test_truncated_checkpoint_exits_2_in_a_real_process(runs, tmp_path):
    run = copy_run(runs, "distill", tmp_path)
    truncate(run / "checkpoint.safetensors", keep=0.3)
    r = subprocess.run([sys.executable, "-m", "ipfm_fast", "distill", "--out", str(run), "--resume", *RUNTIME],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    err = r.stderr.strip()
    assert r.returncode == 2 and "Traceback" not in err and "\n" not in err, err
    says(err, "ipfm-fast distill: error:", "checkpoint.safetensors", "truncated")


# --------------------------------------------------------------------------------------
# teacher.safetensors
# --------------------------------------------------------------------------------------


def test_truncated_or_corrupted_teacher_is_refused(runs, tmp_path, capsys):
    run = copy_run(runs, "teacher", tmp_path)
    teacher = run / "teacher.safetensors"
    good = teacher.read_bytes()
    for damage, words in ((truncate, ["truncated"]), (flip_tensor_byte, ["corrupted", "tensors"])):
        teacher.write_bytes(good)
        damage(teacher)
        err = cli_error(capsys, "sample", "--teacher", teacher, "--num", "4", "--steps", "2", "--png",
                        tmp_path / "s.png", *RUNTIME)
        says(err, "teacher.safetensors", *words)
        err = cli_error(capsys, "distill", "--teacher", run, "--out", tmp_path / "d", "--steps", "1",
                        "--eval-every", "0", "--final-eval-seeds", "0", *RUNTIME)
        says(err, "teacher.safetensors", *words)
    assert not (tmp_path / "s.png").exists()


def test_teacher_with_nan_weights_is_refused(runs, tmp_path, capsys):
    model, meta = ckpt.load_denoiser(runs / "teacher")
    with torch.no_grad():
        next(model.parameters()).view(-1)[3] = float("nan")
    path = ckpt.save_denoiser(tmp_path / "teacher.safetensors", model, meta["model"], D=meta["D"], role="teacher")
    err = cli_error(capsys, "sample", "--teacher", path, "--num", "4", "--png", tmp_path / "s.png", *RUNTIME)
    says(err, "teacher.safetensors", "NaN/Inf", "diverged")


def test_a_model_that_makes_nan_samples_writes_no_npz(runs, tmp_path, capsys):
    """Finite weights whose output overflows: `sample --npz` refuses to write NaN samples
    (a NaN has no uint8 value: the file would hold arbitrary images)."""
    model, meta = ckpt.load_denoiser(runs / "teacher")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1e30)
    path = ckpt.save_denoiser(tmp_path / "teacher.safetensors", model, meta["model"], D=meta["D"], role="teacher")
    err = cli_error(capsys, "sample", "--teacher", path, "--num", "4", "--steps", "2", "--npz", tmp_path / "s.npz",
                    *RUNTIME)
    says(err, "samples hold NaN/Inf", "s.npz not written")
    assert not (tmp_path / "s.npz").exists()


# --------------------------------------------------------------------------------------
# config.json and summary.json
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "empty", "not-utf8", "a-list"])
def test_damaged_config_json_is_one_line(runs, tmp_path, capsys, damage):
    teacher = copy_run(runs, "teacher", tmp_path)
    config = teacher / "config.json"
    text = config.read_text()
    config.write_bytes({"truncated": text[: len(text) // 2].encode(), "empty": b"", "not-utf8": b"\xff\xfe{",
                        "a-list": b"[1, 2]"}[damage])
    want = {"truncated": "not valid JSON", "empty": "is empty", "not-utf8": "not UTF-8",
            "a-list": "expected a JSON object"}[damage]
    err = cli_error(capsys, "demo", "--teacher-dir", teacher, "--out", tmp_path / "demo", "--device", "cpu",
                    "--no-progress")  # the demo reuses a cached teacher by its config.json
    says(err, "config.json", want, "delete")
    run = copy_run(runs, "distill", tmp_path)
    (run / "config.json").write_bytes(config.read_bytes())
    with pytest.raises(BadFile, match=rf"config.json.*{want}"):
        final_evaluation(str(run), seeds=1, device="cpu")


def test_damaged_summary_json_is_one_line(runs, tmp_path, capsys):
    teacher = copy_run(runs, "teacher", tmp_path)
    (teacher / "summary.json").write_text('{"steps": 4, "train_seconds": 0.')
    err = cli_error(capsys, "demo", "--teacher-dir", teacher, "--out", tmp_path / "demo", "--device", "cpu",
                    "--no-progress")
    says(err, "summary.json", "not valid JSON")


def test_read_json_names_a_missing_file(tmp_path):
    with pytest.raises(MissingFile, match="nope.json does not exist"):
        read_json(tmp_path / "nope.json", what="config")


# --------------------------------------------------------------------------------------
# .npz files: data and samples
# --------------------------------------------------------------------------------------


def _images(n=40):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 8, 8), dtype=np.uint8)


def test_samples_with_nan_after_loading_are_refused(tmp_path, capsys):
    """`sample --npz` writes uint8 x and float x_float; NaN in x_float means the uint8
    images are arbitrary: evaluate refuses the file instead of scoring it."""
    x_float = np.zeros((40, 1, 8, 8), np.float32)
    x_float[7, 0, 3, 3] = np.nan
    x_float[9, 0, 0, 0] = np.inf
    np.savez(tmp_path / "s.npz", x=_images()[..., None], x_float=x_float)
    err = cli_error(capsys, "evaluate", "--samples", tmp_path / "s.npz", "--device", "cpu")
    says(err, "s.npz[x_float]", "2 NaN/Inf", "sample 7", "non-finite")
    assert not list(tmp_path.glob("fd_classifier-*"))  # refused before any work


def test_save_npz_refuses_non_finite_samples(tmp_path):
    x = torch.zeros(5, 1, 8, 8)
    x[2, 0, 1, 1] = float("nan")
    with pytest.raises(BadFile, match=r"1 of 5 samples hold NaN/Inf.*model m\.safetensors.*not written"):
        save_npz(tmp_path / "s.npz", x, model="m.safetensors")
    assert not (tmp_path / "s.npz").exists()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_data_npz_of_floats_with_nan_is_refused(tmp_path, capsys, dtype):
    x = _images().astype(dtype) / 255.0
    x[3, 2, 2] = np.nan
    np.savez(tmp_path / "data.npz", x=x)
    err = cli_error(capsys, "train-teacher", "--data", tmp_path / "data.npz", "--out", tmp_path / "t", *RUNTIME)
    says(err, "data.npz[x]", "must be uint8", "NaN/Inf")


def _damaged_member(path, key):
    """An .npz whose member ``key`` is damaged inside the zip (its CRC no longer matches)."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = z.getinfo(f"{key}.npy")
    data = bytearray(open(path, "rb").read())
    name_len, extra_len = (int.from_bytes(data[info.header_offset + o: info.header_offset + o + 2], "little")
                           for o in (26, 28))
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.compress_size - 5] ^= 0xFF  # near the end: past the .npy header
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("compressed", [False, True])
def test_damaged_data_npz_is_one_line(tmp_path, capsys, compressed):
    (np.savez_compressed if compressed else np.savez)(tmp_path / "data.npz", x=_images(), y=np.arange(40) % 3)
    _damaged_member(tmp_path / "data.npz", "x")
    err = cli_error(capsys, "train-teacher", "--data", tmp_path / "data.npz", "--out", tmp_path / "t", *RUNTIME)
    says(err, "data.npz[x]", "truncated or damaged")
    np.savez(tmp_path / "cut.npz", x=_images())
    truncate(tmp_path / "cut.npz", keep=0.5)
    err = cli_error(capsys, "train-teacher", "--data", tmp_path / "cut.npz", "--out", tmp_path / "t2", *RUNTIME)
    says(err, "cut.npz", "cannot read as .npz")


def test_damaged_samples_npz_is_one_line(tmp_path, capsys):
    save_npz(tmp_path / "s.npz", torch.rand(40, 1, 8, 8) * 2 - 1, data="digits", seed=0)
    assert read_npz_meta(tmp_path / "s.npz")["data"] == "digits"
    for key, words in (("x", ["s.npz[x]", "truncated or damaged"]), ("meta", ["s.npz[meta]", "damaged"])):
        save_npz(tmp_path / "s.npz", torch.rand(40, 1, 8, 8) * 2 - 1, data="digits", seed=0)
        _damaged_member(tmp_path / "s.npz", key)
        err = cli_error(capsys, "evaluate", "--samples", tmp_path / "s.npz", "--device", "cpu")
        says(err, *words)


def test_a_model_file_in_place_of_the_checkpoint_is_one_line(runs, tmp_path, capsys):
    run = copy_run(runs, "teacher", tmp_path)
    shutil.copy(run / "teacher.safetensors", run / "checkpoint.safetensors")
    with pytest.raises(BadFile, match="not a training file"):
        ckpt.read_meta(run / "checkpoint.safetensors", kind="training")
    err = cli_error(capsys, "train-teacher", "--out", run, "--resume", *RUNTIME)
    says(err, "checkpoint.safetensors", "not a training")
