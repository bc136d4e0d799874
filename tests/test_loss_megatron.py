"""gopd_loss inside megatron-core's training step: the gradient of the global mean, whatever the split.

A tiny GPTModel (``build_gpt``) wrapped in megatron-core's ``DistributedDataParallel``, the
forward-backward schedule from ``get_forward_backward_func`` and ``finalize_model_grads`` wired as
Megatron-LM's ``train_step`` does (``config.finalize_model_grads_func``; ``config.no_sync_func =
model.no_sync`` when gradient reduction overlaps the backward). The same global batch of 4 rows
(with different response lengths, so micro-batches hold different token counts) is split over
(data-parallel ranks, micro-batches) in several ways; the final ``main_grad`` of every parameter
must equal the gradient of the global loss computed by plain autograd on an unwrapped copy of the
model with the loss written from the formulas (float64), and the reported loss its value.

Tolerance: fp32 model arithmetic (reduction order changes with the micro-batch shape) against a
float64 loss: observed differences are 2e-7 to 5e-7 of the largest gradient entry; we allow 2e-6.
A negative control shows the check bites: a loss that returns per-micro-batch means (a common
mistake) fails it.
"""

import dataclasses
import sys

import pytest
import torch
import torch.nn.functional as F

from megatron_gopd.gopd import GOPDLossConfig
from megatron_gopd.models.arch import ModelArch
from megatron_gopd.parallel import ParallelConfig
from megatron_gopd.testing import run_distributed
from megatron_gopd.types import RolloutBatch

B, SEQ, V_REAL, SEED = 4, 12, 50, 1234
ARCH = ModelArch(
    family="llama",
    hf_architecture="LlamaForCausalLM",
    vocab_size=V_REAL,
    padded_vocab_size=64,
    hidden_size=32,
    ffn_hidden_size=64,
    num_layers=2,
    num_attention_heads=4,
    num_query_groups=2,
    head_dim=8,
    norm_eps=1e-6,
    rope_theta=10000.0,
    max_position_embeddings=32,
    tie_word_embeddings=False,
    qkv_bias=False,
    qk_norm=False,
)
CASES = {
    "sampled_token_mean": GOPDLossConfig(),
    "sampled_seq_mean_tis": GOPDLossConfig(aggregation="seq_mean", tis_cap=1.5),
    "full_vocab": GOPDLossConfig(estimator="full_vocab"),
}


def global_batch():
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, V_REAL, (B, SEQ), generator=g)
    mask = torch.zeros(B, SEQ)
    for b, (a, e) in enumerate([(2, 11), (5, 8), (1, 11), (9, 10)]):
        mask[b, a:e] = 1.0
    mb = RolloutBatch(
        tokens_BS=tokens,
        response_mask_BS=mask,
        teacher_logprobs_BS=-torch.rand(B, SEQ, generator=g) * 5,
        ref_logprobs_BS=-torch.rand(B, SEQ, generator=g) * 5,
        rollout_logprobs_BS=-torch.rand(B, SEQ, generator=g) * 5,
        lam_B=torch.tensor([1.0, 1.25, 1.25, 0.5]),
        domain_ids_B=torch.tensor([0, 1, 1, 0]),
        domains=["math", "code"],
        seq_lens_B=torch.full((B,), SEQ),
    )
    teacher = torch.randn(B, SEQ, ARCH.padded_vocab_size, generator=g) * 2
    ref = torch.randn(B, SEQ, ARCH.padded_vocab_size, generator=g) * 2
    return mb, teacher, ref


def reference_loss(logits, cfg, mb, teacher, ref):
    """The global loss from the formulas, float64, on [B, S, V_padded] logits of the whole batch."""
    x = logits[..., :V_REAL].double()
    labels = torch.roll(mb.tokens_BS, -1, 1)
    m = mb.response_mask_BS.double().clone()
    m[:, -1] = 0
    lam = mb.lam_B.double()[:, None]
    lp = F.log_softmax(x, -1)
    s = lp.gather(-1, labels[..., None])[..., 0]
    q, r = mb.teacher_logprobs_BS.double(), mb.ref_logprobs_BS.double()
    if cfg.estimator == "sampled":
        A = ((s - q) + (lam - 1) * (r - q)).detach()
        w = 1.0
        if cfg.tis_cap:
            w = torch.exp(s.detach() - mb.rollout_logprobs_BS.double()).clamp(max=cfg.tis_cap)
        per_tok = w * A * s
    else:
        lq = F.log_softmax(teacher[..., :V_REAL].double(), -1)
        lr = F.log_softmax(ref[..., :V_REAL].double(), -1)
        L = lam[..., None]
        per_tok = (lp.exp() * (lp - L * lq + (L - 1) * lr)).sum(-1)
    n = m.sum(-1)
    if cfg.aggregation == "token_mean":
        return (per_tok * m).sum() / n.sum()
    return ((per_tok * m).sum(-1) / n).sum() / (n > 0).sum()


def _split(x, a, b):
    return None if x is None else x[a:b]


def _train(nmb, overlap, with_reference, per_microbatch_mean=False):
    from functools import partial

    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_gopd.models import build_gpt
    from megatron_gopd.trainer.loss import gopd_loss

    model = build_gpt(ARCH, seed=SEED, spec="local")
    config = model.config
    assert config.calculate_per_token_loss
    ddp = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=overlap, bucket_size=None
        ),
        module=model,
    )
    # As Megatron-LM's training setup does for a single model chunk without an optimizer:
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync if overlap else None

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    gmb, teacher, ref = global_batch()
    rows = B // dp
    mbs = rows // nmb
    pos = torch.arange(SEQ).unsqueeze(0).expand(mbs, SEQ)
    out = {}
    for name, cfg in CASES.items():
        micro = []
        for i in range(nmb):
            a = dp_rank * rows + i * mbs
            micro.append((gmb.slice(a, a + mbs), teacher[a : a + mbs], ref[a : a + mbs]))

        def forward_step(data_iterator, model, cfg=cfg):
            mb, t_logits, r_logits = next(data_iterator)
            logits = model(mb.tokens_BS, pos, None)
            loss_func = partial(
                gopd_loss,
                mb=mb,
                cfg=cfg,
                tp_group=None,
                vocab_size=V_REAL,
                teacher_logits_BSV=t_logits,
                ref_logits_BSV=r_logits,
            )
            if per_microbatch_mean:  # the mistake: each micro-batch's own mean, weight 1

                def loss_func(o, inner=loss_func):
                    loss, n, rep = inner(o)
                    return loss / n, torch.tensor(1, dtype=torch.int), rep

            return logits, loss_func

        ddp.zero_grad_buffer()
        reports = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro),
            model=[ddp],
            num_microbatches=nmb,
            seq_length=SEQ,
            micro_batch_size=mbs,
            forward_only=False,
        )
        total = torch.stack([r["loss"] for r in reports]).sum(0)
        dist.all_reduce(total, group=ps.get_data_parallel_group())
        grads = {n: p.main_grad.detach().clone() for n, p in ddp.module.named_parameters()}
        out[name] = dict(loss=total[0] / total[1], grads=grads)

    if with_reference:
        plain = build_gpt(ARCH, seed=SEED, spec="local")
        for (n, p), (_, q) in zip(plain.named_parameters(), ddp.module.named_parameters()):
            assert torch.equal(p, q), f"reference copy differs at {n}"
        full_pos = torch.arange(SEQ).unsqueeze(0).expand(B, SEQ)
        for name, cfg in CASES.items():
            plain.zero_grad()
            loss = reference_loss(plain(gmb.tokens_BS, full_pos, None), cfg, gmb, teacher, ref)
            loss.backward()
            out[name]["ref_loss"] = loss.detach()
            out[name]["ref_grads"] = {n: p.grad.clone() for n, p in plain.named_parameters()}
    return out


_REFERENCE = {}


def reference():
    if not _REFERENCE:
        _REFERENCE.update(run_distributed(_train, 1, 1, False, True, parallel=ParallelConfig())[0])
    return _REFERENCE


def _max_rel_diff(grads, ref_grads):
    scale = max(g.abs().max().item() for g in ref_grads.values())
    return max((grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads) / scale


# (world size = DP, micro-batches, overlapped grad reduction): 4 ways to split the same 4 rows
LAYOUTS = [(1, 1, False), (1, 4, False), (2, 2, True), (4, 1, False)]


@pytest.mark.parametrize(("dp", "nmb", "overlap"), LAYOUTS)
def test_main_grads_independent_of_split(dp, nmb, overlap):
    ref = reference()
    outs = run_distributed(_train, dp, nmb, overlap, False, parallel=ParallelConfig())
    for name in CASES:
        want = ref[name]
        for rank_out in outs:  # every DP rank holds the same reduced gradient
            got = rank_out[name]
            torch.testing.assert_close(got["loss"].double(), want["ref_loss"], rtol=2e-6, atol=1e-6)
            rel = _max_rel_diff(got["grads"], want["ref_grads"])
            assert rel < 2e-6, f"{name}: main_grad differs from the global-mean gradient by {rel}"


def test_negative_control_per_microbatch_mean_is_caught():
    """Returning each micro-batch's own mean (weight 1) weights tokens unequally: must fail."""
    ref = reference()
    outs = run_distributed(_train, 1, 4, False, False, True, parallel=ParallelConfig())
    rel = _max_rel_diff(
        outs[0]["sampled_token_mean"]["grads"], ref["sampled_token_mean"]["ref_grads"]
    )
    assert rel > 1e-2


# ---------------------------------------------------------------------------------- sequence parallelism


def _train_tp2(sequence_parallel, untag_norms=False, trainer_path=False):
    """One forward-backward of the whole batch (2 micro-batches) at TP 2; returns the loss and
    this rank's main_grads. ``untag_norms``: the mistake of a norm whose weight is not marked
    ``sequence_parallel`` (its gradient then covers only this rank's slice of the sequence)."""
    import dataclasses
    from functools import partial

    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_gopd.models import build_gpt
    from megatron_gopd.trainer.loss import gopd_loss

    arch = dataclasses.replace(ARCH, family="qwen3", qk_norm=True)  # q/k norms too
    model = build_gpt(arch, seed=SEED, spec="local", sequence_parallel=sequence_parallel)
    if untag_norms:
        for name, p in model.named_parameters():
            if "layernorm" in name and "q_layernorm" not in name and "k_layernorm" not in name:
                p.sequence_parallel = False
    ddp = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, bucket_size=None),
        module=model,
    )
    model.config.finalize_model_grads_func = finalize_model_grads
    gmb, _, _ = global_batch()
    mbs = B // 2
    pos = torch.arange(SEQ).unsqueeze(0).expand(mbs, SEQ)

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        if trainer_path:  # train_step's: final hidden states, the fp32 output layer in the loss
            from megatron_gopd.models.build import final_hidden_states
            from megatron_gopd.trainer.update import student_loss

            with final_hidden_states(model):
                hidden = model(mb.tokens_BS, pos, None)
            return hidden, partial(
                student_loss,
                model=model,
                mb=mb,
                cfg=GOPDLossConfig(),
                tp_group=ps.get_tensor_model_parallel_group(),
                vocab_size=V_REAL,
                temperature=TEMP,
            )
        logits = model(mb.tokens_BS, pos, None)
        return logits / TEMP if trainer_path is None else logits, partial(
            gopd_loss,
            mb=mb,
            cfg=GOPDLossConfig(),
            tp_group=ps.get_tensor_model_parallel_group(),
            vocab_size=V_REAL,
        )

    ddp.zero_grad_buffer()
    reports = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([gmb.slice(0, mbs), gmb.slice(mbs, B)]),
        model=[ddp],
        num_microbatches=2,
        seq_length=SEQ,
        micro_batch_size=mbs,
        forward_only=False,
    )
    total = torch.stack([r["loss"] for r in reports]).sum(0)
    grads = {n: p.main_grad.detach().clone() for n, p in ddp.module.named_parameters()}
    return dict(loss=total[0] / total[1], grads=grads)


def test_sequence_parallel_training_matches_tensor_parallel():
    """TP 2 with sequence parallelism gives the loss and every gradient of TP 2 without it
    (same weights, same batch); the norms' weights (replicated, each rank seeing half of the
    sequence) must have their gradients summed over TP. Negative control: untagged norms."""
    plain = run_distributed(_train_tp2, 2, False, parallel=ParallelConfig(2, 1))
    sp = run_distributed(_train_tp2, 2, True, parallel=ParallelConfig(2, 1, True))
    for want, got in zip(plain, sp, strict=True):
        torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-6, atol=1e-6)
        rel = _max_rel_diff(got["grads"], want["grads"])
        assert rel < 2e-6, f"sequence parallelism changes the gradients by {rel}"
    wrong = run_distributed(_train_tp2, 2, True, True, parallel=ParallelConfig(2, 1, True))
    assert _max_rel_diff(wrong[0]["grads"], plain[0]["grads"]) > 1e-3


# ---------------------------------------------------------------------------------- the trainer's path

TEMP, TEMP_TEACHER, TEMP_REF, H_FROZEN = 0.7, 0.8, 1.3, 16


def frozen_layers():
    """A teacher's and a reference's final hidden states ``[B, S, H]`` and output weights."""
    g = torch.Generator().manual_seed(21)
    th, rh = (torch.randn(B, SEQ, H_FROZEN, generator=g) for _ in range(2))
    tw, rw = (torch.randn(ARCH.padded_vocab_size, H_FROZEN, generator=g) * 0.6 for _ in range(2))
    return th, tw, rh, rw


def _train_trainer_path(nmb):
    """train_step's forward step (the model stops at its final hidden states; ``student_loss``
    applies the fp32 output layer chunk by chunk at temperature TEMP) on this rank's share of the
    global batch; the frozen roles as FrozenLogits at their own temperatures. Returns the loss and
    this rank's main_grads per case."""
    from functools import partial

    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_gopd.models import build_gpt
    from megatron_gopd.models.build import final_hidden_states
    from megatron_gopd.trainer.update import student_loss
    from megatron_gopd.vocab_parallel.output_layer import FrozenLogits, OutputLayer

    model = build_gpt(ARCH, seed=SEED, spec="local")
    ddp = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, bucket_size=None),
        module=model,
    )
    model.config.finalize_model_grads_func = finalize_model_grads
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    gmb, _, _ = global_batch()
    th, tw, rh, rw = frozen_layers()
    rows = B // dp
    mbs = rows // nmb
    pos = torch.arange(SEQ).unsqueeze(0).expand(mbs, SEQ)

    def frozen(h, w, a, temperature):
        layer = OutputLayer(h[a : a + mbs].reshape(-1, H_FROZEN), w, V_REAL, temperature)
        return FrozenLogits.single(layer)

    out = {}
    for name, cfg in CASES.items():
        starts = [dp_rank * rows + i * mbs for i in range(nmb)]

        def forward_step(data_iterator, model, cfg=cfg):
            a = next(data_iterator)
            mb = gmb.slice(a, a + mbs)
            with final_hidden_states(model):
                hidden = model(mb.tokens_BS, pos, None)
            extra = {}
            if cfg.estimator != "sampled":
                extra = dict(
                    teacher_logits_BSV=frozen(th, tw, a, TEMP_TEACHER),
                    ref_logits_BSV=frozen(rh, rw, a, TEMP_REF),
                )
            return hidden, partial(
                student_loss,
                model=model,
                mb=mb,
                cfg=cfg,
                tp_group=None,
                vocab_size=V_REAL,
                temperature=TEMP,
                **extra,
            )

        ddp.zero_grad_buffer()
        reports = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(starts),
            model=[ddp],
            num_microbatches=nmb,
            seq_length=SEQ,
            micro_batch_size=mbs,
            forward_only=False,
        )
        total = torch.stack([r["loss"] for r in reports]).sum(0)
        dist.all_reduce(total, group=ps.get_data_parallel_group())
        grads = {n: p.main_grad.detach().clone() for n, p in ddp.module.named_parameters()}
        out[name] = dict(loss=total[0] / total[1], grads=grads)
    return out


def _trainer_path_reference():
    """The global loss from the formulas at the temperatures (float64), by plain autograd on an
    unwrapped copy of the model, for every case."""
    from megatron_gopd.models import build_gpt

    plain = build_gpt(ARCH, seed=SEED, spec="local")
    gmb, _, _ = global_batch()
    th, tw, rh, rw = frozen_layers()
    teacher, ref = (th @ tw.t()) / TEMP_TEACHER, (rh @ rw.t()) / TEMP_REF
    labels = torch.roll(gmb.tokens_BS, -1, 1)
    mb = dataclasses.replace(
        gmb,  # the sampled estimator's q and r: the frozen roles' tempered log-probs
        teacher_logprobs_BS=F.log_softmax(teacher[..., :V_REAL], -1)
        .gather(-1, labels[..., None])[..., 0]
        .float(),
        ref_logprobs_BS=F.log_softmax(ref[..., :V_REAL], -1)
        .gather(-1, labels[..., None])[..., 0]
        .float(),
    )
    pos = torch.arange(SEQ).unsqueeze(0).expand(B, SEQ)
    out = {}
    for name, cfg in CASES.items():
        plain.zero_grad()
        loss = reference_loss(plain(gmb.tokens_BS, pos, None) / TEMP, cfg, mb, teacher, ref)
        loss.backward()
        out[name] = dict(
            loss=loss.detach(), grads={n: p.grad.clone() for n, p in plain.named_parameters()}
        )
    return out, mb


@pytest.mark.parametrize(("dp", "nmb"), [(1, 2), (2, 1)])
def test_trainer_loss_is_the_global_mean_gradient_at_temperature(dp, nmb, monkeypatch):
    """The trainer's loss function (fp32 output layer, chunked, at the sampling temperature; the
    frozen roles' logits chunked at theirs) gives the loss and every main_grad of the global
    objective on ``softmax(logits / T)``, written from the formulas (issue 15, items 3 and 4)."""
    ref, mb = run_distributed(_trainer_path_reference, 1, parallel=ParallelConfig())[0]
    # the batch's teacher/reference log-probs are the tempered frozen roles' (as scoring makes them)
    monkeypatch.setattr(sys.modules[__name__], "global_batch", lambda: (mb, None, None))
    outs = run_distributed(_train_trainer_path, dp, nmb, parallel=ParallelConfig())
    for name in CASES:
        for got in outs:
            torch.testing.assert_close(
                got[name]["loss"].double(), ref[name]["loss"], rtol=2e-6, atol=1e-6
            )
            rel = _max_rel_diff(got[name]["grads"], ref[name]["grads"])
            assert rel < 2e-6, f"{name}: main_grad differs from the reference by {rel}"


def test_trainer_loss_under_tensor_and_sequence_parallelism():
    """At TP 2, with and without sequence parallelism, the trainer's loss function (hidden states
    gathered or copied into the TP region, each rank's vocabulary slice of the fp32 output layer,
    the hidden states' gradient summed over the ranks) gives the loss and every gradient of the
    model's own output layer with its logits divided by T (``trainer_path=None``)."""
    want = run_distributed(_train_tp2, 2, False, False, None, parallel=ParallelConfig(2, 1))
    for sp in (False, True):
        got = run_distributed(_train_tp2, 2, sp, False, True, parallel=ParallelConfig(2, 1, sp))
        for w, g in zip(want, got, strict=True):
            torch.testing.assert_close(g["loss"], w["loss"], rtol=1e-6, atol=1e-6)
            rel = _max_rel_diff(g["grads"], w["grads"])
            assert rel < 2e-6, f"sequence_parallel={sp}: gradients differ by {rel}"
