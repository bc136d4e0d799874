"""The per-GPU memory estimate: its weights term against the parameters a built megatron-core model
actually holds per rank (TP, PP, EP, tied and untied), the phase arithmetic against hand-computed
numbers, and the refusal before any model is built."""

from __future__ import annotations

import pytest

from megatron_gopd.models import memory
from megatron_gopd.models.arch import ModelArch
from megatron_gopd.parallel import ParallelConfig
from megatron_gopd.testing import run_distributed, tiny_hf_config
from megatron_gopd.utils import GopdError


def _arch(family: str, **over) -> ModelArch:
    cfg = tiny_hf_config(family, **over).to_dict()
    cfg["architectures"] = [
        {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}[family]
    ]
    return ModelArch.from_hf_config(cfg)


def _built_parameters(arch_dict):
    """Parameters this rank's model chunk holds (megatron-core builds it)."""
    from megatron_gopd.models import build_gpt

    model = build_gpt(ModelArch.from_dict(arch_dict), spec="local")
    return sum(p.numel() for p in model.parameters())


CASES = [
    ("qwen3", {}, ParallelConfig(2, 1)),
    ("qwen3", {"tie_word_embeddings": True}, ParallelConfig(1, 2)),
    ("qwen3", {}, ParallelConfig(1, 2)),
    ("qwen3_moe", {}, ParallelConfig(1, 1, False, 2)),
    ("qwen3_moe", {}, ParallelConfig(2, 1)),
]


@pytest.mark.parametrize(
    "family,over,par", CASES, ids=["tp2", "pp2-tied", "pp2", "moe-ep2", "moe-tp2"]
)
def test_weights_match_the_built_model(family, over, par):
    arch = _arch(family, **over)
    world = par.tp * par.pp * max(par.ep // par.tp, 1)
    counts = run_distributed(_built_parameters, world, arch.to_dict(), parallel=par)
    lay = memory.Layout(par.tp, par.pp, par.ep, dp=world // (par.tp * par.pp))
    est = memory.estimate_role("t", arch, lay, bf16=False, trainable=False, tokens=1)
    assert est.weights == 4 * max(counts)  # fp32: 4 bytes per parameter of the busiest rank


def test_student_state_and_phases_by_hand():
    arch = _arch("qwen3")
    lay = memory.Layout(tp=1, pp=1, dp=4)
    s = memory.estimate_role("student", arch, lay, bf16=True, trainable=True, tokens=100)
    p = s.weights // 2  # bf16
    assert s.grads == 4 * p  # fp32 gradient buffer
    assert s.optimizer == 12 * p  # two fp32 moments + fp32 main parameters
    d = memory.estimate_role(
        "student", arch, lay, bf16=True, trainable=True, tokens=100, distributed_optimizer=True
    )
    assert d.optimizer == 12 * p // 4 and d.grads == s.grads
    # phases, on round numbers
    st = memory.RoleMemory("student", arch, 10, 20, 30, 40)
    t = memory.RoleMemory("teacher:a", arch, 100, 0, 0, 7, source="A")
    r = memory.RoleMemory("reference:a", arch, 100, 0, 0, 9, source="A")  # same checkpoint
    u = memory.RoleMemory("reference:b", arch, 50, 0, 0, 300, source="B")
    # the update phase: the student (100) + the frozen weights, A's model once (100)
    assert memory.peak_phase(st, [t, r], offload_frozen=False) == (200, "update (student)")
    # scoring with B: student state 60 + frozen 150 + B's activations 300
    assert memory.peak_phase(st, [t, r, u], offload_frozen=False) == (510, "scoring (reference:b)")
    # offloaded: only the scoring role's weights are on the device
    assert memory.peak_phase(st, [t, u], offload_frozen=True) == (410, "scoring (reference:b)")


def test_a_layout_that_cannot_fit_is_refused_naming_the_numbers():
    arch = _arch("qwen3")
    lay = memory.Layout()
    st = memory.estimate_role("student", arch, lay, bf16=True, trainable=True, tokens=4096)
    te = memory.estimate_role("teacher:default", arch, lay, bf16=True, trainable=False, tokens=4096)
    memory.check_fits(st, [te], budget_gb=1.0, offload_frozen=False)
    with pytest.raises(GopdError, match=r"does not fit 0\.001 GB per GPU: the (update|scoring)"):
        memory.check_fits(st, [te], budget_gb=0.001, offload_frozen=False)
    with pytest.raises(GopdError, match=r"teacher:default .* GB \(weights"):
        memory.check_fits(st, [te], budget_gb=0.001, offload_frozen=False)


def test_qwen3_30b_a3b_teacher_on_8_gpus():
    """A sanity check on a real shape (Qwen3-30B-A3B's config.json): 30.5B parameters, 3.3B
    active; bf16 weights at TP=1 EP=8 fit in a fraction of an 80 GB GPU."""
    cfg = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "moe_intermediate_size": 768,
        "num_hidden_layers": 48,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 40960,
    }
    arch = ModelArch.from_hf_config(cfg)
    assert arch.num_parameters() == pytest.approx(30.53e9, rel=0.01)
    assert arch.num_parameters(active=True) == pytest.approx(3.35e9, rel=0.02)
    m = memory.estimate_role(
        "teacher", arch, memory.Layout(ep=8, dp=8), bf16=True, trainable=False, tokens=16384
    )
    # 29.0B routed-expert parameters / 8 + ~1.5B attention, embeddings and routers: ~5.2B x 2 bytes
    assert 9.5e9 < m.weights < 11e9


def test_the_trainer_refuses_before_building_any_model(tmp_path):
    """The real CLI (a world of one, TP=1) with model building forbidden: a budget too small is
    one error line naming the numbers."""
    from tests.e2e_utils import make_world, train_args
    from tests.test_train_validation import _cli_error

    w = make_world(tmp_path / "w")
    argv = train_args(w, tmp_path / "run", "--teacher-load", str(w["teacher"]))
    argv += ["--tensor-model-parallel-size", "1", "--gpu-memory-gb", "0.001"]
    line = _cli_error(argv)
    assert line.startswith("error: the layout does not fit 0.001 GB per GPU"), line
    assert "student" in line and "teacher:default" in line
