"""What users watch during G-OPD training, as sums that can be added across micro-batches and ranks.

A *report* maps a metric name to an fp32 tensor ``[weighted_sum, weight]``. Reports from every
micro-batch and data-parallel rank are summed element-wise and :func:`finalize_report` divides.
Per-domain entries are keyed ``"{domain}/{metric}"``; every domain of the batch's domain list
appears in every report (weight 0 where absent), so the key set is the same on all ranks and a
dictionary all-reduce lines up.

Token metrics (weight: response tokens; ``s, q, r`` = student, teacher, reference log-prob of the
sampled token, ``A`` the advantage)::

    kl_teacher        s - q                     unbiased per-token estimate of KL(pi_theta || pi*)
    kl_teacher_k3     e^(q-s) - 1 - (q-s)       non-negative, lower-variance estimate of the same
                                                (log-ratio clamped at 20 before exp)
    student_logprob   s
    teacher_logprob   q                         finalize adds logprob_gap = q - s (mean)
    implicit_reward   q - r                     the reward ExOPD extrapolates (needs r)
    kl_ref            s - r                     drift from the reference (needs r)
    advantage         A                         finalize adds advantage_std from advantage_sq
    advantage_sq      A^2
    entropy           H(pi_theta(. | prefix))
    is_ratio, is_weight, is_clipped, rollout_abs_log_ratio     (with rollout log-probs)
    fdiv              f(r) / r, r = e^l        OPD+ (objective "fdiv"): unbiased per-token estimate
                                                of the f-divergence to the teacher (added by the loss)
    fdiv_clamped      1[|l| > L]                OPD+: share of log-ratios l clamped (see gopd.fdiv)

Sequence metrics (weight: sequences with at least one response token): ``response_length``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from megatron_gopd.gopd.aggregation import masked_row_sums
from megatron_gopd.gopd.importance import ISWeights

__all__ = ["build_report", "finalize_report", "token_metrics"]

_K3_MAX_LOG_RATIO = 20.0


def token_metrics(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    is_weights: ISWeights | None = None,
) -> dict[str, torch.Tensor]:
    """Per-token metric values, each ``[B, S]`` fp32 detached (masking happens in the report)."""
    s = student_logprobs.detach().float()
    q = teacher_logprobs.detach().float()
    d = q - s
    out = {
        "kl_teacher": -d,
        "kl_teacher_k3": torch.expm1(d.clamp(max=_K3_MAX_LOG_RATIO)) - d,
        "student_logprob": s,
        "teacher_logprob": q,
        "advantage": advantages.detach().float(),
        "advantage_sq": advantages.detach().float().square(),
    }
    if ref_logprobs is not None:
        r = ref_logprobs.detach().float()
        out["implicit_reward"] = q - r
        out["kl_ref"] = s - r
    if entropy is not None:
        out["entropy"] = entropy.detach().float()
    if is_weights is not None:
        out["is_ratio"] = is_weights.ratio
        out["is_weight"] = is_weights.weight
        out["is_clipped"] = is_weights.clipped
        out["rollout_abs_log_ratio"] = is_weights.abs_log_ratio
    return out


def build_report(
    token_values: Mapping[str, torch.Tensor],
    mask_BS: torch.Tensor,
    domain_ids_B: torch.Tensor,
    domains: Sequence[str],
    row_values: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    row_masks: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Sum metrics per row, then overall and per domain, into ``{name: [sum, weight]}``.

    Args:
        token_values: name -> ``[B, S]`` per-token values, averaged over the masked tokens.
        mask_BS: ``[B, S]`` response-token mask.
        domain_ids_B: ``[B]`` int64 index into ``domains``.
        domains: the batch's domain names (all of them, also those absent from this micro-batch).
        row_values: name -> (``[B]`` contributions, ``[B]`` weights) for metrics that are not token
            means (the loss under its aggregation, response length).
        row_masks: name -> ``[B]`` bool: the rows where that token metric is defined (e.g. the
            reference's metrics only where lambda != 1, the rows whose reference was scored).

    Returns:
        name -> fp32 ``[2]`` for the whole micro-batch and ``"{domain}/{name}"`` per domain.
    """
    names, sums, weights = [], [], []
    n_B = (mask_BS > 0).sum(dim=-1).float()
    row_masks = row_masks or {}
    for name, v in token_values.items():
        keep = row_masks.get(name)
        w = n_B if keep is None else n_B * keep.to(n_B.dtype)
        names.append(name)
        row_sum = masked_row_sums(v.float(), mask_BS)
        sums.append(torch.where(w > 0, row_sum, torch.zeros_like(row_sum)))
        weights.append(w)
    for name, (c, w) in (row_values or {}).items():
        names.append(name)
        sums.append(c.detach().float())
        weights.append(w.detach().float())
    if not names:
        return {}
    S_MB = torch.stack(sums)
    W_MB = torch.stack(weights)
    D = len(domains)
    idx = domain_ids_B.to(S_MB.device, torch.long)
    dom_S = S_MB.new_zeros((len(names), D)).index_add_(1, idx, S_MB)
    dom_W = W_MB.new_zeros((len(names), D)).index_add_(1, idx, W_MB)
    total = torch.stack([S_MB.sum(dim=1), W_MB.sum(dim=1)], dim=-1)  # [M, 2]
    per_dom = torch.stack([dom_S, dom_W], dim=-1)  # [M, D, 2]
    table = torch.cat([total.unsqueeze(1), per_dom], dim=1)  # [M, 1 + D, 2]
    report: dict[str, torch.Tensor] = {}
    for i, name in enumerate(names):
        report[name] = table[i, 0]
        for d, dom in enumerate(domains):
            report[f"{dom}/{name}"] = table[i, 1 + d]
    return report


def finalize_report(summed: Mapping[str, torch.Tensor | Sequence[float]]) -> dict[str, float]:
    """``{name: [sum, weight]}`` (summed over micro-batches and ranks) -> ``{name: mean}``.

    Entries with zero weight are left out. Derived per prefix (overall and per domain):
    ``advantage_std = sqrt(E[A^2] - E[A]^2)`` (replacing ``advantage_sq``) and
    ``logprob_gap = teacher_logprob - student_logprob``.
    """
    out: dict[str, float] = {}
    for key, v in summed.items():
        s, w = (float(x) for x in (v.tolist() if isinstance(v, torch.Tensor) else v))
        if w > 0:
            out[key] = s / w
    for key in [k for k in out if k.endswith("advantage_sq")]:
        prefix = key[: -len("advantage_sq")]
        second = out.pop(key)
        if prefix + "advantage" in out:
            out[prefix + "advantage_std"] = math.sqrt(
                max(0.0, second - out[prefix + "advantage"] ** 2)
            )
    for key in [k for k in out if k.endswith("teacher_logprob")]:
        prefix = key[: -len("teacher_logprob")]
        if prefix + "student_logprob" in out:
            out[prefix + "logprob_gap"] = out[key] - out[prefix + "student_logprob"]
    return out
