"""Scores, intervals, the comparison table and the plot."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from megatron_gopd.evaluation.metrics import (
    bootstrap_ci,
    paired_bootstrap_ci,
    pass_at_k,
    score_summary,
    standard_error,
)
from megatron_gopd.evaluation.report import Run, comparison, comparison_markdown, main, plot_vs
from megatron_gopd.utils import GopdError


def test_pass_at_k_by_hand():
    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 4, 4) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - (3 * 2) / (4 * 3))  # 1 - C(3,2)/C(4,2) = 0.5
    assert pass_at_k(5, 3, 3) == 1.0  # fewer than k wrong samples
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_score_summary_is_avg_at_k_over_problems():
    # problem A: 1/4 right, problem B: 1/2 right -> avg@k = mean(0.25, 0.5), each problem weighs 1
    s = score_summary([[1, 0, 0, 0], [1, 0]], [10, 20, 30, 40, 50, 60])
    assert s["accuracy"] == pytest.approx(0.375)
    assert s["samples_per_problem"] == [2, 4] and s["pass@1"] == pytest.approx(0.375)
    # pass@2: A = 1 - C(3,2)/C(4,2) = 0.5; B = 1 (only one wrong sample)
    assert s["pass@2"] == pytest.approx((0.5 + 1.0) / 2)
    assert s["mean_response_tokens"] == 35.0
    assert s["stderr"] == pytest.approx(standard_error([0.75, 0.5]))


def test_bootstrap_intervals():
    rng = np.random.default_rng(0)
    means = rng.uniform(size=30)
    lo, hi = bootstrap_ci(means, seed=1)
    assert lo < means.mean() < hi
    assert (lo, hi) == bootstrap_ci(means, seed=1)  # seeded: reproducible reports
    # close to the normal approximation for 30 well-spread problems
    se = standard_error(means)
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)
    # stays in [0, 1] where the normal approximation would not (skewed small benchmark)
    skewed = [0.0] * 27 + [1.0] * 3
    lo, hi = bootstrap_ci(skewed)
    assert lo >= 0.0 and 0.1 - 1.96 * standard_error(skewed) < 0.0
    assert bootstrap_ci([0.5]) == (0.5, 0.5) and all(math.isnan(x) for x in bootstrap_ci([]))
    # paired differences are tighter than two separate intervals when problems vary a lot
    a = rng.uniform(size=40)
    b = np.clip(a - 0.05 + rng.normal(0, 0.01, 40), 0, 1)
    d, (dlo, dhi) = paired_bootstrap_ci(a, b)
    assert dlo > 0 and dhi - dlo < (bootstrap_ci(a)[1] - bootstrap_ci(a)[0]) / 3


def fake_run(name, p, n_problems=12, k=4, tags=None, seed=0) -> Run:
    rng = np.random.default_rng(seed)
    correct = {
        b: {f"q{i}": list(rng.uniform(size=k) < p) for i in range(n_problems)}
        for b in ("aime", "lcb")
    }
    lengths = {b: [int(100 * p) + 10] * (n_problems * k) for b in correct}
    return Run(name, tags or {}, correct, lengths)


def test_comparison_table_and_plot(tmp_path):
    runs = [
        fake_run("base", 0.2, tags={"lambda": 0.0}),
        fake_run("OPD", 0.6, tags={"lambda": 1.0}, seed=1),
        fake_run("ExOPD", 0.7, tags={"lambda": 1.25}, seed=2),
    ]
    cmp = comparison(runs, baseline="base")
    assert cmp["benchmarks"] == ["aime", "lcb"]
    cell = cmp["runs"]["ExOPD"]["aime"]
    assert cell["ci"][0] <= cell["accuracy"] <= cell["ci"][1] and "delta" in cell
    assert "delta" not in cmp["runs"]["base"]["aime"]
    avg = cmp["runs"]["OPD"]["Avg"]
    assert avg["accuracy"] == pytest.approx(
        (cmp["runs"]["OPD"]["aime"]["accuracy"] + cmp["runs"]["OPD"]["lcb"]["accuracy"]) / 2
    )
    md = comparison_markdown(cmp)
    assert md.count("| ExOPD |") == 3 and "Difference to base" in md
    table_lines = [line for line in md.splitlines() if line.startswith("|")]
    for header, sep in zip(table_lines[::4], table_lines[1::4]):
        assert header.count("|") == sep.count("|")  # well-formed markdown tables
    assert "*" in md.split("Difference to base")[1]  # 12 problems, a 50-point gain: significant
    png = plot_vs(cmp, "lambda", tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    with pytest.raises(GopdError, match="fewer than two runs"):
        plot_vs(cmp, "step", tmp_path / "x.png")
    with pytest.raises(GopdError, match="baseline 'nope'"):
        comparison(runs, baseline="nope")
    other = fake_run("other", 0.5, n_problems=11)
    with pytest.raises(GopdError, match="differ in the problems"):
        comparison([runs[0], other], baseline="base")


def test_report_cli_on_evaluation_dirs(tmp_path, capsys):
    for name, p, lam in (("base", 0.2, 0.0), ("ExOPD", 0.7, 1.25)):
        d = tmp_path / name
        (d / "records").mkdir(parents=True)
        run = fake_run(name, p)
        summary = {
            "tags": {"run": name, "lambda": lam},
            "benchmarks": {b: {} for b in run.correct},
        }
        (d / "summary.json").write_text(json.dumps(summary))
        for b, probs in run.correct.items():
            lines = [json.dumps({"problem_id": pid, "correct": bool(c), "response_tokens": 50})
                     for pid, cs in probs.items() for c in cs]  # fmt: skip
            (d / "records" / f"{b}.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "report"
    args = [
        "--run",
        str(tmp_path / "base"),
        "--run",
        f"Ex={tmp_path / 'ExOPD'}",
        "--baseline",
        "base",
    ]
    assert main([*args, "--x", "lambda", "--out", str(out)]) == 0
    assert "| Ex |" in capsys.readouterr().out
    assert (out / "comparison.md").is_file() and (out / "accuracy_length_vs_lambda.png").is_file()
    assert json.loads((out / "comparison.json").read_text())["baseline"] == "base"
    assert main(["--run", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "no summary.json" in capsys.readouterr().err
