"""Packed (THD) sequences for the local layer spec.

With Transformer Engine, megatron-core runs packed micro-batches natively: ``tokens [1, T]`` plus
``PackedSeqParams(qkv_format="thd", cu_seqlens_q=...)`` make ``TEDotProductAttention`` attend
within each sequence only, and RoPE restart its positions at every boundary
(``_apply_rotary_pos_emb_thd``). megatron-core's local ``DotProductAttention`` refuses packed
input, so CPU runs (and every CPU test) could not exercise the batches GPU runs use.

:class:`PackedDotProductAttention` is the local core attention with the same contract: given
``packed_seq_params`` (``query [T, np, hn]``, keys and values ``[T, ng, hn]``, as megatron's
``Attention`` hands them over for THD) it runs the parent's own causal attention on each segment
``cu_seqlens[i]:cu_seqlens[i+1]`` as a batch of one, so every token attends to exactly the
tokens it would in an unpacked forward, with the same arithmetic (the same scaled, masked, fp32
softmax); without ``packed_seq_params`` it *is* the parent. Cost: one small attention per
sequence, sum(L_i^2) instead of T^2 — a CPU path, not a kernel.
"""

from __future__ import annotations

import itertools

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention

__all__ = ["PackedDotProductAttention"]


class PackedDotProductAttention(DotProductAttention):
    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
        **kwargs,
    ):
        if packed_seq_params is None:
            return super().forward(
                query, key, value, attention_mask, attn_mask_type, attention_bias, **kwargs
            )
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"packed qkv_format {packed_seq_params.qkv_format!r}: only 'thd'")
        cu = packed_seq_params.cu_seqlens_q.tolist()
        if cu[0] != 0 or cu[-1] != query.shape[0]:
            raise ValueError(f"cu_seqlens {cu} do not cover the {query.shape[0]} packed tokens")
        outs = []
        for a, b in itertools.pairwise(cu):
            if b > a:
                # [L, 1, heads, hn]: the parent's [s, b, np, hn] layout with a batch of one
                ctx = super().forward(
                    query[a:b].unsqueeze(1),
                    key[a:b].unsqueeze(1),
                    value[a:b].unsqueeze(1),
                    None,
                    attn_mask_type,
                    attention_bias,
                    **kwargs,
                )
                outs.append(ctx.squeeze(1))
        return torch.cat(outs, dim=0)  # [T, np * hn]
