"""The typed objects that cross the stages of a training step.

    prompts -> rollout -> [Sample] -> scoring/advantages -> RolloutBatch -> update

Names carry their shape: ``_T`` is one value per response token of one sample; ``_BS`` is a padded
``[batch, seq]`` tensor aligned with *labels*, i.e. position ``j`` holds the value for token
``j + 1`` given the prefix ``tokens[: j + 1]`` (the Megatron convention: logits at position ``j``
predict token ``j + 1``). The teacher is never called "ref": ``ref`` always means the frozen
reference policy pi_ref of the G-OPD reward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["RolloutBatch", "Sample"]


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
class RolloutBatch:
    """Samples collated for the update: right-padded, label-aligned tensors."""

    tokens_BS: torch.Tensor  # int64 input ids
    response_mask_BS: torch.Tensor  # float: 1 where label j+1 is a response token
    teacher_logprobs_BS: torch.Tensor  # float32, 0 outside the response
    ref_logprobs_BS: torch.Tensor | None  # None when lambda == 1 everywhere
    rollout_logprobs_BS: torch.Tensor | None
    lam_B: torch.Tensor  # float32: the G-OPD lambda of each sample (per domain)
    domain_ids_B: torch.Tensor  # int64 index into ``domains``
    domains: list[str]
    seq_lens_B: torch.Tensor  # int64 number of real tokens per row

    @property
    def batch_size(self) -> int:
        return self.tokens_BS.shape[0]

    def slice(self, a: int, b: int) -> RolloutBatch:
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
        )
