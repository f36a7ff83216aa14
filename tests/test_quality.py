"""The score that ranks models: pixel-space FD and KID beside the classifier FD, the paired
interval over sampling seeds, and `ipfm-fast generate` / `evaluate --generator`."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ipfm_fast.metrics import Evaluator, kernel_distance, paired_difference
from ipfm_fast.train.evaluation import generate, iter_generate

from test_distill import tiny_teacher

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def classifier_cache(tmp_path_factory):
    """A folder holding the digits FD classifier (trained once for the module)."""
    from ipfm_fast.data import load_dataset
    from ipfm_fast.metrics import load_or_train_classifier

    folder = tmp_path_factory.mktemp("classifier")
    with torch.random.fork_rng():
        load_or_train_classifier(load_dataset("digits"), folder)
    return folder


def test_kernel_distance_is_unbiased_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    same = [kernel_distance(rng.normal(size=(n, 8)), rng.normal(size=(200, 8))) for n in (50, 400) for _ in range(20)]
    assert abs(np.mean(same)) < 0.01  # zero in expectation whatever the sample counts
    shifted = kernel_distance(rng.normal(size=(300, 8)) + 0.5, rng.normal(size=(300, 8)))
    assert shifted > 10 * np.std(same)


def test_paired_difference_interval():
    a, b = np.array([1.0, 2.0, 3.0, 4.0, 5.0]), np.array([0.9, 2.1, 2.8, 4.0, 4.7])
    mean, (lo, hi) = paired_difference(a, b)
    d = a - b
    half = 2.7764 * d.std(ddof=1) / np.sqrt(5)  # Student t, 4 degrees of freedom
    assert mean == pytest.approx(d.mean()) and lo == pytest.approx(d.mean() - half) and hi == pytest.approx(
        d.mean() + half)
    with pytest.raises(ValueError):
        paired_difference([1.0], [2.0])


def test_pixel_score_separates_the_data_from_a_blurred_copy(classifier_cache):
    """The score space of small images is the pixels: the training split scores the baseline
    exactly, a blurred copy of it (what a slightly-off sampler makes) clearly more, in the KID
    score and in the pixel FD beside it."""
    from ipfm_fast.data import load_dataset

    data = load_dataset("digits")
    ev = Evaluator(data, classifier_cache)
    assert ev.space == "pixels" and ev.score_name == "pixel KID x 1e3"
    train = data.train.floats()
    same = ev.score(train)
    blurred = ev.score(torch.nn.functional.avg_pool2d(train, 3, 1, 1, count_include_pad=False))
    assert same["score"] == pytest.approx(same["baseline_score"])
    assert same["space_fd"] == pytest.approx(same["baseline_space_fd"])
    assert blurred["score"] > same["score"] + 10.0 and blurred["space_fd"] > 1.5 * same["space_fd"]


def test_generate_is_a_function_of_the_seed_alone():
    model, meta = tiny_teacher(3)
    a = generate(model, 23, [1, 8, 8], 128.0, 2.5, seed=4, batch=5)
    b = torch.cat(list(iter_generate(model, 23, [1, 8, 8], 128.0, 2.5, seed=4, batch=23)))
    # the prior draws are the seed's alone; the network's batched matmuls round alike to ~1 ulp
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert torch.equal(a, generate(model, 23, [1, 8, 8], 128.0, 2.5, seed=4, batch=5))  # same seed, same batch
    assert (a - generate(model, 23, [1, 8, 8], 128.0, 2.5, seed=5)).abs().max() > 1e-3


def _cli(*argv):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "ipfm_fast", *map(str, argv)], capture_output=True, text=True,
                          timeout=300, env=env)


def test_generate_and_evaluate_generator_through_the_cli(tmp_path, classifier_cache):
    from ipfm_fast import checkpoint as ckpt
    from ipfm_fast.train.distill import DistillConfig, distill

    from test_distill import TINY

    model, meta = tiny_teacher(1)
    teacher = str(tmp_path / "teacher.safetensors")
    ckpt.save_denoiser(teacher, model, meta["model"], D=128.0, data="digits", role="teacher")
    distill(DistillConfig(teacher=teacher, out=str(tmp_path / "d"), steps=2, **TINY), log=lambda *a: None)
    r = _cli("generate", "--generator", tmp_path / "d", "--num", 30, "--seed", 2, "--batch", 7, "--png",
             tmp_path / "g.png", "--npz", tmp_path / "g.npz", "--folder", tmp_path / "pngs", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "30 images at 1 NFE from sigma_init = 2.5" in r.stdout
    assert len(os.listdir(tmp_path / "pngs")) == 30 and (tmp_path / "g.png").exists()
    with np.load(tmp_path / "g.npz") as f:
        assert f["x"].shape == (30, 8, 8, 1) and json.loads(str(f["meta"]))["nfe"] == 1
    r2 = _cli("generate", "--generator", tmp_path / "d", "--num", 30, "--seed", 2, "--npz", tmp_path / "g2.npz",
              "--device", "cpu")
    with np.load(tmp_path / "g.npz") as f, np.load(tmp_path / "g2.npz") as g:
        # the batch does not change the images (beyond a rounding step of the uint8 quantization)
        assert r2.returncode == 0 and np.abs(f["x"].astype(int) - g["x"].astype(int)).max() <= 1
    r = _cli("generate", "--generator", teacher, "--num", 3, "--png", tmp_path / "t.png", "--device", "cpu")
    assert r.returncode == 2 and "is a teacher, not a generator" in r.stderr
    r = _cli("evaluate", "--generator", tmp_path / "d", "--seeds", 2, "--num", 40, "--device", "cpu",
             "--cache-dir", classifier_cache, "--json", tmp_path / "e.json")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["nfe"] == 1 and res["score_name"] == "pixel KID x 1e3" and len(res["score"]["values"]) == 2
    assert "pixel KID x 1e3 at 1 NFE" in r.stdout
    r = _cli("evaluate", "--generator", teacher, "--device", "cpu")
    assert r.returncode == 2 and "not a generator" in r.stderr
