"""Mixture-of-experts teachers (Qwen3-MoE) hosted in Megatron: architecture, conversion, parity with
HF transformers at TP/PP/EP layouts, and a dense student distilled from an MoE teacher under expert
parallelism. References: HF's own forward and HF's own parameter count, never our code."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_gopd.models.arch import ArchError, ModelArch
from megatron_gopd.parallel import ParallelConfig
from megatron_gopd.testing import make_tiny_hf_model, run_distributed, tiny_hf_config
from megatron_gopd.utils import GopdError
from tests.test_parity_hf import TOL, _sequences, convert, hf_logprobs, max_diff

# ---------------------------------------------------------------------------------- architecture


def _moe_config(**over) -> dict:
    cfg = tiny_hf_config("qwen3_moe", num_hidden_layers=6, **over).to_dict()
    cfg["architectures"] = ["Qwen3MoeForCausalLM"]
    return cfg


def test_qwen3_moe_arch_from_hf_config():
    arch = ModelArch.from_hf_config(_moe_config(decoder_sparse_step=2, mlp_only_layers=[3]))
    # transformers: experts in layer i when (i + 1) % decoder_sparse_step == 0 and i is not in
    # mlp_only_layers -> layers 1 and 5 (3 is excluded)
    assert arch.family == "qwen3_moe" and arch.is_moe and arch.qk_norm
    assert arch.moe_layers == (1, 5)
    assert (arch.num_experts, arch.moe_router_topk, arch.moe_ffn_hidden_size) == (4, 2, 48)
    assert arch.moe_norm_topk_prob is True
    # the architecture survives gopd_model.json (a list in JSON)
    again = ModelArch.from_dict(json.loads(json.dumps(arch.to_dict())))
    assert again == arch
    # a dense checkpoint written before MoE support still reads
    d = arch.to_dict()
    for k in ("num_experts", "moe_ffn_hidden_size", "moe_router_topk", "moe_norm_topk_prob"):
        d.pop(k)
    d.pop("moe_layers")
    assert not ModelArch.from_dict(d | {"family": "qwen3"}).is_moe


def test_parameter_count_matches_transformers():
    from transformers import AutoModelForCausalLM

    cfg = tiny_hf_config("qwen3_moe", num_hidden_layers=6, decoder_sparse_step=2)
    model = AutoModelForCausalLM.from_config(cfg)
    arch = ModelArch.from_hf_config(_moe_config(decoder_sparse_step=2))
    assert arch.num_parameters() == sum(p.numel() for p in model.parameters())
    # active: 2 of 4 experts per token in each MoE layer
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    moe_layers = len(arch.moe_layers)
    assert arch.num_parameters(active=True) == arch.num_parameters() - moe_layers * 2 * per_expert


@pytest.mark.parametrize(
    "over,field",
    [
        (dict(model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"]), "Qwen2Moe"),
        (dict(model_type="mixtral", architectures=["MixtralForCausalLM"]), "Mixtral"),
        (dict(shared_expert_intermediate_size=64), "shared_expert_intermediate_size=64"),
        (dict(num_experts_per_tok=5), "num_experts_per_tok=5"),
        (dict(moe_intermediate_size=None), "moe_intermediate_size"),
    ],
)
def test_unsupported_moe_variants_are_refused_by_name(over, field):
    with pytest.raises(ArchError, match=field):
        ModelArch.from_hf_config(_moe_config() | over)
    # MoE fields on a dense family are refused too
    with pytest.raises(ArchError, match="num_experts=4"):
        ModelArch.from_hf_config(
            _moe_config() | dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"])
        )


def test_expert_parallel_split_is_checked():
    arch = ModelArch.from_hf_config(_moe_config())
    arch.check_parallel(2, 1, ep=4)
    with pytest.raises(ArchError, match="num_experts=4"):
        arch.check_parallel(1, 1, ep=3)
    with pytest.raises(GopdError, match="EP must divide"):
        ParallelConfig(1, 1, False, 4).validate(2)


# ---------------------------------------------------------------------------------- conversion


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    d = tmp_path_factory.mktemp("moe")
    hf = make_tiny_hf_model(d / "hf", "qwen3_moe", seed=1)
    hf.config._attn_implementation = "eager"
    convert(d / "hf", d / "mcore")
    seqs = _sequences(hf.config.vocab_size)
    return d, seqs, hf_logprobs(hf.eval(), seqs)


def _back_to_hf(load, out):
    from megatron_gopd.convert.checkpoint import convert_megatron_to_hf

    convert_megatron_to_hf(load, out)


def test_round_trip_is_bit_exact(moe):
    from megatron_gopd.convert.hf_io import HFWeights

    d, _, _ = moe
    run_distributed(_back_to_hf, 1, str(d / "mcore"), str(d / "back"))
    a, b = HFWeights(d / "hf"), HFWeights(d / "back")
    assert sorted(a) == sorted(b)
    assert (
        any(".mlp.experts.3.down_proj." in k for k in a) and "model.layers.0.mlp.gate.weight" in a
    )
    for k in a:
        assert torch.equal(a[k], b[k]), k
    cfg = json.loads((d / "back" / "config.json").read_text())
    assert ModelArch.from_hf_config(cfg).moe_layers == (0, 2, 3)


# ---------------------------------------------------------------------------------- parity


def _score(ckpt, seqs, mbs, sp, take=None):
    import torch.distributed as dist

    from megatron_gopd.models import build_role
    from megatron_gopd.scoring import score_sequences

    role = build_role("teacher", ckpt, frozen=True, sequence_parallel=sp)
    if take is not None:  # ranks score different numbers of sequences (expert lockstep)
        seqs = seqs[: take[dist.get_rank()]]
    return score_sequences(role, seqs, micro_batch_size=mbs)


LAYOUTS = [(1, 1, 1, False), (2, 1, 1, False), (1, 2, 1, False), (2, 1, 1, True), (1, 1, 2, False)]


@pytest.mark.parametrize(
    "tp,pp,ep,sp", LAYOUTS, ids=[f"tp{t}pp{p}ep{e}{'-sp' if s else ''}" for t, p, e, s in LAYOUTS]
)
def test_moe_logprobs_match_hf(moe, tp, pp, ep, sp):
    d, seqs, ref = moe
    world = tp * pp * max(ep // tp, 1)
    outs = run_distributed(
        _score, world, str(d / "mcore"), seqs, 2, sp, parallel=ParallelConfig(tp, pp, sp, ep)
    )
    for rank_out in outs:
        assert [len(x) for x in rank_out] == [len(s) - 1 for s in seqs]
        assert max_diff(rank_out, ref) <= TOL


def test_expert_parallel_ranks_with_different_work_stay_in_step(moe):
    """EP2 over two data-parallel ranks: one scores five sequences (three micro-batches), the
    other one; the all-to-alls of the MoE layers need the same number of forward passes on both,
    so the idle rank runs padding micro-batches. Both must finish, with HF's log-probs."""
    d, seqs, ref = moe
    outs = run_distributed(
        _score,
        2,
        str(d / "mcore"),
        seqs,
        2,
        False,
        [5, 1],
        parallel=ParallelConfig(1, 1, False, 2),
        timeout=240,
    )
    assert len(outs[0]) == 5 and len(outs[1]) == 1
    assert max_diff(outs[0], ref) <= TOL and max_diff(outs[1], ref[:1]) <= TOL


def _convert_with_wrong_router(hf_dir, out_dir, seqs):
    """The router's top-k weights not renormalised (pre-softmax), though the config says so."""
    import megatron_gopd.models.build as build

    orig = build._moe_config
    build._moe_config = lambda arch, ep: dict(orig(arch, ep), moe_router_pre_softmax=True)
    from megatron_gopd.convert.checkpoint import convert_hf_to_megatron

    convert_hf_to_megatron(hf_dir, out_dir)
    return _score(out_dir, seqs, 2, False)


def test_negative_control_router_normalisation(moe):
    d, seqs, ref = moe
    (out,) = run_distributed(
        _convert_with_wrong_router,
        1,
        str(d / "hf"),
        str(d / "wrong"),
        seqs,
        parallel=ParallelConfig(),
    )
    assert max_diff(out, ref) > 100 * TOL, "the router's normalisation went unnoticed"


# ---------------------------------------------------------------------------------- trainer


@pytest.fixture(scope="module")
def moe_world(tmp_path_factory):
    """The tiny distillation world plus a Qwen3-MoE teacher and its MoE "base" (same tokenizer)."""
    from megatron_gopd.testing import _convert_here_or_in_a_fork
    from tests.e2e_utils import make_world

    root = tmp_path_factory.mktemp("moe_world")
    w = make_world(root)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(root / "tok"))
    dims = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
    )
    for name, seed in (("moe_teacher", 5), ("moe_base", 6)):
        hf = root / "hf" / name
        make_tiny_hf_model(hf, "qwen3_moe", seed=seed, tied=True, **dims)
        tok.save_pretrained(str(hf))
        _convert_here_or_in_a_fork(hf, root / name)
        w[name] = root / name
    return w


@pytest.mark.slow
def test_dense_student_from_an_moe_teacher_under_expert_parallelism(moe_world, tmp_path):
    """A dense student (EP does not apply to it) distilled from an MoE math teacher with reward
    correction (its MoE base as the reference) and a dense code teacher, over two data-parallel
    ranks that form one expert-parallel group: each rank holds 2 of the 4 experts, and the ranks
    score different numbers of math samples, so the MoE roles must stay in step."""
    from tests.e2e_utils import train_args
    from tests.test_train_e2e import _check_common, _run

    w = moe_world
    save = tmp_path / "moe"
    args = train_args(
        w,
        save,
        "--teacher-load",
        f"math={w['moe_teacher']}",
        "--teacher-load",
        f"code={w['teacher2']}",
        "--ref-load",
        f"math={w['moe_base']}",
        "--gopd-lambda",
        "math=1.25",
        "--gopd-lambda",
        "code=1.0",
        "--expert-model-parallel-size",
        "2",
    )
    args[args.index("--tensor-model-parallel-size") + 1] = "1"
    args[args.index("--prompt-data") + 1] = str(w["train2"])
    args[args.index("--eval-prompt-data") + 1] = str(w["eval2"])
    scored, built = _run(args)
    _check_common(save)
    assert ("teacher:math", str(w["moe_teacher"])) in built
    assert ("reference:math", str(w["moe_base"])) in built
    # the MoE teacher ran on both ranks (with or without math samples), only on math samples
    assert {tuple(d) for n, d, _ in scored if n == "teacher:math"} <= {("math",), ()}
