"""Math answer checking: extract the final ``\\boxed{}`` answer, compare with ``math-verify``.

Equivalence is decided by HuggingFace's ``math-verify`` (LaTeX -> SymPy, then numeric and symbolic
comparison: ``\\frac12`` = ``0.5`` = ``2/4``, intervals, sets, ``\\sqrt{12}`` = ``2\\sqrt3``, units
and ``\\text{}`` stripped, ``073`` = ``73``) rather than string matching, which both over- and
under-counts on AIME/HMMT-style answers.

Extraction is ours and deliberately strict, as the paper's prompt asks for the answer "within
\\boxed{}": the *last* ``\\boxed{...}`` (or ``\\fbox``) of the final answer, i.e. after the last
``</think>`` when the model thinks; a response still inside ``<think>`` (cut by the token limit)
has no answer. ``extraction="any"`` uses math-verify's own extraction instead (boxed first, then
"the final answer is ..." and bare expressions), which is more lenient with base models.

math-verify bounds parsing and comparison time with ``signal.alarm``, which only works in the main
thread; elsewhere the timeout is off (the caller must then bound the time itself).
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

__all__ = ["MathGrade", "extract_final_answer", "grade_math", "last_boxed"]

_TIMEOUT_S = 5


@dataclass(frozen=True)
class MathGrade:
    correct: bool
    extracted: str | None  # the answer found in the response (None: no answer)


def strip_reasoning(text: str) -> str | None:
    """The part of a response after its reasoning; None if the reasoning never ended."""
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1]
    if "<think>" in text:
        return None
    return text


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces), or of ``\\boxed 5``."""
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    i = idx + (len("\\boxed") if text.startswith("\\boxed", idx) else len("\\fbox"))
    if i < len(text) and text[i] == " ":  # "\boxed 5": up to the next whitespace or "$"
        j = i + 1
        while j < len(text) and not text[j].isspace() and text[j] != "$":
            j += 1
        return text[i + 1 : j] or None
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
    return None  # unbalanced: cut off mid-answer


def extract_final_answer(response: str) -> str | None:
    """The boxed final answer of a response (see the module docstring), or None."""
    final = strip_reasoning(response)
    return None if final is None else last_boxed(final)


def _timeout(seconds: int) -> int | None:
    return seconds if threading.current_thread() is threading.main_thread() else None


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str):
    from math_verify import parse

    parse_t = _timeout(_TIMEOUT_S)
    gold = gold.strip()
    boxed = last_boxed(gold)  # MATH-style golds are whole solutions ending in \boxed{}
    text = f"\\boxed{{{boxed}}}" if boxed is not None else f"${gold.strip('$')}$"
    parsed = parse(text, parsing_timeout=parse_t)
    return parsed or parse(gold, parsing_timeout=parse_t)


def grade_math(
    response: str, gold: str, *, extraction: str = "boxed", timeout_s: int = _TIMEOUT_S
) -> MathGrade:
    """Whether ``response`` answers ``gold``; never raises on malformed text (it is then wrong).

    ``timeout_s`` bounds parsing and comparison each (pathological LaTeX can make SymPy spin).
    """
    from math_verify import parse, verify

    parse_t = verify_t = _timeout(timeout_s)
    if extraction == "boxed":
        answer = extract_final_answer(response)
        if answer is None or not answer.strip():
            return MathGrade(False, None)
        pred = parse(f"\\boxed{{{answer}}}", parsing_timeout=parse_t)
    elif extraction == "any":
        final = strip_reasoning(response)
        if final is None:
            return MathGrade(False, None)
        pred = parse(final, parsing_timeout=parse_t)
        answer = str(pred[-1]) if pred else None
    else:
        raise ValueError(f"extraction must be 'boxed' or 'any', not {extraction!r}")
    gold_parsed = _parse_gold(str(gold))
    if not pred or not gold_parsed:
        return MathGrade(False, answer)
    return MathGrade(bool(verify(gold_parsed, pred, timeout_seconds=verify_t)), answer)
