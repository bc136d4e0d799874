"""Math grading on a table of equivalent and non-equivalent answers."""

from __future__ import annotations

import threading

import pytest

from megatron_gopd.evaluation.math_grader import extract_final_answer, grade_math, last_boxed


def boxed(x: str) -> str:
    return f"Some reasoning first. So the answer is $\\boxed{{{x}}}$."


EQUIVALENT = [
    # (gold, predicted answer inside \boxed{}): fractions, decimals, LaTeX variants
    ("\\frac{1}{2}", "0.5"),
    ("\\frac{1}{2}", "\\dfrac12"),
    ("1/2", "\\frac{2}{4}"),
    ("\\dfrac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}"),
    ("\\sqrt{2}/2", "\\frac{1}{\\sqrt{2}}"),
    ("2\\sqrt{3}", "\\sqrt{12}"),
    ("10^{3}", "1000"),
    ("1000", "1{,}000"),
    ("073", "73"),  # AIME answers are written with leading zeros
    ("-\\frac{7}{3}", "-2\\frac{1}{3}"),  # mixed number
    # intervals and sets
    ("(1, 3]", "(1,3]"),
    ("[-2, 5)", "[-2,5)"),
    ("(-\\infty, 0) \\cup (1, \\infty)", "(-\\infty,0)\\cup(1,\\infty)"),
    ("\\{1,2\\}", "\\{2,1\\}"),
    ("1,2", "1, 2"),
    # units and text
    ("10", "10\\text{ cm}"),
    ("10", "10 \\mbox{ meters}"),
    ("30", "30^\\circ"),
    # algebra
    ("x^2+2x+1", "(x+1)^2"),
    ("a+b", "b+a"),
    ("\\pi", "\\pi"),
    ("\\infty", "\\infty"),
    ("3", "x=3"),
]

NOT_EQUIVALENT = [
    ("\\frac{1}{2}", "\\frac{1}{3}"),
    ("(1, 3]", "(1,3)"),  # open vs half-open
    ("[-2, 5)", "[-2,5]"),
    ("7", "-7"),
    ("\\frac{1}{3}", "0.33"),  # too coarse a rounding
    ("2\\sqrt{3}", "3\\sqrt{2}"),
    ("x^2+1", "x^2-1"),
    ("\\{1,2\\}", "\\{1,2,3\\}"),
    ("10", "100\\text{ cm}"),
    ("\\pi/3", "60"),  # no degree-to-radian guessing
    ("1000", "100"),
]


@pytest.mark.parametrize("gold,pred", EQUIVALENT)
def test_equivalent_answers(gold, pred):
    grade = grade_math(boxed(pred), gold)
    assert grade.correct, f"{pred!r} should equal {gold!r}"
    assert grade.extracted == pred


@pytest.mark.parametrize("gold,pred", NOT_EQUIVALENT)
def test_non_equivalent_answers(gold, pred):
    assert not grade_math(boxed(pred), gold).correct, f"{pred!r} should differ from {gold!r}"


def test_boxed_extraction():
    assert last_boxed("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("first \\boxed{3}, finally \\boxed{\\{1,\\{2\\}\\}}") == "\\{1,\\{2\\}\\}"
    assert last_boxed("\\fbox{42}") == "42"
    assert last_boxed("so $\\boxed 5$.") == "5"
    assert last_boxed("\\boxed{\\frac{1}{2") is None  # cut off by the token limit
    assert last_boxed("no box") is None
    # the final answer comes after the reasoning; an unfinished reasoning has none
    assert extract_final_answer("<think>maybe \\boxed{1}</think> so \\boxed{2}") == "2"
    assert extract_final_answer("<think>maybe \\boxed{1} hmm, wait") is None
    assert extract_final_answer("<think>\\boxed{1}</think> I give up.") is None


def test_grading_rules():
    # the last box counts, not the first
    assert grade_math("try \\boxed{3}, no: \\boxed{\\frac12}", "1/2").correct
    assert not grade_math("try \\boxed{\\frac12}, no: \\boxed{3}", "1/2").correct
    # no box: wrong in the strict (default) mode, found by math-verify in the lenient one
    assert not grade_math("The final answer is 42.", "42").correct
    assert grade_math("The final answer is $42$.", "42", extraction="any").correct
    # MATH-style gold: a whole solution ending in a box
    assert grade_math(boxed("\\frac{3}{4}"), "We compute ... $\\boxed{\\dfrac{3}{4}}$").correct
    # garbage never raises
    for junk in ("\\boxed{}", "\\boxed{\\frac{}{}}", "\\boxed{)(}", "\\boxed{" + "(" * 500 + "}"):
        assert not grade_math(junk, "1", timeout_s=1).correct
    with pytest.raises(ValueError):
        grade_math("x", "1", extraction="nope")


def test_works_outside_the_main_thread():
    out = []
    t = threading.Thread(target=lambda: out.append(grade_math(boxed("0.5"), "\\frac12").correct))
    t.start()
    t.join()
    assert out == [True]
