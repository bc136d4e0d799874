"""The G-OPD token-level advantage and the quantities it is made of.

Notation (one response token ``y_t`` of a student rollout, log-probs given the prefix)::

    s_t = log pi_theta(y_t)    student (the policy being trained)
    q_t = log pi*(y_t)         teacher
    r_t = log pi_ref(y_t)      reference (frozen student init, or the teacher's pre-RL base)

    A_t = (s_t - q_t) + (lambda - 1) (r_t - q_t)

``A_t`` is a cost (the negative of the G-OPD reward ``lambda (q_t - r_t) - (s_t - r_t)``): the
student minimises the mean of ``sg[A_t] * log pi_theta(y_t)``. ``lambda = 1`` is plain on-policy
distillation (reverse KL to the teacher, no reference needed), ``lambda > 1`` is ExOPD (reward
extrapolation; 1.25 in the paper), ``lambda = 0`` is a reverse KL to the reference alone.
"""

from __future__ import annotations

import torch

__all__ = ["as_token_lambda", "gopd_advantages", "implicit_reward"]


def as_token_lambda(lam: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """Broadcast a per-sample lambda ``[B]`` against per-token values ``[B, S]`` (``[B, 1]``).

    Floats and tensors that already broadcast pass through unchanged.
    """
    if isinstance(lam, torch.Tensor) and lam.dim() == 1 and like.dim() == 2:
        return lam.to(like.device, torch.float32).unsqueeze(-1)
    return lam


def _is_one(lam: float | torch.Tensor) -> bool:
    if isinstance(lam, torch.Tensor):
        return bool(torch.all(lam == 1.0))  # one host sync; only taken when ref is absent
    return lam == 1.0


def gopd_advantages(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    lam: float | torch.Tensor = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token G-OPD advantage (a cost), detached, fp32.

    ``A = (s - q) + (lam - 1) (r - q)``

    Args:
        student_logprobs: ``[...]`` log pi_theta of the sampled tokens (detached here).
        teacher_logprobs: ``[...]`` log pi* of the same tokens.
        ref_logprobs: ``[...]`` log pi_ref, or None when ``lam == 1`` everywhere (plain OPD).
        lam: a float, or a tensor broadcastable to the log-probs (a per-sample ``[B]`` with
            ``[B, S]`` log-probs is broadcast per row). Must be >= 0.
        mask: optional ``[...]``; where it is 0 the advantage is exactly 0 (whatever the inputs
            hold there, NaN included), so masked tokens contribute nothing.

    Returns:
        ``[...]`` fp32 advantage, ``requires_grad=False``.
    """
    s = student_logprobs.detach().float()
    q = teacher_logprobs.detach().float()
    lam = as_token_lambda(lam, s)
    if isinstance(lam, float | int) and lam < 0:
        raise ValueError(f"lambda must be >= 0, got {lam}")
    adv = s - q
    if ref_logprobs is None:
        if not _is_one(lam):
            raise ValueError(
                "lambda != 1 needs the reference log-probs (ref_logprobs): "
                "A = (log pi_theta - log pi*) + (lambda - 1)(log pi_ref - log pi*)"
            )
    else:
        r = ref_logprobs.detach().float()
        adv = adv + (lam - 1.0) * (r - q)
    if mask is not None:
        adv = torch.where(mask > 0, adv, torch.zeros_like(adv))
    return adv


def implicit_reward(teacher_logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """``log pi*(y) - log pi_ref(y)``: the reward that the teacher implies relative to the
    reference (what ExOPD extrapolates by ``lambda``). Detached fp32."""
    return teacher_logprobs.detach().float() - ref_logprobs.detach().float()
