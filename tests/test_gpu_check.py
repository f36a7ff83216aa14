"""benchmarks/gpu_check.sh --dry-run: every stage's plumbing on a CPU machine (tiny sizes,
a handful of tests per pytest step), the files it leaves in $OUT, and a stage killed by its
timeout reported as such while the stages before it stay packed."""

import json
import os
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
STAGES = list("ABCDEFGH")
COMMITTED = os.path.join(ROOT, "benchmarks", "results")


def _gpu_check(out, **env):
    e = {k: v for k, v in os.environ.items() if not k.startswith(("STAGES", "TIMEOUT_", "BUDGET_S", "GPU_CHECK"))}
    e.update(OUT=str(out), PYTHON=sys.executable, **env)
    return subprocess.run(["bash", SCRIPT, "--dry-run"], cwd=ROOT, env=e, capture_output=True, text=True,
                          timeout=600)


def _snapshot(folder):
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(folder) for f in files}


def _members(out):
    with tarfile.open(out / "results.tar.gz") as tar:
        return set(tar.getnames())


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_out")
    before = _snapshot(COMMITTED)
    done = _gpu_check(out)
    return out, done, before


def test_dry_run_runs_every_stage(dry_run):
    out, done, before = dry_run
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    files = sorted(os.listdir(out))
    assert files == ["gpu_check.log", "results.tar.gz", "summary.json"] and len(files) <= 6
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] and summary["finished"] and summary["ok"]
    assert [s["stage"] for s in summary["stages"]] == STAGES
    for s in summary["stages"]:
        assert s["status"] == "ok", s
        assert s["rc"] == 0 and s["seconds"] >= 0 and s["steps"] and s["title"] and s["expected"]
    env = summary["env"]
    for key in ("torch", "python", "triton", "date", "cuda_runtime", "gpu"):
        assert key in env, key
    # the pytest steps wrote junit reports with their counts; stage B ran real tests
    tests = {s["stage"]: [st["tests"] for st in s["steps"] if st.get("tests")] for s in summary["stages"]}
    assert tests["B"][0]["passed"] >= 3 and tests["B"][0]["failures"] == 0
    assert tests["C"] and tests["D"][0]["passed"] >= 1
    # the stage table is printed last
    assert "all selected stages ok: True" in done.stdout


def test_dry_run_packs_logs_junit_and_results(dry_run):
    out, done, before = dry_run
    names = _members(out)
    for path in ("gpu_check/summary.json", "gpu_check/env.json", "gpu_check/info.json", "gpu_check/gpu_check.log",
                 "gpu_check/logs/A_info.log", "gpu_check/logs/B_tests.log", "gpu_check/junit/B_tests.xml",
                 "gpu_check/junit/C_tests.xml", "gpu_check/junit/D_bench.xml", "gpu_check/logs/G_profile.log"):
        assert path in names, path
    results = {os.path.basename(n) for n in names if n.startswith("gpu_check/results/")}
    assert {"perturb.json", "perturb.md", "distill_step_eager.json", "distill_step_graph.json",
            "distill_profile.json", "distill_profile.md", "distill_step.json"} <= results
    # the committed CPU results are left alone
    assert _snapshot(COMMITTED) == before


def test_a_stage_killed_by_its_timeout_is_reported_and_earlier_stages_stay_packed(tmp_path):
    done = _gpu_check(tmp_path, STAGES="A B G", TIMEOUT_B="1")
    assert done.returncode == 1, done.stdout[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    status = {s["stage"]: s["status"] for s in summary["stages"]}
    assert status == {"A": "ok", "B": "timeout", "C": "skipped", "D": "skipped", "E": "skipped", "F": "skipped",
                      "G": "ok", "H": "skipped"}
    b = next(s for s in summary["stages"] if s["stage"] == "B")
    assert b["rc"] in (124, 137) and "timeout" in b["steps"][0]["note"]
    names = _members(tmp_path)
    assert {"gpu_check/logs/A_info.log", "gpu_check/logs/A_check.log", "gpu_check/logs/B_tests.log",
            "gpu_check/logs/G_profile.log"} <= names
    assert len(os.listdir(tmp_path)) <= 6
