"""Packing: the planner (token budget, data-parallel balance, equal micro-batch counts) against
brute force and hand-made cases, and the packed local attention against the unpacked forward."""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest
import torch

from megatron_gopd import packing
from megatron_gopd.gopd import GOPDLossConfig
from megatron_gopd.models.arch import ModelArch
from megatron_gopd.parallel import ParallelConfig
from megatron_gopd.testing import run_distributed
from megatron_gopd.utils import GopdError


def _long_tailed(n, seed):
    """Lengths shaped like reasoning rollouts: log-normal, median ~250, clipped to [16, 2048]."""
    rng = random.Random(seed)
    return [min(2048, max(16, int(rng.lognormvariate(5.5, 0.9)))) for _ in range(n)]


def test_first_fit_decreasing_by_hand():
    # 7+3, 6+4, 5+5, 8: four bins of <= 10, each index once, longest first
    bins = packing.first_fit_decreasing([7, 3, 6, 4, 5, 5, 8], 10)
    assert sorted(sorted(b) for b in bins) == [[0, 1], [2, 3], [4, 5], [6]]
    with pytest.raises(GopdError, match=r"a sequence of 12 tokens does not fit .* 10"):
        packing.first_fit_decreasing([3, 12], 10)


def test_balanced_partition_is_near_optimal():
    """Karmarkar-Karp against the exhaustive optimum on small instances (and never worse than
    round-robin on long-tailed ones)."""
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 100) for _ in range(rng.randint(1, 9))]
        parts = packing.balanced_partition(lengths, 2)
        assert sorted(i for p in parts for i in p) == list(range(len(lengths)))
        sums = [sum(lengths[i] for i in p) for p in parts]
        best = min(
            abs(sum(lengths) - 2 * sum(lengths[i] for i in c))
            for r in range(len(lengths) + 1)
            for c in itertools.combinations(range(len(lengths)), r)
        )
        # KK is optimal for most instances and within the largest item otherwise
        assert abs(sums[0] - sums[1]) <= max(best, max(lengths) // 2 + 1)
    lengths = _long_tailed(256, 1)
    kk = [sum(lengths[i] for i in p) for p in packing.balanced_partition(lengths, 8)]
    rr = [sum(lengths[r::8]) for r in range(8)]
    assert max(kk) - min(kk) < max(rr) - min(rr)
    assert max(kk) / (sum(lengths) / 8) < 1.02


@pytest.mark.parametrize("ranks,budget", [(1, 2048), (2, 4096), (4, 3000), (8, 2048)])
def test_plan_respects_budget_balance_and_equal_counts(ranks, budget):
    lengths = _long_tailed(200, ranks)
    out = packing.plan(lengths, budget, ranks)
    assert len(out) == ranks
    assert len({len(mbs) for mbs in out}) == 1, "every rank runs the same number of micro-batches"
    seen = sorted(i for mbs in out for mb in mbs for i in mb)
    assert seen == list(range(len(lengths)))
    for mbs in out:
        for mb in mbs:
            assert sum(lengths[i] for i in mb) <= budget
    totals = [sum(lengths[i] for mb in mbs for i in mb) for mbs in out]
    assert max(totals) - min(totals) <= max(lengths)
    # few micro-batches: within one of the volume bound of the busiest rank
    assert len(out[0]) <= -(-max(totals) // budget) + 1


def test_plan_with_fewer_sequences_than_ranks():
    out = packing.plan([5, 7], 16, 4)
    assert [sum(len(mb) for mb in mbs) for mbs in out].count(0) == 2
    assert {len(mbs) for mbs in out} == {1}


# ---------------------------------------------------------------------------------- attention


ARCH = ModelArch(
    family="qwen3",
    hf_architecture="Qwen3ForCausalLM",
    vocab_size=50,
    padded_vocab_size=64,
    hidden_size=32,
    ffn_hidden_size=64,
    num_layers=2,
    num_attention_heads=4,
    num_query_groups=2,
    head_dim=8,
    norm_eps=1e-6,
    rope_theta=10000.0,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    qkv_bias=False,
    qk_norm=True,
)
LENS = [5, 9, 3, 1, 12]
# ExOPD with per-domain lambdas, seq_mean and truncated IS: every per-sequence term of the loss
GOPD_CFG = GOPDLossConfig(aggregation="seq_mean", tis_cap=2.0)


def _packed_vs_padded(sp, boundaries=True):
    """max |packed - unpacked| logits on the real tokens, and the logits' scale."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_gopd.models import build_gpt

    m = build_gpt(ARCH, spec="local", seed=1, sequence_parallel=sp).eval()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 50, (n,), generator=g) for n in LENS]
    tp = m.config.tensor_model_parallel_size
    total = sum(LENS)
    pad = (-total) % tp
    lens = [*LENS, pad] if pad else list(LENS)  # the tail padding is a segment of its own
    if not boundaries:  # the negative control: one segment, attention across sequences
        lens = [sum(lens)]
    cu = torch.tensor([0, *torch.cumsum(torch.tensor(lens), 0).tolist()], dtype=torch.int32)
    tokens = torch.cat([*seqs, torch.zeros(pad, dtype=torch.long)])[None]
    psp = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=max(lens),
        max_seqlen_kv=max(lens),
    )
    with torch.no_grad():
        packed = m(tokens, None, None, packed_seq_params=psp)[0]
        S = 16
        batch = torch.zeros(len(seqs), S, dtype=torch.long)
        for i, s in enumerate(seqs):
            batch[i, : len(s)] = s
        padded = m(batch, torch.arange(S)[None].expand(len(seqs), S), None)
    ref = torch.cat([padded[i, :n] for i, n in enumerate(LENS)])
    return (packed[:total] - ref).abs().max().item(), ref.abs().max().item()


@pytest.mark.parametrize("tp,sp", [(1, False), (2, False), (2, True)], ids=["tp1", "tp2", "tp2-sp"])
def test_packed_attention_equals_unpacked(tp, sp):
    for diff, scale in run_distributed(
        _packed_vs_padded, tp, sp, parallel=ParallelConfig(tp, 1, sp)
    ):
        assert diff <= 1e-6 * scale


def test_negative_control_packing_without_boundaries():
    ((diff, scale),) = run_distributed(
        _packed_vs_padded, 1, False, False, parallel=ParallelConfig()
    )
    assert diff > 1e-2 * scale, "attention across sequence boundaries went unnoticed"


# ---------------------------------------------------------------------------------- recompute


RECOMPUTE = [
    dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
    dict(recompute_granularity="selective"),
]


def _grads_with_recompute(sp):
    """Gradients of a packed-free fwd/bwd with each recompute setting vs none: max |difference|."""
    from megatron_gopd.models import build_gpt
    from megatron_gopd.models.build import RecomputeConfig

    tokens = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))

    def grads(**kw):
        m = build_gpt(ARCH, spec="local", seed=1, sequence_parallel=sp, **kw).train()
        m(tokens, None, None).float().pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    ref = grads()
    out = []
    for flags in RECOMPUTE:
        g = grads(**RecomputeConfig(**flags).overrides(ARCH, 1))
        out.append(max((g[n] - ref[n]).abs().max().item() for n in ref))
    return out


@pytest.mark.parametrize("tp,sp", [(1, False), (2, True)], ids=["tp1", "tp2-sp"])
def test_recompute_gives_the_same_gradients(tp, sp):
    for diffs in run_distributed(_grads_with_recompute, tp, sp, parallel=ParallelConfig(tp, 1, sp)):
        assert max(diffs) <= 1e-6, diffs


def test_recompute_flags_are_checked():
    from megatron_gopd.models.build import RecomputeConfig

    bad = [
        (dict(recompute_granularity="full"), "needs --recompute-method"),
        (dict(recompute_granularity="selective", recompute_num_layers=1), "takes no"),
        (dict(recompute_method="uniform"), "need --recompute-granularity"),
        (
            dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=3),
            "divide the 4 layers",
        ),
        (
            dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=5),
            "between 1 and the 4 layers",
        ),
    ]
    four = dataclasses.replace(ARCH, num_layers=4)
    for flags, msg in bad:
        with pytest.raises(GopdError, match=msg):
            RecomputeConfig(**flags).overrides(four, 1)


# ---------------------------------------------------------------------------------- scoring


@pytest.fixture(scope="module")
def converted_qwen3(tmp_path_factory):
    from megatron_gopd.testing import make_tiny_hf_model
    from tests.test_parity_hf import _sequences, convert, hf_logprobs

    d = tmp_path_factory.mktemp("pack_score")
    hf = make_tiny_hf_model(d / "hf", "qwen3", seed=3)
    hf.config._attn_implementation = "eager"
    convert(d / "hf", d / "mcore")
    seqs = _sequences(hf.config.vocab_size, seed=5)
    return d / "mcore", seqs, hf_logprobs(hf.eval(), seqs)


def _score_both(ckpt, seqs, sp):
    from megatron_gopd.models import build_role
    from megatron_gopd.scoring import score_sequences

    role = build_role("teacher", ckpt, frozen=True, sequence_parallel=sp)
    padded = score_sequences(role, seqs, micro_batch_size=2)
    packed = score_sequences(role, seqs, max_tokens=100)  # 80 + 17; 33 + 9 + 5: two packs
    return padded, packed


@pytest.mark.parametrize(
    "tp,pp,sp", [(1, 1, False), (2, 1, True), (1, 2, False)], ids=["tp1", "tp2-sp", "pp2"]
)
def test_packed_scoring_equals_padded_and_hf(converted_qwen3, tp, pp, sp):
    from tests.test_parity_hf import TOL, max_diff

    ckpt, seqs, ref = converted_qwen3
    outs = run_distributed(
        _score_both, tp * pp, str(ckpt), seqs, sp, parallel=ParallelConfig(tp, pp, sp)
    )
    for padded, packed in outs:
        assert [len(x) for x in packed] == [len(s) - 1 for s in seqs]
        for a, b in zip(padded, packed, strict=True):
            assert (a - b).abs().max().item() <= 1e-6 * max(1.0, a.abs().max().item())
        assert max_diff(packed, ref) <= TOL


# ---------------------------------------------------------------------------------- the update


def _samples(n=7, seed=11):
    from megatron_gopd.types import Sample

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        P = int(torch.randint(1, 6, (1,), generator=g))
        R = int(torch.randint(0 if i == 3 else 1, 12, (1,), generator=g))
        out.append(
            Sample(
                prompt_ids=torch.randint(0, 50, (P,), generator=g).tolist(),
                response_ids=torch.randint(0, 50, (R,), generator=g).tolist(),
                domain=["math", "code"][i % 2],
                rollout_logprobs_T=(-torch.rand(R, generator=g) * 4).tolist(),
                teacher_logprobs_T=-torch.rand(R, generator=g) * 4,
                ref_logprobs_T=-torch.rand(R, generator=g) * 4,
            )
        )
    return out


def _update_grads(how, budget, sp=False, no_boundaries=False):
    """main_grads after one update of the same samples: padded (``how="padded"``) or packed
    micro-batches planned over the data-parallel ranks with token ``budget``."""
    from megatron.core import parallel_state as ps

    from megatron_gopd import packing as pk
    from megatron_gopd.models import build_gpt
    from megatron_gopd.trainer.update import (
        OptimConfig,
        build_optimizer,
        collate,
        collate_packed,
        train_step,
    )
    from megatron_gopd.types import PackedSeqs

    if no_boundaries:  # the negative control: one segment, attention across the sequences
        orig = PackedSeqs.params

        def one_segment(self):
            p = orig(self)
            p.cu_seqlens_q = p.cu_seqlens_kv = p.cu_seqlens_q[[0, -1]]
            p.max_seqlen_q = p.max_seqlen_kv = self.num_tokens
            return p

        PackedSeqs.params = one_segment
    model = build_gpt(ARCH, seed=1, spec="local", sequence_parallel=sp)
    opt = build_optimizer(model, OptimConfig(lr=0.0), train_iters=1, bf16=False)
    samples = _samples()
    dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    how_kw = dict(
        domains=["code", "math"],
        lam_of={"math": 1.25, "code": 0.5}.get,
        with_ref=True,
        sequence_multiple=model.config.tensor_model_parallel_size if sp else 1,
    )
    if how == "padded":
        mine = samples[r::dp]
        batch = collate(mine, pad_rows_to=2, **how_kw)
        reports, _ = train_step(opt, batch, micro_batch_size=2, loss_cfg=GOPD_CFG, vocab_size=50)
    else:
        plan = pk.plan([len(s.tokens) for s in samples], budget, dp)[r]
        micro = [collate_packed([samples[i] for i in mb], **how_kw) for mb in plan]
        reports, _ = train_step(opt, micro, loss_cfg=GOPD_CFG, vocab_size=50)
    grads = {n: p.main_grad.detach().clone() for n, p in opt.ddp.module.named_parameters()}
    return grads


def _rel(a, b):
    return max(((a[n] - b[n]).abs().max() / b[n].abs().max().clamp_min(1e-12)).item() for n in b)


LAYOUTS_UPDATE = [(1, 1, 1, False), (2, 1, 1, True), (1, 2, 1, False), (1, 1, 2, False)]


@pytest.mark.parametrize("tp,pp,dp,sp", LAYOUTS_UPDATE, ids=["tp1", "tp2-sp", "pp2", "dp2"])
def test_packed_update_equals_padded(tp, pp, dp, sp):
    par = ParallelConfig(tp, pp, sp)
    world = tp * pp * dp
    padded = run_distributed(_update_grads, world, "padded", 0, sp, parallel=par)
    for budget in (20, 64):  # many small packs, or few large ones: the same global token mean
        packed = run_distributed(_update_grads, world, "packed", budget, sp, parallel=par)
        for a, b in zip(packed, padded, strict=True):
            assert _rel(a, b) <= 1e-6


def test_packed_update_is_split_invariant_over_data_parallel_sizes():
    one = run_distributed(_update_grads, 1, "packed", 64, parallel=ParallelConfig())[0]
    two = run_distributed(_update_grads, 2, "packed", 20, parallel=ParallelConfig())
    for g in two:
        assert _rel(g, one) <= 1e-6


def test_negative_control_packed_update_without_boundaries():
    padded = run_distributed(_update_grads, 1, "padded", 0, parallel=ParallelConfig())[0]
    wrong = run_distributed(_update_grads, 1, "packed", 64, False, True, parallel=ParallelConfig())[
        0
    ]
    assert _rel(wrong, padded) > 1e-2
