"""CLI smoke tests with tiny budgets, --help everywhere, and clear errors."""

import json
import pickle
import subprocess
import sys

import pytest
import torch

from ipfm_fast.cli import COMMANDS, main

TINY = ["--width", "16", "--depth", "1", "--batch", "16", "--steps", "4", "--log-every", "2", "--device", "cpu",
        "--no-progress"]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """One FD classifier for the module (the cache file is keyed on the data, so copying it
    into a run folder makes that run reuse it)."""
    from ipfm_fast.data import load_dataset
    from ipfm_fast.metrics import load_or_train_classifier

    cache = tmp_path_factory.mktemp("fd-cache")
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        _, info = load_or_train_classifier(load_dataset("digits"), cache)
    return info["cached"]


def _seed_cache(folder, classifier):
    import os
    import shutil

    os.makedirs(folder, exist_ok=True)
    shutil.copy(classifier, folder)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one thread is faster


@pytest.mark.parametrize("name", [c[0] for c in COMMANDS])
def test_help_on_every_command(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0 and "usage: ipfm-fast" in capsys.readouterr().out


def test_python_m_help():
    out = subprocess.run([sys.executable, "-m", "ipfm_fast", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for name in ("train-teacher", "sample", "evaluate"):
        assert name in out.stdout


def test_train_sample_evaluate(tmp_path, capsys, classifier):
    run = tmp_path / "run"
    assert main(["train-teacher", "--out", str(run), "--D", "inf", "--eval-samples", "0", *TINY]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and (run / "teacher.safetensors").exists()
    assert main(["train-teacher", "--out", str(run), "--resume", *TINY[:-5], "--steps", "6", "--no-progress",
                 "--eval-samples", "0"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert main(["sample", "--teacher", str(run), "--num", "12", "--steps", "2", "--png", str(tmp_path / "g.png"),
                 "--npz", str(tmp_path / "s.npz"), "--device", "cpu", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "D = inf" in out and "parameters" in out and (tmp_path / "g.png").exists()
    cache = tmp_path / "cache"
    _seed_cache(cache, classifier)
    assert main(["evaluate", "--samples", str(tmp_path / "s.npz"), "--cache-dir", str(cache), "--device", "cpu",
                 "--json", str(tmp_path / "a.json")]) == 0
    res = json.loads((tmp_path / "a.json").read_text())
    assert res["n"] == 12 and res["baseline_fd"] > 0 and "fd" in res
    assert main(["evaluate", "--teacher", str(run), "--seeds", "2", "--num", "20", "--steps", "2", "--cache-dir",
                 str(cache), "--device", "cpu", "--json", str(tmp_path / "b.json")]) == 0
    res = json.loads((tmp_path / "b.json").read_text())
    assert len(res["fd"]["values"]) == 2 and res["nfe"] == 3 and res["D"] == "inf"
    assert "data baseline" in capsys.readouterr().out


def test_train_with_eval_writes_grid(tmp_path, capsys, classifier):
    run = tmp_path / "run"
    _seed_cache(run, classifier)
    assert main(["train-teacher", "--out", str(run), "--eval-samples", "30", "--eval-steps", "2", *TINY]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval"]["nfe"] == 3 and summary["eval"]["baseline_fd"] > 0 and (run / "samples.png").exists()
    assert list(run.glob("fd_classifier-*.safetensors"))


@pytest.mark.parametrize("argv,message", [
    (["train-teacher", "--data", "/no/such/folder", "--out", "{tmp}/r"], "does not exist"),
    (["train-teacher", "--target", "field", "--ref-batch", "4", "--out", "{tmp}/r"], "ref-batch"),
    (["train-teacher", "--device", "cuda" if not torch.cuda.is_available() else "cuda:99", "--out", "{tmp}/r"], "cuda"),
    (["train-teacher", "--resume", "--out", "{tmp}/empty"], "no checkpoint"),
    (["sample", "--teacher", "{tmp}/missing", "--png", "{tmp}/x.png"], "does not exist"),
    (["sample", "--teacher", "{tmp}", "--png", "{tmp}/x.png"], "without a denoiser file"),
    (["sample", "--teacher", "{tmp}/net.pkl", "--png", "{tmp}/x.png"], "--trust-pickle"),
    (["evaluate", "--samples", "{tmp}/none.npz"], "does not exist"),
])
def test_clear_errors(tmp_path, capsys, argv, message):
    with open(tmp_path / "net.pkl", "wb") as f:
        pickle.dump({"ema": torch.nn.Identity()}, f)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if argv[0] == "train-teacher":
        argv = argv[:1] + TINY + ["--eval-samples", "0"] + argv[1:]  # the tested flags come last and win
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"ipfm-fast {argv[0]}: error:" in err and message.lower() in err.lower()


@pytest.mark.parametrize("argv", [
    ["train-teacher", "--D", "-3"], ["train-teacher", "--D", "abc"], ["train-teacher", "--steps", "0"],
    ["sample", "--teacher", "x", "--num", "-1"], ["evaluate"], ["nonsense"],
])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "error" in capsys.readouterr().err


def test_sample_needs_an_output(tmp_path, capsys):
    assert main(["sample", "--teacher", str(tmp_path)]) == 2
    assert "--png" in capsys.readouterr().err


def test_npz_data_without_labels(tmp_path, capsys):
    """A user's .npz (no labels): trains, and the FD falls back to random features."""
    import numpy as np

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "imgs.npz", x=rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8))
    run = tmp_path / "run"
    assert main(["train-teacher", "--data", str(tmp_path / "imgs.npz"), "--out", str(run), "--eval-samples", "20",
                 "--eval-steps", "2", "--test-fraction", "0.25", *TINY]) == 0
    ev = json.loads((run / "summary.json").read_text())["eval"]
    assert ev["features"] == "random" and ev["n_test"] == 10 and ev["baseline_fd"] >= 0
    assert "30 train / 10 test images of 3x8x8, no labels" in capsys.readouterr().out


def test_device_index_is_checked(monkeypatch, capsys):
    """--device cuda:N with N >= the device count: one line and exit code 2, not a CUDA error."""
    from ipfm_fast.errors import InvalidInput
    from ipfm_fast.train import common

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert common.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(InvalidInput, match=r"2 CUDA device\(s\) here \(cuda:0 \.\. cuda:1\)"):
        common.resolve_device("cuda:2")
    with pytest.raises(InvalidInput, match="must be cpu, cuda, cuda:N or auto"):
        common.resolve_device("tpu")
    assert main(["sample", "--teacher", "x", "--png", "x.png", "--device", "cuda:7"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ipfm-fast sample: error: --device cuda:7:") and "\n" not in err


def test_only_the_projects_errors_become_one_line(monkeypatch, capsys):
    """A user's mistake (an IpfmError) is one line with exit code 2; any other exception is a
    bug and keeps its traceback, even a ValueError."""
    from ipfm_fast import cli
    from ipfm_fast.errors import InvalidInput

    def boom(exc):
        def handler(args):
            raise exc
        return handler

    monkeypatch.setattr(cli, "COMMANDS", [("info", cli.add_info, boom(InvalidInput("bad value")))])
    assert main(["info"]) == 2
    assert capsys.readouterr().err == "ipfm-fast info: error: bad value\n"
    monkeypatch.setattr(cli, "COMMANDS", [("info", cli.add_info, boom(ValueError("a bug")))])
    with pytest.raises(ValueError, match="a bug"):
        main(["info"])
