"""Benchmark files in their public formats, and code grading through the sandbox."""

from __future__ import annotations

import base64
import json
import pickle
import zlib
from pathlib import Path

import pytest

from megatron_gopd.evaluation.benchmarks import BenchmarkSpec, load_benchmark, read_rows
from megatron_gopd.evaluation.code_grader import extract_code, grade_code
from megatron_gopd.evaluation.sandbox import Sandbox, SandboxLimits
from megatron_gopd.evaluation.testing import SAMPLES_DIR
from megatron_gopd.utils import GopdError


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(SandboxLimits(cpu_seconds=5, wall_seconds=20, memory_bytes=512 << 20))


def load(fmt: str, name: str):
    return {p.id: p for p in load_benchmark(BenchmarkSpec(name, fmt, str(SAMPLES_DIR / name)))}


def fenced(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\nDone."


def test_math_formats_and_parquet(tmp_path):
    probs = load("math", "math_sample.jsonl")
    assert probs["sample-2"].answer == "\\frac{3}{4}" and "\\boxed{}" in probs["sample-2"].prompt
    hmmt = load("math", "hmmt_style_sample.jsonl")
    assert sorted(hmmt) == ["1", "2"]
    # AIME as published on the hub: parquet with ID / Problem / Answer columns
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    table = pa.table({"ID": ["2024-I-1"], "Problem": ["What is $2+2$?"], "Answer": [4]})
    pq.write_table(table, tmp_path / "aime.parquet")
    (p,) = load_benchmark(BenchmarkSpec.parse(f"aime=math:{tmp_path / 'aime.parquet'}"))
    assert (p.id, p.answer) == ("2024-I-1", "4")
    # MATH-style rows carry a worked solution instead of an answer
    (tmp_path / "m.jsonl").write_text(json.dumps({"problem": "x", "solution": "so $\\boxed{5}$"}))
    assert load_benchmark(BenchmarkSpec("m", "math", str(tmp_path / "m.jsonl")))[0].answer


def test_bad_inputs_give_one_line_errors(tmp_path):
    with pytest.raises(GopdError, match="expected NAME=FORMAT:PATH"):
        BenchmarkSpec.parse("aime24.jsonl")
    with pytest.raises(GopdError, match="unknown format 'maths'"):
        BenchmarkSpec.parse("a=maths:x.jsonl")
    with pytest.raises(GopdError, match="does not exist"):
        read_rows(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1"}\n{oops\n')
    with pytest.raises(GopdError, match=r"bad.jsonl:2: not valid JSON"):
        read_rows(bad)
    bad.write_text('{"problem": "1+1"}\n')
    with pytest.raises(GopdError, match=r"row 0 \(math\): no answer field.*fields: \['problem'\]"):
        load_benchmark(BenchmarkSpec("b", "math", str(bad)))
    bad.write_text('{"task_id": "x", "prompt": "def f(): pass", "entry_point": "f"}\n')
    with pytest.raises(GopdError, match="no tests"):
        load_benchmark(BenchmarkSpec("b", "evalplus", str(bad)))


def test_livecodebench_compressed_cases_and_no_code_execution_from_pickle(tmp_path):
    lcb = load("livecodebench", "livecodebench_sample.jsonl")
    stdin_case = lcb["sample_abc_a"]
    assert (
        stdin_case.tests["kind"] == "stdio" and len(stdin_case.tests["cases"]) == 3
    )  # 1 public + 2 compressed
    assert lcb["sample_running_sum"].tests["kind"] == "functional"
    # a pickle that would call a function on load is refused, not executed
    evil = base64.b64encode(zlib.compress(pickle.dumps(Path("/etc/passwd")))).decode()
    row = {"question_content": "q", "public_test_cases": "[]", "private_test_cases": evil}
    (tmp_path / "evil.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(GopdError, match="refusing to unpickle"):
        load_benchmark(BenchmarkSpec("e", "livecodebench", str(tmp_path / "evil.jsonl")))


def test_code_extraction():
    assert extract_code(fenced("x = 1")) == "x = 1"
    two = "```python\ndef helper(): pass\n```\ntext\n```python\ndef f(x):\n    return x\n```\n```\nf(1)\n```"
    assert extract_code(two, "f").startswith("def f")  # the block that defines the entry point
    assert extract_code("<think>```python\nbad()\n```</think>no code here") == "no code here"
    assert extract_code("<think>still thinking") is None
    assert extract_code("```python\ndef f(x):\n    return") is None  # cut-off fence
    assert (
        extract_code("\n    return a + b\n") == "    return a + b"
    )  # a bare body keeps its indent


def test_evalplus_correct_wrong_and_completion_style(sandbox):
    he = load("evalplus", "humaneval_plus_sample.jsonl")
    add, mean = he["HumanEval/Sample0"], he["HumanEval/Sample1"]
    assert add.tests["kind"] == "io_compare" and len(add.tests["inputs"]) == 4
    assert grade_code(sandbox, add, fenced("def add(a, b):\n    return a + b")).correct
    # completion style: only the body, the prompt is prepended
    assert grade_code(sandbox, add, "    return a + b\n").correct
    wrong = grade_code(sandbox, add, fenced("def add(a, b):\n    return a + b if a < 10**6 else 0"))
    assert (wrong.correct, wrong.status) == (False, "failed")  # fails on a plus input only
    # floats compared within atol
    assert grade_code(
        sandbox, mean, fenced("def mean(xs):\n    return sum(xs) / len(xs) + 1e-9")
    ).correct
    assert not grade_code(
        sandbox, mean, fenced("def mean(xs):\n    return sum(xs) / len(xs) + 1e-3")
    ).correct
    assert grade_code(sandbox, add, "I cannot solve this.").status == "error"
    assert (
        grade_code(sandbox, add, "<think>```python\ndef add(a, b): return a + b").status
        == "no_code"
    )
    mbpp = load("evalplus", "mbpp_plus_sample.jsonl")
    assert grade_code(
        sandbox,
        mbpp["Mbpp/Sample3"],
        fenced("def reverse_words(s):\n    return ' '.join(reversed(s.split()))"),
    ).correct
    assert not grade_code(
        sandbox, mbpp["Mbpp/Sample3"], fenced("def reverse_words(s):\n    return s[::-1]")
    ).correct


def test_mbpp_set_equality_tasks(sandbox, tmp_path):
    row = {
        "task_id": "Mbpp/2",
        "prompt": '"""\nShared elements of two lists.\n"""\n',
        "entry_point": "similar_elements",
        "canonical_solution": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))\n",
        "base_input": [[[3, 4, 5, 6], [5, 7, 4, 10]]],
        "plus_input": [],
    }
    (tmp_path / "m.jsonl").write_text(json.dumps(row) + "\n")
    (p,) = load_benchmark(BenchmarkSpec("m", "evalplus", str(tmp_path / "m.jsonl")))
    assert p.tests["compare"] == "set"
    other_order = (
        "def similar_elements(a, b):\n    return tuple(sorted(set(a) & set(b), reverse=True))"
    )
    assert grade_code(sandbox, p, fenced(other_order)).correct


def test_humaneval_check_function(sandbox, tmp_path):
    row = json.loads((SAMPLES_DIR / "humaneval_plus_sample.jsonl").read_text().splitlines()[0])
    for key in ("base_input", "plus_input", "canonical_solution"):
        row.pop(key)  # original HumanEval: only the check(candidate) test
    (tmp_path / "he.jsonl").write_text(json.dumps(row) + "\n")
    (p,) = load_benchmark(BenchmarkSpec("he", "evalplus", str(tmp_path / "he.jsonl")))
    assert p.tests["kind"] == "script"
    assert grade_code(sandbox, p, fenced("def add(a, b):\n    return a + b")).correct
    assert grade_code(sandbox, p, fenced("def add(a, b):\n    return a * b")).status == "failed"


@pytest.mark.parametrize(
    "solution",
    [
        "a, b = map(int, input().split())\nprint(a + b)",
        "import sys\na, b = map(int, sys.stdin.buffer.read().split())\nsys.stdout.write(f'{a+b}\\n')",
        "def main():\n    a, b = map(int, open(0).read().split())\n    print(a + b)\n\nif __name__ == '__main__':\n    main()",
    ],
)
def test_livecodebench_stdio_reading_styles(sandbox, solution):
    prob = load("livecodebench", "livecodebench_sample.jsonl")["sample_abc_a"]
    assert grade_code(sandbox, prob, fenced(solution)).correct


def test_livecodebench_stdio_and_functional_failures(sandbox):
    lcb = load("livecodebench", "livecodebench_sample.jsonl")
    res = grade_code(
        sandbox, lcb["sample_abc_a"], fenced("a, b = map(int, input().split())\nprint(a - b)")
    )
    assert (res.correct, res.status) == (False, "failed")
    func = lcb["sample_running_sum"]
    good = "class Solution:\n    def runningSum(self, nums: List[int]) -> List[int]:\n        return list(accumulate(nums))"
    assert grade_code(sandbox, func, fenced(good)).correct  # List, accumulate: LCB's prelude
    bad = "class Solution:\n    def runningSum(self, nums):\n        return nums"
    assert grade_code(sandbox, func, fenced(bad)).status == "failed"
    slow = "class Solution:\n    def runningSum(self, nums):\n        while True:\n            pass"
    assert grade_code(sandbox, func, fenced(slow), test_timeout=0.3).status == "timeout"
