"""The typed configuration of the G-OPD loss, built once at the edge and validated there."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from megatron_gopd.flags import flag
from megatron_gopd.gopd.fdiv import DIVERGENCES, MAX_ABS_LOG_RATIO, MAX_EXP_ARG, Divergence
from megatron_gopd.utils import GopdError

__all__ = ["AGGREGATIONS", "ESTIMATORS", "OBJECTIVES", "GOPDLossConfig", "LossConfigError"]

Estimator = Literal["sampled", "full_vocab", "top_k"]
Aggregation = Literal["token_mean", "seq_mean"]
Objective = Literal["gopd", "fdiv"]
ESTIMATORS: tuple[str, ...] = ("sampled", "full_vocab", "top_k")
AGGREGATIONS: tuple[str, ...] = ("token_mean", "seq_mean")
OBJECTIVES: tuple[str, ...] = ("gopd", "fdiv")

# Tokens x vocabulary-slice elements per fp32 scratch buffer (chunk_elements=None picks these).
# The sampled estimator keeps one or two such buffers, the full-vocabulary ones a handful.
# Host: 1 Mi elements (4 MiB) stays in the last-level cache: fp32 forward+backward of the sampled
# loss at 2048 x 65536 took 0.39 s with 1 Mi, 0.50 s with 4 Mi, 0.95 s with 16 Mi (EPYC, 1
# thread). CUDA: 16 Mi elements (64 MiB) amortise kernel launches and stay small against the
# logits of a real micro-batch (8k tokens x 152k vocabulary = 4.6 GiB in fp32).
CPU_CHUNK_ELEMENTS = 1 << 20
CUDA_CHUNK_ELEMENTS = 1 << 24


FDIV_FLAG_GROUP = "OPD+ (f-divergence distillation; --gopd-objective fdiv)"


class LossConfigError(GopdError, ValueError):
    """An invalid loss configuration; the message names the field."""


@dataclass(frozen=True)
class GOPDLossConfig:
    """How the student's G-OPD loss is estimated and averaged.

    Attributes:
        estimator: ``"sampled"`` (the paper's: the advantage of the sampled token times its
            log-prob), ``"full_vocab"`` (the exact per-position expectation of the sampled-token
            gradient, from the teacher's and reference's logits), or ``"top_k"`` (the same on the
            student's top-k tokens plus one bucket for the rest of the vocabulary). See
            :mod:`megatron_gopd.vocab_parallel.gopd_objective` for the derivation.
        top_k: tokens kept per position by ``"top_k"``.
        aggregation: ``"token_mean"`` (every response token of the global batch weighs the same)
            or ``"seq_mean"`` (mean over tokens within a sequence, then over sequences).
        tis_cap: truncated importance sampling between the rollout engine's log-probs and the
            trainer's: every token is weighted by ``min(pi_theta / pi_rollout, tis_cap)`` (the
            official G-OPD code uses 5.0). None: off. Sampled estimator only.
        chunk_elements: size of the fp32 scratch buffers (tokens x vocabulary slice), a memory /
            speed knob; None: a default per device type (:meth:`chunk_elements_for`).
        objective: ``"gopd"`` (the G-OPD advantage) or ``"fdiv"`` (OPD+: an f-divergence between
            the student and the (G-OPD) teacher, :mod:`megatron_gopd.gopd.fdiv`; sampled
            estimator only). The fields below apply to ``"fdiv"``.
        divergence: ``"reverse_kl"`` (= G-OPD), ``"forward_kl"``, ``"js"``, ``"tv"``, ``"alpha"``.
        alpha: the parameter of ``"alpha"`` (1: reverse KL, 0: forward KL, 0.5: Hellinger).
        fdiv_correction: the unbiased advantage ``f'(r) - f'(1)`` (True) or the naive
            stop-gradient ``f(r) / r`` (False, for comparison; biased except for reverse KL).
        fdiv_max_log_ratio: clamp of ``|log r|`` (all divergences but reverse KL).
    """

    FLAG_GROUP = "G-OPD"

    estimator: Estimator = flag(
        "sampled",
        name="--gopd-estimator",
        help="sampled: the paper's sampled-token estimator; full_vocab: its exact expectation "
        "from the teacher's and reference's logits; top_k: the same on the student's top-k",
    )
    top_k: int = flag(64, name="--gopd-top-k", help="tokens kept per position by top_k")
    aggregation: Aggregation = flag(
        "token_mean",
        name="--gopd-aggregation",
        help="token_mean: every response token weighs the same; seq_mean: mean per sequence, "
        "then over sequences",
    )
    tis_cap: float | None = flag(
        None,
        name="--gopd-tis-cap",
        help="truncated importance-sampling cap between rollout and trainer log-probs "
        "(official code: 5.0)",
        default_help="off",
    )
    chunk_elements: int | None = None
    objective: Objective = flag(
        "gopd",
        name="--gopd-objective",
        group=FDIV_FLAG_GROUP,
        help="gopd: the G-OPD advantage; fdiv: minimise an f-divergence to the teacher "
        "(sampled estimator only)",
    )
    divergence: Divergence = flag(
        "reverse_kl",
        name="--fdiv-divergence",
        group=FDIV_FLAG_GROUP,
        help="the f-divergence; reverse_kl is G-OPD exactly",
    )
    alpha: float = flag(
        0.5,
        name="--fdiv-alpha",
        group=FDIV_FLAG_GROUP,
        help="alpha of --fdiv-divergence alpha (1: reverse KL, 0: forward KL, 0.5: Hellinger)",
    )
    fdiv_correction: bool = flag(
        True,
        name="--fdiv-advantage",
        choices=("corrected", "naive"),
        parse=lambda v: v == "corrected",
        cli_default="corrected",
        group=FDIV_FLAG_GROUP,
        help="corrected: the unbiased advantage f'(r) - f'(1); naive: the stop-gradient f(r)/r "
        "(biased except for reverse KL; for comparison)",
    )
    fdiv_max_log_ratio: float = flag(
        MAX_ABS_LOG_RATIO,
        name="--fdiv-max-log-ratio",
        group=FDIV_FLAG_GROUP,
        help="clamp of |log(pi_theta / pi*)| for all divergences but reverse KL",
    )

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise LossConfigError(
                f"estimator={self.estimator!r}: choose one of {', '.join(ESTIMATORS)}"
            )
        if self.aggregation not in AGGREGATIONS:
            raise LossConfigError(
                f"aggregation={self.aggregation!r}: choose one of {', '.join(AGGREGATIONS)}"
            )
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise LossConfigError(f"top_k={self.top_k!r} must be a positive integer")
        if self.tis_cap is not None:
            cap = self.tis_cap
            if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap):
                raise LossConfigError(f"tis_cap={cap!r} must be a finite number or None")
            if cap < 1.0:
                # a cap below 1 would down-weight even tokens where trainer and engine agree
                raise LossConfigError(f"tis_cap={cap} must be >= 1 (the official code uses 5.0)")
            if self.estimator != "sampled":
                # The token-level weight corrects the sampling of y_t; the full-vocabulary
                # estimators do not use y_t at all (their expectation over y_t is exact).
                raise LossConfigError(
                    f"tis_cap applies to the sampled estimator only, not to {self.estimator!r}"
                )
        ce = self.chunk_elements
        if ce is not None and (isinstance(ce, bool) or not isinstance(ce, int) or ce < 1):
            raise LossConfigError(f"chunk_elements={ce!r} must be a positive integer or None")
        self._check_fdiv()

    def _check_fdiv(self) -> None:
        if self.objective not in OBJECTIVES:
            raise LossConfigError(
                f"objective={self.objective!r}: choose one of {', '.join(OBJECTIVES)}"
            )
        if self.divergence not in DIVERGENCES:
            raise LossConfigError(
                f"divergence={self.divergence!r}: choose one of {', '.join(DIVERGENCES)}"
            )
        if not isinstance(self.fdiv_correction, bool):
            raise LossConfigError(f"fdiv_correction={self.fdiv_correction!r} must be a bool")
        a, L = self.alpha, self.fdiv_max_log_ratio
        for name, x in (("alpha", a), ("fdiv_max_log_ratio", L)):
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                raise LossConfigError(f"{name}={x!r} must be a finite number")
        if not 0 < L <= MAX_EXP_ARG:
            raise LossConfigError(f"fdiv_max_log_ratio={L} must be in (0, {MAX_EXP_ARG}]")
        if self.divergence == "alpha" and abs(a - 1.0) * L > MAX_EXP_ARG:
            # the advantage is expm1((alpha - 1) l) / (alpha - 1) with |l| <= L
            raise LossConfigError(
                f"alpha={a} with fdiv_max_log_ratio={L}: exp((alpha - 1) log r) could overflow "
                f"fp32; need |alpha - 1| * fdiv_max_log_ratio <= {MAX_EXP_ARG}"
            )
        if self.objective == "fdiv" and self.estimator != "sampled":
            raise LossConfigError(
                f"objective='fdiv' supports the sampled estimator only, not {self.estimator!r}"
            )

    def chunk_elements_for(self, device: torch.device) -> int:
        """The scratch-buffer size to use for logits on ``device``."""
        if self.chunk_elements is not None:
            return self.chunk_elements
        return CUDA_CHUNK_ELEMENTS if device.type == "cuda" else CPU_CHUNK_ELEMENTS

    @property
    def needs_teacher_logits(self) -> bool:
        """The full-vocabulary estimators read the teacher's (and reference's) logits."""
        return self.estimator != "sampled"
