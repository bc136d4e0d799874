"""End to end: a tiny HF model on the shipped sample benchmarks, and the gopd-eval CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from megatron_gopd.evaluation import ChatFormat, EvalConfig, HFGenerator, evaluate, flat_metrics
from megatron_gopd.evaluation.__main__ import main
from megatron_gopd.evaluation.sandbox import Sandbox, SandboxLimits
from megatron_gopd.evaluation.testing import (
    ScriptedGenerator,
    make_tiny_tokenizer,
    sample_benchmark_specs,
)
from megatron_gopd.testing import make_tiny_hf_model

BENCHMARKS = sample_benchmark_specs(hmmt="hmmt", livecodebench="lcb")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny Qwen3 and a byte-level tokenizer saved together, as a HF checkpoint dir."""
    path = tmp_path_factory.mktemp("tiny_model")
    tok = make_tiny_tokenizer(path)
    make_tiny_hf_model(
        path, vocab_size=len(tok), max_position_embeddings=1024, eos_token_id=tok.eos_token_id
    )
    return path, tok


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(SandboxLimits(cpu_seconds=5, wall_seconds=20, memory_bytes=512 << 20))


def records(out: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((out / "records").glob("*.jsonl"))}


def test_tiny_model_deterministic_at_temperature_zero(tiny, sandbox, tmp_path):
    path, tok = tiny
    gen = HFGenerator(path, eos_token_ids=[tok.eos_token_id])
    cfg = EvalConfig(n_samples=2, temperature=0.0, max_new_tokens=6)
    s1 = evaluate(gen, tok, BENCHMARKS, tmp_path / "a", cfg, sandbox=sandbox, tags={"run": "tiny"})
    s2 = evaluate(gen, tok, BENCHMARKS, tmp_path / "b", cfg, sandbox=sandbox, tags={"run": "tiny"})
    r1, r2 = records(tmp_path / "a"), records(tmp_path / "b")
    assert len(r1) == 5 and r1 == r2  # byte-identical records
    rows = [json.loads(line) for line in r1["math.jsonl"].splitlines()]
    assert len(rows) == 4 * 2 and {r["sample_index"] for r in rows} == {0, 1}
    assert all(
        r["response_tokens"] <= 6 and r["prompt"].startswith("<|im_start|>user") for r in rows
    )
    assert rows[0]["response"] == rows[1]["response"]  # greedy: the n samples agree
    for name, b in s1["benchmarks"].items():
        assert b == {**s2["benchmarks"][name], "seconds": b["seconds"]}
        assert 0.0 <= b["ci_low"] <= b["accuracy"] <= b["ci_high"] <= 1.0
    assert (tmp_path / "a" / "summary.md").read_text().count("\n| ") == 5 + 1
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["tags"] == {"run": "tiny"}


def test_sampling_is_seeded(tiny, tmp_path):
    path, tok = tiny
    gen = HFGenerator(path, eos_token_ids=[tok.eos_token_id])
    bench = [BENCHMARKS[0]]
    cfg = EvalConfig(n_samples=3, temperature=1.0, max_new_tokens=5, seed=7)
    evaluate(gen, tok, bench, tmp_path / "a", cfg)
    evaluate(gen, tok, bench, tmp_path / "b", cfg)
    evaluate(
        gen,
        tok,
        bench,
        tmp_path / "c",
        EvalConfig(n_samples=3, temperature=1.0, max_new_tokens=5, seed=8),
    )
    assert records(tmp_path / "a") == records(tmp_path / "b") != records(tmp_path / "c")
    rows = [json.loads(line) for line in records(tmp_path / "a")["math.jsonl"].splitlines()]
    assert len({r["response"] for r in rows[:3]}) > 1  # real sampling: the samples differ


SOLUTIONS = {
    "What is $1+1$": "\\boxed{2}",
    "frac{1}{2}+": "\\boxed{0.75}",
    "x^2 < 4": "\\boxed{(-2,2)}",
    "2^{10}": "\\boxed{24}",
    "sqrt{12}": "\\boxed{10}",
    "sin(": "\\boxed{\\frac12}",
    "def add": "```python\ndef add(a, b):\n    return a + b\n```",
    "def mean": "```python\ndef mean(xs):\n    return sum(xs) / len(xs)\n```",
    "max_of_three": "```python\ndef max_of_three(a, b, c):\n    return max(a, b, c)\n```",
    "reverse_words": "```python\ndef reverse_words(s):\n    return ' '.join(s.split()[::-1])\n```",
    "Print A+B": "```python\nprint(sum(map(int, input().split())))\n```",
    "runningSum": "```python\nclass Solution:\n    def runningSum(self, nums):\n        return list(accumulate(nums))\n```",
}


def oracle(p_right: float):
    """Right with probability p_right (per sample, seeded), else a wrong answer."""

    def respond(prompt: str, j: int, rng) -> str:
        right = next(v for k, v in SOLUTIONS.items() if k in prompt)
        wrong = "\\boxed{-1}" if "boxed{}" in prompt else "```python\nprint(0)\n```"
        return "Let me think. " + (right if rng.random() < p_right else wrong)

    return respond


def test_pipeline_grades_known_answers(tiny, sandbox, tmp_path):
    _, tok = tiny
    cfg = EvalConfig(n_samples=4, temperature=1.0, max_new_tokens=200)
    s = evaluate(
        ScriptedGenerator(tok, oracle(1.0)),
        tok,
        BENCHMARKS,
        tmp_path / "right",
        cfg,
        sandbox=sandbox,
    )
    assert {n: b["accuracy"] for n, b in s["benchmarks"].items()} == dict.fromkeys(
        s["benchmarks"], 1.0
    )
    assert s["benchmarks"]["lcb"]["status_counts"] == {"passed": 8}
    flat = flat_metrics(s)
    assert flat["eval/avg_math/accuracy"] == flat["eval/avg_code/accuracy"] == 1.0
    assert flat["eval/math/accuracy"] == 1.0 and flat["eval/math/samples_per_problem"] == 4
    assert flat["eval/lcb/pass@4"] == 1.0 and "eval/lcb/mean_response_tokens" in flat
    s = evaluate(
        ScriptedGenerator(tok, oracle(0.0)),
        tok,
        BENCHMARKS,
        tmp_path / "wrong",
        cfg,
        sandbox=sandbox,
    )
    assert all(b["accuracy"] == 0.0 for b in s["benchmarks"].values())
    s = evaluate(ScriptedGenerator(tok, oracle(0.5)), tok, BENCHMARKS[:1], tmp_path / "half", cfg)
    b = s["benchmarks"]["math"]
    assert 0.0 < b["accuracy"] < 1.0 and b["ci_low"] < b["accuracy"] < b["ci_high"]
    assert b["pass@1"] == pytest.approx(b["accuracy"]) and b["pass@4"] >= b["pass@1"]
    # a cut-off response is recorded as truncated and has no answer
    s = evaluate(
        ScriptedGenerator(tok, oracle(1.0)),
        tok,
        BENCHMARKS[:1],
        tmp_path / "cut",
        EvalConfig(n_samples=1, max_new_tokens=3),
    )
    assert s["benchmarks"]["math"]["truncated_fraction"] == 1.0
    assert s["benchmarks"]["math"]["no_answer_fraction"] == 1.0


def test_raw_prompts_without_chat_template(tiny, tmp_path):
    _, tok = tiny
    gen = ScriptedGenerator(tok, oracle(1.0))
    evaluate(
        gen,
        tok,
        BENCHMARKS[:1],
        tmp_path,
        EvalConfig(n_samples=1),
        chat=ChatFormat(use_chat_template=False),
    )
    row = json.loads((tmp_path / "records" / "math.jsonl").read_text().splitlines()[0])
    assert row["prompt"].startswith("What is $1+1$?") and row["correct"]


def test_cli(tiny, tmp_path, capsys):
    path, _ = tiny
    argv = [
        "--hf-model",
        str(path),
        "--n-samples",
        "1",
        "--temperature",
        "0",
        "--max-new-tokens",
        "4",
    ]
    argv += ["--benchmark", BENCHMARKS[0], "--benchmark", BENCHMARKS[4], "--limit", "1"]
    argv += ["--output-dir", str(tmp_path / "out"), "--tag", "lambda=1.25", "--tag", "run=ExOPD"]
    assert main(argv) == 0
    assert re.search(r"\| math \| 1 \| 1 \|", capsys.readouterr().out)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["tags"] == {"lambda": 1.25, "run": "ExOPD"}
    assert set(summary["benchmarks"]) == {"math", "lcb"} and summary["sandbox_isolation"]
    # bad input: one line, exit code 2, nothing else
    for bad, msg in [
        (["--benchmark", "x.jsonl"], "expected NAME=FORMAT:PATH"),
        (["--benchmark", f"m=math:{tmp_path / 'nope.jsonl'}"], "does not exist"),
        ([], "no benchmark given"),
        (["--benchmark", BENCHMARKS[0], "--temperature", "-1"], "temperature must be >= 0"),
    ]:
        assert main(["--hf-model", str(path), "--output-dir", str(tmp_path / "x"), *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and err.count("\n") == 1, err
    out = ["--output-dir", str(tmp_path / "y"), "--benchmark", BENCHMARKS[0]]
    for model_args, msg in [
        (["--hf-model", str(tmp_path / "missing")], "cannot load a tokenizer"),
        ([], "exactly one of --hf-model DIR, --load MCORE and --rollout-urls"),
        (["--hf-model", str(path), "--rollout-urls", "http://127.0.0.1:1"], "exactly one of"),
        (["--rollout-urls", "http://127.0.0.1:1"], "--rollout-urls needs --tokenizer"),
    ]:
        assert main([*model_args, *out]) == 2
        assert msg in capsys.readouterr().err


def _convert(hf_dir, out_dir):
    from megatron_gopd.convert.checkpoint import convert_hf_to_megatron

    convert_hf_to_megatron(hf_dir, out_dir)


def _eval_main(argv):
    return main(argv)


def test_load_a_megatron_checkpoint_gives_the_hf_models_results(tiny, tmp_path):
    """gopd-eval --load MCORE exports the checkpoint and evaluates it: same records as --hf-model
    on the model it was converted from (greedy)."""
    from megatron_gopd.testing import run_distributed

    path, _ = tiny
    run_distributed(_convert, 1, str(path), str(tmp_path / "mcore"))
    common = [
        "--n-samples",
        "1",
        "--temperature",
        "0",
        "--max-new-tokens",
        "4",
        "--benchmark",
        BENCHMARKS[0],
        "--limit",
        "2",
    ]
    assert main(["--hf-model", str(path), "--output-dir", str(tmp_path / "hf"), *common]) == 0
    # in a forked rank: the export sets up (and tears down) a process group of one
    (rc,) = run_distributed(
        _eval_main,
        1,
        ["--load", str(tmp_path / "mcore"), "--output-dir", str(tmp_path / "mc"), *common],
    )
    assert rc == 0
    assert (tmp_path / "mc" / "model_hf" / "config.json").is_file()
    assert records(tmp_path / "mc") == records(tmp_path / "hf")
