"""gopd_loss(objective="fdiv") over vocab-parallel logits against plain torch on the whole vocabulary.

The reference is written from the definitions in float64, independently of the code under test:
log_softmax over the real vocabulary, ``l = (s - q) + (lambda - 1)(r - q)`` clamped to ``[-L, L]``
(all divergences but reverse KL), the advantage ``f'(e^l) - f'(1)`` by *autograd* of the textbook
``f`` (or ``f(r) / r`` for the naive variant), the truncated IS weight and the aggregation. The
data plant tokens beyond the clamp on both sides. Values and gradients must agree with it at TP 1
and 2 to 1e-5 relative (fp32 kernels against float64; advantages up to e^20 ~ 5e8 on the clamped
tokens of the forward KL make absolute tolerances meaningless), and TP 1 and TP 2 with each other
to the same tolerance.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from megatron_gopd.gopd import GOPDLossConfig
from megatron_gopd.testing import run_distributed
from megatron_gopd.types import RolloutBatch
from tests.test_fdiv_pure import textbook_f

B, SEQ, V_PAD, V_REAL = 4, 9, 48, 45  # 3 padding columns, on the last TP rank
TOL = dict(rtol=1e-5, atol=1e-6)
L = 20.0


def _fdiv(divergence, alpha=0.5, **kw):
    return GOPDLossConfig(objective="fdiv", divergence=divergence, alpha=alpha, **kw)


CASES = {
    "reverse_kl": _fdiv("reverse_kl"),
    "forward_kl": _fdiv("forward_kl"),
    "js": _fdiv("js"),
    "tv": _fdiv("tv", aggregation="seq_mean"),
    "alpha_half": _fdiv("alpha", 0.5),
    "alpha_two_seq_tis": _fdiv("alpha", 2.0, aggregation="seq_mean", tis_cap=2.0),
    "js_naive": _fdiv("js", fdiv_correction=False),
    "forward_kl_naive_clamp5": _fdiv("forward_kl", fdiv_correction=False, fdiv_max_log_ratio=5.0),
}


def make_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, SEQ, V_PAD, generator=g) * 3
    tokens = torch.randint(0, V_REAL, (B, SEQ), generator=g)
    mask = torch.zeros(B, SEQ)
    for b, (start, end) in enumerate([(2, 8), (4, 6), (1, 8), (0, 0)]):
        mask[b, start:end] = 1.0
    teacher = -torch.rand(B, SEQ, generator=g) * 4
    teacher[0, 3] = -40.0  # l ~ +37: beyond the clamp
    labels = torch.roll(tokens, -1, dims=1)
    logits[2, 5, labels[2, 5]] = -60.0  # the student all but excludes its own token: l ~ -60
    mb = RolloutBatch(
        tokens_BS=tokens,
        response_mask_BS=mask,
        teacher_logprobs_BS=teacher,
        ref_logprobs_BS=-torch.rand(B, SEQ, generator=g) * 4,
        rollout_logprobs_BS=-torch.rand(B, SEQ, generator=g) * 4,
        lam_B=torch.tensor([1.0, 1.25, 0.5, 2.0]),
        domain_ids_B=torch.tensor([0, 1, 0, 1]),
        domains=["math", "code"],
        seq_lens_B=torch.full((B,), SEQ),
    )
    return logits, mb


def reference(cfg, logits, mb):
    """float64 loss sum, count, d loss / d logits and per-token metric values."""
    x = logits[..., :V_REAL].double().requires_grad_(True)
    labels = torch.roll(mb.tokens_BS, -1, dims=1)
    m = mb.response_mask_BS.double().clone()
    m[:, -1] = 0
    s = F.log_softmax(x, -1).gather(-1, labels[..., None])[..., 0]
    q, r = mb.teacher_logprobs_BS.double(), mb.ref_logprobs_BS.double()
    lr = (s - q + (mb.lam_B.double()[:, None] - 1) * (r - q)).detach()
    clamp = cfg.divergence != "reverse_kl"
    L = cfg.fdiv_max_log_ratio
    clamped = (lr.abs() > L).double() if clamp else torch.zeros_like(lr)
    lr = lr.clamp(-L, L) if clamp else lr
    f = textbook_f(cfg.divergence, cfg.alpha)
    ratio = lr.exp().requires_grad_(True)
    (df,) = torch.autograd.grad(f(ratio).sum(), ratio)
    one = torch.ones((), dtype=torch.float64, requires_grad=True)
    (df1,) = torch.autograd.grad(f(one), one)
    est = f(lr.exp()) / lr.exp()
    A = df - df1 if cfg.fdiv_correction else est
    w = torch.ones_like(A)
    if cfg.tis_cap is not None:
        w = torch.exp(s.detach() - mb.rollout_logprobs_BS.double()).clamp(max=cfg.tis_cap)
    per_tok = w * A * s
    n = m.sum(-1)
    if cfg.aggregation == "token_mean":
        loss, count = torch.where(m > 0, per_tok, 0).sum(), n.sum()
    else:
        rows = n > 0
        loss, count = (torch.where(m > 0, per_tok, 0).sum(-1)[rows] / n[rows]).sum(), rows.sum()
    loss.backward()
    grad = torch.zeros(logits.shape, dtype=torch.float64)
    grad[..., :V_REAL] = x.grad
    return loss.detach(), int(count), grad, dict(m=m, A=A, est=est, clamped=clamped)


def _rank(names, world, dtype=torch.float32, masked_garbage=False, objective=None):
    import torch.distributed as dist

    from megatron_gopd.trainer.loss import gopd_loss

    rank = dist.get_rank()
    group = dist.group.WORLD if world > 1 else None
    out = {}
    for name in names:
        logits, mb = make_data()
        cfg = (
            CASES[name]
            if objective is None
            else dataclasses.replace(CASES[name], objective=objective)
        )
        if masked_garbage:  # NaN / inf log-probs wherever the mask is 0: none of it may matter
            off = mb.response_mask_BS == 0
            mb = dataclasses.replace(
                mb,
                teacher_logprobs_BS=mb.teacher_logprobs_BS.masked_fill(off, float("nan")),
                ref_logprobs_BS=mb.ref_logprobs_BS.masked_fill(off, float("-inf")),
            )
        shard = logits.to(dtype).chunk(world, -1)[rank].clone().requires_grad_(True)
        loss, n, report = gopd_loss(shard * 1, mb, cfg, tp_group=group, vocab_size=V_REAL)
        loss.backward()
        out[name] = dict(loss=loss.detach(), n=n, grad=shard.grad, report=report)
    return out


def _stat(values, weights):
    return torch.stack([(values * weights).sum(), weights.sum()])


@pytest.fixture(scope="module")
def by_tp():
    return {tp: run_distributed(_rank, tp, list(CASES), tp) for tp in (1, 2)}


@pytest.mark.parametrize("tp", [1, 2])
def test_matches_unsharded_reference(by_tp, tp):
    results = by_tp[tp]
    logits, mb = make_data()
    for name, cfg in CASES.items():
        ref_loss, ref_n, ref_grad, parts = reference(cfg, logits, mb)
        for r in results:  # every TP rank returns the same loss, count and report
            got = r[name]
            torch.testing.assert_close(got["loss"].double(), ref_loss, **TOL, msg=name)
            assert int(got["n"]) == ref_n, name
        grad = torch.cat([r[name]["grad"] for r in results], dim=-1)
        torch.testing.assert_close(grad.double(), ref_grad, **TOL, msg=name)
        assert torch.all(grad[..., V_REAL:] == 0), "padding columns get no gradient"

        rep, m = results[-1][name]["report"], parts["m"]
        torch.testing.assert_close(rep["fdiv"].double(), _stat(parts["est"], m), **TOL, msg=name)
        torch.testing.assert_close(rep["advantage"].double(), _stat(parts["A"], m), **TOL, msg=name)
        clamped = _stat(parts["clamped"], m)
        torch.testing.assert_close(rep["fdiv_clamped"].double(), clamped, rtol=0, atol=0)
        dm = m * (mb.domain_ids_B == 1).double()[:, None]  # per domain, like every metric
        torch.testing.assert_close(rep["code/fdiv"].double(), _stat(parts["est"], dm), **TOL)
    # the planted tokens: two beyond the default clamp (0 for reverse KL), more beyond 5
    assert by_tp[tp][0]["forward_kl"]["report"]["fdiv_clamped"][0] == 2
    assert by_tp[tp][0]["reverse_kl"]["report"]["fdiv_clamped"][0] == 0
    assert by_tp[tp][0]["forward_kl_naive_clamp5"]["report"]["fdiv_clamped"][0] > 2


def test_tp1_equals_tp2(by_tp):
    for name in CASES:
        one, two = by_tp[1][0][name], by_tp[2]
        for r in two:
            torch.testing.assert_close(r[name]["loss"], one["loss"], **TOL, msg=name)
            assert int(r[name]["n"]) == int(one["n"])
            for k, v in one["report"].items():
                torch.testing.assert_close(r[name]["report"][k], v, **TOL, msg=f"{name} {k}")
        grad2 = torch.cat([r[name]["grad"] for r in two], dim=-1)
        torch.testing.assert_close(grad2, one["grad"], **TOL, msg=name)


def test_reverse_kl_is_gopd_bit_for_bit(by_tp):
    """OPD+ with the reverse KL is G-OPD: same loss, gradient and metrics, bit for bit (TP 2,
    per-sample lambda with a reference)."""
    gopd = run_distributed(_rank, 2, ["reverse_kl"], 2, objective="gopd")
    for a, b in zip(by_tp[2], gopd):
        a, b = a["reverse_kl"], b["reverse_kl"]
        assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["grad"], b["grad"])
        assert set(a["report"]) - set(b["report"]) == {
            k for k in a["report"] if k.endswith(("fdiv", "fdiv_clamped"))
        }
        for k, v in b["report"].items():
            assert torch.equal(a["report"][k], v), k


def test_bf16_logits():
    """bf16 logits: the kernel reads them chunk-wise into fp32, so loss and gradient are those of
    the fp32 computation on the same rounded logits (to fp32 accuracy), the gradient comes back
    in bf16, and nothing overflows with the clamped forward KL's e^20 advantages."""
    names = ["forward_kl", "alpha_two_seq_tis", "js"]
    bf = run_distributed(_rank, 2, names, 2, dtype=torch.bfloat16)
    logits, mb = make_data()
    rounded = logits.bfloat16().float()
    for name in names:
        ref_loss, _, ref_grad, _ = reference(CASES[name], rounded, mb)
        torch.testing.assert_close(bf[0][name]["loss"].double(), ref_loss, **TOL, msg=name)
        grad = torch.cat([r[name]["grad"] for r in bf], dim=-1)
        assert grad.dtype == torch.bfloat16 and torch.isfinite(grad).all()
        # the gradient is rounded to bf16 on return: 8 bits, relative 2^-8
        torch.testing.assert_close(
            grad.double(), ref_grad, rtol=2**-8, atol=1e-6 * ref_grad.abs().max().item()
        )


def test_masked_tokens_contribute_nothing(by_tp):
    dirty = run_distributed(_rank, 2, list(CASES), 2, masked_garbage=True)
    for name in CASES:
        for a, b in zip(by_tp[2], dirty):
            torch.testing.assert_close(a[name]["loss"], b[name]["loss"], rtol=0, atol=0)
            torch.testing.assert_close(a[name]["grad"], b[name]["grad"], rtol=0, atol=0)
            for k, v in b[name]["report"].items():
                assert torch.isfinite(v).all(), (name, k)
