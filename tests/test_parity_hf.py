"""HF transformers vs our converted Megatron models: per-token log-probs at TP/PP layouts.

Reference: the HF model's own forward (fp32, eager attention) on each unpadded sequence. Ours:
convert -> load at (TP, PP) -> ``score_sequences`` with right-padding and several micro-batches.
The tolerance is 1e-4 on log-probs, tight enough that each negative control below (a layout or
config mistake that leaves argmax intact) fails it by orders of magnitude.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from megatron_gopd.parallel import ParallelConfig
from megatron_gopd.testing import make_tiny_hf_model, run_distributed

TOL = 1e-4
MODELS = [
    ("llama", False),
    ("llama3", True),
    ("qwen2", True),
    ("qwen2", False),
    ("qwen3", False),
    ("qwen3", True),
]
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


def _sequences(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    # uneven lengths: exercises padding; > 64 tokens: exercises llama3 rope scaling (orig ctx 64)
    lengths = [5, 17, 80, 9, 33]
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def hf_logprobs(model, seqs):
    out = []
    with torch.no_grad():
        for s in seqs:
            ids = torch.tensor([s])
            logits = model(input_ids=ids).logits.float()
            lp = F.log_softmax(logits[0, :-1], dim=-1).gather(1, ids[0, 1:, None]).squeeze(1)
            out.append(lp)
    return out


def _convert(hf_dir, out_dir):
    from megatron_gopd.convert.checkpoint import convert_hf_to_megatron

    convert_hf_to_megatron(hf_dir, out_dir)


def convert(hf_dir, out_dir):
    run_distributed(_convert, 1, str(hf_dir), str(out_dir))


def _score(ckpt, seqs, mbs, sp):
    from megatron_gopd.models import build_role
    from megatron_gopd.scoring import score_sequences

    role = build_role("teacher", ckpt, frozen=True, sequence_parallel=sp)
    return score_sequences(role, seqs, micro_batch_size=mbs)


def score(ckpt, seqs, tp, pp, mbs=2, sp=False):
    outs = run_distributed(
        _score, tp * pp, str(ckpt), seqs, mbs, sp, parallel=ParallelConfig(tp, pp, sp)
    )
    return outs


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


@pytest.fixture(
    scope="module", params=MODELS, ids=[f"{f}-{'tied' if t else 'untied'}" for f, t in MODELS]
)
def converted(request, tmp_path_factory):
    family, tied = request.param
    d = tmp_path_factory.mktemp(f"{family}{'_tied' if tied else ''}")
    hf = make_tiny_hf_model(d / "hf", family, tied=tied, seed=1)
    hf.config._attn_implementation = "eager"
    convert(d / "hf", d / "mcore")
    seqs = _sequences(hf.config.vocab_size)
    return d / "mcore", seqs, hf_logprobs(hf.eval(), seqs)


@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}pp{p}" for t, p in LAYOUTS])
def test_logprobs_match_hf(converted, tp, pp):
    ckpt, seqs, ref = converted
    outs = score(ckpt, seqs, tp, pp)
    for rank_out in outs:  # every rank (all TP and PP ranks) returns the same log-probs
        assert [len(x) for x in rank_out] == [len(s) - 1 for s in seqs]
        assert max_diff(rank_out, ref) <= TOL


@pytest.mark.parametrize("tp,pp", [(2, 1), (2, 2)], ids=["tp2pp1-sp", "tp2pp2-sp"])
def test_logprobs_match_hf_with_sequence_parallelism(converted, tp, pp):
    """Sequence parallelism: the final hidden states arrive split along the sequence over the TP
    ranks and are gathered before the chunked output layer (odd lengths: padded to TP)."""
    ckpt, seqs, ref = converted
    for rank_out in score(ckpt, seqs, tp, pp, sp=True):
        assert [len(x) for x in rank_out] == [len(s) - 1 for s in seqs]
        assert max_diff(rank_out, ref) <= TOL


# ---------------------------------------------------------------------------------- negative controls


@pytest.fixture(scope="module")
def qwen3_hf(tmp_path_factory):
    d = tmp_path_factory.mktemp("neg")
    hf = make_tiny_hf_model(d / "hf", "qwen3", seed=2)
    hf.config._attn_implementation = "eager"
    seqs = _sequences(hf.config.vocab_size, seed=3)
    return d, seqs, hf_logprobs(hf.eval(), seqs)


def _convert_with_bug(hf_dir, out_dir, bug):
    from megatron_gopd.convert import mapping
    from megatron_gopd.convert.checkpoint import convert_hf_to_megatron
    from megatron_gopd.models import arch as arch_mod

    if bug == "qkv_layout":  # q, k, v concatenated whole instead of grouped per kv head
        mapping.fuse_qkv = lambda arch, q, k, v: torch.cat([q, k, v], dim=0)
    elif bug == "swapped_qk_norm":
        mapping._LAYER_RENAMES["self_attention.q_layernorm.weight"] = "self_attn.k_norm.weight"
        mapping._LAYER_RENAMES["self_attention.k_layernorm.weight"] = "self_attn.q_norm.weight"
    elif bug == "rope_theta":
        orig = arch_mod.ModelArch.from_hf_config.__func__

        def wrong(cls, cfg, **kw):
            return dataclasses.replace(orig(cls, cfg, **kw), rope_theta=10000.0)

        arch_mod.ModelArch.from_hf_config = classmethod(wrong)
    elif bug == "gate_up_swapped":
        orig_h2m = mapping.hf_to_megatron

        def swapped(arch, hf):
            out = orig_h2m(arch, hf)
            for k in out:
                if k.endswith("linear_fc1.weight"):
                    g, u = out[k].chunk(2)
                    out[k] = torch.cat([u, g])
            return out

        mapping.hf_to_megatron = swapped
        import megatron_gopd.convert.checkpoint as ck

        ck.mapping = mapping
    convert_hf_to_megatron(hf_dir, out_dir)


@pytest.mark.parametrize("bug", ["qkv_layout", "swapped_qk_norm", "rope_theta", "gate_up_swapped"])
def test_negative_controls_exceed_tolerance(qwen3_hf, bug):
    d, seqs, ref = qwen3_hf
    run_distributed(
        _convert_with_bug, 1, str(d / "hf"), str(d / bug), bug
    )  # forked: bug stays there
    outs = score(d / bug, seqs, 1, 1)
    assert max_diff(outs[0], ref) > 100 * TOL, f"{bug} went unnoticed by the parity check"
