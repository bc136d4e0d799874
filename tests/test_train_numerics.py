"""gopd-train's numerics end to end on one CPU rank, through the CPU rollout server: every role's
log-probs at the sampling temperature, the full-vocabulary estimator with a teacher whose
vocabulary has more rows than the student's, and --offload-frozen moving each frozen role once per
phase. The checks that refuse configurations come first (no model is built for them).

References are Hugging Face ``transformers`` forwards of the same checkpoints in fp32 (the
conversion's parity is ~1e-6, tests/test_parity_hf.py), written from the formulas: ``log_softmax(
logits / T)`` over each model's own rows.
"""

import pytest
import torch
import torch.nn.functional as F

from megatron_gopd.testing import make_tiny_hf_model, run_distributed
from megatron_gopd.trainer.config import build_config, parse_args
from megatron_gopd.utils import GopdError
from tests.e2e_utils import make_world, read_metrics, train_args

ROLLOUT_TOL = 1e-4  # |log pi_rollout - log pi_trainer| per token (fp32 both sides)
STEPS = 2


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny world plus a teacher whose HF embedding has 20 rows for the same 15-token
    tokenizer (as Qwen2.5-7B has 152064 rows and Qwen2.5-1.5B 151936): equal Megatron padding
    (128), different real vocabulary sizes."""
    from megatron_gopd.testing import _convert_here_or_in_a_fork

    root = tmp_path_factory.mktemp("numerics")
    w = make_world(root)
    hf = root / "hf" / "teacher_wide"
    make_tiny_hf_model(
        hf,
        "qwen3",
        seed=5,
        tied=True,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=20,
        max_position_embeddings=64,
    )
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(root / "tok")).save_pretrained(str(hf))
    _convert_here_or_in_a_fork(hf, root / "teacher_wide")
    w["teacher_wide"] = root / "teacher_wide"
    return w


def _hf(world, name):
    from transformers import AutoModelForCausalLM

    path = world["student"].parent / "hf" / name
    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager"
    ).eval()


def _hf_logprobs(model, s, temperature):
    """[R, V] log softmax(logits / T) at the response positions of sample ``s``, and the sampled
    tokens' [R] values."""
    ids = torch.tensor([s.tokens])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    P = len(s.prompt_ids)
    lp = F.log_softmax(logits[P - 1 : -1] / temperature, -1)
    return lp, lp.gather(1, torch.tensor(s.response_ids)[:, None])[:, 0]


def _args(world, save, *extra):
    args = train_args(world, save, *extra, steps=STEPS)
    args[args.index("--tensor-model-parallel-size") + 1] = "1"
    return args


# ---------------------------------------------------------------------------------- refused


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--rollout-top-p", "0.9"], r"--rollout-top-p 0.9 truncates the sampling distribution"),
        (["--rollout-top-k", "20"], r"--rollout-top-k 20 truncates"),
        (["--rollout-temperature", "0"], r"--rollout-temperature 0.0: training needs"),
        (["--teacher-temperature", "-1"], r"--teacher-temperature must be a finite number > 0"),
        (["--ref-temperature", "nan"], r"--ref-temperature must be a finite number > 0"),
    ],
)
def test_sampling_the_trainer_cannot_score_is_refused(world, tmp_path, extra, message):
    """Training rollouts are samples of the student's full tempered distribution; truncating or
    greedy samplers are refused before anything starts (issue 15, item 3)."""
    argv = _args(world, tmp_path / "run", "--teacher-load", str(world["teacher"]), *extra)
    with pytest.raises(GopdError, match=message):
        build_config(parse_args(argv))


def test_untempered_rollout_logprobs_are_refused_at_another_temperature(
    world, tmp_path, monkeypatch
):
    """SGLANG_RETURN_ORIGINAL_LOGPROB=1 (inherited by the servers the trainer starts) makes the
    engine report untempered log-probs: at T != 1 they are not the sampler's."""
    argv = _args(world, tmp_path / "run", "--teacher-load", str(world["teacher"]))
    monkeypatch.setenv("SGLANG_RETURN_ORIGINAL_LOGPROB", "1")
    build_config(parse_args(argv))  # T = 1: the same numbers
    with pytest.raises(GopdError, match="SGLANG_RETURN_ORIGINAL_LOGPROB is set"):
        build_config(parse_args([*argv, "--rollout-temperature", "0.6"]))


def test_scoring_temperatures_default_to_the_sampling_temperature(world, tmp_path):
    base = _args(world, tmp_path / "run", "--teacher-load", str(world["teacher"]))
    cfg = build_config(parse_args([*base, "--rollout-temperature", "0.6"]))
    assert cfg.models.teacher_temperature == cfg.models.ref_temperature == 0.6
    cfg = build_config(parse_args([*base, "--teacher-temperature", "1", "--ref-temperature", "2"]))
    assert (cfg.models.teacher_temperature, cfg.models.ref_temperature) == (1.0, 2.0)


# ---------------------------------------------------------------------------------- runs


def _train_and_record(args):
    """Train in this rank; record every update's largest |trainer - rollout| log-prob gap over
    response tokens, the first step's scored samples, and the frozen roles' transfers."""
    from megatron_gopd.models.build import RoleModel
    from megatron_gopd.train import train
    from megatron_gopd.trainer import loss as L
    from megatron_gopd.trainer import stages as T

    rec = {"gaps": [], "samples": None, "offloads_per_update": [], "stats": {}}
    orig_isw, orig_update, orig_offload = (
        L.truncated_is_weights,
        T.GOPDTrainer.update,
        RoleModel.offload_to_host,
    )
    calls = {}

    def isw_spy(logp, rollout, cap, *, mask):
        gap = ((logp.detach() - rollout).abs() * (mask > 0)).max().item()
        rec["gaps"].append(gap)
        return orig_isw(logp, rollout, cap, mask=mask)

    def offload_spy(self):
        calls[self.name] = calls.get(self.name, 0) + 1
        return orig_offload(self)

    def update_spy(self, samples):
        if rec["samples"] is None:
            rec["samples"] = samples  # scored by the teacher and the reference at this point
        calls.clear()
        out = orig_update(self, samples)
        rec["offloads_per_update"].append(dict(calls))
        for role in {id(r): r for r in [*self.teachers.values(), *self.refs.values()]}.values():
            n = sum(1 for m in role.chunks for _ in [*m.parameters(), *m.buffers()])
            rec["stats"][role.name] = (getattr(role, "offload_stats", None), n)
        return out

    L.truncated_is_weights = isw_spy
    T.GOPDTrainer.update = update_spy
    RoleModel.offload_to_host = offload_spy
    train(build_config(parse_args(args)))
    return rec


def _run(args):
    return run_distributed(_train_and_record, 1, args, timeout=900)[0]


@pytest.mark.parametrize("temperature", [0.6, 1.0])
def test_rollout_and_trainer_logprobs_agree_at_the_sampling_temperature(
    world, tmp_path, temperature
):
    """The student's update log-probs are the rollout engine's (SGLang reports log softmax of the
    tempered logits) to 1e-4 per token at T = 0.6 and T = 1, and the teacher scores at T too."""
    save = tmp_path / "run"
    rec = _run(
        _args(
            world,
            save,
            "--teacher-load",
            str(world["teacher"]),
            "--rollout-temperature",
            str(temperature),
        )
    )
    assert len(rec["gaps"]) >= STEPS  # one per (packed) micro-batch
    assert max(rec["gaps"]) <= ROLLOUT_TOL, rec["gaps"]
    metrics = read_metrics(save)
    assert all(m["train/rollout_abs_log_ratio"] <= ROLLOUT_TOL for m in metrics[1:])
    teacher = _hf(world, "teacher")
    scored = [s for s in rec["samples"] if s.response_len]
    assert len(scored) >= 8
    for s in scored:
        _, ref = _hf_logprobs(teacher, s, temperature)
        assert (s.teacher_logprobs_T.double() - ref).abs().max() <= ROLLOUT_TOL


def test_full_vocab_wider_teacher_temperatures_and_offload(world, tmp_path):
    """The full-vocabulary estimator with a teacher of 20 rows for the student's 15 (item 6),
    teacher and reference at their own temperatures (item 3), and --offload-frozen (item 7):

    * the exact KL of the first update is KL(pi_T || q_T') with the teacher normalised over its
      own 20 rows (over the student's 15 it differs by far more than the tolerance);
    * the teacher's and the reference's log-probs are HF's at 0.8 and 1.0;
    * the trainer's log-probs (through the full-vocabulary kernel) are the rollout engine's;
    * every frozen role crosses to the device once per update phase (of several micro-batches:
      the budget below holds four samples), and its
      host buffers are allocated once in the whole run."""
    save = tmp_path / "run"
    T, T_TEACHER, T_REF = 0.6, 0.8, 1.0
    rec = _run(
        _args(
            world,
            save,
            "--teacher-load",
            str(world["teacher_wide"]),
            "--gopd-lambda",
            "1.25",
            "--gopd-estimator",
            "full_vocab",
            "--offload-frozen",
            "--rollout-temperature",
            str(T),
            "--teacher-temperature",
            str(T_TEACHER),
            "--ref-temperature",
            str(T_REF),
        )
    )
    assert max(rec["gaps"]) <= ROLLOUT_TOL, rec["gaps"]

    student, teacher = _hf(world, "student"), _hf(world, "teacher_wide")
    kl_own, kl_15, n = 0.0, 0.0, 0
    for s in (s for s in rec["samples"] if s.response_len):
        lp, _ = _hf_logprobs(student, s, T)  # [R, 15]
        lq, q_y = _hf_logprobs(teacher, s, T_TEACHER)  # [R, 20]
        _, r_y = _hf_logprobs(student, s, T_REF)  # the reference: the student's initial weights
        assert (s.teacher_logprobs_T.double() - q_y).abs().max() <= ROLLOUT_TOL
        assert (s.ref_logprobs_T.double() - r_y).abs().max() <= ROLLOUT_TOL
        p = lp.exp()
        kl_own += (p * (lp - lq[:, :15])).sum().item()
        lq15 = F.log_softmax(lq[:, :15], -1)  # the teacher cut to the student's rows
        kl_15 += (p * (lp - lq15)).sum().item()
        n += s.response_len
    kl_own, kl_15 = kl_own / n, kl_15 / n
    step1 = read_metrics(save)[1]
    assert step1["train/kl_teacher_exact"] == pytest.approx(kl_own, rel=1e-4, abs=1e-5)
    assert abs(kl_own - kl_15) > 1e-2

    # --offload-frozen: once per update phase, whatever the number of micro-batches
    assert rec["offloads_per_update"] == [{"teacher:default": 1, "reference:default": 1}] * STEPS
    for name, (stats, n_tensors) in rec["stats"].items():
        assert stats.host_allocations == n_tensors, name  # the first offload only
        assert stats.bytes_to_host > 0 and stats.bytes_to_device == stats.to_device * (
            stats.bytes_to_host
        ), name  # after the first offload, nothing travels back


# ---------------------------------------------------------------------------------- vocabularies


def _validate(argv):
    from megatron_gopd.trainer.preflight import load_tokenizer, validate_inputs

    cfg = build_config(parse_args(argv))
    return validate_inputs(cfg, load_tokenizer(cfg))


@pytest.fixture(scope="module")
def teacher_padded_512(world, tmp_path_factory):
    """The tiny teacher converted with --make-vocab-size-divisible-by 512 (the student: 1024)."""
    from megatron_gopd.convert.checkpoint import convert_hf_to_megatron

    out = tmp_path_factory.mktemp("pad512") / "teacher"
    run_distributed(
        convert_hf_to_megatron,
        1,
        str(world["student"].parent / "hf" / "teacher"),
        str(out),
        vocab_divisor=512,
    )
    return out


@pytest.mark.parametrize("estimator", ["full_vocab", "top_k"])
def test_full_vocab_estimators_refuse_different_paddings(
    world, tmp_path, teacher_padded_512, estimator
):
    """Teacher and student padded differently (issue 15, item 6): the full-vocabulary estimators
    are refused before any model is built (they failed on the first micro-batch, after rollout
    and scoring), naming both sizes; the sampled estimator does not care."""
    import megatron_gopd.models.build as B

    built = []
    orig = B.build_gpt
    B.build_gpt = lambda *a, **k: built.append(1) or orig(*a, **k)
    try:
        argv = _args(world, tmp_path / "run", "--teacher-load", str(teacher_padded_512))
        with pytest.raises(GopdError, match=r"padded to 512 rows and the student's to 1024"):
            _validate([*argv, "--gopd-estimator", estimator])
        _validate(argv)  # sampled: fine
    finally:
        B.build_gpt = orig
    assert not built


def test_full_vocab_refuses_a_teacher_with_fewer_rows_than_the_student(world, tmp_path):
    """Equal paddings, the teacher's real vocabulary smaller than the student's: it has no
    probability for some tokens the student can produce; a larger one is handled (above)."""
    argv = _args(world, tmp_path / "run", "--teacher-load", str(world["teacher"]))
    argv[argv.index("--student-load") + 1] = str(world["teacher_wide"])  # 20 rows; teacher 15
    with pytest.raises(
        GopdError, match=r"teacher has 15 vocabulary rows, fewer than the student's 20"
    ):
        _validate([*argv, "--gopd-estimator", "full_vocab"])
    _validate(argv)
