"""Benchmarks from local files in their public formats, with the format declared by the user.

Formats (``NAME=FORMAT:PATH`` on the command line; ``.jsonl``, ``.json`` or ``.parquet``):

- ``math``: one problem per row with a problem field (``problem`` / ``question`` / ``Problem`` /
  ``prompt``) and an answer field (``answer`` / ``Answer`` / ``final_answer``, or a MATH-style
  ``solution`` ending in ``\\boxed{}``): AIME24/25 and HMMT25 as published, MATH-500.
- ``evalplus``: HumanEval+ / MBPP+ rows (``task_id``, ``prompt``, ``entry_point``, and either
  ``canonical_solution`` + ``base_input``/``plus_input`` [+ ``atol``] for EvalPlus's differential
  testing, or a ``test`` (HumanEval ``check(candidate)``) / ``test_list`` (MBPP asserts)).
- ``livecodebench``: ``code_generation_lite`` rows (``question_content``, ``starter_code``,
  ``public_test_cases`` and ``private_test_cases`` as JSON strings, the private ones possibly
  zlib+base64+pickle-compressed as released, ``metadata`` with ``func_name`` for LeetCode problems).

Prompts follow the usual templates of each benchmark (the math one asks for the answer in
``\\boxed{}``, which the grader requires). The paper's sample counts are the defaults: 32 per math
problem, 4 per code problem.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_gopd.utils import GopdError, read_text_file

__all__ = [
    "DEFAULT_N_SAMPLES",
    "FORMATS",
    "BenchmarkSpec",
    "Problem",
    "load_benchmark",
    "read_rows",
]

FORMATS = ("math", "evalplus", "livecodebench")
DEFAULT_N_SAMPLES = {"math": 32, "evalplus": 4, "livecodebench": 4}  # the paper's settings

MATH_PROMPT = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
EVALPLUS_PROMPT = (
    "Please provide a self-contained Python script that solves the following problem in a "
    "markdown code block:\n```python\n{prompt}\n```"
)
LCB_PROMPT = (
    "You will be given a question (problem specification) and will generate a correct Python "
    "program that matches the specification and passes all tests.\n\nQuestion: {question}\n\n"
)
LCB_STARTER = (
    "You will use the following starter code to write the solution to the problem and enclose "
    "your code within delimiters.\n```python\n{starter}\n```\n\n"
)
LCB_STDIN = (
    "Read the inputs from stdin solve the problem and write the answer to stdout (do not directly "
    "test on the sample inputs). Enclose your code within delimiters as follows. Ensure that when "
    "the python program runs, it reads the inputs, runs the algorithm and writes output to "
    "STDOUT.\n```python\n# YOUR CODE HERE\n```\n\n"
)
LCB_ANSWER = "Answer: (use the provided format with backticks)\n\n"
# LiveCodeBench's harness runs solutions after a block of stdlib imports; LeetCode solutions
# rely on it (``List``, ``defaultdict`` ... without importing them).
LCB_PRELUDE = (
    "from typing import *\nfrom collections import *\nfrom functools import *\n"
    "from itertools import *\nfrom heapq import *\nfrom bisect import *\n"
    "import math, sys, re, string, random, heapq, bisect, itertools, functools, collections\n"
)

# MBPP+ tasks whose outputs EvalPlus compares as sets, or only as "is not None" (the reference
# returns one valid answer among several)
MBPP_SET_EQ_TASKS = frozenset(
    ("similar_elements", "find_char_long", "common_in_nested_lists", "extract_singly",
     "larg_nnum", "intersection_array", "find_dissimilar", "Diff")
)  # fmt: skip
MBPP_NOT_NONE_TASKS = frozenset(("check_str", "text_match_three", "text_starta_endb"))

_PROBLEM_KEYS = ("problem", "question", "Problem", "Question", "prompt")
_ANSWER_KEYS = ("answer", "Answer", "final_answer", "expected_answer")
_SOLUTION_KEYS = ("solution", "Solution")
_ID_KEYS = ("id", "ID", "problem_id", "problem_idx", "unique_id", "task_id", "question_id", "idx")


@dataclass(frozen=True)
class BenchmarkSpec:
    """What to evaluate: a name (the report's row), a declared format, a local file."""

    name: str
    format: str
    path: str
    n_samples: int | None = None  # None: the format's default (DEFAULT_N_SAMPLES)
    limit: int | None = None  # first N problems only (smoke runs)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise GopdError(
                f"benchmark {self.name!r}: unknown format {self.format!r} (one of {', '.join(FORMATS)})"
            )

    @classmethod
    def parse(cls, text: str) -> BenchmarkSpec:
        """``NAME=FORMAT:PATH`` (``aime24=math:data/aime24.parquet``) or ``FORMAT:PATH``."""
        name, sep, rest = text.partition("=")
        if not sep:
            name, rest = "", text
        fmt, sep, path = rest.partition(":")
        if not sep or not path:
            raise GopdError(
                f"--benchmark {text!r}: expected NAME=FORMAT:PATH, e.g. aime24=math:aime24.jsonl"
            )
        return cls(name=name or Path(path).stem, format=fmt, path=path)

    @property
    def domain(self) -> str:
        return "math" if self.format == "math" else "code"

    def samples(self, override: int | None) -> int:
        return override or self.n_samples or DEFAULT_N_SAMPLES[self.format]


@dataclass
class Problem:
    """One benchmark problem: the user message, and what grading needs.

    ``answer`` is the gold answer (math). ``tests`` is the harness spec without the candidate's
    code (code; see ``_harness.py``); ``code_prefix`` is prepended to a completion that does not
    define the entry point itself (HumanEval completion style) or always (LiveCodeBench imports).
    """

    id: str
    prompt: str
    domain: str
    answer: str | None = None
    tests: dict[str, Any] | None = None
    entry_point: str | None = None
    code_prefix: str = ""
    always_prefix: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``.jsonl``, ``.json`` (a list) or ``.parquet`` file, as dicts."""
    p = Path(path)
    if not p.is_file():
        raise GopdError(f"benchmark file {p} does not exist")
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise GopdError(
                "reading parquet needs pyarrow: pip install 'megatron_gopd[eval]'"
            ) from e
        try:
            return pq.read_table(p).to_pylist()
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise GopdError(f"benchmark file {p} is not a readable parquet file: {e}") from None
    text = read_text_file(p, "benchmark file")
    if suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise GopdError(f"benchmark file {p} is not valid JSON ({e})") from None
        if not isinstance(rows, list):
            raise GopdError(f"{p}: expected a JSON list of problems")
        return rows
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise GopdError(f"{p}:{lineno}: not valid JSON ({e.msg})") from None
    return rows


def load_benchmark(spec: BenchmarkSpec) -> list[Problem]:
    rows = read_rows(spec.path)
    if spec.limit:
        rows = rows[: spec.limit]
    if not rows:
        raise GopdError(f"benchmark {spec.name!r}: {spec.path} has no problems")
    parse = {"math": _math_problem, "evalplus": _evalplus_problem, "livecodebench": _lcb_problem}
    problems = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise GopdError(f"{spec.path} row {i}: expected an object, got {type(row).__name__}")
        try:
            problems.append(parse[spec.format](row, i))
        except _RowError as e:
            raise GopdError(
                f"{spec.path} row {i} ({spec.format}): {e}; fields: {sorted(row)}"
            ) from None
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        raise GopdError(f"benchmark {spec.name!r}: duplicate problem ids in {spec.path}")
    return problems


class _RowError(ValueError):
    pass


def _first(row: dict, keys: tuple[str, ...], what: str, *, required: bool = True):
    for k in keys:
        if row.get(k) not in (None, ""):
            return row[k]
    if required:
        raise _RowError(f"no {what} field (looked for {', '.join(keys)})")
    return None


def _row_id(row: dict, index: int) -> str:
    value = _first(row, _ID_KEYS, "id", required=False)
    return str(index if value is None else value)


def _math_problem(row: dict, index: int) -> Problem:
    problem = _first(row, _PROBLEM_KEYS, "problem")
    answer = _first(row, _ANSWER_KEYS, "answer", required=False)
    if answer is None:
        solution = _first(row, _SOLUTION_KEYS, "", required=False)
        if solution is None:
            raise _RowError(
                f"no answer field (looked for {', '.join(_ANSWER_KEYS + _SOLUTION_KEYS)})"
            )
        if "\\boxed" not in str(solution) and "\\fbox" not in str(solution):
            raise _RowError("no answer field, and the solution has no \\boxed{} answer")
        answer = solution
    return Problem(
        id=_row_id(row, index),
        prompt=MATH_PROMPT.format(problem=str(problem).strip()),
        domain="math",
        answer=str(answer),
    )


def _evalplus_problem(row: dict, index: int) -> Problem:
    for key in ("prompt", "entry_point"):
        if not row.get(key):
            raise _RowError(f"missing {key!r}")
    prompt, entry = str(row["prompt"]), str(row["entry_point"])
    inputs = list(row.get("base_input") or []) + list(row.get("plus_input") or [])
    if isinstance(row.get("base_input"), str):  # some exports keep the input lists as JSON text
        inputs = json.loads(row["base_input"]) + json.loads(row.get("plus_input") or "[]")
    if inputs and row.get("canonical_solution"):
        tests = {
            "kind": "io_compare",
            "reference": prompt + str(row["canonical_solution"]),
            "inputs": inputs,
            "atol": float(row.get("atol") or 0.0),
            "entry_point": entry,
            "compare": "exact",
        }
        if str(row.get("task_id", "")).startswith("Mbpp/"):
            if entry in MBPP_SET_EQ_TASKS:
                tests["compare"] = "set"
            elif entry in MBPP_NOT_NONE_TASKS:
                tests["compare"] = "not_none"
    elif row.get("test"):
        test = str(row["test"])
        if "def check(" in test:
            test += f"\n\ncheck({entry})\n"
        tests = {"kind": "script", "test": test, "entry_point": entry}
    elif row.get("test_list"):
        setup = str(row.get("test_setup_code") or "")
        tests = {
            "kind": "script",
            "test": setup + "\n" + "\n".join(row["test_list"]),
            "entry_point": entry,
        }
    else:
        raise _RowError(
            "no tests (need canonical_solution + base_input/plus_input, test, or test_list)"
        )
    return Problem(
        id=_row_id(row, index),
        prompt=EVALPLUS_PROMPT.format(prompt=prompt.strip()),
        domain="code",
        tests=tests,
        entry_point=entry,
        code_prefix=prompt,
    )


class _NoGlobalsUnpickler(pickle.Unpickler):
    """LiveCodeBench pickles plain strings; anything that names a class or function is refused
    (unpickling an untrusted file could otherwise run code)."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def _decode_cases(value: Any) -> list[dict]:
    if value in (None, ""):
        return []
    if isinstance(value, list):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        pass
    try:
        raw = zlib.decompress(base64.b64decode(value))
        obj = _NoGlobalsUnpickler(io.BytesIO(raw)).load()
    except (ValueError, zlib.error, pickle.UnpicklingError, EOFError) as e:
        raise _RowError(f"test cases are neither JSON nor LiveCodeBench-compressed ({e})") from None
    return json.loads(obj) if isinstance(obj, (str, bytes)) else obj


def _lcb_problem(row: dict, index: int) -> Problem:
    question = _first(row, ("question_content", "question", "problem"), "question_content")
    cases = _decode_cases(row.get("public_test_cases")) + _decode_cases(
        row.get("private_test_cases")
    )
    if not cases:
        raise _RowError("no test cases")
    meta = row.get("metadata") or {}
    if isinstance(meta, str):
        meta = json.loads(meta) if meta.strip() else {}
    starter = str(row.get("starter_code") or "")
    functional = any(c.get("testtype") == "functional" for c in cases)
    if functional:
        if not meta.get("func_name"):
            raise _RowError("functional test cases but no metadata.func_name")
        tests = {"kind": "functional", "func_name": meta["func_name"]}
    else:
        tests = {"kind": "stdio"}
    tests["cases"] = [{"input": str(c["input"]), "output": str(c["output"])} for c in cases]
    prompt = LCB_PROMPT.format(question=str(question).strip())
    prompt += LCB_STARTER.format(starter=starter) if starter.strip() else LCB_STDIN
    return Problem(
        id=str(row.get("question_id") or _row_id(row, index)),
        prompt=prompt + LCB_ANSWER,
        domain="code",
        tests=tests,
        code_prefix=LCB_PRELUDE,
        always_prefix=True,
        metadata={k: str(row[k]) for k in ("platform", "difficulty", "contest_date") if k in row},
    )
