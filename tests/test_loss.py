"""gopd_loss over vocab-parallel logits against plain torch on the gathered vocabulary.

The reference below is written from the formulas (log_softmax over the real vocabulary, the
advantage, the truncated IS weight, the full-vocabulary and top-k objectives on explicit cells) in
float64, independently of the code under test. Values and gradients must agree at TP 1, 2 and 4
to 1e-6 (rtol and atol: fp32 arithmetic on values of order 1-10).
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from megatron_gopd.gopd import GOPDLossConfig
from megatron_gopd.testing import run_distributed
from megatron_gopd.types import RolloutBatch

B, SEQ, V_PAD, V_REAL = 4, 9, 48, 45  # 3 padding columns, on the last TP rank
TOL = dict(rtol=1e-6, atol=1e-6)
CASES = {
    "sampled": GOPDLossConfig(),
    "sampled_opd_no_ref": GOPDLossConfig(),
    "sampled_seq_tis": GOPDLossConfig(aggregation="seq_mean", tis_cap=2.0),
    "full_vocab": GOPDLossConfig(estimator="full_vocab"),
    "full_vocab_opd_no_ref": GOPDLossConfig(estimator="full_vocab"),
    "top_k_seq": GOPDLossConfig(estimator="top_k", top_k=5, aggregation="seq_mean"),
}


def make_data(seed=0, opd=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, SEQ, V_PAD, generator=g) * 3
    teacher = torch.randn(B, SEQ, V_PAD, generator=g) * 3
    ref = torch.randn(B, SEQ, V_PAD, generator=g) * 3
    tokens = torch.randint(0, V_REAL, (B, SEQ), generator=g)
    mask = torch.zeros(B, SEQ)
    # label positions of each response; the last row has none (it must not count in seq_mean)
    for b, (start, end) in enumerate([(2, 8), (4, 6), (1, 8), (0, 0)]):
        mask[b, start:end] = 1.0
    mb = RolloutBatch(
        tokens_BS=tokens,
        response_mask_BS=mask,
        teacher_logprobs_BS=-torch.rand(B, SEQ, generator=g) * 4,
        ref_logprobs_BS=None if opd else -torch.rand(B, SEQ, generator=g) * 4,
        rollout_logprobs_BS=-torch.rand(B, SEQ, generator=g) * 4,
        lam_B=torch.ones(B) if opd else torch.tensor([1.0, 1.25, 0.5, 2.0]),
        domain_ids_B=torch.tensor([0, 1, 0, 1]),
        domains=["math", "code"],
        seq_lens_B=torch.full((B,), SEQ),
    )
    if not opd:  # the teacher/ref log-probs of the sampled tokens follow from their logits
        labels = torch.roll(tokens, -1, dims=1)
        mb.teacher_logprobs_BS = _logp(teacher, labels).float()
        mb.ref_logprobs_BS = _logp(ref, labels).float()
    return logits, teacher, ref, mb


def _logp(logits, labels):
    return F.log_softmax(logits[..., :V_REAL].double(), -1).gather(-1, labels[..., None])[..., 0]


def reference(name, cfg, logits, teacher, ref, mb):
    """float64 loss sum, count and d loss / d logits from the formulas."""
    x = logits[..., :V_REAL].double().requires_grad_(True)
    labels = torch.roll(mb.tokens_BS, -1, dims=1)
    m = mb.response_mask_BS.double().clone()
    m[:, -1] = 0
    lam = mb.lam_B.double()[:, None]
    lp_all = F.log_softmax(x, -1)
    s = lp_all.gather(-1, labels[..., None])[..., 0]
    q = mb.teacher_logprobs_BS.double()
    r = mb.ref_logprobs_BS.double() if mb.ref_logprobs_BS is not None else q  # lam == 1 there
    if cfg.estimator == "sampled":
        A = ((s - q) + (lam - 1) * (r - q)).detach()
        w = torch.ones_like(A)
        if cfg.tis_cap is not None:
            w = torch.exp(s.detach() - mb.rollout_logprobs_BS.double()).clamp(max=cfg.tis_cap)
        per_tok = w * A * s
    else:
        lq = F.log_softmax(teacher[..., :V_REAL].double(), -1)
        lr = F.log_softmax(ref[..., :V_REAL].double(), -1) if "no_ref" not in name else lq
        p = lp_all.exp()
        if cfg.estimator == "full_vocab":
            per_tok = (p * (lp_all - lam[..., None] * lq + (lam[..., None] - 1) * lr)).sum(-1)
        else:
            kth = x.detach().topk(cfg.top_k, -1).values[..., -1:]
            in_k = x.detach() >= kth

            def cells(logprob):  # [K cells as their own entries (0 elsewhere), rest cell]
                pr = logprob.exp()
                rest = torch.where(in_k, 0.0, pr).sum(-1, keepdim=True)
                return torch.cat([torch.where(in_k, pr, 0.0), rest], -1)

            P, Qc, Rc = cells(lp_all), cells(lq), cells(lr)
            L = lam[..., None]
            terms = P * (P.log() - L * Qc.log() + (L - 1) * Rc.log())
            per_tok = torch.where(P > 0, terms, 0.0).sum(-1)
    n = m.sum(-1)
    if cfg.aggregation == "token_mean":
        loss, count = (per_tok * m).sum(), n.sum()
    else:
        rows = n > 0
        loss, count = ((per_tok * m).sum(-1)[rows] / n[rows]).sum(), rows.sum()
    loss.backward()
    grad = torch.zeros(logits.shape, dtype=torch.float64)
    grad[..., :V_REAL] = x.grad
    return loss.detach(), int(count), grad, dict(s=s.detach(), q=q, r=r, m=m)


def _garbage_at_masked(logits, mb):
    """Other logits and NaN/inf log-probs wherever the mask is 0: none of it may matter."""
    g = torch.Generator().manual_seed(99)
    keep = mb.response_mask_BS.clone()
    keep[:, -1] = 0
    off = keep == 0
    logits = torch.where(off[..., None], torch.randn(logits.shape, generator=g) * 5, logits)
    mb = dataclasses.replace(mb)
    mb.teacher_logprobs_BS = mb.teacher_logprobs_BS.masked_fill(off, float("nan"))
    if mb.ref_logprobs_BS is not None:
        mb.ref_logprobs_BS = mb.ref_logprobs_BS.masked_fill(off, float("-inf"))
    mb.rollout_logprobs_BS = mb.rollout_logprobs_BS.masked_fill(off, float("inf"))
    return logits, mb


def _rank(names, world, masked_garbage=False, ref_for_opd=False):
    import torch.distributed as dist

    from megatron_gopd.trainer.loss import gopd_loss

    rank = dist.get_rank()
    group = dist.group.WORLD if world > 1 else None
    out = {}
    for name in names:
        logits, teacher, ref, mb = make_data(opd="opd" in name)
        if masked_garbage:
            logits, mb = _garbage_at_masked(logits, mb)
        if ref_for_opd:  # lambda = 1 with a (random) reference given: it must not matter
            mb = dataclasses.replace(mb, ref_logprobs_BS=-torch.rand(B, SEQ) * 9)
        no_ref = "no_ref" in name and not ref_for_opd
        shard = logits.chunk(world, -1)[rank].clone().requires_grad_(True)
        loss, n, report = gopd_loss(
            shard * 1.0,  # a non-leaf, like a model's output (the loss may overwrite it)
            mb,
            CASES[name],
            tp_group=group,
            vocab_size=V_REAL,
            teacher_logits_BSV=teacher.chunk(world, -1)[rank],
            ref_logits_BSV=None if no_ref else ref.chunk(world, -1)[rank],
        )
        loss.backward()
        out[name] = dict(loss=loss.detach(), n=n, grad=shard.grad, report=report)
    return out


def _stat(values, weights):
    """The [sum, weight] pair a report holds for a token mean of ``values``."""
    return torch.stack([(values * weights).sum(), weights.sum()])


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_matches_unsharded_reference(tp):
    results = run_distributed(_rank, tp, list(CASES), tp)
    for name, cfg in CASES.items():
        logits, teacher, ref, mb = make_data(opd="opd" in name)
        ref_loss, ref_n, ref_grad, parts = reference(name, cfg, logits, teacher, ref, mb)
        for r in results:  # every TP rank returns the same loss, count and report
            got = r[name]
            torch.testing.assert_close(got["loss"].double(), ref_loss, **TOL, msg=name)
            assert got["n"].dtype == torch.int32 and int(got["n"]) == ref_n, name
            expect = torch.stack([ref_loss, torch.tensor(float(ref_n), dtype=torch.float64)])
            torch.testing.assert_close(got["report"]["loss"].double(), expect, **TOL)
        grad = torch.cat([r[name]["grad"] for r in results], dim=-1)
        torch.testing.assert_close(grad.double(), ref_grad, **TOL, msg=name)
        assert torch.all(grad[..., V_REAL:] == 0), "padding columns get no gradient"

        # metrics: token means of the sampled-token quantities, overall and per domain
        m, s, q = parts["m"], parts["s"], parts["q"]
        rep = results[-1][name]["report"]
        torch.testing.assert_close(rep["kl_teacher"].double(), _stat(s - q, m), **TOL)
        dm = m * (mb.domain_ids_B == 1).double()[:, None]
        torch.testing.assert_close(rep["code/student_logprob"].double(), _stat(s, dm), **TOL)
        lp = F.log_softmax(logits[..., :V_REAL].double(), -1)
        ent = -(lp.exp() * lp).sum(-1)
        torch.testing.assert_close(rep["entropy"].double(), _stat(ent, m), **TOL)
        if cfg.estimator == "full_vocab":
            lq = F.log_softmax(teacher[..., :V_REAL].double(), -1)
            kl = (lp.exp() * (lp - lq)).sum(-1)
            torch.testing.assert_close(rep["kl_teacher_exact"].double(), _stat(kl, m), **TOL)
        if "is_weight" in rep and cfg.tis_cap is not None:
            w = torch.exp(s - mb.rollout_logprobs_BS.double()).clamp(max=cfg.tis_cap)
            torch.testing.assert_close(rep["is_weight"].double(), _stat(w, m), **TOL)


def test_lambda_one_is_plain_opd_whatever_the_reference():
    """lambda = 1: the reference log-probs/logits may be absent or anything; the result is the
    reverse-KL OPD of the reference above (A = s - q), for both estimators."""
    names = ["sampled_opd_no_ref", "full_vocab_opd_no_ref"]
    without = run_distributed(_rank, 2, names, 2)
    with_ref = run_distributed(_rank, 2, names, 2, ref_for_opd=True)
    for name in names:
        for a, b in zip(without, with_ref):
            torch.testing.assert_close(a[name]["loss"], b[name]["loss"], rtol=0, atol=0)
            torch.testing.assert_close(a[name]["grad"], b[name]["grad"], rtol=0, atol=0)
        assert "implicit_reward" not in without[0][name]["report"]


def test_masked_tokens_contribute_nothing():
    names = list(CASES)
    clean = run_distributed(_rank, 2, names, 2)
    dirty = run_distributed(_rank, 2, names, 2, masked_garbage=True)
    _, _, _, mb = make_data()
    keep = mb.response_mask_BS.clone()
    keep[:, -1] = 0
    for name in names:
        for a, b in zip(clean, dirty):
            torch.testing.assert_close(a[name]["loss"], b[name]["loss"], **TOL, msg=name)
            assert int(a[name]["n"]) == int(b[name]["n"])
            torch.testing.assert_close(a[name]["grad"], b[name]["grad"], **TOL, msg=name)
            assert torch.all(b[name]["grad"][keep == 0] == 0), name
            for k, v in b[name]["report"].items():
                assert torch.isfinite(v).all(), (name, k)
                torch.testing.assert_close(v, a[name]["report"][k], **TOL, msg=f"{name} {k}")


def test_bad_inputs_are_refused():
    from megatron_gopd.trainer.loss import gopd_loss

    logits, teacher, _, mb = make_data()
    with pytest.raises(ValueError, match="teacher"):
        gopd_loss(logits.clone(), mb, CASES["full_vocab"], vocab_size=V_REAL)
    with pytest.raises(ValueError, match="reference"):
        gopd_loss(
            logits.clone(), mb, CASES["full_vocab"], vocab_size=V_REAL, teacher_logits_BSV=teacher
        )
    with pytest.raises(ValueError, match="reference"):
        gopd_loss(logits.clone(), dataclasses.replace(mb, ref_logprobs_BS=None), CASES["sampled"])
    with pytest.raises(ValueError, match="rollout"):
        no_rollout = dataclasses.replace(mb, rollout_logprobs_BS=None)
        gopd_loss(logits.clone(), no_rollout, CASES["sampled_seq_tis"], vocab_size=V_REAL)
