"""Log-probability of the sampled token, and entropy, from vocab-parallel logits.

Each tensor-parallel rank holds a contiguous slice ``[start, start + V_local)`` of the (padded)
vocabulary. For tokens ``t`` with logits ``z`` (row of ``V`` entries over all ranks)::

    log p(y) = z_y - logsumexp(z)           H = logsumexp(z) - sum_i p_i z_i

computed without gathering the vocabulary: every rank reduces its slice to per-token scalars (its
max, its sum of ``exp``, its share of ``sum p z`` and of ``z_y``) and two all-reduces over the TP
group combine them (one MAX, one SUM over a stacked ``[3, T]`` tensor). Columns at or beyond
``vocab_size`` (Megatron's padding rows) are excluded, so the result equals a softmax over the real
vocabulary only (what Hugging Face computes).

Memory. The work is chunked over tokens through up to three fp32 scratch buffers of
``chunk_elements`` values, allocated once per call and reused by every chunk (cache-friendly on the
host, no per-chunk allocation). The forward saves only the input logits (no fp32 copy). The
backward recomputes the softmax chunk by chunk and, by default, writes the gradient into the saved
logits' storage, as megatron-core's
``vocab_parallel_cross_entropy`` does for fp32 logits (the logits are dead after this backward; if
another autograd node saved the same tensor, autograd's version check raises instead of computing
a wrong gradient). bf16 logits are read chunk-wise into fp32; the gradient is returned in the
logits' dtype.

With ``overwrite_logits=True`` (fp32 logits whose only reader is this function, e.g. the training
loss) the forward goes one step further, like megatron-core does: it turns the logits' storage into
``e = exp(z - m_local)`` in place, and the backward computes ``g (1[i = y] - p_i)`` with
``p = e * f`` (a per-token scale) in that storage, without recomputing the softmax. The only
temporary is a block of 256 Ki values (or one row; a sixteenth of a chunk for larger chunks) for
``z - m``, and only for the entropy: peak memory is the logits plus O(tokens) plus that block, as
megatron-core's cross-entropy's is the logits plus O(tokens). ``exp`` runs once, and the storage
is read/written in fewer passes than megatron-core's (whose forward also normalises ``p`` in a
separate pass).
An autograd node that saved the same logits before this call sees their version counter bumped and
raises in its backward.

Gradients, per token with upstream ``g`` (log-prob) and ``h`` (entropy)::

    d log p(y) / d z_i = 1[i = y] - p_i
    d H / d z_i        = -p_i (log p_i + H)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_gopd.vocab_parallel.chunking import (
    DEFAULT_CHUNK_ELEMENTS,
    ChunkBuffers,
    as_fp32,
    group_rank_size,
    row_chunks,
)

__all__ = ["DEFAULT_CHUNK_ELEMENTS", "vocab_parallel_logprobs"]

# overwrite_logits with the entropy: the one temporary (z - m) holds at most this many fp32 values
# (1 MiB, or one row of a wider vocabulary slice), or a sixteenth of a chunk when chunks are larger
# (CUDA: 4 MiB, fewer kernel launches), so that the loss's peak memory is the logits' plus O(tokens)
# plus that block, as megatron-core's cross-entropy's is the logits' plus O(tokens). The price is
# more, smaller operations: 8-27% on this function's forward+backward on CPU (2 cores, noisy)
# against one whole 4 MiB chunk; the loss stays at 0.85-0.88x megatron-core's time.
_OVERWRITE_ENTROPY_BLOCK = 1 << 18


class _VocabParallelLogProb(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        logits,
        target,
        group,
        vocab_size,
        chunk_elements,
        with_entropy,
        inplace_backward,
        overwrite_logits,
    ):
        # Unused outputs (the entropy, when only the log-prob enters the loss) get None, not a
        # materialised zero tensor: the backward then skips the entropy term entirely.
        ctx.set_materialize_grads(False)
        rank, world = group_rank_size(group)
        T, v_local = logits.shape
        start = rank * v_local
        valid = v_local if vocab_size is None else max(0, min(v_local, vocab_size - start))
        dev = logits.device
        # Overwriting needs fp32 storage (e is stored in it) and the in-place backward.
        overwrite = overwrite_logits and inplace_backward and logits.dtype == torch.float32

        m_loc = torch.full((T,), float("-inf"), device=dev, dtype=torch.float32)
        sums = torch.zeros((3, T), device=dev, dtype=torch.float32)  # sum exp, sum e*(z-m), z_y
        local_t = target - start
        has_t = (local_t >= 0) & (local_t < valid)
        local_t = torch.where(has_t, local_t, torch.zeros_like(local_t))
        bufs = ChunkBuffers(T, valid, chunk_elements, dev)
        block = min(chunk_elements, max(_OVERWRITE_ENTROPY_BLOCK, chunk_elements // 16))
        ent_buf = ChunkBuffers(T, valid, block, dev)
        for a, b in row_chunks(T, valid, chunk_elements) if valid > 0 else ():
            n = b - a
            x = logits[a:b, :valid]
            xf = x if overwrite else as_fp32(x, bufs, 0)
            m = xf.amax(dim=-1)
            m_loc[a:b] = m
            sums[2, a:b] = xf.gather(1, local_t[a:b].unsqueeze(1)).squeeze(1)
            if overwrite and not with_entropy:
                e = x.sub_(m.unsqueeze(-1)).exp_()  # Megatron-style, in the logits' storage
            elif overwrite:
                # e lands in the logits' storage; z - m (for the entropy) goes through a scratch
                # block a fraction of a chunk in size
                e = x
                for c, d in row_chunks(n, valid, block):
                    xs = torch.sub(x[c:d], m[c:d].unsqueeze(-1), out=ent_buf.get(0, d - c))
                    torch.exp(xs, out=x[c:d])
                    sums[1, a + c : a + d] = xs.mul_(x[c:d]).sum(dim=-1)
            else:
                xs = torch.sub(xf, m.unsqueeze(-1), out=bufs.get(1, n))
                # e in a buffer: xf's if that is a copy, else a third one
                e = torch.exp(xs, out=bufs.get(0 if xf is not x else 2, n))
                if with_entropy:
                    # sum e (z - m), in xs's buffer: no temporary (vecdot would allocate one)
                    sums[1, a:b] = xs.mul_(e).sum(dim=-1)
            sums[0, a:b] = e.sum(dim=-1)
        del bufs, ent_buf
        # combine: rescale each rank's sums from its own max to the global one
        m = m_loc.clone()
        if world > 1:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        scale = torch.exp(m_loc - m)  # 0 for a rank whose slice is all padding (m_loc = -inf)
        scale = torch.nan_to_num(scale, nan=0.0)
        s_loc = sums[0] * scale
        ez_loc = (sums[1] + (m_loc - m).nan_to_num(nan=0.0, neginf=0.0) * sums[0]) * scale
        zt_loc = torch.where(has_t, sums[2], torch.zeros_like(sums[2]))
        red = torch.stack([s_loc, ez_loc, zt_loc])
        if world > 1:
            dist.all_reduce(red, group=group)
        log_z = red[0].log()  # logsumexp(z) - m
        logprob = red[2] - m - log_z
        entropy = log_z - red[1] / red[0] if with_entropy else None
        # What the backward needs per token to rebuild p from what it reads:
        #   overwrite: the storage holds e = exp(z - m_local), p = e * (exp(m_local - m) / sum)
        #   else:      the logits are intact,             p = exp(z - (m + log Z))
        p_coef = scale / red[0] if overwrite else m + log_z
        if overwrite and valid < v_local:
            logits[:, valid:].zero_()  # padding: p = 0, hence gradient 0
        # The in-place ops bumped the logits' version counter: an autograd node that saved these
        # logits earlier raises in its backward instead of reading e.

        ctx.group, ctx.start, ctx.valid = group, start, valid
        ctx.chunk_elements, ctx.inplace = chunk_elements, inplace_backward
        ctx.with_entropy, ctx.overwrite = with_entropy, overwrite
        ctx.save_for_backward(logits, target, p_coef, entropy if with_entropy else p_coef)
        ctx.mark_non_differentiable(target)
        if with_entropy:
            return logprob, entropy
        return logprob, torch.zeros_like(logprob)

    @staticmethod
    def backward(ctx, g_logprob, g_entropy):
        logits, target, p_coef, entropy = ctx.saved_tensors
        valid, start = ctx.valid, ctx.start
        T, v_local = logits.shape
        use_ent = ctx.with_entropy and g_entropy is not None
        local_t = target - start
        has_t = (local_t >= 0) & (local_t < valid)
        local_t = torch.where(has_t, local_t, torch.zeros_like(local_t))
        g_lp = g_logprob.float() if g_logprob is not None else torch.zeros_like(p_coef)
        rows_t = torch.nonzero(has_t).squeeze(1)
        if ctx.overwrite:
            # The storage holds e (0 on padding), p = e * p_coef: the gradient is computed in
            # place, nothing is recomputed.
            grad = logits
            if use_ent:
                # -g p - h p (log p + H)  =  -p (g + h H) - h xlogy(p, p)
                hh = g_entropy.float()
                coef = (g_lp + hh * entropy).neg_().unsqueeze(-1)
                for a, b in row_chunks(T, valid, ctx.chunk_elements):
                    pc = grad[a:b, :valid].mul_(p_coef[a:b].unsqueeze(-1))
                    t = torch.xlogy(pc, pc).mul_(hh[a:b].unsqueeze(-1))
                    pc.mul_(coef[a:b]).sub_(t)
                    del t, pc
            else:
                grad.mul_((g_lp * p_coef).neg_().unsqueeze(-1))
            if rows_t.numel():
                grad[rows_t, local_t[rows_t]] += g_lp[rows_t]
            return grad, None, None, None, None, None, None, None

        grad = logits if ctx.inplace else torch.empty_like(logits)
        if valid < v_local:
            grad[:, valid:].zero_()
        bufs = ChunkBuffers(T, valid, ctx.chunk_elements, logits.device)
        for a, b in row_chunks(T, valid, ctx.chunk_elements) if valid > 0 else ():
            n = b - a
            x = logits[a:b, :valid]
            xf = as_fp32(x, bufs, 0)
            logp = torch.sub(xf, p_coef[a:b].unsqueeze(-1), out=bufs.get(1, n))
            p = torch.exp(logp, out=bufs.get(0 if xf is not x else 2, n))
            gl = g_lp[a:b].unsqueeze(-1)
            if use_ent:
                # -g p - h p (log p + H)  =  -p (g + h (log p + H))
                hh = g_entropy[a:b].float().unsqueeze(-1)
                logp.add_(entropy[a:b].unsqueeze(-1)).mul_(hh).add_(gl)
                g = p.mul_(logp).neg_()
            else:
                g = p.mul_(gl).neg_()
            rows = torch.nonzero(has_t[a:b]).squeeze(1)
            if rows.numel():
                g[rows, local_t[a:b][rows]] += g_lp[a:b][rows]
            grad[a:b, :valid] = g
        return grad, None, None, None, None, None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    target: torch.Tensor,
    group=None,
    *,
    vocab_size: int | None = None,
    with_entropy: bool = False,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    inplace_backward: bool = True,
    overwrite_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``log p(target)`` (and the entropy) from this rank's vocabulary slice of ``logits``.

    Args:
        logits: ``[..., V_local]``, any float dtype; this TP rank's slice of the padded vocabulary.
        target: ``[...]`` global token ids (same on every TP rank).
        group: the tensor-parallel process group (None: a single rank holds the whole vocabulary).
        vocab_size: number of real vocabulary entries; columns beyond it are padding and ignored.
        with_entropy: also return the entropy of the (real-vocabulary) distribution.
        chunk_elements: fp32 elements per temporary; bounds the extra memory.
        inplace_backward: write the gradient into the logits' storage (see module doc).
        overwrite_logits: fp32 logits only (ignored otherwise): the forward replaces the logits
            with the softmax in place, as megatron-core's ``vocab_parallel_cross_entropy`` does,
            and the backward turns that into the gradient without recomputing anything. The
            logits are unusable after the call; use it when this function is their only reader.

    Returns:
        ``(logprob, entropy)`` shaped like ``target``, fp32; ``entropy`` is None unless asked for.
    """
    if logits.shape[:-1] != target.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not match"
        )
    lead = target.shape
    lg = logits.reshape(-1, logits.shape[-1])
    tg = target.reshape(-1).long()
    lp, ent = _VocabParallelLogProb.apply(
        lg, tg, group, vocab_size, chunk_elements, with_entropy, inplace_backward, overwrite_logits
    )
    return lp.view(lead), (ent.view(lead) if with_entropy else None)
