"""benchmarks/e2e.py runs both loops and writes the fields issue 7 asks for."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import e2e  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_e2e_bench_smoke(tmp_path, capsys):
    out = tmp_path / "distill_step.json"
    result = e2e.main(["--iters", "1", "--rounds", "2", "--warmup", "1", "--batch", "4", "--shape", "1", "4", "4", "--width", "8",
                       "--out", str(out)])
    saved = json.loads(out.read_text())
    for key in ("reference_images_per_s", "ipfm_fast_images_per_s", "speedup", "device", "versions", "date"):
        assert key in saved
    assert saved["speedup"] == pytest.approx(result["speedup"]) and saved["speedup"] > 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("speedup: ")
