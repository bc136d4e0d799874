"""vocab_parallel_logprobs against plain torch on the full vocabulary (values and gradients)."""

import pytest
import torch
import torch.nn.functional as F

from megatron_gopd.testing import run_distributed
from megatron_gopd.vocab_parallel import vocab_parallel_logprobs

V_PADDED, V_REAL, T = 48, 45, 13  # 3 padding columns, all on the last TP rank


def _data(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, V_PADDED, generator=g) * 3
    target = torch.randint(0, V_REAL, (T,), generator=g)
    g_lp = torch.randn(T, generator=g)
    g_ent = torch.randn(T, generator=g)
    return logits.to(dtype), target, g_lp, g_ent


def _reference(logits, target, g_lp, g_ent):
    """Unsharded reference: log_softmax over the real vocabulary only."""
    x = logits[:, :V_REAL].detach().double().requires_grad_(True)
    logp = F.log_softmax(x, dim=-1)
    lp = logp.gather(1, target[:, None]).squeeze(1)
    ent = -(logp.exp() * logp).sum(-1)
    ((lp * g_lp.double()).sum() + (ent * g_ent.double()).sum()).backward()
    grad = torch.zeros(logits.shape, dtype=torch.float64)
    grad[:, :V_REAL] = x.grad
    return lp.detach(), ent.detach(), grad


def _sharded(with_entropy, chunk_elements, inplace, dtype, overwrite=False):
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    logits, target, g_lp, g_ent = _data(dtype)
    shard = logits.chunk(world, dim=-1)[rank].clone().requires_grad_(True)
    lp, ent = vocab_parallel_logprobs(
        shard * 1.0,
        target,
        dist.group.WORLD,
        vocab_size=V_REAL,
        with_entropy=with_entropy,
        chunk_elements=chunk_elements,
        inplace_backward=inplace,
        overwrite_logits=overwrite,
    )
    loss = (lp * g_lp).sum() + ((ent * g_ent).sum() if with_entropy else 0.0)
    loss.backward()
    return lp.detach(), None if ent is None else ent.detach(), shard.grad


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("overwrite", [False, True], ids=["recompute", "overwrite"])
def test_matches_full_vocab_reference(tp, with_entropy, overwrite):
    logits, target, g_lp, g_ent = _data()
    ref_lp, ref_ent, ref_grad = _reference(
        logits, target, g_lp, g_ent if with_entropy else torch.zeros(T)
    )
    # chunk of 20 elements -> a handful of rows per chunk: exercises the chunk loop
    outs = run_distributed(_sharded, tp, with_entropy, 20, True, torch.float32, overwrite)
    grad = torch.cat([o[2] for o in outs], dim=-1)
    for lp, ent, _ in outs:
        torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-6, atol=1e-6)
        if with_entropy:
            torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-6, atol=1e-6)
    assert torch.all(grad[:, V_REAL:] == 0), "padding columns must get no gradient"


def test_bf16_logits_close_to_fp32_reference():
    logits, target, g_lp, g_ent = _data(torch.bfloat16)
    ref_lp, ref_ent, ref_grad = _reference(logits.float(), target, g_lp, g_ent)
    out = run_distributed(_sharded, 2, True, 1 << 20, False, torch.bfloat16)
    grad = torch.cat([o[2] for o in out], dim=-1)
    assert grad.dtype == torch.bfloat16
    # the math is fp32 on bf16 inputs: only the final gradient is rounded to bf16
    torch.testing.assert_close(out[0][0].double(), ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-2, atol=1e-2)


def test_single_process_no_group():
    logits, target, g_lp, g_ent = _data()
    ref_lp, _, ref_grad = _reference(logits, target, g_lp, torch.zeros(T))
    x = logits.clone().requires_grad_(True)
    lp, ent = vocab_parallel_logprobs(x * 1.0, target, None, vocab_size=V_REAL)
    (lp * g_lp).sum().backward()
    assert ent is None
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), ref_grad, rtol=1e-6, atol=1e-6)


def test_inplace_backward_never_corrupts_a_shared_tensor_silently():
    """If another autograd node saved the same logits, the in-place gradient must not corrupt it
    silently. Autograd runs the most recently created node first, so: a node created *before* ours
    runs after our in-place write and must raise; one created after ours reads intact logits."""
    logits, target, g_lp, _ = _data()
    x = logits.clone().requires_grad_(True)
    z = x * 1.0
    before = (z * z).sum()  # saves z; its backward runs after ours
    lp, _ = vocab_parallel_logprobs(z, target, None, vocab_size=V_REAL, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (lp.sum() + before).backward()

    x = logits.clone().requires_grad_(True)
    z = x * 1.0
    lp, _ = vocab_parallel_logprobs(z, target, None, vocab_size=V_REAL, inplace_backward=True)
    after = (z * z).sum()  # its backward runs first, on intact logits
    (lp * g_lp).sum().add(after).backward()
    _, _, ref_grad = _reference(logits, target, g_lp, torch.zeros(T))
    torch.testing.assert_close(
        x.grad.double(), ref_grad + 2 * logits.double(), rtol=1e-6, atol=1e-6
    )


def test_entropy_only_used_for_metrics_gets_no_gradient_term():
    """When only the log-prob enters the loss, the entropy output's gradient is None (not a zero
    tensor) and the result equals the log-prob-only gradient, in both backward paths."""
    logits, target, g_lp, _ = _data()
    _, _, ref_grad = _reference(logits, target, g_lp, torch.zeros(T))
    for overwrite in (False, True):
        x = logits.clone().requires_grad_(True)
        lp, ent = vocab_parallel_logprobs(
            x * 1.0, target, None, vocab_size=V_REAL, with_entropy=True, overwrite_logits=overwrite
        )
        assert ent is not None
        (lp * g_lp).sum().backward()
        torch.testing.assert_close(x.grad.double(), ref_grad, rtol=1e-6, atol=1e-6)


def test_overwrite_logits_bumps_version_so_earlier_readers_raise():
    """overwrite_logits replaces the logits by p in place: a node that saved them earlier must
    raise rather than compute with p."""
    logits, target, _, _ = _data()
    x = logits.clone().requires_grad_(True)
    z = x * 1.0
    before = (z * z).sum()
    lp, _ = vocab_parallel_logprobs(z, target, None, vocab_size=V_REAL, overwrite_logits=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (lp.sum() + before).backward()


def test_overwrite_ignored_for_bf16():
    logits, target, _, _ = _data(torch.bfloat16)
    z = logits.clone()
    vocab_parallel_logprobs(z, target, None, vocab_size=V_REAL, overwrite_logits=True)
    assert torch.equal(z, logits), "bf16 logits cannot hold p: they must be left as they are"


def test_overwrite_entropy_blocks_inside_a_chunk(monkeypatch):
    """With overwrite_logits and the entropy, ``z - m`` goes through blocks smaller than a chunk
    (peak memory): a chunk of all 13 rows split into blocks of 2 rows gives the reference values."""
    import megatron_gopd.vocab_parallel.logprobs as vp

    monkeypatch.setattr(vp, "_OVERWRITE_ENTROPY_BLOCK", 2 * V_REAL)
    logits, target, g_lp, g_ent = _data()
    ref_lp, ref_ent, ref_grad = _reference(logits, target, g_lp, g_ent)
    z = logits.clone().requires_grad_(True)
    lp, ent = vocab_parallel_logprobs(
        z * 1.0,
        target,
        None,
        vocab_size=V_REAL,
        with_entropy=True,
        chunk_elements=T * V_PADDED,
        overwrite_logits=True,
    )
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z.grad.double(), ref_grad, rtol=1e-6, atol=1e-6)
