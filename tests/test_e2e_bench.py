"""benchmarks/e2e.py runs both loops and writes the fields issue 7 asks for;
benchmarks/profile_step.py splits an iteration into its parts."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import e2e  # noqa: E402
import profile_step  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def test_e2e_bench_smoke(tmp_path, capsys):
    out = tmp_path / "distill_step.json"
    result = e2e.main(["--iters", "1", "--rounds", "2", "--warmup", "1", "--batch", "4", "--shape", "1", "4", "4", "--width", "8",
                       "--compile", "off", "--out", str(out)])
    saved = json.loads(out.read_text())
    for key in ("reference_images_per_s", "ipfm_fast_images_per_s", "speedup", "device", "versions", "date",
                "reference_peak_memory_mb", "ipfm_fast_peak_memory_mb", "ipfm_fast_host_syncs_per_iteration"):
        assert key in saved
    assert saved["speedup"] == pytest.approx(result["speedup"]) and saved["speedup"] > 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("speedup: ")


def test_profile_breakdown(tmp_path, capsys):
    out = tmp_path / "distill_profile.json"
    r = profile_step.main(["--iters", "2", "--warmup", "1", "--rounds", "3", "--batch", "8", "--shape", "1", "8", "8",
                           "--width", "16", "--compile", "off", "--out", str(out)])
    assert json.loads(out.read_text())["shares"] == r["shares"]
    assert set(r["shares"]) == set(profile_step.CATEGORIES)
    assert sum(r["shares"].values()) == pytest.approx(1.0)
    assert all(r["shares"][k] > 0 for k in ("networks", "ipfm_fast ops", "optimizer + EMA"))
    # (no ordering of the shares: on a tiny network under a loaded machine it is noise)
    clock = r["clock_ms_per_iteration"]  # the same parts by the clock alone: they add up to the iteration
    assert set(clock) == {"ipfm_fast ops", "networks", "backward (networks and ops)", "optimizer + EMA", "rest",
                          "iteration"}
    assert all(clock[k] > 0 for k in ("ipfm_fast ops", "networks", "backward (networks and ops)", "optimizer + EMA"))
    parts = sum(v for k, v in clock.items() if k != "iteration")
    assert parts == pytest.approx(clock["iteration"], rel=0.25)  # (medians of each part: not an exact sum)
    assert (tmp_path / "distill_profile.md").read_text().count("\n| ") == 7
    assert "networks" in capsys.readouterr().out


def test_compare_checkouts_runs_each_variant_in_its_processes(tmp_path, capsys):
    """The tree against itself as a "checkout" (and without the host-memory policy): one
    process per variant per alternation, the parts and the paired change reported."""
    import compare_checkouts

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "checkouts.json"
    r = compare_checkouts.main(["--compile", "off", "--checkout", f"self={root}", "--default-memory",
                                "--alternations", "2", "--iters", "2", "--rounds", "2", "--warmup", "1", "--batch", "4",
                                "--shape", "1", "4", "4", "--width", "8", "--threads", "1", "--out", str(out)])
    assert [n for n, _ in r["variants"]] == ["self", "now", "now, default memory"]
    assert all(len(runs) == 2 for runs in r["runs"].values())
    for runs in r["runs"].values():
        for parts in runs:
            assert parts["non-network"] == pytest.approx(parts["ipfm_fast ops"] + parts["optimizer + EMA"]
                                                         + parts["rest"])
    assert set(r["paired_non_network_change"]) == {"now", "now, default memory"}
    assert json.loads(out.read_text())["table"].keys() == r["table"].keys()
    assert "| non-network against self" in (tmp_path / "checkouts.md").read_text()
    with pytest.raises(SystemExit):
        compare_checkouts.main(["--compile", "off", "--checkout", "nowhere"])  # NAME=DIR expected


def test_host_memory_bench_reports_faults_and_adam_per_layout(tmp_path):
    import bench_host_memory

    out = tmp_path / "host_memory.json"
    r = bench_host_memory.main(["--alternations", "1", "--warmup", "1", "--iters", "2", "--rounds", "1", "--calls", "1",
                                "--threads", "1", "--out", str(out)])
    assert set(r["faults"]) == {"keep", "default"} and all(len(v) == 1 for v in r["faults"].values())
    assert all(x["ms_per_iteration"] > 0 and x["faults_per_iteration"] >= 0 for v in r["faults"].values() for x in v)
    assert set(r["adam"]) == {"4 KiB pages", "huge pages"} and all(t["min_us"] > 0 for t in r["adam"].values())
    assert "| torch fused Adam" in (tmp_path / "host_memory.md").read_text()
