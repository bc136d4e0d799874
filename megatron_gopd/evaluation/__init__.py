"""Evaluation as in the G-OPD paper: avg@k over sampled generations, graded answers, reports.

- :func:`evaluate` (``evaluate.py``): the entry point for the trainer and ``gopd-eval``.
- ``generation.py``: the :class:`Generator` protocol the rollout client plugs into, prompt
  encoding (chat template on/off), and an in-process HF generator.
- ``benchmarks.py``: local benchmark files (math, EvalPlus, LiveCodeBench formats).
- ``math_grader.py``: boxed-answer extraction + ``math-verify`` equivalence.
- ``sandbox.py`` / ``code_grader.py``: sandboxed execution of generated programs.
- ``metrics.py`` / ``report.py``: avg@k, pass@k, bootstrap intervals, comparison tables, plots.
"""

from megatron_gopd.evaluation.benchmarks import BenchmarkSpec, Problem, load_benchmark
from megatron_gopd.evaluation.evaluate import EvalConfig, evaluate, flat_metrics
from megatron_gopd.evaluation.generation import (
    ChatFormat,
    Completion,
    Generator,
    HFGenerator,
    RolloutClientGenerator,
)
from megatron_gopd.evaluation.sandbox import Sandbox, SandboxLimits

__all__ = [
    "BenchmarkSpec",
    "ChatFormat",
    "Completion",
    "EvalConfig",
    "Generator",
    "HFGenerator",
    "Problem",
    "RolloutClientGenerator",
    "Sandbox",
    "SandboxLimits",
    "evaluate",
    "flat_metrics",
    "load_benchmark",
]
