r"""OPD+: on-policy distillation as an f-divergence, with the unbiased (corrected) advantage.

Notation (one response token ``y`` at a prefix ``h`` of a student rollout, log-probs given ``h``)::

    s = log pi_theta(y)                      student
    q = log pi*(y)                           teacher
    l = s - q = log r,   r = pi_theta(y) / pi*(y)

With lambda != 1 the teacher is replaced by the G-OPD target ``pi~ = pi*^lambda pi_ref^(1-lambda)``
(unnormalised), i.e. ``l`` is the G-OPD advantage ``(s - q) + (lambda - 1)(r_ref - q)``; every
formula below holds unchanged (none uses the normalisation of pi*), and the minimiser over the
simplex is still ``pi_theta proportional to pi~`` for a strictly convex ``f``. lambda = 1 (plain
distillation) is the usual case.

The divergence at one position. For convex ``f`` with ``f(1) = 0``::

    D_f(pi_theta || pi*) = sum_y pi*(y) f(r(y)) = E_{y ~ pi_theta}[ g(r(y)) ],   g(r) = f(r) / r

so the single sampled token gives the unbiased estimate ``g(r)`` (reported as ``fdiv``).

The exact gradient (the derivation). ``d r(y) = r(y) d log pi_theta(y)`` and ``r g(r) = f(r)``::

    grad D_f = sum_y pi*(y) f'(r) grad r = sum_y pi_theta(y) f'(r) grad log pi_theta(y)
             = E_{y ~ pi_theta}[ f'(r) grad log pi_theta(y) ]
             = E_{y ~ pi_theta}[ (g(r) + r g'(r)) grad log pi_theta(y) ]       (f' = (r g)')

The naive estimator (the reward ``g(r)`` behind a stop-gradient, as OPD treats ``log r``) keeps
only the first term::

    E_pi[ g(r) grad log pi ] = grad D_f - E_pi[ r g'(r) grad log pi ]

The dropped term vanishes for every ``pi_theta`` iff ``r g'(r)`` is a constant (then it is a
constant times ``E_pi[grad log pi] = grad sum_y pi = 0``), i.e. ``g = c log r``: the reverse KL,
and no other member of the family. Since ``E_pi[grad log pi] = 0``, any constant baseline may be
subtracted; we subtract ``f'(1)`` so that the advantage is 0 where student and teacher agree::

    corrected (unbiased):  A = f'(r) - f'(1)          naive (stop-gradient):  A = g(r) = f(r) / r

and the student minimises the mean of ``sg[A] * log pi_theta(y)`` exactly as in G-OPD (``A`` is a
cost). The family, in ``l = log r`` (``softplus(x) = log(1 + e^x)``, ``expm1(x) = e^x - 1``)::

    divergence  f(r)                              A = f'(r) - f'(1)         g(r) = f(r) / r
    reverse_kl  r log r                           l                         l
    forward_kl  -log r                            -expm1(-l)                -l e^-l
    js          (r log(2r/(1+r)) + log(2/(1+r)))/2  (log 2 - softplus(-l))/2  A + e^-l (log 2 - softplus(l))/2
    tv          |r - 1| / 2                       sign(l) / 2               |expm1(-l)| / 2
    alpha       ((r^a - 1)/a - (r - 1)) / (a - 1)  expm1((a-1) l) / (a - 1)  ((expm1((a-1)l) - expm1(-l))/a
                                                                               + expm1(-l)) / (a - 1)

``reverse_kl`` is KL(pi_theta || pi*): its corrected advantage is the OPD/G-OPD advantage ``s - q``
itself, and its naive one too (no correction needed), so the loss is G-OPD's bit for bit.
``forward_kl`` is KL(pi* || pi_theta) (``A = 1 - pi*/pi_theta``: an importance weight, mode
covering), ``js`` the Jensen-Shannon divergence (bounded by log 2; ``A <= log(2)/2``), ``tv`` the
total variation (bounded by 1; ``A = +-1/2``, the subgradient 0 at ``r = 1``). ``alpha`` is
Amari's alpha-divergence: ``A`` is the Box-Cox transform of ``r`` with parameter ``a - 1``; ``a -> 1``
is the reverse KL (``A -> l``; its ``f`` differs from ``r log r`` by the linear term ``-(r - 1)``,
which changes ``g`` but neither ``D_f`` nor ``A``) and ``a -> 0`` the forward KL. ``a = 1/2`` is
four times the squared Hellinger distance. ``a = 0`` and ``a = 1`` use the limits; near them (not
at them) the naive ``g`` cancels, with a relative fp32 error of ``~1e-7 / |a (a - 1)|``; ``A`` does
not (``expm1``).

What is optimised over a sequence (discount 0, as G-OPD). For a rollout ``y_1..y_T ~ pi_theta``
with prefixes ``h_t``, the loss is the sampled estimate of the gradient of::

    J(theta) = E_{h ~ pi_theta_old}[ sum_t D_f(pi_theta(. | h_t) || pi*(. | h_t)) ]

at ``theta = theta_old``: the per-position divergences summed over the positions the student
visits, with the distribution of prefixes held fixed (its dependence on theta is not
differentiated; no reward-to-go). For the reverse KL, ``J`` has the value of the sequence-level
KL(pi_theta(y) || pi*(y)) (chain rule); for any other ``f``, ``J`` is not the sequence-level
f-divergence (which does not factorise over positions), but it has the same minimiser: pi_theta =
pi* at every visited prefix. ``tests/test_fdiv_mc.py`` checks the Monte-Carlo gradient against
autograd of ``J`` enumerated over all sequences.

Numerical care.
* Ratios in log space: ``l = s - q`` in fp32; ``r`` itself is never formed except through ``exp``
  and ``expm1`` of a clamped ``l``. Inputs of any dtype are upcast to fp32 first: a bf16 log-prob of
  -8 is only known to 2^-6 = 0.016 (a 1.6% error in ``r``, amplified by ``e^{|(a-1) l|}``); the
  trainer's log-probs are fp32 even from bf16 logits (the vocab-parallel kernel upcasts chunk-wise).
* Clamp: ``l`` is clamped to ``[-L, L]`` (``L = max_log_ratio``, default :data:`MAX_ABS_LOG_RATIO`)
  for every divergence but ``reverse_kl`` (linear in ``l``: no exponential, so nothing to guard, and
  no clamp keeps it identical to G-OPD). Clamping biases the gradient of the clamped tokens; their
  share is reported (``fdiv_clamped``). With the default, ``|A| <= e^20 ~ 5e8`` for the forward KL:
  a smaller ``L`` (e.g. 5) trades that variance for bias. The configuration refuses ``L`` and
  ``alpha`` whose exponent ``max(1, |a - 1|) L`` could overflow fp32 (:data:`MAX_EXP_ARG`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from megatron_gopd.gopd.advantages import gopd_advantages

__all__ = [
    "DIVERGENCES",
    "MAX_ABS_LOG_RATIO",
    "MAX_EXP_ARG",
    "FDivAdvantages",
    "fdiv_advantages",
    "fdiv_terms",
]

Divergence = Literal["reverse_kl", "forward_kl", "js", "tv", "alpha"]
DIVERGENCES: tuple[str, ...] = ("reverse_kl", "forward_kl", "js", "tv", "alpha")

# Default clamp of |log r|: e^20 ~ 5e8 is far beyond any ratio a trained student and its teacher
# show on the tokens the student samples, yet far from fp32's exp overflow at ~88.7.
MAX_ABS_LOG_RATIO = 20.0
# The largest exponent allowed to reach exp/expm1 (e^80 ~ 5.5e34 < fp32 max 3.4e38, leaving room
# for the products and sums the loss forms with the advantage).
MAX_EXP_ARG = 80.0

_LOG2 = math.log(2.0)


@dataclass
class FDivAdvantages:
    """Per-token outputs, each ``[...]`` fp32 detached, 0 where masked."""

    advantage: torch.Tensor  # A: the cost that weights log pi_theta(y_t) in the loss
    estimate: torch.Tensor  # g(r_t): unbiased single-token estimate of D_f at the position
    clamped: torch.Tensor  # 1.0 where the clamp changed l = log r


def fdiv_terms(
    log_ratio: torch.Tensor, divergence: str, alpha: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, g)`` from ``l = log r`` (already clamped): the corrected advantage ``f'(r) - f'(1)``
    and ``g(r) = f(r) / r`` (the naive advantage and the divergence estimate). Shapes as ``l``."""
    lr = log_ratio
    if divergence == "reverse_kl":
        return lr, lr
    if divergence == "forward_kl":
        em = torch.expm1(-lr)  # 1/r - 1
        return -em, -lr * (em + 1.0)
    if divergence == "js":
        adv = 0.5 * (_LOG2 - torch.nn.functional.softplus(-lr))  # f'(r) = log(2r / (1 + r)) / 2
        rest = 0.5 * torch.exp(-lr) * (_LOG2 - torch.nn.functional.softplus(lr))
        return adv, adv + rest
    if divergence == "tv":
        return 0.5 * torch.sign(lr), 0.5 * torch.expm1(-lr).abs()
    if divergence == "alpha":
        a = float(alpha)
        em = torch.expm1(-lr)
        if a == 1.0:  # the limit: f = r log r - r + 1
            return lr.clone(), lr + em
        if a == 0.0:  # the limit: f = -log r + r - 1
            return -em, -lr * (em + 1.0) - em
        ea = torch.expm1((a - 1.0) * lr)  # r^(a-1) - 1
        return ea / (a - 1.0), ((ea - em) / a + em) / (a - 1.0)
    raise ValueError(f"unknown divergence {divergence!r}: choose one of {', '.join(DIVERGENCES)}")


def fdiv_advantages(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    lam: float | torch.Tensor = 1.0,
    mask: torch.Tensor | None = None,
    *,
    divergence: str = "reverse_kl",
    alpha: float = 0.5,
    corrected: bool = True,
    max_log_ratio: float = MAX_ABS_LOG_RATIO,
) -> FDivAdvantages:
    """Per-token f-divergence advantage (a cost), divergence estimate and clamp indicator.

    ``l = (s - q) + (lam - 1)(r_ref - q)`` (the G-OPD advantage; ``s - q`` for lam = 1), clamped to
    ``[-L, L]`` except for ``reverse_kl``; then ``A = f'(r) - f'(1)`` (``corrected``) or
    ``A = f(r) / r`` (naive), see the module docstring.

    Args:
        student_logprobs: ``[...]`` log pi_theta of the sampled tokens (detached here).
        teacher_logprobs: ``[...]`` log pi* of the same tokens.
        ref_logprobs: ``[...]`` log pi_ref, or None when ``lam == 1`` everywhere.
        lam: G-OPD lambda, a float or a tensor (``[B]`` with ``[B, S]`` log-probs per row).
        mask: optional ``[...]``; where 0 every output is exactly 0 (NaN inputs included).
        divergence: one of :data:`DIVERGENCES`.
        alpha: the parameter of ``"alpha"``.
        corrected: the unbiased advantage (True) or the naive stop-gradient one (False).
        max_log_ratio: ``L``, the clamp of ``|l|``.

    Returns:
        :class:`FDivAdvantages`, fp32, ``requires_grad=False``.
    """
    lr = gopd_advantages(student_logprobs, teacher_logprobs, ref_logprobs, lam, mask=mask)
    if divergence == "reverse_kl":
        clamped = torch.zeros_like(lr)
    else:
        clamped = (lr.abs() > max_log_ratio).float()  # NaN compares False: not counted
        lr = lr.clamp(-max_log_ratio, max_log_ratio)
    adv, est = fdiv_terms(lr, divergence, alpha)
    if not corrected:
        adv = est
    if mask is not None:
        keep = mask > 0
        zero = torch.zeros_like(lr)
        adv, est = torch.where(keep, adv, zero), torch.where(keep, est, zero)
        clamped = torch.where(keep, clamped, zero)
    return FDivAdvantages(advantage=adv, estimate=est, clamped=clamped)
