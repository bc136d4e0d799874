"""The student update: collate samples, run megatron-core's pipeline schedule with the G-OPD loss,
step the optimizer.

Collation aligns every per-token quantity with Megatron's *labels*: position ``j`` of a row holds
the value for token ``j + 1`` (the logits at ``j`` predict it). A response token at absolute index
``p`` therefore sits at position ``p - 1``.

The loss is a sum over tokens with ``config.calculate_per_token_loss=True``: megatron-core divides
the gradients by the token count summed over micro-batches and data-parallel ranks
(``finalize_model_grads``), so the update is the exact token-mean of the global batch however it
is split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch

from megatron_gopd import parallel
from megatron_gopd.flags import flag
from megatron_gopd.types import PackedSeqs, RolloutBatch, Sample
from megatron_gopd.utils import get_logger

__all__ = [
    "OptimConfig",
    "Optimizer",
    "build_optimizer",
    "collate",
    "collate_packed",
    "skip_non_finite_updates",
    "student_loss",
    "train_step",
]

log = get_logger(__name__)


@dataclass(frozen=True)
class OptimConfig:
    """Adam, gradient clipping and the learning-rate schedule (Megatron-LM's flag names)."""

    FLAG_GROUP = "optimization (Megatron-LM names)"

    lr: float = flag(1e-5, help="peak learning rate (the paper: 1e-5, constant)")
    min_lr: float = flag(0.0, help="learning rate at the end of a cosine or linear decay")
    lr_decay_style: Literal["constant", "cosine", "linear"] = flag(
        "constant", help="learning-rate schedule after the warm-up"
    )
    lr_warmup_iters: int = flag(0, help="steps of linear warm-up from 0 to --lr")
    lr_decay_iters: int | None = flag(
        None, help="steps over which the learning rate decays", default_help="--train-iters"
    )
    weight_decay: float = flag(0.0, help="decoupled (AdamW) weight decay")
    adam_beta1: float = flag(0.9, help="Adam's first-moment decay")
    adam_beta2: float = flag(0.98, help="Adam's second-moment decay")
    adam_eps: float = flag(1e-8, help="Adam's epsilon")
    clip_grad: float = flag(1.0, help="clip the global gradient norm to this (0: no clipping)")
    use_distributed_optimizer: bool = flag(
        False,
        group="parallelism and batches (Megatron-LM names)",
        help="shard the optimizer state and fp32 main parameters over the data-parallel ranks "
        "(Megatron's distributed optimizer)",
    )


def collate(
    samples: list[Sample],
    *,
    domains: list[str],
    lam_of,
    with_ref: bool,
    pad_rows_to: int = 1,
    pad_to_multiple: int = 8,
    sequence_multiple: int = 1,
    seq_len: int | None = None,
) -> RolloutBatch:
    """Right-padded, label-aligned tensors for ``samples`` (rows added up to a multiple of
    ``pad_rows_to`` are all-masked dummies, so every micro-batch has one shape). The length is a
    multiple of ``pad_to_multiple`` and of ``sequence_multiple`` (the model's: TP under sequence
    parallelism)."""
    n = len(samples)
    rows = max(1, -(-n // pad_rows_to) * pad_rows_to)
    longest = max((len(s.tokens) for s in samples), default=2)
    mult = math.lcm(pad_to_multiple, sequence_multiple)
    S = seq_len or max(2, -(-longest // mult) * mult)
    if S % sequence_multiple:
        raise ValueError(f"sequence length {S} is not a multiple of {sequence_multiple}")
    tokens = torch.zeros((rows, S), dtype=torch.long)
    mask = torch.zeros((rows, S), dtype=torch.float32)
    teacher = torch.zeros((rows, S), dtype=torch.float32)
    ref = torch.zeros((rows, S), dtype=torch.float32) if with_ref else None
    have_rollout = n > 0 and all(s.rollout_logprobs_T is not None for s in samples)
    rollout = torch.zeros((rows, S), dtype=torch.float32) if have_rollout else None
    lam = torch.ones(rows, dtype=torch.float32)
    dom = torch.zeros(rows, dtype=torch.long)
    lens = torch.zeros(rows, dtype=torch.long)
    for i, s in enumerate(samples):
        t = s.tokens
        P, R = len(s.prompt_ids), len(s.response_ids)
        tokens[i, : len(t)] = torch.as_tensor(t)
        lens[i] = len(t)
        lam[i] = lam_of(s.domain)
        dom[i] = domains.index(s.domain)
        if R == 0 or s.finish_reason == "abort":
            continue
        a, b = P - 1, P - 1 + R
        mask[i, a:b] = 1.0
        teacher[i, a:b] = torch.as_tensor(s.teacher_logprobs_T, dtype=torch.float32)
        if with_ref:
            if s.ref_logprobs_T is None:
                raise ValueError(f"sample of prompt {s.prompt_index} has no reference log-probs")
            ref[i, a:b] = torch.as_tensor(s.ref_logprobs_T, dtype=torch.float32)
        if rollout is not None:
            rollout[i, a:b] = torch.as_tensor(s.rollout_logprobs_T, dtype=torch.float32)
    return RolloutBatch(
        tokens_BS=tokens,
        response_mask_BS=mask,
        teacher_logprobs_BS=teacher,
        ref_logprobs_BS=ref,
        rollout_logprobs_BS=rollout,
        lam_B=lam,
        domain_ids_B=dom,
        domains=list(domains),
        seq_lens_B=lens,
    )


def collate_packed(
    samples: list[Sample],
    *,
    domains: list[str],
    lam_of,
    with_ref: bool,
    sequence_multiple: int = 1,
    pad_to_multiple: int = 8,
) -> RolloutBatch:
    """One packed micro-batch: the model runs on ``samples`` laid end to end
    (:class:`~megatron_gopd.types.PackedSeqs`, no padding between them, ``T`` a multiple of
    ``pad_to_multiple`` and of the model's ``sequence_multiple``); the loss reads the per-token
    values in the usual ``[B, S]`` layout (:func:`collate`). An empty list (a data-parallel rank
    with fewer micro-batches' worth of samples) gives one all-masked two-token sequence."""
    batch = collate(samples, domains=domains, lam_of=lam_of, with_ref=with_ref)
    sequences = [s.tokens for s in samples] or [[0, 0]]
    if not samples:
        batch.seq_lens_B[:] = 2
    packed = PackedSeqs.of(sequences, math.lcm(pad_to_multiple, sequence_multiple))
    batch.packed = packed
    batch.row_BS = packed.row_index_BS(batch.tokens_BS.shape[1])
    return batch


@dataclass
class Optimizer:
    ddp: object  # megatron DistributedDataParallel around the student's GPTModel
    optimizer: object  # MegatronOptimizer
    scheduler: object  # OptimizerParamScheduler


def build_optimizer(model, optim_cfg, *, train_iters: int, bf16: bool) -> Optimizer:
    """Megatron DDP + optimizer + LR scheduler, wired into the model config as Megatron-LM does."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    config = model.config
    ddp = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            use_distributed_optimizer=optim_cfg.use_distributed_optimizer,
        ),
        module=model,
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=optim_cfg.lr,
            min_lr=optim_cfg.min_lr,
            weight_decay=optim_cfg.weight_decay,
            adam_beta1=optim_cfg.adam_beta1,
            adam_beta2=optim_cfg.adam_beta2,
            adam_eps=optim_cfg.adam_eps,
            clip_grad=optim_cfg.clip_grad,
            bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_distributed_optimizer=optim_cfg.use_distributed_optimizer,
        ),
        [ddp],
    )
    decay_iters = optim_cfg.lr_decay_iters or train_iters
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if optim_cfg.lr_warmup_iters else optim_cfg.lr,
        max_lr=optim_cfg.lr,
        min_lr=optim_cfg.min_lr,
        lr_warmup_steps=optim_cfg.lr_warmup_iters,
        lr_decay_steps=max(decay_iters, optim_cfg.lr_warmup_iters + 1),
        lr_decay_style=optim_cfg.lr_decay_style,
        start_wd=optim_cfg.weight_decay,
        end_wd=optim_cfg.weight_decay,
        wd_incr_steps=max(1, train_iters),
        wd_incr_style="constant",
    )
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = ddp.no_sync
    skip_non_finite_updates(optimizer)
    return Optimizer(ddp=ddp, optimizer=optimizer, scheduler=scheduler)


def skip_non_finite_updates(optimizer) -> None:
    """Make ``optimizer.step()`` skip the update when the gradient norm is NaN or inf.

    Megatron's optimizer skips such a step only when a loss scaler looks for inf/NaN (fp16); in
    fp32 and bf16 a NaN gradient goes into Adam and turns every weight into NaN, silently. Here
    the step is skipped the same way: weights, optimizer state and (in :func:`train_step`) the LR
    schedule are left as they were, ``step()`` returns ``(False, grad_norm, ...)`` and the skip is
    counted. The gradient norm is the one megatron-core computes for clipping (over every
    model-parallel and, with the distributed optimizer, data-parallel rank), so all ranks agree.

    ``ChainedOptimizer.step`` (megatron-core 0.16 - 0.19) computes the norm with
    ``get_grad_norm()`` and then applies the update with ``step_with_ready_grads()``; both are
    wrapped on this instance. Should a later version not ask for the norm first, the wrapper
    computes it itself.
    """
    get_grad_norm, step_with_ready_grads = optimizer.get_grad_norm, optimizer.step_with_ready_grads
    seen: list[float] = []

    def recording_get_grad_norm():
        norm = get_grad_norm()
        seen.append(float(norm))
        return norm

    def guarded_step_with_ready_grads():
        norm = seen.pop() if seen else float(get_grad_norm())
        seen.clear()
        if not math.isfinite(norm):
            return False
        return step_with_ready_grads()

    optimizer.get_grad_norm = recording_get_grad_norm
    optimizer.step_with_ready_grads = guarded_step_with_ready_grads


def train_step(
    opt: Optimizer,
    batch: RolloutBatch | list[RolloutBatch],
    *,
    micro_batch_size: int = 1,
    loss_cfg,
    vocab_size: int,
    temperature: float = 1.0,
    frozen_logits=None,
) -> tuple[list[dict], dict[str, float]]:
    """One optimizer step on ``batch`` (this data-parallel rank's share): a padded batch cut into
    micro-batches of ``micro_batch_size`` rows, or a list of packed micro-batches
    (:func:`collate_packed`; every data-parallel rank must pass as many).

    The student's log-probs are those of ``softmax(logits / temperature)`` (the sampling
    temperature: the policy the rollouts came from), with fp32 logits made chunk by chunk from the
    final hidden states (:mod:`megatron_gopd.vocab_parallel.output_layer`).
    ``frozen_logits(mb) -> (teacher, reference)`` supplies the frozen roles'
    :class:`~megatron_gopd.vocab_parallel.output_layer.FrozenLogits` for the full-vocabulary
    estimators (None for the sampled estimator). Returns the per-micro-batch loss reports (last
    pipeline stage; [] elsewhere) and optimizer stats.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_gopd import platform
    from megatron_gopd.models.build import final_hidden_states

    device = platform.device()
    if isinstance(batch, list):
        micro = [mb.to(device) for mb in batch]
        micro_batch_size, S = 1, max(mb.packed.num_tokens for mb in micro)
    else:
        rows, S = batch.tokens_BS.shape
        if rows % micro_batch_size:
            raise ValueError(
                f"batch of {rows} rows is not a multiple of micro batch {micro_batch_size}"
            )
        micro = [
            batch.slice(a, a + micro_batch_size).to(device)
            for a in range(0, rows, micro_batch_size)
        ]
    tp_group = (
        ps.get_tensor_model_parallel_group()
        if ps.get_tensor_model_parallel_world_size() > 1
        else None
    )
    position_ids = torch.arange(S, device=device).unsqueeze(0).expand(micro_batch_size, S)

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        with final_hidden_states(model):
            if mb.packed is not None:
                hidden_SBH = model(
                    mb.packed.tokens_1T, None, None, packed_seq_params=mb.packed.params()
                )
            else:
                hidden_SBH = model(mb.tokens_BS, position_ids, None)
        extra = {}
        if frozen_logits is not None and ps.is_pipeline_last_stage():
            extra["teacher_logits_BSV"], extra["ref_logits_BSV"] = frozen_logits(mb)
        return hidden_SBH, partial(
            student_loss,
            model=model,
            mb=mb,
            cfg=loss_cfg,
            tp_group=tp_group,
            vocab_size=vocab_size,
            temperature=temperature,
            **extra,
        )

    opt.ddp.zero_grad_buffer()
    opt.optimizer.zero_grad()
    reports = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro),
        model=[opt.ddp],
        num_microbatches=len(micro),
        seq_length=S,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    ok, grad_norm, _ = opt.optimizer.step()
    if ok:
        opt.scheduler.step(increment=1)
    elif parallel.is_rank0():
        log.warning("the gradients are not finite (norm %s): this update is skipped", grad_norm)
    stats = {
        "optim/lr": opt.optimizer.param_groups[0]["lr"],
        "optim/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "optim/update_skipped": 0.0 if ok else 1.0,
    }
    return reports or [], stats


def student_loss(
    hidden_SBH: torch.Tensor,
    *,
    model,
    mb: RolloutBatch,
    cfg,
    tp_group,
    vocab_size: int,
    temperature: float,
    **frozen,
):
    """megatron-core's ``loss_func`` on the last stage: the student's fp32 output layer at the
    sampling temperature on its final hidden states, then :func:`gopd_loss`."""
    from megatron_gopd.models.build import output_rows, output_weight
    from megatron_gopd.trainer.loss import gopd_loss
    from megatron_gopd.vocab_parallel.output_layer import OutputLayer

    student = OutputLayer(
        output_rows(model, hidden_SBH, grad=True),
        output_weight(model),
        vocab_size,
        temperature=temperature,
    )
    return gopd_loss(student, mb, cfg, tp_group=tp_group, **frozen)
