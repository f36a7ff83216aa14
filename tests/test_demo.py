"""`ipfm-fast demo` and `ipfm-fast study` end to end with tiny budgets: every artefact is
written, a second demo run reuses the teacher, and --publish copies the results."""

import functools
import json
import math

import pytest
import torch
from PIL import Image

from ipfm_fast import metrics
from ipfm_fast.train.demo import ARTIFACTS, run_demo, run_study

TINY_TEACHER = dict(arch="mlp", width=16, depth=1, batch=32, steps=20, warmup=2)
TINY_DISTILL = dict(batch=32, eval_every=2, eval_samples=200, log_every=1)


def _quiet(*a, **k):
    pass


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    monkeypatch.setattr(metrics, "train_classifier", functools.partial(metrics.train_classifier, steps=20))
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_demo_writes_metrics_report_pictures_and_reuses_the_teacher(tmp_path):
    kw = dict(seeds=2, distill_seconds=None, distill_steps=4, device="cpu", log=_quiet, num_samples=300,
              teacher_overrides=TINY_TEACHER, distill_overrides=TINY_DISTILL)
    m = run_demo(str(tmp_path / "demo"), publish=str(tmp_path / "docs"), **kw)
    for key in ("teacher_fd", "generator_fd", "initial_generator_fd", "data_baseline_fd", "teacher_nfe",
                "generator_nfe", "distill_seconds", "images_per_second", "teacher_fd_std", "generator_fd_std",
                "initial_generator_fd_std", "targets_met", "score_name", "teacher_score", "generator_score",
                "data_baseline_score", "paired_diff_mean", "paired_diff_ci95"):
        assert key in m, key
    lo, hi = m["paired_diff_ci95"]
    assert lo <= m["paired_diff_mean"] <= hi
    assert m["paired_diff_mean"] == pytest.approx(m["generator_score"] - m["teacher_score"])
    assert m["teacher_nfe"] == 35 and m["generator_nfe"] == 1 and not m["teacher_reused"]
    assert all(math.isfinite(m[k]) for k in ("teacher_fd", "generator_fd", "initial_generator_fd"))
    assert len(m["fd_seeds"]["generator"]) == 2 and m["distill_iterations"] == 4
    saved = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert saved["generator_fd"] == m["generator_fd"]
    assert f"{m['generator_fd']:.2f}" in (tmp_path / "demo" / "report.md").read_text()
    for name in ARTIFACTS:
        assert (tmp_path / "docs" / name).exists(), name
        if name.endswith(".png"):
            assert Image.open(tmp_path / "demo" / name).size[0] >= 256
    m2 = run_demo(str(tmp_path / "demo"), **kw)
    assert m2["teacher_reused"] and m2["teacher_fd"] == m["teacher_fd"]


def test_study_writes_table_and_plot(tmp_path):
    res = run_study(str(tmp_path), Ds=(128.0, math.inf), distill_steps=4, distill_seeds=(0, 1), eval_every=2,
                    teacher_seeds=1, device="cpu", log=_quiet, teacher_overrides=TINY_TEACHER,
                    distill_overrides=TINY_DISTILL)
    assert [r["D"] for r in res["rows"]] == [128.0, "inf"]
    assert all(len(run["curve"]) == 3 for r in res["rows"] for run in r["runs"])  # iterations 0, 2, 4
    for name in ("study.json", "study.md", "study.png"):
        assert (tmp_path / name).exists()
    md = (tmp_path / "study.md").read_text()
    assert "| 128 |" in md and "| inf |" in md
