"""The OPD+ advantage is an unbiased policy gradient of the f-divergence; the naive one is not.

A tiny language: vocabulary of V = 5 symbols, responses of exactly T = 3 tokens (125 sequences).
The student is a table of logits, one row per prefix (1 + 5 + 25 = 31 rows x 5: 155 parameters);
the teacher another such table (and a reference, for G-OPD's lambda). What discount-0 distillation optimises (``megatron_gopd.gopd.fdiv``)
is, with the prefix distribution held at the current student::

    J(theta) = sum_t sum_{h : |h| = t} sg[P_theta(h)] D_f(pi_theta(. | h) || pi*(. | h))

It is enumerated exactly over all prefixes in float64 with every divergence written from its
textbook definition on the two distributions (``sum p log(p/q)``, ``sum q log(q/p)``, the JS through
the mixture ``m = (p + q)/2``, ``sum |p - q| / 2``, Amari's ``(1 - sum p^a q^(1-a)) / (a(1-a))``),
and autograd gives its exact gradient ``G`` (no formula of the code under test is involved).

The Monte-Carlo estimate samples N sequences from the student and averages the per-sequence
gradient ``X_n = sum_t A_nt grad log pi_theta(y_nt | h_nt)`` with ``A`` from ``fdiv_advantages``
(``grad log pi`` w.r.t. the row of ``h`` is ``onehot(y) - p``). ``X_n`` depends only on which of
the 125 sequences was sampled, so its mean and covariance over the N samples are computed from the
counts of each sequence (the same numbers as a loop over the samples).

Statistics (N = 2^18 = 262144 sampled sequences, fixed seed; well under a second):
* per parameter, the error in standard errors ``z_i = (mean_i - G_i) / se_i``,
  ``se_i = std_i(X) / sqrt(N)``;
* the whole error in whitened standard errors, ``chi2 = (mean - G)^T Cov(mean)^+ (mean - G)``,
  ``Cov(mean) = Cov(X) / N``: for an unbiased estimator ~ chi^2 with k = rank dof (124: 31 rows x 4,
  a softmax row's constant direction has no gradient), mean k, sd sqrt(2k) ~ 16.
Corrected advantage: ``max |z| < 5`` (155 components: a normal |z| > 5 has probability 155 x 5.7e-7
~ 1e-4) and ``chi2`` below the chi^2_k quantile of tail probability 1e-5 (~203 for k = 124).
Naive advantage, every divergence but the reverse KL: ``max |z| > 20`` and ``chi2`` over ten times
that quantile (its bias, derived in the module docstring, is hundreds of standard errors here).
Reverse KL: naive = corrected, both unbiased. (With a table student ``X_n`` is a linear function of
the sampled sequence's indicator, so ``chi2`` comes out the same for every unbiased advantage on the
same samples; ``max |z|`` does not. Scaling the corrected advantage by 1.02 already gives
``chi2 > 2e4`` and ``max |z| > 6``.)
"""

import math

import pytest
import torch

from megatron_gopd.gopd import fdiv_advantages

V, T = 5, 3
N_SAMPLES = 1 << 18
Z_MAX, Z_BIASED = 5.0, 20.0
Z_TAIL = 4.265  # the one-sided normal quantile of 1e-5
# (divergence, alpha): the family, with alpha on both sides of the KL limits and beyond them
# (divergence, alpha, lambda): the family, alpha on both sides of the KL limits and beyond them,
# and G-OPD's lambda = 1.25 (the target pi*^lambda pi_ref^(1 - lambda), unnormalised)
CASES = [
    ("reverse_kl", None, 1.0),
    ("forward_kl", None, 1.0),
    ("js", None, 1.0),
    ("tv", None, 1.0),
    ("alpha", 0.5, 1.0),
    ("alpha", 2.0, 1.0),
    ("alpha", -1.0, 1.0),
    ("reverse_kl", None, 1.25),
    ("forward_kl", None, 1.25),
    ("alpha", 0.5, 1.25),
]
OFFSETS = [0, 1, 1 + V]  # first row of the prefixes of length 0, 1, 2
N_ROWS = 1 + V + V * V


def _tables():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(N_ROWS, V, generator=g, dtype=torch.float64)
    teacher = 1.5 * torch.randn(N_ROWS, V, generator=g, dtype=torch.float64)
    ref = torch.randn(N_ROWS, V, generator=g, dtype=torch.float64)
    return student, teacher, ref


def target_logprobs(teacher, ref, lam):
    """``log pi~ = lam log pi* + (1 - lam) log pi_ref`` (unnormalised for lam != 1)."""
    return lam * teacher.log_softmax(-1) + (1 - lam) * ref.log_softmax(-1)


def exact_divergence(p, q, divergence, alpha):
    """D(p || q) per row of two ``[R, V]`` distributions, from the textbook definitions.

    Each is ``sum_y q f(p / q)`` term by term (Amari's form up to terms constant in ``p`` when
    ``q`` is unnormalised), so it is also the objective against an unnormalised target."""
    if divergence == "reverse_kl":
        return (p * (p / q).log()).sum(-1)
    if divergence == "forward_kl":
        return (q * (q / p).log()).sum(-1)
    if divergence == "js":
        m = (p + q) / 2
        return 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    if divergence == "tv":
        return 0.5 * (p - q).abs().sum(-1)
    a = alpha
    return (1 - (p**a * q ** (1 - a)).sum(-1)) / (a * (1 - a))


def _prefix_rows(t):
    """Row index of every prefix of length t, and the prefixes themselves ``[V^t, t]``."""
    seqs = torch.cartesian_prod(*[torch.arange(V)] * t).reshape(-1, t) if t else None
    return torch.arange(V**t) + (OFFSETS[t] if t < T else 0), seqs


def exact_gradient(student, teacher, ref, divergence, alpha, lam):
    """``G = grad J`` by autograd of the enumerated objective (prefix probabilities held fixed)."""
    theta = student.clone().requires_grad_(True)
    p_all = theta.softmax(-1)
    q_all = target_logprobs(teacher, ref, lam).exp()
    J = theta.new_zeros(())
    for t in range(T):
        rows, seqs = _prefix_rows(t)
        prob_h = torch.ones(len(rows), dtype=torch.float64)  # P(h), detached: discount 0
        for j in range(t):
            parent = _row_of(seqs[:, :j])
            prob_h = prob_h * p_all.detach()[parent, seqs[:, j]]
        J = J + (prob_h * exact_divergence(p_all[rows], q_all[rows], divergence, alpha)).sum()
    (G,) = torch.autograd.grad(J, theta)
    return G


def _code(seqs):
    """``[n, t]`` symbols -> their base-V number (the order of ``torch.cartesian_prod``)."""
    code = torch.zeros(seqs.shape[0], dtype=torch.long)
    for j in range(seqs.shape[1]):
        code = code * V + seqs[:, j]
    return code


def _row_of(prefix):
    """``[n, t]`` prefixes -> their row indices in the logit tables."""
    return _code(prefix) + OFFSETS[prefix.shape[1]]


def monte_carlo(student, teacher, ref, cases, n, seed=1):
    """Per (divergence, alpha, lambda, corrected): the mean of ``X_n`` over ``n`` sampled sequences
    ``[P]`` (P = N_ROWS * V parameters) and the covariance of that mean ``[P, P]``, float64."""
    g = torch.Generator().manual_seed(seed)
    P = N_ROWS * V
    p_all = student.softmax(-1)
    logp_all, logq_all, logr_all = (x.log_softmax(-1) for x in (student, teacher, ref))
    prefix = torch.zeros(n, 0, dtype=torch.long)
    for _t in range(T):  # ancestral sampling from the student
        y = torch.multinomial(p_all[_row_of(prefix)], 1, generator=g)
        prefix = torch.cat([prefix, y], dim=1)
    count = torch.bincount(_code(prefix), minlength=V**T).double()  # [125]
    seqs = _prefix_rows(T)[1]  # [125, T], in the order of _row_of's codes
    X = {}
    for d, a, lam in cases:
        for c in (True, False):
            X[(d, a, lam, c)] = torch.zeros(V**T, N_ROWS, V, dtype=torch.float64)
    for t in range(T):
        rows, y = _row_of(seqs[:, :t]), seqs[:, t]
        s = logp_all[rows, y].float()  # the trainer's log-probs are fp32
        q, r = logq_all[rows, y].float(), logr_all[rows, y].float()
        score = -p_all[rows]  # grad of log pi(y | h) w.r.t. the row of h
        score[torch.arange(len(y)), y] += 1.0
        for (d, a, lam, c), x in X.items():
            kw = dict(divergence=d, corrected=c) | ({} if a is None else dict(alpha=a))
            A = fdiv_advantages(s, q, r, lam, **kw).advantage.double()
            x[torch.arange(len(y)), rows] += A[:, None] * score
    w = count / n
    out = {}
    for k, x in X.items():
        x = x.reshape(V**T, P)
        mean = w @ x
        cov = (x.T * w) @ x - torch.outer(mean, mean)
        out[k] = (mean, cov / n)
    return out


def error_stats(mean, cov, G):
    """``(max |z|, chi2)``: the largest per-parameter error in standard errors, and the squared
    Mahalanobis norm of the error, ``(mean - G)^T cov^+ (mean - G)`` (~ chi^2 with RANK dof)."""
    delta = mean - G.reshape(-1)
    z = delta / cov.diagonal().sqrt()
    evals, evecs = torch.linalg.eigh(cov)
    keep = evals > evals.max() * 1e-10  # drop the null space: each row's constant direction
    w = (evecs[:, keep].T @ delta) / evals[keep].sqrt()  # the error in whitened standard errors
    return float(z.abs().max()), float(w.square().sum()), int(keep.sum())


def chi2_upper_quantile(k, z=Z_TAIL):
    """The chi^2_k quantile exceeded with the normal tail probability of ``z`` (Wilson-Hilferty,
    accurate to ~1% for k > 30)."""
    c = 2.0 / (9.0 * k)
    return k * (1.0 - c + z * math.sqrt(c)) ** 3


@pytest.fixture(scope="module")
def results():
    student, teacher, ref = _tables()
    mc = monte_carlo(student, teacher, ref, CASES, N_SAMPLES)
    out = {}
    for case in CASES:
        G = exact_gradient(student, teacher, ref, *case)
        assert G.abs().max() > 1e-2, "a degenerate test: the exact gradient is ~0"
        out[case] = {c: error_stats(*mc[(*case, c)], G) for c in (True, False)}
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x) for x in c if x is not None))
def test_corrected_advantage_is_unbiased_naive_is_not(results, case):
    (z_c, chi2_c, k_c), (z_n, chi2_n, k_n) = results[case][True], results[case][False]
    msg = f"{case}: corrected max|z|={z_c:.2f} chi2={chi2_c:.0f}/{k_c}; naive max|z|={z_n:.0f}"
    assert z_c < Z_MAX and chi2_c < chi2_upper_quantile(k_c), msg
    if case[0] == "reverse_kl":  # no correction needed: the naive advantage is the same
        assert z_n < Z_MAX and chi2_n < chi2_upper_quantile(k_n), msg
    else:
        assert z_n > Z_BIASED and chi2_n > 10 * chi2_upper_quantile(k_n), msg


def test_enumeration_matches_the_policy_gradient_identity():
    """A check of the test's own machinery, without sampling: for the reverse KL the exact
    gradient equals ``sum_h P(h) sum_y p(y) log(p/q)(y) (onehot(y) - p)`` written out."""
    student, teacher, ref = _tables()
    G = exact_gradient(student, teacher, ref, "reverse_kl", None, 1.0)
    p, lp, lq = student.softmax(-1), student.log_softmax(-1), teacher.log_softmax(-1)
    expect = torch.zeros_like(G)
    for t in range(T):
        rows, seqs = _prefix_rows(t)
        ph = torch.ones(len(rows), dtype=torch.float64)
        for j in range(t):
            ph = ph * p[_row_of(seqs[:, :j]), seqs[:, j]]
        pr, A = p[rows], (lp - lq)[rows]
        # sum_y p(y) A(y) (e_y - p) = p * A - p * (p . A)
        expect[rows] = ph[:, None] * (pr * A - pr * (pr * A).sum(-1, keepdim=True))
    torch.testing.assert_close(G, expect, rtol=1e-10, atol=1e-12)
