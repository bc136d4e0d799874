"""Token masks and loss aggregation that does not depend on how a batch is split.

Megatron-Core with ``calculate_per_token_loss=True`` sums what each micro-batch's loss function
returns as ``(loss_sum, count)`` over micro-batches and data-parallel ranks, and divides the
gradients by the total count. So each micro-batch contributes *sums*, never means, and the global
result is::

    token_mean:  L = sum_{b,t} m_bt v_bt / sum_{b,t} m_bt
    seq_mean:    L = sum_b [ sum_t m_bt v_bt / n_b ] / #{b : n_b > 0},   n_b = sum_t m_bt

Both are invariant to how the rows are distributed over micro-batches and ranks (seq_mean because
every row is whole within a micro-batch). Rows without response tokens count for nothing in either.
"""

from __future__ import annotations

import torch

__all__ = ["label_mask", "masked_row_sums", "row_contributions", "shift_labels"]


def shift_labels(tokens_BS: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the logits: position ``j`` predicts ``tokens[j + 1]``.

    ``[B, S]`` int64 -> ``[B, S]`` int64; the last column has no next token and holds 0 (it is
    always masked, see :func:`label_mask`).
    """
    labels = torch.zeros_like(tokens_BS, dtype=torch.long)
    labels[:, :-1] = tokens_BS[:, 1:]
    return labels


def label_mask(response_mask_BS: torch.Tensor) -> torch.Tensor:
    """fp32 ``[B, S]`` mask of the response tokens, label-aligned (``RolloutBatch`` convention).

    The last column has no label and is always 0, whatever the collator wrote there.
    """
    m = (response_mask_BS > 0).float()
    m[:, -1] = 0.0
    return m


def masked_row_sums(values_BS: torch.Tensor, mask_BS: torch.Tensor) -> torch.Tensor:
    """``sum_t m_bt v_bt`` per row, ``[..., B, S] -> [..., B]``.

    Masked entries are dropped with ``where``, not multiplied by 0, so that a NaN or inf at a
    masked position (padding, a token the teacher did not score) cannot leak into the sum.
    """
    keep = mask_BS > 0
    return torch.where(keep, values_BS, 0.0).sum(dim=-1)


def row_contributions(
    values_BS: torch.Tensor, mask_BS: torch.Tensor, aggregation: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's share of the loss sum and of the count, ``[B, S] -> ([B], [B])``.

    ``token_mean``: ``(sum_t m v, n_b)``; ``seq_mean``: ``(sum_t m v / n_b, 1[n_b > 0])``.
    The global loss is ``sum(contrib) / sum(weight)`` over all rows of all micro-batches and ranks.
    Differentiable in ``values_BS``.
    """
    sums_B = masked_row_sums(values_BS, mask_BS)
    n_B = (mask_BS > 0).sum(dim=-1).to(sums_B.dtype)
    if aggregation == "token_mean":
        return sums_B, n_B
    if aggregation == "seq_mean":
        return sums_B / n_B.clamp(min=1.0), (n_B > 0).to(sums_B.dtype)
    raise ValueError(f"unknown aggregation {aggregation!r} (token_mean, seq_mean)")
