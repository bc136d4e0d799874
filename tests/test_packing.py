"""Packing: the planner (token budget, data-parallel balance, equal micro-batch counts) against
brute force and hand-made cases, and the packed local attention against the unpacked forward."""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest
import torch

from megatron_gopd import packing
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
