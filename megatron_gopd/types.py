"""The typed objects that cross the stages of a training step.

    prompts -> rollout -> [Sample] -> scoring/advantages -> RolloutBatch -> update

Names carry their shape: ``_T`` is one value per response token of one sample; ``_BS`` is a padded
``[batch, seq]`` tensor aligned with *labels*, i.e. position ``j`` holds the value for token
``j + 1`` given the prefix ``tokens[: j + 1]`` (the Megatron convention: logits at position ``j``
predict token ``j + 1``). The teacher is never called "ref": ``ref`` always means the frozen
reference policy pi_ref of the G-OPD reward.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["PackedSeqs", "RolloutBatch", "Sample"]


@dataclass
class Sample:
    """One response of the student to one prompt."""

    prompt_ids: list[int]
    response_ids: list[int]
    domain: str = "default"
    prompt_index: int = 0  # position of the prompt in the dataset
    sample_index: int = 0  # which of the n samples of that prompt
    finish_reason: str = "stop"  # "stop" | "length" | "abort"
    # log pi_rollout(y_t) reported by the rollout engine (None if it did not return them)
    rollout_logprobs_T: list[float] | None = None
    # filled by scoring: log pi*(y_t) and log pi_ref(y_t) per response token
    teacher_logprobs_T: torch.Tensor | None = None
    ref_logprobs_T: torch.Tensor | None = None
    # dataset fields kept as they were (answer, tests, ...)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    @property
    def response_len(self) -> int:
        return len(self.response_ids)


@dataclass
class PackedSeqs:
    """Sequences laid end to end in one row (THD): what the model runs on a packed micro-batch.

    ``tokens_1T``: the sequences one after the other, then ``pad`` zeros so that ``T`` is a
    multiple of the model's (TP under sequence parallelism); ``cu_seqlens``: int32 ``[n + 1]``
    boundaries (0, L_0, L_0 + L_1, ..., T), the tail padding a segment of its own, so that no
    token attends across a boundary and RoPE restarts at each (megatron-core's ``PackedSeqParams``
    with ``qkv_format="thd"``). ``starts``: where each of the ``n`` sequences begins."""

    tokens_1T: torch.Tensor  # int64 [1, T]
    cu_seqlens: torch.Tensor  # int32 [segments + 1]
    max_seqlen: int
    starts: list[int]
    lengths: list[int]

    @classmethod
    def of(cls, sequences, multiple: int = 1, device=None) -> PackedSeqs:
        lengths = [len(s) for s in sequences]
        total = sum(lengths)
        T = max(-(-total // multiple) * multiple, multiple)
        tokens = torch.zeros((1, T), dtype=torch.long)
        starts, pos = [], 0
        for s in sequences:
            starts.append(pos)
            tokens[0, pos : pos + len(s)] = torch.as_tensor(list(s), dtype=torch.long)
            pos += len(s)
        segments = [n for n in lengths if n] + ([T - total] if total < T else [])
        cu = torch.tensor([0, *itertools.accumulate(segments)], dtype=torch.int32)
        return cls(tokens.to(device), cu.to(device), max(segments), starts, lengths)

    @property
    def num_tokens(self) -> int:
        return self.tokens_1T.shape[1]

    def params(self):
        """megatron-core's ``PackedSeqParams`` for this pack."""
        from megatron.core.packed_seq_params import PackedSeqParams

        return PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=self.cu_seqlens,
            cu_seqlens_kv=self.cu_seqlens,
            max_seqlen_q=self.max_seqlen,
            max_seqlen_kv=self.max_seqlen,
        )

    def labels_1T(self) -> torch.Tensor:
        """Position ``j`` holds token ``j + 1`` (the next token of the same sequence except at a
        sequence's last position, which no mask selects)."""
        return torch.roll(self.tokens_1T, shifts=-1, dims=1)

    def row_index_BS(self, S: int) -> torch.Tensor:
        """``[n, S]``: the packed position of each (sequence, position) of a right-padded
        ``[n, S]`` layout; padding positions point at 0 (masked wherever they are read)."""
        starts = torch.tensor(self.starts, dtype=torch.long).unsqueeze(1)
        cols = torch.arange(S, dtype=torch.long).unsqueeze(0)
        valid = cols < torch.tensor(self.lengths, dtype=torch.long).unsqueeze(1)
        return torch.where(valid, starts + cols, torch.zeros_like(cols)).to(self.tokens_1T.device)

    def to(self, device) -> PackedSeqs:
        return PackedSeqs(
            self.tokens_1T.to(device),
            self.cu_seqlens.to(device),
            self.max_seqlen,
            self.starts,
            self.lengths,
        )


@dataclass
class RolloutBatch:
    """Samples collated for the update: right-padded, label-aligned tensors. With ``packed`` the
    model runs on the packed sequences instead (:class:`PackedSeqs`) and ``row_BS`` maps each
    ``(b, s)`` to its packed row; every per-token tensor here stays in the ``[B, S]`` layout."""

    tokens_BS: torch.Tensor  # int64 input ids
    response_mask_BS: torch.Tensor  # float: 1 where label j+1 is a response token
    teacher_logprobs_BS: torch.Tensor  # float32, 0 outside the response
    ref_logprobs_BS: torch.Tensor | None  # None when lambda == 1 everywhere
    rollout_logprobs_BS: torch.Tensor | None
    lam_B: torch.Tensor  # float32: the G-OPD lambda of each sample (per domain)
    domain_ids_B: torch.Tensor  # int64 index into ``domains``
    domains: list[str]
    seq_lens_B: torch.Tensor  # int64 number of real tokens per row
    packed: PackedSeqs | None = None
    row_BS: torch.Tensor | None = None  # int64: packed row of (b, s) (with ``packed``)

    @property
    def batch_size(self) -> int:
        return self.tokens_BS.shape[0]

    def slice(self, a: int, b: int) -> RolloutBatch:
        if self.packed is not None:
            raise ValueError("a packed micro-batch is not sliced: pack each one on its own")

        def s(t):
            return None if t is None else t[a:b]

        return RolloutBatch(
            tokens_BS=self.tokens_BS[a:b],
            response_mask_BS=self.response_mask_BS[a:b],
            teacher_logprobs_BS=self.teacher_logprobs_BS[a:b],
            ref_logprobs_BS=s(self.ref_logprobs_BS),
            rollout_logprobs_BS=s(self.rollout_logprobs_BS),
            lam_B=self.lam_B[a:b],
            domain_ids_B=self.domain_ids_B[a:b],
            domains=self.domains,
            seq_lens_B=self.seq_lens_B[a:b],
        )

    def to(self, device) -> RolloutBatch:
        def m(t):
            return None if t is None else t.to(device)

        return RolloutBatch(
            tokens_BS=m(self.tokens_BS),
            response_mask_BS=m(self.response_mask_BS),
            teacher_logprobs_BS=m(self.teacher_logprobs_BS),
            ref_logprobs_BS=m(self.ref_logprobs_BS),
            rollout_logprobs_BS=m(self.rollout_logprobs_BS),
            lam_B=m(self.lam_B),
            domain_ids_B=m(self.domain_ids_B),
            domains=self.domains,
            seq_lens_B=m(self.seq_lens_B),
            packed=None if self.packed is None else self.packed.to(device),
            row_BS=m(self.row_BS),
        )
