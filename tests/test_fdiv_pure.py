"""The OPD+ f-divergence advantages against hand-computed values and autograd of the textbook ``f``.

``A = f'(r) - f'(1)`` is checked against ``torch.autograd`` of ``f`` written from its definition in
float64 (the code under test uses closed forms in ``log r``), ``g = f(r) / r`` against that ``f``
divided by ``r``. The unbiasedness of ``A`` as a policy gradient is ``tests/test_fdiv_mc.py``.
"""

import math

import pytest
import torch

from megatron_gopd.gopd import (
    DIVERGENCES,
    GOPDLossConfig,
    LossConfigError,
    fdiv_advantages,
    fdiv_terms,
    gopd_advantages,
)
from megatron_gopd.gopd.fdiv import MAX_ABS_LOG_RATIO

LN2 = math.log(2.0)


def textbook_f(divergence, alpha):
    """``f`` with ``D_f(p || q) = sum q f(p / q)``, from the definitions (float64 torch ops)."""
    if divergence == "reverse_kl":  # sum p log(p / q)
        return lambda r: r * r.log()
    if divergence == "forward_kl":  # sum q log(q / p)
        return lambda r: -r.log()
    if divergence == "js":  # KL(p || m) / 2 + KL(q || m) / 2, m = (p + q) / 2
        return lambda r: 0.5 * (r * (2 * r / (1 + r)).log() + (2 / (1 + r)).log())
    if divergence == "tv":  # sum |p - q| / 2
        return lambda r: 0.5 * (r - 1).abs()
    a = alpha  # Amari: (1 - sum p^a q^(1-a)) / (a (1 - a)), plus terms linear in r
    if a == 1.0:
        return lambda r: r * r.log() - r + 1
    if a == 0.0:
        return lambda r: -r.log() + r - 1
    return lambda r: (r**a - a * r - (1 - a)) / (a * (a - 1))


FAMILY = [(d, 0.5) for d in DIVERGENCES if d != "alpha"] + [
    ("alpha", a) for a in (-2.0, -1.0, 0.0, 0.3, 0.5, 1.0, 2.0, 3.0)
]


@pytest.mark.parametrize(("divergence", "alpha"), FAMILY)
def test_terms_are_the_derivative_of_the_textbook_f(divergence, alpha):
    f = textbook_f(divergence, alpha)
    lr = torch.linspace(-6.0, 6.0, 49, dtype=torch.float64)
    lr = lr[lr != 0]  # TV's kink: its subgradient is a convention, checked separately
    r = lr.exp().requires_grad_(True)
    (df,) = torch.autograd.grad(f(r).sum(), r)
    one = torch.ones((), dtype=torch.float64, requires_grad=True)
    (df1,) = torch.autograd.grad(f(one), one)
    A, g = fdiv_terms(lr, divergence, alpha)
    torch.testing.assert_close(A, df - df1, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g, f(r.detach()) / r.detach(), rtol=1e-10, atol=1e-10)
    # the same through the fp32 entry point (student - teacher log-probs)
    out = fdiv_advantages(
        lr.float() - 3.0, torch.full_like(lr, -3.0).float(), divergence=divergence, alpha=alpha
    )
    torch.testing.assert_close(out.advantage.double(), df - df1, rtol=2e-5, atol=2e-5)


def test_hand_computed_values():
    lr = torch.tensor([LN2, -LN2])  # r = 2, 1/2
    cases = {
        # A = f'(r) - f'(1), g = f(r) / r
        "reverse_kl": ([LN2, -LN2], [LN2, -LN2]),
        "forward_kl": ([1 - 1 / 2, 1 - 2], [-LN2 / 2, 2 * LN2]),  # 1 - 1/r, -log(r) / r
        # f'(r) = log(2r / (1 + r)) / 2; f(2) = (2 log(4/3) + log(2/3)) / 2
        "js": (
            [0.5 * math.log(4 / 3), 0.5 * math.log(2 / 3)],
            [
                (2 * math.log(4 / 3) + math.log(2 / 3)) / 4,
                (0.5 * math.log(2 / 3) + math.log(4 / 3)),
            ],
        ),
        "tv": ([0.5, -0.5], [0.25, 0.5]),  # sign / 2, |r - 1| / (2 r)
    }
    for d, (A, g) in cases.items():
        out = fdiv_advantages(lr, torch.zeros(2), divergence=d)
        torch.testing.assert_close(out.advantage, torch.tensor(A), msg=d)
        torch.testing.assert_close(out.estimate, torch.tensor(g), msg=d)
    # alpha = 1/2 at r = 4: Box-Cox (4^-0.5 - 1) / -0.5 = 1; f = 2 (sqrt(r) - 1)^2 = 2, g = 1/2
    out = fdiv_advantages(torch.tensor([math.log(4.0)]), torch.zeros(1), divergence="alpha")
    torch.testing.assert_close(out.advantage, torch.tensor([1.0]))
    torch.testing.assert_close(out.estimate, torch.tensor([0.5]))
    # alpha = 2 at r = 2: A = r - 1 = 1; f = (r - 1)^2 / 2 = 1/2 (Pearson chi^2 / 2), g = 1/4
    out = fdiv_advantages(torch.tensor([LN2]), torch.zeros(1), divergence="alpha", alpha=2.0)
    torch.testing.assert_close(out.advantage, torch.tensor([1.0]))
    torch.testing.assert_close(out.estimate, torch.tensor([0.25]))
    # agreement: every advantage and estimate is 0 at r = 1 (TV: the subgradient 0)
    for d, a in FAMILY:
        out = fdiv_advantages(torch.zeros(3), torch.zeros(3), divergence=d, alpha=a)
        assert torch.all(out.advantage == 0) and torch.all(out.estimate == 0), (d, a)


def test_naive_is_the_stop_gradient_reward():
    s, q = torch.tensor([-1.0, -2.0, -0.1]), torch.tensor([-1.5, -0.5, -3.0])
    for d, a in FAMILY:
        naive = fdiv_advantages(s, q, divergence=d, alpha=a, corrected=False)
        torch.testing.assert_close(naive.advantage, naive.estimate, rtol=0, atol=0)
        corrected = fdiv_advantages(s, q, divergence=d, alpha=a)
        torch.testing.assert_close(corrected.estimate, naive.estimate, rtol=0, atol=0)


def test_reverse_kl_is_gopd_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    s, q, r = (-torch.rand(4, 7, generator=g) * 30 for _ in range(3))  # |s - q| up to 30: no clamp
    mask = (torch.rand(4, 7, generator=g) > 0.3).float()
    lam = torch.tensor([1.0, 1.25, 0.5, 2.0])
    expect = gopd_advantages(s, q, r, lam, mask=mask)
    for corrected in (True, False):
        out = fdiv_advantages(s, q, r, lam, mask, divergence="reverse_kl", corrected=corrected)
        assert torch.equal(out.advantage, expect)
        assert torch.equal(out.estimate, expect)
        assert torch.all(out.clamped == 0)
    # lambda = 1 needs no reference
    assert torch.equal(fdiv_advantages(s, q).advantage, s - q)


def test_alpha_limits_are_the_kls():
    s, q = torch.tensor([-1.0, -2.0, -0.1, -5.0]), torch.tensor([-1.5, -0.5, -3.0, -2.0])
    rev = fdiv_advantages(s, q, divergence="reverse_kl").advantage
    fwd = fdiv_advantages(s, q, divergence="forward_kl").advantage
    torch.testing.assert_close(fdiv_advantages(s, q, divergence="alpha", alpha=1.0).advantage, rev)
    torch.testing.assert_close(fdiv_advantages(s, q, divergence="alpha", alpha=0.0).advantage, fwd)
    for eps in (1e-3, -1e-3):  # continuous through the limits (expm1: no cancellation in A)
        near1 = fdiv_advantages(s, q, divergence="alpha", alpha=1.0 + eps).advantage
        near0 = fdiv_advantages(s, q, divergence="alpha", alpha=eps).advantage
        torch.testing.assert_close(near1, rev, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(near0, fwd, rtol=1e-2, atol=1e-2)
    # the estimates differ from the KLs' by terms of zero mean, c (1 - 1/r): not checked here


def test_clamp_keeps_everything_finite_and_is_counted():
    L = MAX_ABS_LOG_RATIO
    s = torch.tensor([0.0, -60.0, 0.0, -1.0, float("-inf"), -1.0])
    q = torch.tensor(
        [-60.0, 0.0, -19.0, -1.0, -1.0, float("-inf")]
    )  # l = 60, -60, 19, 0, -inf, inf
    for d, a in [*FAMILY, ("alpha", 5.0), ("alpha", -3.0)]:
        out = fdiv_advantages(s, q, divergence=d, alpha=a)
        if d == "reverse_kl":  # linear: no clamp, exactly G-OPD (infinite where it is)
            assert out.clamped.tolist() == [0.0] * 6
            assert out.advantage[:4].tolist() == [60.0, -60.0, 19.0, 0.0]
            continue
        assert torch.isfinite(out.advantage).all() and torch.isfinite(out.estimate).all(), (d, a)
        assert out.clamped.tolist() == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0], (d, a)
        at_L = fdiv_terms(torch.tensor([L, -L, L, -L]), d, a)
        torch.testing.assert_close(out.advantage[[0, 1, 5, 4]], at_L[0], msg=str((d, a)))
    # a smaller clamp bounds the forward KL's importance weight: |A| <= e^L - 1
    out = fdiv_advantages(
        torch.tensor([-10.0]), torch.tensor([0.0]), divergence="forward_kl", max_log_ratio=5.0
    )
    torch.testing.assert_close(out.advantage, torch.tensor([-math.expm1(5.0)]))
    assert out.clamped.item() == 1.0


def test_mask_zeroes_everything_even_nan():
    s = torch.tensor([-1.0, float("nan"), -1.0])
    q = torch.tensor([-2.0, -1.0, float("inf")])
    mask = torch.tensor([1.0, 0.0, 0.0])
    for d, a in FAMILY:
        out = fdiv_advantages(s, q, mask=mask, divergence=d, alpha=a)
        for t in (out.advantage, out.estimate, out.clamped):
            assert t[1:].tolist() == [0.0, 0.0] and torch.isfinite(t).all(), (d, a)


def test_bf16_inputs_are_upcast_before_the_ratio():
    """bf16 log-probs: the result is the fp32 computation on the same (rounded) values, never a
    ratio formed in bf16; the outputs are fp32."""
    g = torch.Generator().manual_seed(1)
    s, q = -torch.rand(64, generator=g) * 12, -torch.rand(64, generator=g) * 12
    sb, qb = s.bfloat16(), q.bfloat16()
    for d, a in FAMILY:
        got = fdiv_advantages(sb, qb, divergence=d, alpha=a)
        want = fdiv_advantages(sb.float(), qb.float(), divergence=d, alpha=a)
        assert got.advantage.dtype == torch.float32
        assert torch.equal(got.advantage, want.advantage) and torch.equal(
            got.estimate, want.estimate
        )
    # what the upcast cannot undo: bf16 keeps 8 bits, so log-probs of magnitude <= 12 move by up
    # to 2^-5 = 0.031 each, and the reverse-KL advantage l = s - q by up to twice that
    rev = fdiv_advantages(sb, qb).advantage - fdiv_advantages(s, q).advantage
    assert rev.abs().max() <= 2 * 2**-5


def test_outputs_are_detached_fp32():
    s = torch.tensor([-1.0, -2.0], dtype=torch.float64, requires_grad=True)
    out = fdiv_advantages(s, torch.tensor([-1.5, -0.5]), divergence="js")
    assert not out.advantage.requires_grad and out.advantage.dtype == torch.float32


def test_config():
    assert GOPDLossConfig().objective == "gopd"  # the default path is G-OPD
    cfg = GOPDLossConfig(objective="fdiv", divergence="alpha", alpha=2.0, fdiv_correction=False)
    assert cfg.divergence == "alpha" and not cfg.fdiv_correction
    bad = [
        dict(objective="ppo"),
        dict(divergence="hellinger"),
        dict(objective="fdiv", estimator="full_vocab"),
        dict(objective="fdiv", estimator="top_k"),
        dict(divergence="alpha", alpha=6.0),  # |alpha - 1| * 20 > 80: exp could overflow fp32
        dict(divergence="alpha", alpha=-3.5),
        dict(alpha=float("nan")),
        dict(fdiv_max_log_ratio=0.0),
        dict(fdiv_max_log_ratio=100.0),
        dict(fdiv_correction="yes"),
    ]
    for kw in bad:
        with pytest.raises(LossConfigError):
            GOPDLossConfig(**kw)
    # a larger alpha is fine with a smaller clamp
    GOPDLossConfig(objective="fdiv", divergence="alpha", alpha=6.0, fdiv_max_log_ratio=10.0)


def test_trainer_flags_reach_the_loss_config():
    from megatron_gopd.trainer.config import build_config, parse_args
    from megatron_gopd.utils import GopdError

    base = ["--student-load", "s", "--teacher-load", "t", "--prompt-data", "p.jsonl"]
    cfg = build_config(parse_args(base)).loss
    assert cfg == GOPDLossConfig()  # no flag: the G-OPD loss, untouched
    assert parse_args(base).fdiv_max_log_ratio == MAX_ABS_LOG_RATIO
    flags = ["--gopd-objective", "fdiv", "--fdiv-divergence", "alpha", "--fdiv-alpha", "2"]
    flags += ["--fdiv-advantage", "naive", "--fdiv-max-log-ratio", "10"]
    cfg = build_config(parse_args(base + flags)).loss
    assert cfg == GOPDLossConfig(
        objective="fdiv",
        divergence="alpha",
        alpha=2.0,
        fdiv_correction=False,
        fdiv_max_log_ratio=10.0,
    )
    # invalid combinations fail when the flags are read, not mid-run
    for bad in (["--gopd-estimator", "full_vocab"], ["--fdiv-alpha", "9"]):
        with pytest.raises(GopdError, match=r"fdiv|alpha"):
            build_config(parse_args(base + flags[:6] + bad))
