"""Smoke test of benchmarks/bench_step.py on a tiny workload (the real benchmark is not a test)."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_step.py"


def test_bench_step_runs_and_reports_both_modes():
    out = subprocess.run(
        [sys.executable, str(BENCH), "--sequences", "10", "--max-len", "96", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout[out.stdout.index("{") :])
    assert report["workload"]["sequences"] == 10
    # packing processes (almost) only real tokens; padding to the longest wastes some
    assert report["packed"]["efficiency_update"] >= 0.95
    assert report["padded"]["efficiency_update"] < report["packed"]["efficiency_update"]
    assert report["packed_vs_padded"]["time_step"] > 0
