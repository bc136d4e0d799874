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


def test_bench_output_layer_runs_and_prints_json(capsys):
    """Smoke test of benchmarks/bench_output_layer.py: both parts on tiny sizes, TP 2."""
    path = BENCH.parent / "bench_output_layer.py"
    spec = importlib.util.spec_from_file_location("bench_output_layer", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--shapes", "128x1024x32x2", "--dtypes", "fp32", "--repeats", "1", "--json"]
    argv += ["--vocab", "512", "--hidden", "64", "--prompts", "2", "--new-tokens", "4"]
    bench.main(argv)
    out = json.loads(capsys.readouterr().out)
    (row,) = out["cost"]
    assert row["tp"] == 2 and set(row["candidates"]) == {"megatron", "bf16_gopd", "fp32_gopd"}
    assert all(c["time_s"] > 0 for c in row["candidates"].values())
    e = out["error"]
    # the head's bf16 rounding is what the fp32 logits remove: it is there, and measured
    assert e["head"]["max"] > 1e-3 and e["tokens"] == 2 * 4
    for key in ("model_before", "model_after", "mismatch_before", "mismatch_after"):
        assert 0 <= e[key]["mean"] <= e[key]["max"]
