"""The G-OPD loss as a megatron-core loss function: the student's logits in, ``(loss, n, report)`` out.

The trainer calls :func:`gopd_loss` inside the ``loss_func`` that its forward step returns, on the
student's final hidden states (the model stops before its output layer) and output weight: the
logits are then made in fp32, one chunk of tokens at a time, and never materialised for the whole
micro-batch (:mod:`megatron_gopd.vocab_parallel.output_layer`)::

    def forward_step(data_iterator, model):
        mb = next(data_iterator)                                   # RolloutBatch on the device
        with final_hidden_states(model):
            hidden_SBH = model(mb.tokens_BS, position_ids, None)   # [S, B, H]
        def loss_func(hidden_SBH):
            student = OutputLayer(output_rows(model, hidden_SBH, grad=True), output_weight(model),
                                  arch.vocab_size, temperature=T)
            return gopd_loss(student, mb, cfg, tp_group=tp_group)
        return hidden_SBH, loss_func

(``[B, S, V_padded / TP]`` logits, e.g. a GPTModel's own, are accepted too.)

Temperature. The rollout engine samples ``y_t ~ pi_T = softmax(z_t / T)`` and reports
``log pi_T(y_t)``. The policy the student follows is therefore ``pi_T``, and every student term
here is of ``pi_T`` (the output layer divides its logits by ``T``): the advantage's
``log pi_theta``, the IS ratio against the engine's log-prob (like with like), the entropy. The
sampled estimator's ``A_t grad log pi_T(y_t)`` is unbiased for ``grad E_{y ~ pi_T}[A(y)]`` because
``y_t`` is drawn from ``pi_T`` itself; a sampler that truncates the distribution (top-p, top-k,
min-p) draws from another one, which is why the trainer refuses it. With respect to the logits,
``d log pi_T(y) / d z = (e_y - pi_T) / T``: at ``T < 1`` the gradient reaching the untempered
logits is ``1 / T`` times that of the same sample under ``pi_1``, as it must be for the tempered
objective. The teacher and the reference are scored at the same ``T`` by default (the G-OPD reward
of the tempered student against the equally tempered teacher); ``--teacher-temperature`` and
``--ref-temperature`` set theirs apart.

Contract with megatron-core (``config.calculate_per_token_loss=True``): the schedule back-propagates
the returned ``loss`` unscaled, sums ``num_tokens`` over micro-batches, and
``finalize_model_grads`` all-reduces the gradients and that count over data-parallel ranks and
divides the former by the latter. So ``loss`` is a *sum* and ``num_tokens`` its weight::

    token_mean:  loss = sum_{b,t} m_bt l_bt                    num_tokens = sum_{b,t} m_bt
    seq_mean:    loss = sum_b (sum_t m_bt l_bt) / n_b          num_tokens = #{b : n_b > 0}

and the gradient is that of the global mean, however the global batch is split over micro-batches
and ranks. The per-token term ``l_bt`` depends on the estimator (:class:`GOPDLossConfig`):

    sampled     l = w_t sg[A_t] log pi_theta(y_t)         (w_t: truncated IS weight, or 1)
    full_vocab  l = J_t = sum_y pi_theta(y) A_t(y)       (exact expectation over y_t)
    top_k       l = J_t on the student's top-k tokens + one rest cell

``objective="fdiv"`` (OPD+, sampled estimator) replaces ``A_t`` by the f-divergence advantage of
:mod:`megatron_gopd.gopd.fdiv` (the report gains ``fdiv``, the per-token divergence estimate, and
``fdiv_clamped``, the share of clamped log-ratios); ``divergence="reverse_kl"`` is G-OPD exactly.

``report`` maps metric names (see :mod:`megatron_gopd.gopd.metrics`) and ``"{domain}/{name}"`` to
fp32 ``[weighted_sum, weight]``; ``"loss"`` is ``[loss, num_tokens]``. Sum reports over
micro-batches and DP ranks, then :func:`~megatron_gopd.gopd.metrics.finalize_report`.
"""

from __future__ import annotations

import torch

from megatron_gopd.gopd import (
    GOPDLossConfig,
    fdiv_advantages,
    gopd_advantages,
    label_mask,
    row_contributions,
    shift_labels,
    token_metrics,
    truncated_is_weights,
)
from megatron_gopd.gopd.metrics import build_report
from megatron_gopd.types import RolloutBatch
from megatron_gopd.vocab_parallel import (
    GOPDObjective,
    vocab_parallel_gopd_objective,
    vocab_parallel_logprobs,
)
from megatron_gopd.vocab_parallel.output_layer import (
    FrozenLogits,
    OutputLayer,
    output_layer_gopd_objective,
    output_layer_logprobs,
)

__all__ = ["gopd_loss"]

Report = dict[str, torch.Tensor]


def gopd_loss(
    logits_BSV: torch.Tensor | OutputLayer,
    mb: RolloutBatch,
    cfg: GOPDLossConfig,
    *,
    tp_group=None,
    vocab_size: int | None = None,
    teacher_logits_BSV: torch.Tensor | FrozenLogits | None = None,
    ref_logits_BSV: torch.Tensor | FrozenLogits | None = None,
) -> tuple[torch.Tensor, torch.Tensor, Report]:
    """The student's G-OPD loss for one micro-batch, in megatron-core's per-token-loss contract.

    Args:
        logits_BSV: the student's logits, either ``[B, S, V_padded / TP]`` vocab-parallel logits
            (GPTModel with ``parallel_output=True``; position ``j`` predicts
            ``mb.tokens_BS[:, j + 1]``; with the sampled estimator and fp32 logits they are
            overwritten, softmax then gradient, like megatron-core's cross-entropy does: do not
            read them after this call), or the student's :class:`OutputLayer` (its final hidden
            states, one row per ``(b, s)``, and output weight at the sampling temperature): the
            trainer's path, fp32 logits chunk by chunk, never all at once.
        mb: the micro-batch (``RolloutBatch`` on the logits' device).
        cfg: the loss configuration.
        tp_group: the tensor-parallel group the vocabulary is split over (None: TP = 1).
        vocab_size: real vocabulary size; logits columns beyond it (padding) are ignored (an
            :class:`OutputLayer` carries its own).
        teacher_logits_BSV: the teacher's logits, same partition (``full_vocab`` / ``top_k``):
            a tensor like ``logits_BSV``, or :class:`FrozenLogits` with an :class:`OutputLayer`.
        ref_logits_BSV: the reference's logits (``full_vocab`` / ``top_k`` with lambda != 1).

    Returns:
        ``(loss, num_tokens, report)``: fp32 scalar sum, int32 scalar count (tokens, or sequences
        for ``seq_mean``), and ``{name: fp32 [sum, weight]}``.
    """
    labels_BS = shift_labels(mb.tokens_BS)
    mask_BS = label_mask(mb.response_mask_BS)
    lam_B = mb.lam_B.float()
    if isinstance(logits_BSV, OutputLayer):
        rows = mb.packed.num_tokens if mb.packed is not None else labels_BS.numel()
        if logits_BSV.hidden.shape[0] != rows:
            raise ValueError(
                f"{logits_BSV.hidden.shape[0]} hidden rows do not match tokens "
                f"{tuple(labels_BS.shape)} ({rows} rows expected)"
            )
    elif logits_BSV.shape[:2] != labels_BS.shape:
        raise ValueError(
            f"logits {tuple(logits_BSV.shape)} do not match tokens {tuple(labels_BS.shape)}"
        )
    if cfg.tis_cap is not None and mb.rollout_logprobs_BS is None:
        raise ValueError("tis_cap is set but the batch has no rollout log-probs")
    if cfg.estimator != "sampled" and teacher_logits_BSV is None:
        raise ValueError(f"estimator {cfg.estimator!r} needs the teacher's logits")

    extra: dict[str, torch.Tensor] = {}
    if isinstance(logits_BSV, OutputLayer):
        logp_BS, entropy_BS, obj = _from_output_layer(
            logits_BSV, mb, labels_BS, lam_B, cfg, tp_group, teacher_logits_BSV, ref_logits_BSV
        )
    else:
        logp_BS, entropy_BS, obj = _from_logits(
            logits_BSV,
            labels_BS,
            lam_B,
            cfg,
            tp_group,
            vocab_size,
            teacher_logits_BSV,
            ref_logits_BSV,
        )
    if obj is not None:
        extra["kl_teacher_exact" if cfg.estimator == "full_vocab" else "kl_teacher_topk"] = (
            obj.kl_teacher
        )

    # The sampled-token advantage: the loss weight for "sampled", a metric for the others.
    if cfg.objective == "fdiv":
        adv_BS = _fdiv_advantages(logp_BS, mb, cfg, mask_BS, extra)
    else:
        adv_BS = gopd_advantages(
            logp_BS, mb.teacher_logprobs_BS, mb.ref_logprobs_BS, lam_B, mask=mask_BS
        )
    isw = None
    if mb.rollout_logprobs_BS is not None:
        isw = truncated_is_weights(logp_BS, mb.rollout_logprobs_BS, cfg.tis_cap, mask=mask_BS)

    if cfg.estimator == "sampled":
        coef_BS = adv_BS if cfg.tis_cap is None else adv_BS * isw.weight
        per_token_BS = coef_BS * logp_BS
    else:
        per_token_BS = obj.objective
    contrib_B, weight_B = row_contributions(per_token_BS, mask_BS, cfg.aggregation)
    loss = contrib_B.sum()
    num_tokens = weight_B.sum().round().to(torch.int)

    n_B = mask_BS.sum(dim=-1)
    values = token_metrics(
        logp_BS,
        mb.teacher_logprobs_BS,
        adv_BS,
        ref_logprobs=mb.ref_logprobs_BS,
        entropy=entropy_BS,
        is_weights=isw,
    )
    values.update(extra)
    report = build_report(
        values,
        mask_BS,
        mb.domain_ids_B,
        mb.domains,
        row_values={"loss": (contrib_B, weight_B), "response_length": (n_B, (n_B > 0).float())},
        # rows with lambda == 1 need no reference (their reference slots are placeholders)
        row_masks=dict.fromkeys(("implicit_reward", "kl_ref"), lam_B != 1.0),
    )
    return loss, num_tokens, report


def _from_logits(logits_BSV, labels_BS, lam_B, cfg, tp_group, vocab_size, teacher, ref):
    """(log-prob, entropy, objective or None) of the sampled tokens from materialised logits."""
    chunk = cfg.chunk_elements_for(logits_BSV.device)
    if cfg.estimator == "sampled":
        logp_BS, entropy_BS = vocab_parallel_logprobs(
            logits_BSV,
            labels_BS,
            tp_group,
            vocab_size=vocab_size,
            with_entropy=True,
            chunk_elements=chunk,
            overwrite_logits=True,  # the logits' only reader: Megatron CE's memory footprint
        )
        return logp_BS, entropy_BS, None
    obj = vocab_parallel_gopd_objective(
        logits_BSV,
        teacher,
        labels_BS,
        lam_B.unsqueeze(-1),
        tp_group,
        ref_logits=ref,
        vocab_size=vocab_size,
        top_k=cfg.top_k if cfg.estimator == "top_k" else None,
        chunk_elements=chunk,
    )
    return obj.student_logprobs, obj.entropy, obj


def _from_output_layer(student, mb, labels_BS, lam_B, cfg, tp_group, teacher, ref):
    """The same from the student's output layer, fp32 logits one chunk of tokens at a time.

    The output layer's rows are the model's tokens: the ``[B, S]`` positions row by row, or, for
    a packed micro-batch, the packed sequences; per-row results are then gathered into the
    ``[B, S]`` layout (``mb.row_BS``), through which the gradient flows back to the packed rows."""
    shape = labels_BS.shape
    chunk = cfg.chunk_elements_for(student.hidden.device)
    if mb.packed is not None:
        target_N = mb.packed.labels_1T().reshape(-1)
        row_BS = mb.row_BS
        lam_N = torch.zeros(target_N.shape, dtype=torch.float32, device=target_N.device)
        real = torch.arange(shape[1], device=row_BS.device) < mb.seq_lens_B.unsqueeze(-1)
        lam_N[row_BS[real]] = lam_B.unsqueeze(-1).expand(shape)[real]

        def to_BS(x):
            return x[row_BS]

    else:
        target_N = labels_BS.reshape(-1)
        lam_N = lam_B.unsqueeze(-1).expand(shape).reshape(-1)

        def to_BS(x):
            return x.view(shape)

    if cfg.estimator == "sampled":
        lp, ent = output_layer_logprobs(
            student, target_N, tp_group, with_entropy=True, chunk_elements=chunk
        )
        return to_BS(lp), to_BS(ent), None
    if not isinstance(teacher, FrozenLogits) or not (ref is None or isinstance(ref, FrozenLogits)):
        raise ValueError("an OutputLayer student needs FrozenLogits for the teacher and reference")
    obj = output_layer_gopd_objective(
        student,
        teacher,
        target_N,
        lam_N,
        tp_group,
        ref=ref,
        top_k=cfg.top_k if cfg.estimator == "top_k" else None,
        chunk_elements=chunk,
    )
    obj = GOPDObjective(*(to_BS(o) for o in obj))
    return obj.student_logprobs, obj.entropy, obj


def _fdiv_advantages(
    logp_BS: torch.Tensor,
    mb: RolloutBatch,
    cfg: GOPDLossConfig,
    mask_BS: torch.Tensor,
    extra: dict[str, torch.Tensor],
) -> torch.Tensor:
    """OPD+ (``objective="fdiv"``): the f-divergence advantage of the sampled tokens; adds the
    per-token divergence estimate and clamp indicator to ``extra`` (the report's metrics)."""
    fd = fdiv_advantages(
        logp_BS,
        mb.teacher_logprobs_BS,
        mb.ref_logprobs_BS,
        mb.lam_B.float(),
        mask=mask_BS,
        divergence=cfg.divergence,
        alpha=cfg.alpha,
        corrected=cfg.fdiv_correction,
        max_log_ratio=cfg.fdiv_max_log_ratio,
    )
    extra["fdiv"], extra["fdiv_clamped"] = fd.estimate, fd.clamped
    return fd.advantage
