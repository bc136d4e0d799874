"""Code grading: extract the program from a response, run the problem's tests in the sandbox."""

from __future__ import annotations

import re
from dataclasses import dataclass

from megatron_gopd.evaluation.benchmarks import Problem
from megatron_gopd.evaluation.math_grader import strip_reasoning
from megatron_gopd.evaluation.sandbox import Sandbox

__all__ = ["CodeGrade", "build_program", "extract_code", "grade_code"]

_FENCE = re.compile(r"```[ \t]*([\w+#-]*)[^\n]*\n(.*?)```", re.DOTALL)


@dataclass(frozen=True)
class CodeGrade:
    correct: bool
    status: str  # SandboxResult.status, or "no_code"
    message: str = ""


def extract_code(response: str, entry_point: str | None = None) -> str | None:
    """The program in a response: the last fenced block (preferring python-tagged ones and ones
    that define ``entry_point``), else the whole final answer if it has no fence at all.

    The reasoning (``<think>``) is skipped: code drafted there is not the answer."""
    final = strip_reasoning(response)
    if final is None:
        return None
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(final)]
    if not blocks:
        if "```" in final:  # an unclosed fence: cut off by the token limit
            return None
        return _trim(final)
    python = [b for lang, b in blocks if lang in ("python", "py", "python3")] or [
        b for _, b in blocks
    ]
    if entry_point:
        defining = [b for b in python if re.search(rf"\bdef\s+{re.escape(entry_point)}\s*\(", b)]
        python = defining or python
    return _trim(python[-1])


def _trim(code: str) -> str | None:
    """Drop surrounding blank lines but keep the first line's indent (a bare function body)."""
    code = code.rstrip()
    while code.startswith("\n") or (code.split("\n", 1)[0].strip() == "" and "\n" in code):
        code = code.split("\n", 1)[1]
    return code if code.strip() else None


def build_program(problem: Problem, code: str) -> str:
    """Prefix the prompt when the response only completes the function body (HumanEval style)."""
    if problem.always_prefix:
        return problem.code_prefix + "\n" + code
    if problem.entry_point and not re.search(
        rf"\bdef\s+{re.escape(problem.entry_point)}\s*\(", code
    ):
        return problem.code_prefix + code
    return code


def grade_code(
    sandbox: Sandbox, problem: Problem, response: str, *, test_timeout: float | None = 6.0
) -> CodeGrade:
    """Pass iff every test of the problem passes (stopping at the first failure).

    ``test_timeout``: seconds per test inside the harness (LiveCodeBench's is 6); the sandbox's own
    CPU and wall-clock limits bound the whole run."""
    if problem.tests is None:
        raise ValueError(f"problem {problem.id} has no tests")
    code = extract_code(response, problem.entry_point)
    if code is None:
        return CodeGrade(False, "no_code", "no code block in the response")
    spec = dict(problem.tests, code=build_program(problem, code), timeout=test_timeout)
    res = sandbox.run(spec)
    return CodeGrade(res.passed, res.status, res.message)
