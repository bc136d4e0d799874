"""The full-vocabulary G-OPD estimator: its gradient is the expected sampled-token gradient.

Three independent checks of ``vocab_parallel_gopd_objective`` / ``gopd_loss(estimator=...)``:
1. its gradient equals autograd of the naive objective ``J = sum_y p(y) A(y)`` written in float64
   (sharded at TP 1, 2, 4; also bf16 inputs against the fp32 reference);
2. its gradient equals the expected sampled-token gradient ``E_{y~p}[A(y) grad log p(y)]``
   computed by exact enumeration of ``y`` (the derivation in the module docstring, no sampling);
3. a Monte-Carlo run of the *default* (sampled) estimator through ``gopd_loss`` averages to it.
"""

import pytest
import torch
import torch.nn.functional as F

from megatron_gopd.gopd import GOPDLossConfig
from megatron_gopd.testing import run_distributed
from megatron_gopd.types import RolloutBatch
from megatron_gopd.vocab_parallel import vocab_parallel_gopd_objective

T, V_PAD, V_REAL = 6, 16, 13
LAM = torch.tensor([1.0, 1.25, 0.0, 2.0, 1.25, 0.5])


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    z, t, u = (torch.randn(T, V_PAD, generator=g) * 2 for _ in range(3))
    target = torch.randint(0, V_REAL, (T,), generator=g)
    g_out = torch.randn(T, generator=g)
    return z, t, u, target, g_out


def naive_objective(z, t, u, lam):
    """float64 J per position over the real vocabulary, differentiable in z."""
    lp, lq, lr = (F.log_softmax(x[:, :V_REAL].double(), -1) for x in (z, t, u))
    L = lam.double()[:, None]
    return (lp.exp() * (lp - L * lq + (L - 1) * lr)).sum(-1)


def _sharded(dtype, top_k):
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    z, t, u, target, g_out = _data()
    z, t, u = (x.to(dtype).chunk(world, -1)[rank].clone() for x in (z, t, u))
    x = z.requires_grad_(True)
    out = vocab_parallel_gopd_objective(
        x * 1,
        t,
        target,
        LAM,
        dist.group.WORLD,
        ref_logits=u,
        vocab_size=V_REAL,
        top_k=top_k,
        chunk_elements=20,  # several chunks of rows
    )
    (out.objective * g_out).sum().backward()
    return out.objective.detach(), x.grad


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_gradient_matches_autograd_of_naive_objective(tp):
    z, t, u, _, g_out = _data()
    zz = z.double().requires_grad_(True)
    J = naive_objective(zz, t, u, LAM)
    (J * g_out.double()).sum().backward()
    # top_k >= vocabulary is the full objective
    for top_k in (None, V_REAL):
        outs = run_distributed(_sharded, tp, torch.float32, top_k)
        for obj, _ in outs:
            torch.testing.assert_close(obj.double(), J.detach(), rtol=1e-6, atol=1e-6)
        grad = torch.cat([g for _, g in outs], -1)
        torch.testing.assert_close(
            grad[:, :V_REAL].double(), zz.grad[:, :V_REAL], rtol=1e-6, atol=1e-6
        )
        assert torch.all(grad[:, V_REAL:] == 0)


def test_bf16_logits_close_to_fp32_reference():
    z, t, u, _, g_out = _data()
    z, t, u = (x.bfloat16().float() for x in (z, t, u))  # the values bf16 can hold
    zz = z.double().requires_grad_(True)
    J = naive_objective(zz, t, u, LAM)
    (J * g_out.double()).sum().backward()
    outs = run_distributed(_sharded, 2, torch.bfloat16, None)
    grad = torch.cat([g for _, g in outs], -1)
    assert grad.dtype == torch.bfloat16
    # fp32 math on bf16 inputs: only the returned gradient is rounded to bf16 (8 bits)
    torch.testing.assert_close(outs[0][0].double(), J.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double()[:, :V_REAL], zz.grad[:, :V_REAL], rtol=1e-2, atol=1e-2)


def test_gradient_is_the_exact_expected_sampled_gradient():
    """grad J = sum_y p(y) A(y) (e_y - p), the expectation of the sampled estimator's gradient
    ``A(y) d log p(y) / dz`` with A held constant, enumerated over every y (no sampling)."""
    z, t, u, target, _ = _data()
    lp, lq, lr = (F.log_softmax(x[:, :V_REAL].double(), -1) for x in (z, t, u))
    L = LAM.double()[:, None]
    A = lp - L * lq + (L - 1) * lr  # [T, V]: the cost of every possible sampled token
    p = lp.exp()
    eye = torch.eye(V_REAL, dtype=torch.float64)
    # sum_y p(y) A(y) (e_y - p)   ->  [T, V]
    expected = torch.einsum("ty,ty,tyv->tv", p, A, eye[None] - p[:, None, :])
    x = z.clone().requires_grad_(True)
    out = vocab_parallel_gopd_objective(x * 1, t, target, LAM, ref_logits=u, vocab_size=V_REAL)
    out.objective.sum().backward()
    torch.testing.assert_close(x.grad[:, :V_REAL].double(), expected, rtol=1e-6, atol=1e-6)
    # and its value is the expected advantage E_y[A(y)]
    torch.testing.assert_close(out.objective.double(), (p * A).sum(-1), rtol=1e-6, atol=1e-6)


def test_monte_carlo_sampled_estimator_agrees_with_full_vocab():
    """Average N sampled-token gradients (the default estimator, through gopd_loss) per position
    and compare with the full-vocabulary gradient.

    Each position's single-sample gradient has per-element standard deviation sigma (measured from
    the samples); the mean of N = 20000 has standard error sigma / sqrt(N). We require every
    element within 5 standard errors (+1e-6 for fp32): for a correct estimator the chance that
    any of the T * V = 78 elements exceeds 5 s.e. is < 78 * 5.7e-7 = 4.5e-5 (normal tails; N is
    large), and the seed is fixed, so the test is deterministic (the largest deviation here is
    3.5 s.e.). It is sensitive: 5 s.e. is 0.0006-0.09 per element, while a wrong factor on the
    reference term (lambda instead of lambda - 1) moves the expected gradient by 0.26-1.7 per
    position (largest element).
    """
    from megatron_gopd.trainer.loss import gopd_loss

    N = 20000
    z, t, u, _, _ = _data(seed=1)
    lp, lq, lr = (F.log_softmax(x[:, :V_REAL].double(), -1) for x in (z, t, u))
    g = torch.Generator().manual_seed(5)
    y = torch.multinomial(lp.exp(), N, replacement=True, generator=g)  # [T, N] y ~ p

    def batch(rows_logits, tokens_next, lam, q_lp, r_lp):
        R = rows_logits.shape[0]
        tokens = torch.stack([torch.zeros(R, dtype=torch.long), tokens_next], 1)  # [R, 2]
        mask = torch.tensor([[1.0, 0.0]]).expand(R, 2)  # position 0 predicts token 1
        mb = RolloutBatch(
            tokens_BS=tokens,
            response_mask_BS=mask,
            teacher_logprobs_BS=torch.stack([q_lp, torch.zeros(R)], 1).float(),
            ref_logprobs_BS=torch.stack([r_lp, torch.zeros(R)], 1).float(),
            rollout_logprobs_BS=None,
            lam_B=lam,
            domain_ids_B=torch.zeros(R, dtype=torch.long),
            domains=["d"],
            seq_lens_B=torch.full((R,), 2),
        )
        # position 1 has no label: any finite logits
        logits = torch.stack([rows_logits, torch.zeros_like(rows_logits)], 1)
        return logits.clone().requires_grad_(True), mb

    # sampled: one row per (position, sample); the loss is a sum, so each row's gradient is
    # that sample's A(y) d log p(y) / dz
    rows = torch.arange(T).repeat_interleave(N)
    yy = y.reshape(-1)
    logits, mb = batch(z[rows], yy, LAM[rows], lq[rows, yy], lr[rows, yy])
    loss, n, _ = gopd_loss(logits * 1, mb, GOPDLossConfig(), vocab_size=V_REAL)
    loss.backward()
    per_sample = logits.grad[:, 0, :V_REAL].double().view(T, N, V_REAL)
    mc_mean, mc_se = per_sample.mean(1), per_sample.std(1) / N**0.5

    logits, mb = batch(z, torch.zeros(T, dtype=torch.long), LAM, torch.zeros(T), torch.zeros(T))
    cfg = GOPDLossConfig(estimator="full_vocab")
    loss, _, _ = gopd_loss(
        logits * 1,
        mb,
        cfg,
        vocab_size=V_REAL,
        teacher_logits_BSV=torch.stack([t, t], 1),
        ref_logits_BSV=torch.stack([u, u], 1),
    )
    loss.backward()
    full = logits.grad[:, 0, :V_REAL].double()
    assert torch.all((mc_mean - full).abs() <= 5 * mc_se + 1e-6), (mc_mean - full).abs().max()
    # the sampled loss's mean advantage estimates J as well (same 5 s.e. criterion)
    L = LAM.double()[:, None]
    A = (lp - L * lq + (L - 1) * lr).gather(1, y)  # [T, N]
    J = (lp.exp() * (lp - L * lq + (L - 1) * lr)).sum(-1)
    assert torch.all((A.mean(1) - J).abs() <= 5 * A.std(1) / N**0.5)


# ------------------------------------------------- frozen roles with a larger real vocabulary

# the teacher's and reference's real rows (15) exceed the student's (12), same padding (16): at
# TP 4 the last rank holds real teacher columns and no student one
V_STUDENT, V_FROZEN = 12, 15


def naive_objective_wider_frozen(z, t, u, lam, top_k=None):
    """float64 J where the teacher and the reference normalise over their own V_FROZEN rows; the
    student's cells are its top-k tokens (all of its tokens for the full vocabulary) and one rest
    cell, which for q and r also holds their mass on the tokens the student does not have."""
    lp = F.log_softmax(z[:, :V_STUDENT].double(), -1)
    lq_all, lr_all = (F.log_softmax(x[:, :V_FROZEN].double(), -1) for x in (t, u))
    lq, lr = lq_all[:, :V_STUDENT], lr_all[:, :V_STUDENT]
    L = lam.double()[:, None]
    if top_k is None:
        return (lp.exp() * (lp - L * lq + (L - 1) * lr)).sum(-1)
    kth = z[:, :V_STUDENT].double().topk(top_k, -1).values[:, -1:]
    in_k = z[:, :V_STUDENT].double() >= kth

    def cells(logprob):
        pr = logprob.exp()
        return torch.cat([torch.where(in_k, pr, 0.0), 1 - (pr * in_k).sum(-1, keepdim=True)], -1)

    P, Q, R = cells(lp), cells(lq), cells(lr)
    terms = P * (P.log() - L * Q.log() + (L - 1) * R.log())
    return torch.where(P > 0, terms, 0.0).sum(-1)


def _sharded_wider(top_k):
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    z, t, u, target, g_out = _data()
    z, t, u = (x.chunk(world, -1)[rank].clone() for x in (z, t, u))
    x = z.requires_grad_(True)
    out = vocab_parallel_gopd_objective(
        x * 1,
        t,
        target % V_STUDENT,
        LAM,
        dist.group.WORLD,
        ref_logits=u,
        vocab_size=V_STUDENT,
        frozen_vocab_size=V_FROZEN,
        top_k=top_k,
        chunk_elements=20,
    )
    (out.objective * g_out).sum().backward()
    return out.objective.detach(), out.kl_teacher, x.grad


@pytest.mark.parametrize("top_k", [None, 4])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_teacher_and_reference_normalise_over_their_own_vocabulary(tp, top_k):
    """Equal paddings, different real vocabulary sizes (issue 15, item 6): the teacher's and the
    reference's softmaxes cover their own rows; values and gradients as the float64 objective
    written from the cells."""
    z, t, u, _, g_out = _data()
    zz = z.double().requires_grad_(True)
    J = naive_objective_wider_frozen(zz, t, u, LAM, top_k)
    (J * g_out.double()).sum().backward()
    outs = run_distributed(_sharded_wider, tp, top_k)
    for obj, _, _ in outs:
        torch.testing.assert_close(obj.double(), J.detach(), rtol=1e-6, atol=1e-6)
    grad = torch.cat([g for _, _, g in outs], -1)
    torch.testing.assert_close(
        grad[:, :V_STUDENT].double(), zz.grad[:, :V_STUDENT], rtol=1e-6, atol=1e-6
    )
    assert torch.all(grad[:, V_STUDENT:] == 0)
    # the control: normalising the teacher over the student's rows gives another objective
    lp = F.log_softmax(z[:, :V_STUDENT].double(), -1)
    kl_own = (lp.exp() * (lp - F.log_softmax(t[:, :V_FROZEN].double(), -1)[:, :V_STUDENT])).sum(-1)
    kl_student_rows = (lp.exp() * (lp - F.log_softmax(t[:, :V_STUDENT].double(), -1))).sum(-1)
    assert (kl_own - kl_student_rows).abs().max() > 1e-2
    if top_k is None:
        torch.testing.assert_close(outs[0][1].double(), kl_own, rtol=1e-6, atol=1e-6)
