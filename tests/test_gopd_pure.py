"""The pure G-OPD functions against values computed by hand (no distributed, no Megatron)."""

import ast
import dataclasses
import math
from pathlib import Path

import pytest
import torch

from megatron_gopd.gopd import (
    GOPDLossConfig,
    LossConfigError,
    build_report,
    finalize_report,
    gopd_advantages,
    implicit_reward,
    label_mask,
    row_contributions,
    shift_labels,
    token_metrics,
    truncated_is_weights,
)

# two tokens: student s, teacher q, reference r
S = torch.tensor([-1.0, -2.0])
Q = torch.tensor([-1.5, -0.5])
R = torch.tensor([-1.2, -1.0])


def test_advantage_hand_computed():
    # A = (s - q) + (lam - 1)(r - q)
    # lam = 1.25: [0.5 + 0.25 * 0.3, -1.5 + 0.25 * (-0.5)] = [0.575, -1.625]
    torch.testing.assert_close(gopd_advantages(S, Q, R, 1.25), torch.tensor([0.575, -1.625]))
    # lam = 1: plain OPD, A = s - q; the reference is irrelevant and may be absent
    torch.testing.assert_close(gopd_advantages(S, Q, R, 1.0), torch.tensor([0.5, -1.5]))
    torch.testing.assert_close(gopd_advantages(S, Q, None, 1.0), torch.tensor([0.5, -1.5]))
    # lam = 0: the teacher cancels, A = s - r = [0.2, -1.0]
    torch.testing.assert_close(gopd_advantages(S, Q, R, 0.0), torch.tensor([0.2, -1.0]))


def test_advantage_is_detached_fp32():
    s = S.double().requires_grad_(True)
    a = gopd_advantages(s, Q, R, 1.25)
    assert not a.requires_grad and a.dtype == torch.float32


def test_lambda_other_than_one_needs_reference():
    with pytest.raises(ValueError, match="reference"):
        gopd_advantages(S, Q, None, 1.25)
    with pytest.raises(ValueError, match="reference"):
        gopd_advantages(S[None], Q[None], None, torch.tensor([1.25]))
    with pytest.raises(ValueError, match=">= 0"):
        gopd_advantages(S, Q, R, -0.5)


def test_per_sample_lambda_broadcasts_over_tokens():
    s, q, r = S.expand(2, 2), Q.expand(2, 2), R.expand(2, 2)
    a = gopd_advantages(s, q, r, torch.tensor([1.0, 1.25]))  # lam_B [B] with [B, S]
    torch.testing.assert_close(a[0], torch.tensor([0.5, -1.5]))
    torch.testing.assert_close(a[1], torch.tensor([0.575, -1.625]))


def test_mask_zeroes_advantage_even_for_nan_inputs():
    q = torch.tensor([-1.5, float("nan")])
    a = gopd_advantages(S, q, R, 1.25, mask=torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(a, torch.tensor([0.575, 0.0]))


def test_implicit_reward():
    torch.testing.assert_close(implicit_reward(Q, R), torch.tensor([-0.3, 0.5]))


def test_shift_labels_and_mask():
    tokens = torch.tensor([[5, 6, 7, 8]])
    assert shift_labels(tokens).tolist() == [[6, 7, 8, 0]]
    # a collator that (wrongly) marks the last column still gets it masked: it has no label
    assert label_mask(torch.tensor([[0, 1, 1, 1]])).tolist() == [[0.0, 1.0, 1.0, 0.0]]


def test_aggregation_hand_computed():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    c, w = row_contributions(v, m, "token_mean")
    assert c.tolist() == [3.0, 6.0, 0.0] and w.tolist() == [2.0, 1.0, 0.0]
    assert c.sum() / w.sum() == 3.0  # (1 + 2 + 6) / 3
    c, w = row_contributions(v, m, "seq_mean")
    assert c.tolist() == [1.5, 6.0, 0.0] and w.tolist() == [1.0, 1.0, 0.0]
    assert c.sum() / w.sum() == 3.75  # (1.5 + 6) / 2; the empty row does not count
    with pytest.raises(ValueError):
        row_contributions(v, m, "sum")


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean"])
def test_aggregation_split_invariant(mode):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(6, 5, generator=g)
    m = (torch.rand(6, 5, generator=g) > 0.4).float()
    c, w = row_contributions(v, m, mode)
    whole = c.sum() / w.sum()
    parts = [row_contributions(v[a:b], m[a:b], mode) for a, b in [(0, 1), (1, 4), (4, 6)]]
    split = sum(p[0].sum() for p in parts) / sum(p[1].sum() for p in parts)
    torch.testing.assert_close(split, whole)


def test_masked_nan_leaks_neither_into_sum_nor_gradient():
    v = torch.tensor([[1.0, float("nan")]], requires_grad=True)
    c, _ = row_contributions(v, torch.tensor([[1.0, 0.0]]), "token_mean")
    c.sum().backward()
    assert c.item() == 1.0 and v.grad.tolist() == [[1.0, 0.0]]


def test_truncated_is_weights_hand_computed():
    o = torch.tensor([-1.0, -1.0, -1.0, -1.0])
    s = o + torch.tensor([0.0, math.log(2.0), math.log(10.0), -math.log(4.0)])
    w = truncated_is_weights(s, o, 5.0)
    torch.testing.assert_close(w.weight, torch.tensor([1.0, 2.0, 5.0, 0.25]))
    torch.testing.assert_close(w.ratio, torch.tensor([1.0, 2.0, 10.0, 0.25]))
    assert w.clipped.tolist() == [0.0, 0.0, 1.0, 0.0]
    torch.testing.assert_close(
        w.abs_log_ratio, torch.tensor([0.0, math.log(2), math.log(10), math.log(4)])
    )
    off = truncated_is_weights(s, o, None)
    assert off.weight.tolist() == [1.0] * 4 and off.clipped.tolist() == [0.0] * 4
    masked = truncated_is_weights(s, o, 5.0, mask=torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert masked.weight.tolist() == [1.0, 0.0, 5.0, 0.0]


def test_report_overall_and_per_domain_hand_computed():
    # rows: domain 0 ("math"), 1 ("code"), 0; domain "chat" is absent but still reported
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    x = torch.tensor([[1.0, 3.0, 99.0], [5.0, 99.0, 99.0], [99.0, 2.0, 4.0]])
    rep = build_report(
        {"x": x},
        mask,
        torch.tensor([0, 1, 0]),
        ["math", "code", "chat"],
        row_values={"len": (mask.sum(-1), torch.ones(3))},
    )
    assert rep["x"].tolist() == [15.0, 5.0]  # 1 + 3 + 5 + 2 + 4 over 5 tokens
    assert rep["math/x"].tolist() == [10.0, 4.0]
    assert rep["code/x"].tolist() == [5.0, 1.0]
    assert rep["chat/x"].tolist() == [0.0, 0.0]
    assert rep["len"].tolist() == [5.0, 3.0]
    assert rep["math/len"].tolist() == [4.0, 2.0]
    out = finalize_report(rep)
    assert out["x"] == 3.0 and out["math/x"] == 2.5 and "chat/x" not in out


def test_token_metrics_and_finalize_derived_values():
    a = torch.tensor([1.0, 3.0])
    vals = token_metrics(S, Q, a, ref_logprobs=R)
    torch.testing.assert_close(vals["kl_teacher"], torch.tensor([0.5, -1.5]))
    # k3 = e^(q-s) - 1 - (q-s): q - s = [-0.5, 1.5]
    k3 = [math.exp(-0.5) - 1 + 0.5, math.exp(1.5) - 1 - 1.5]
    torch.testing.assert_close(vals["kl_teacher_k3"], torch.tensor(k3))
    torch.testing.assert_close(vals["implicit_reward"], torch.tensor([-0.3, 0.5]))
    torch.testing.assert_close(vals["kl_ref"], torch.tensor([0.2, -1.0]))
    rep = build_report(vals, torch.ones(1, 2), torch.tensor([0]), ["d"])
    out = finalize_report({k: v * 2 for k, v in rep.items()})  # as if summed over two ranks
    assert math.isclose(out["advantage"], 2.0) and math.isclose(out["advantage_std"], 1.0)
    assert "advantage_sq" not in out
    assert math.isclose(out["logprob_gap"], (-1.5 - 0.5 + 1.0 + 2.0) / 2)  # mean(q) - mean(s)
    assert math.isclose(out["d/advantage_std"], 1.0)


def test_config_validation():
    assert GOPDLossConfig().estimator == "sampled" and GOPDLossConfig().tis_cap is None
    GOPDLossConfig(estimator="top_k", top_k=8, aggregation="seq_mean")
    GOPDLossConfig(tis_cap=5.0)
    bad = [
        dict(estimator="dense"),
        dict(aggregation="sum"),
        dict(top_k=0),
        dict(top_k=2.5),
        dict(tis_cap=0.5),
        dict(tis_cap=float("inf")),
        dict(estimator="full_vocab", tis_cap=5.0),
        dict(chunk_elements=0),
    ]
    for kw in bad:
        with pytest.raises(LossConfigError):
            GOPDLossConfig(**kw)
    with pytest.raises(dataclasses.FrozenInstanceError):
        GOPDLossConfig().estimator = "top_k"


def test_gopd_package_is_pure():
    """No torch.distributed, Megatron or argparse in the algorithm package."""
    pkg = Path(__file__).resolve().parents[1] / "megatron_gopd" / "gopd"
    for f in pkg.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for n in names:
                assert not n.startswith(("megatron.", "torch.distributed", "argparse")), (f, n)


def test_report_counts_reference_metrics_only_on_rows_that_have_a_reference():
    """Row 0 (lambda = 1) carries a placeholder reference (NaN here, zeros in the trainer); the
    implicit reward q - r must average row 1's tokens only: ((-1 - -3) + (-2 - -3)) / 2 = 1.5."""
    from megatron_gopd.gopd.metrics import build_report, finalize_report

    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    q = torch.tensor([[-0.5, -0.5], [-1.0, -2.0]])
    r = torch.tensor([[float("nan"), float("nan")], [-3.0, -3.0]])
    rep = build_report(
        {"implicit_reward": q - r, "teacher_logprob": q},
        mask,
        torch.tensor([0, 1]),
        ["a", "b"],
        row_masks={"implicit_reward": torch.tensor([False, True])},
    )
    out = finalize_report(rep)
    assert out["implicit_reward"] == pytest.approx(1.5)
    assert out["b/implicit_reward"] == pytest.approx(1.5) and "a/implicit_reward" not in out
    assert out["teacher_logprob"] == pytest.approx(-1.0)  # unmasked metrics use every row
