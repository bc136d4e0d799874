"""Scores over sampled generations: avg@k, pass@k, and confidence intervals over problems.

**Which interval, and why.** A benchmark score is ``mean_i m_i`` over problems ``i`` of the
problem-level means ``m_i`` (the fraction of a problem's ``k`` samples that are correct: avg@k).
The unit of resampling is the problem, not the sample: the 32 samples of one AIME problem are
strongly correlated (a model solves a problem almost always or almost never), so treating 30 x 32
samples as independent would make intervals several times too narrow. The interval is a percentile
bootstrap over problems (resample problems with replacement, keep each problem's k samples):
it stays inside [0, 1] and handles the skewed ``m_i`` of small benchmarks (AIME: 30 problems,
many at 0 or 1), where the normal approximation ``mean +/- 1.96 sd(m_i)/sqrt(P)`` can leave
[0, 1]. The normal standard error is reported alongside. Both capture the uncertainty of the
benchmark's problem sample and of the k samples (the within-problem noise is part of each
``m_i``'s variance). Differences between two runs on the same problems use the paired
bootstrap (resample problems, difference of means), which is much tighter than comparing two
separate intervals. The bootstrap is seeded: reports are reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "bootstrap_ci",
    "paired_bootstrap_ci",
    "pass_at_k",
    "score_summary",
    "standard_error",
]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct (Chen et al., 2021):
    ``1 - C(n-c, k) / C(n, k)``."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def standard_error(values: Sequence[float]) -> float:
    v = np.asarray(values, dtype=np.float64)
    return float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0


def bootstrap_ci(
    values: Sequence[float], *, level: float = 0.95, n_boot: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (one value per problem)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return (math.nan, math.nan)
    if len(v) == 1 or np.all(v == v[0]):
        return (float(v[0]), float(v[0]))
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [a, 1.0 - a])
    return (float(lo), float(hi))


def paired_bootstrap_ci(
    a: Sequence[float], b: Sequence[float], **kw
) -> tuple[float, tuple[float, float]]:
    """Mean of ``a - b`` over the same problems and its bootstrap interval."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return float(d.mean()), bootstrap_ci(d, **kw)


def score_summary(
    correct_by_problem: Sequence[Sequence[bool]],
    lengths: Sequence[int],
    *,
    level: float = 0.95,
    seed: int = 0,
) -> dict:
    """Accuracy (avg@k), its interval, pass@k and the mean response length of one benchmark.

    ``correct_by_problem``: per problem, the correctness of each of its samples (k may differ
    between problems, e.g. after a cut-off run; each problem weighs the same)."""
    means = [float(np.mean(c)) for c in correct_by_problem if len(c)]
    ks = {len(c) for c in correct_by_problem}
    k_min = min(ks) if ks else 0
    lo, hi = bootstrap_ci(means, level=level, seed=seed)
    pass_k = {}
    k = 1
    while k <= k_min:
        pass_k[f"pass@{k}"] = float(
            np.mean([pass_at_k(len(c), int(sum(c)), k) for c in correct_by_problem])
        )
        k *= 2
    if k_min and f"pass@{k_min}" not in pass_k:
        pass_k[f"pass@{k_min}"] = float(
            np.mean([pass_at_k(len(c), int(sum(c)), k_min) for c in correct_by_problem])
        )
    return {
        "n_problems": len(means),
        "samples_per_problem": k_min if len(ks) == 1 else sorted(ks),
        "accuracy": float(np.mean(means)) if means else math.nan,
        "ci_low": lo,
        "ci_high": hi,
        "ci_level": level,
        "stderr": standard_error(means),
        **pass_k,
        "mean_response_tokens": float(np.mean(lengths)) if len(lengths) else math.nan,
    }
