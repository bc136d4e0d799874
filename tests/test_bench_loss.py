"""Smoke test of benchmarks/bench_loss.py on a tiny shape (the real benchmark is not a test)."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_loss.py"


def test_bench_loss_runs_and_prints_json(capsys):
    spec = importlib.util.spec_from_file_location("bench_loss", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--shapes", "128x1024x2", "--dtypes", "fp32", "--repeats", "1", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert [(r["tp"], r["dtype"]) for r in out["results"]] == [(2, "fp32")]
    for r in out["results"]:
        assert set(r["ratios"]) == {"gopd", "fdiv", "naive", "gopd_full"}
        for c in r["candidates"].values():
            assert c["time_s"] > 0 and c["peak_bytes"] > 0
