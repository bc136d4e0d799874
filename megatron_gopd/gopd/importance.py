"""Truncated importance sampling between the rollout engine and the trainer.

The student's tokens are sampled by the rollout engine (SGLang), whose numerics differ from the
trainer's even with identical weights (kernels, batch composition, bf16). The policy gradient is an
expectation under the trainer's pi_theta, so each token is re-weighted by the ratio of the two,
truncated to bound the variance (Yao et al., "Your efficient RL framework secretly brings you
off-policy RL training", 2025; the official G-OPD code caps at 5.0)::

    rho_t = pi_theta(y_t) / pi_rollout(y_t) = exp(s_t - o_t)
    w_t   = min(rho_t, C)            (detached: a constant weight on sg[A_t] * log pi_theta(y_t))

``s_t`` is the trainer's log-prob, ``o_t`` the engine's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["ISWeights", "truncated_is_weights"]

# exp() overflows fp32 beyond ~88: the *reported* ratio is computed from a log-ratio clamped here.
# The weight itself needs no clamp (min(inf, C) = C).
_MAX_LOG_RATIO = 20.0


@dataclass
class ISWeights:
    """Per-token importance weights and the statistics users watch, all ``[...]`` fp32 detached."""

    weight: torch.Tensor  # w_t = min(rho_t, C), or 1 when truncation is off
    ratio: torch.Tensor  # rho_t (log-ratio clamped to +-20 before exp, for reporting)
    clipped: torch.Tensor  # 1.0 where rho_t > C
    abs_log_ratio: torch.Tensor  # |s_t - o_t|: the engine/trainer mismatch


def truncated_is_weights(
    trainer_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    cap: float | None,
    mask: torch.Tensor | None = None,
) -> ISWeights:
    """``w = min(exp(s - o), cap)`` per token (``cap=None``: w = 1, statistics only).

    Args:
        trainer_logprobs: ``[...]`` log pi_theta(y_t) from the trainer (detached here).
        rollout_logprobs: ``[...]`` log pi_rollout(y_t) reported by the engine.
        cap: the truncation C >= 1, or None.
        mask: optional ``[...]``; masked entries get weight 0 and zero statistics.
    """
    d = trainer_logprobs.detach().float() - rollout_logprobs.detach().float()
    if mask is not None:
        d = torch.where(mask > 0, d, torch.zeros_like(d))
    ratio = torch.exp(d.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    if cap is None:
        weight = torch.ones_like(d)
        clipped = torch.zeros_like(d)
    else:
        weight = torch.exp(d).clamp(max=float(cap))
        clipped = (d > math.log(cap)).float()
    abs_lr = d.abs()
    if mask is not None:
        keep = mask > 0
        zero = torch.zeros_like(d)
        weight, ratio = torch.where(keep, weight, zero), torch.where(keep, ratio, zero)
        clipped, abs_lr = torch.where(keep, clipped, zero), torch.where(keep, abs_lr, zero)
    return ISWeights(weight=weight, ratio=ratio, clipped=clipped, abs_log_ratio=abs_lr)
