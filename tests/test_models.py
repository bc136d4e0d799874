"""Roles in one job: frozen roles, a teacher of a different size, the vocabulary check."""

import dataclasses

import pytest
import torch

from megatron_gopd.models import check_vocab_compatible
from megatron_gopd.models.arch import ModelArch
from megatron_gopd.parallel import ParallelConfig
from megatron_gopd.testing import make_tiny_hf_model, run_distributed, tiny_hf_config
from megatron_gopd.utils import GopdError
from tests.test_parity_hf import TOL, convert, hf_logprobs, max_diff


def _arch(**over):
    return ModelArch.from_hf_config(tiny_hf_config("qwen3", **over).to_dict())


# ---------------------------------------------------------------------------------- frozen roles


def _frozen_role_has_no_grad_or_optimizer_state():
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_gopd.models import build_role

    student = build_role("student", arch=_arch(), frozen=False)
    teacher = build_role("teacher", arch=_arch(num_hidden_layers=6, hidden_size=96), frozen=True)
    ddp = DistributedDataParallel(
        student.model.config, DistributedDataParallelConfig(), student.model
    )
    opt = get_megatron_optimizer(OptimizerConfig(lr=1e-3, bf16=False), [ddp])
    tokens = torch.randint(0, 200, (2, 16))
    pos = torch.arange(16).expand(2, 16)
    # a student loss that also uses the teacher's output: the teacher still gets no gradient
    with torch.no_grad():
        t_out = teacher.model(tokens, pos, None)
    s_out = ddp(tokens, pos, None)
    (s_out.float().logsumexp(-1).mean() + 0 * t_out.sum()).backward()
    opt.step()
    opt_params = {id(p) for g in opt.param_groups for p in g["params"]}
    teacher_params = list(teacher.model.parameters())
    inner = [o.optimizer for o in getattr(opt, "chained_optimizers", [opt])]
    state_keys = {id(p) for o in inner for p in o.state}
    return dict(
        teacher_requires_grad=any(p.requires_grad for p in teacher_params),
        teacher_grads=[p.grad for p in teacher_params if p.grad is not None],
        teacher_main_grad=any(hasattr(p, "main_grad") for p in teacher_params),
        teacher_in_optimizer=any(id(p) in opt_params for p in teacher_params),
        teacher_training=teacher.model.training,
        student_in_optimizer=len(opt_params),
        n_student_params=len(list(student.model.parameters())),
        teacher_in_state=any(id(p) in state_keys for p in teacher_params),
        student_state=len(state_keys),
    )


def test_frozen_role_holds_no_grad_and_no_optimizer_state():
    (r,) = run_distributed(
        _frozen_role_has_no_grad_or_optimizer_state, 1, parallel=ParallelConfig()
    )
    assert r["teacher_requires_grad"] is False
    assert r["teacher_grads"] == []
    assert r["teacher_main_grad"] is False
    assert r["teacher_in_optimizer"] is False
    assert r["teacher_training"] is False
    # the optimizer does hold the student (sanity check that the test can see optimizer params)
    assert r["teacher_in_state"] is False
    # the controls: the same checks do see the student in the optimizer and its state
    assert r["student_in_optimizer"] > 0 and r["student_state"] > 0


# ---------------------------------------------------------------------------------- sizes


def _score_two_roles(student_ckpt, teacher_ckpt, seqs):
    from megatron_gopd.models import build_role
    from megatron_gopd.scoring import score_sequences

    student = build_role("student", student_ckpt, frozen=False)
    teacher = build_role("teacher", teacher_ckpt, frozen=True)
    check_vocab_compatible(student.arch, teacher.arch, "teacher")
    return dict(
        student=score_sequences(student, seqs, micro_batch_size=2),
        teacher=score_sequences(teacher, seqs, micro_batch_size=2),
        student_layers=len(student.model.decoder.layers),
        teacher_layers=len(teacher.model.decoder.layers),
    )


def test_teacher_of_another_size_is_scored_in_the_same_job(tmp_path):
    """Student: 4 layers, hidden 64. Teacher: 6 layers, hidden 128, 8 heads / 4 kv heads, wider
    FFN, different head_dim. Both built on the same TP=2 x PP=2 groups and scored against HF."""
    s_hf = make_tiny_hf_model(tmp_path / "s_hf", "qwen3", seed=4)
    t_hf = make_tiny_hf_model(
        tmp_path / "t_hf",
        "qwen3",
        seed=5,
        num_hidden_layers=6,
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=16,
    )
    for m in (s_hf, t_hf):
        m.config._attn_implementation = "eager"
    convert(tmp_path / "s_hf", tmp_path / "s_mc")
    convert(tmp_path / "t_hf", tmp_path / "t_mc")
    g = torch.Generator().manual_seed(7)
    seqs = [torch.randint(0, 250, (n,), generator=g).tolist() for n in (12, 30, 7)]
    outs = run_distributed(
        _score_two_roles,
        4,
        str(tmp_path / "s_mc"),
        str(tmp_path / "t_mc"),
        seqs,
        parallel=ParallelConfig(2, 2),
    )
    ref_s, ref_t = hf_logprobs(s_hf.eval(), seqs), hf_logprobs(t_hf.eval(), seqs)
    for o in outs:
        assert max_diff(o["student"], ref_s) <= TOL
        assert max_diff(o["teacher"], ref_t) <= TOL
    assert {o["student_layers"] for o in outs} == {2} and {o["teacher_layers"] for o in outs} == {3}
    assert max_diff(outs[0]["student"], outs[0]["teacher"]) > 0.1  # really two different models


# ---------------------------------------------------------------------------------- vocabulary


def test_vocab_check_accepts_padding_differences():
    base = _arch()
    # Megatron padding differs (another divisor): fine
    check_vocab_compatible(base, dataclasses.replace(base, padded_vocab_size=2048), "teacher")
    # HF rows differ but the tokenizer is the same (Qwen 151936 vs 152064 rows): fine
    a = dataclasses.replace(base, vocab_size=300, tokenizer_vocab_size=240)
    b = dataclasses.replace(base, vocab_size=256, tokenizer_vocab_size=240)
    check_vocab_compatible(a, b, "teacher")
    # tokenizer known on one side only: the same embedding rows are accepted
    check_vocab_compatible(
        dataclasses.replace(base, vocab_size=300, tokenizer_vocab_size=None), a, "teacher"
    )


def test_vocab_check_names_both_sizes():
    a = dataclasses.replace(_arch(), vocab_size=256, tokenizer_vocab_size=250)
    b = dataclasses.replace(_arch(), vocab_size=512, tokenizer_vocab_size=500)
    with pytest.raises(
        GopdError, match=r"teacher vocabulary has 500 tokens, the student's has 250"
    ):
        check_vocab_compatible(a, b, "teacher")
    c = dataclasses.replace(_arch(), vocab_size=128, tokenizer_vocab_size=None)
    with pytest.raises(GopdError, match="reference"):
        check_vocab_compatible(a, c, "reference")
    # without a tokenizer on one side, rows that merely cover the other's tokens prove nothing
    # (they used to be accepted: a 250-row teacher for a 15-token student)
    student = dataclasses.replace(_arch(), vocab_size=15, tokenizer_vocab_size=15)
    teacher = dataclasses.replace(_arch(), vocab_size=250, tokenizer_vocab_size=None)
    with pytest.raises(GopdError, match="the teacher checkpoint has no tokenizer"):
        check_vocab_compatible(student, teacher, "teacher")
    with pytest.raises(GopdError, match="the student checkpoint has no tokenizer"):
        check_vocab_compatible(dataclasses.replace(teacher, vocab_size=512), a, "teacher")


# ---------------------------------------------------------------------------------- memory


def _max_logits_chunk(ckpt, seqs, chunk_elements):
    """Scores ``seqs`` with a spy on every matrix product whose output spans this rank's
    vocabulary slice: the size of every logits tensor the scoring produces."""
    import torch.nn.functional as F

    from megatron_gopd.models import build_role
    from megatron_gopd.scoring import score_sequences

    role = build_role("teacher", ckpt, frozen=True)
    v_local = role.model.output_layer.output_size_per_partition
    seen = []
    orig = F.linear

    def spy(x, w, *a, **k):
        out = orig(x, w, *a, **k)
        if out.shape[-1] == v_local:
            seen.append(out.numel())
        return out

    F.linear = spy  # this forked rank only
    lps = score_sequences(role, seqs, micro_batch_size=4, chunk_elements=chunk_elements)
    return max(seen), len(seen), lps, v_local


def test_scoring_never_materialises_more_than_one_chunk_of_logits(tmp_path):
    make_tiny_hf_model(tmp_path / "hf", "qwen3")
    convert(tmp_path / "hf", tmp_path / "mc")
    seqs = [list(range(1, 60))] * 4  # 4 x 64 padded tokens per micro-batch
    full = run_distributed(
        _max_logits_chunk, 1, str(tmp_path / "mc"), seqs, 1 << 30, parallel=ParallelConfig()
    )
    small = run_distributed(
        _max_logits_chunk, 2, str(tmp_path / "mc"), seqs, 16 * 512, parallel=ParallelConfig(2, 1)
    )
    v_local = small[0][3]
    assert small[0][0] <= 16 * v_local  # never more than 16 rows of logits at once
    assert small[0][1] >= 16  # ...so the 256 rows took many chunks
    assert full[0][1] == 1  # one chunk when the budget allows (the control)
    assert max_diff(small[0][2], full[0][2]) < 1e-5  # and the chunking changes nothing
