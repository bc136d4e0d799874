r"""Full-vocabulary and top-k estimators of the G-OPD objective over vocab-parallel logits.

The sampled-token estimator (the paper's) uses one token per position. Here the expectation over
that token is taken exactly, from the student's (``z``), teacher's (``t``) and reference's (``u``)
logits for the whole vocabulary, without gathering it.

Derivation. At one position (prefix fixed) write ``p = softmax(z)`` (student), ``q`` (teacher),
``r`` (reference) and, for every token ``y``::

    A(y) = log p(y) - lambda log q(y) + (lambda - 1) log r(y)
         = (log p(y) - log q(y)) + (lambda - 1)(log r(y) - log q(y))        (the G-OPD cost)

The sampled estimator's gradient is ``A(y) grad log p(y)`` with ``y ~ p`` and ``A`` held constant.
Its expectation is ``G = sum_y p(y) A(y) grad log p(y)``. Take::

    J = sum_y p(y) A(y) = KL(p || q) + (lambda - 1) sum_y p(y) (log r(y) - log q(y))

and differentiate *everything*, including the ``log p`` inside ``A``::

    grad J = sum_y grad p(y) A(y) + sum_y p(y) grad log p(y)
           = sum_y p(y) A(y) grad log p(y) + grad sum_y p(y)  =  G + 0

since ``sum_y p(y) = 1``. So ``J`` needs no stop-gradient: its plain gradient *is* the expected
sampled gradient (treating ``A`` as constant gives the same gradient, for the same reason). With
respect to the logits, using ``d p(y) / d z_i = p(y) (1[y = i] - p_i)``::

    d J / d z_i = p_i (A(i) - J)                                              (*)

Like the sampled estimator, this is the gradient at a fixed prefix: the prefix is the one the
student sampled, and the effect of theta on later positions is not part of either.

Top-k (``top_k=k``). The sum over the vocabulary is replaced by a sum over the cells of a partition:
each of the student's k most likely tokens ``K`` is its own cell, the rest of the vocabulary is one
cell ``R`` with ``p(R) = sum_{y not in K} p(y)`` (likewise ``q(R)``, ``r(R)``). ``J_k`` is the same
objective on these coarsened distributions, so (*) holds with ``A(i)`` replaced by ``A(R)`` for
``i`` in ``R``; with ``k >= V`` it is the full objective, and its KL part is a lower bound of the
full one (data processing). Why the *student's* top-k: every term of ``J`` is weighted by ``p(y)``,
so the student's most likely tokens carry the objective (the teacher's top-k would drop exactly the
tokens the student over-weights, whose cost is largest). No renormalisation: all probabilities are
the full-vocabulary softmaxes (each log-sum-exp is local sums + an all-reduce), and the rest-cell
closes the distribution. Ties at the k-th largest logit are all kept (``|K|`` may exceed k). Cost:
the same reads as the full vocabulary (every log-sum-exp needs the whole slice) plus one all-gather
of ``[T, k]`` values to find the k-th largest logit. Top-k is a different objective, not a cheaper
one: it matches the tail's total mass instead of every tail token, as top-k distillation objectives
do; with the teacher's logits at hand, ``full_vocab`` is the exact expectation.

Vocab parallelism. Each rank holds the same slice of the three (padded) vocabularies. Per position
it reduces its slice to a dozen scalars (local maxima; sums of ``exp``; ``sum e_z (z - m)``,
``sum e_z (t - m_t)``, ``sum e_z (u - m_u)`` over ``K``; the rest-cell masses) and one MAX and one
SUM all-reduce combine them, as in :mod:`megatron_gopd.vocab_parallel.logprobs`. The backward recomputes (*)
chunk by chunk and by default writes the gradient into the student logits' storage. The teacher's
and reference's logits get no gradient (they are frozen roles). Columns at or beyond
``vocab_size`` are padding and excluded from the student's softmax; the teacher's and reference's
run over their own real vocabulary (``frozen_vocab_size``, at least the student's: a teacher
whose HF embedding has more rows than the student's normalises over all of them, as its own
scoring does). All three share one padded size, so every rank holds the same columns of each.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from megatron_gopd.vocab_parallel.chunking import ChunkBuffers, as_fp32, group_rank_size, row_chunks

__all__ = ["GOPDObjective", "topk_threshold", "vocab_parallel_gopd_objective"]

_TINY = torch.finfo(torch.float32).tiny

# rows of the per-position statistics (see _VocabParallelGOPD.forward)
SZ, EZ, SQ, SR, KM, KZ, KQ, KR, TZ, TQ, TR, ZY = range(12)


class GOPDObjective(NamedTuple):
    """Per-position outputs, each shaped like ``target``, fp32."""

    objective: torch.Tensor  # J: differentiable w.r.t. the student's logits
    student_logprobs: torch.Tensor  # log p(y_t) of the sampled token (detached)
    entropy: torch.Tensor  # H(p) over the real vocabulary (detached)
    kl_teacher: torch.Tensor  # KL(p || q) on the cells (exact for full vocabulary) (detached)


def _valid_columns(v_local: int, start: int, vocab_size: int | None) -> int:
    return v_local if vocab_size is None else max(0, min(v_local, vocab_size - start))


@torch.no_grad()
def topk_threshold(
    logits: torch.Tensor,
    k: int,
    group=None,
    *,
    vocab_size: int | None = None,
    chunk_elements: int = 1 << 20,
) -> torch.Tensor:
    """The k-th largest real-vocabulary logit per row over the TP group, ``[T, V_local] -> [T]``.

    ``-inf`` where ``k`` covers the whole vocabulary (then every token is its own cell). Each rank
    contributes its local top-k; one all-gather of ``[T, k]`` values finds the global k-th.
    """
    rank, world = group_rank_size(group)
    T, v_local = logits.shape
    valid = _valid_columns(v_local, rank * v_local, vocab_size)
    n_real = vocab_size if vocab_size is not None else v_local * world
    if k >= n_real:
        return torch.full((T,), float("-inf"), device=logits.device)
    local = torch.full((T, k), float("-inf"), device=logits.device)
    kk = min(k, valid)
    if kk > 0:
        for a, b in row_chunks(T, valid, chunk_elements):
            local[a:b, :kk] = logits[a:b, :valid].topk(kk, dim=-1).values.float()
    if world > 1:
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local, group=group)
        local = torch.cat(parts, dim=-1)
    return local.topk(k, dim=-1).values[:, -1].contiguous()


class _VocabParallelGOPD(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        z,
        t,
        u,
        target,
        lam,
        thr,
        group,
        vocab_size,
        frozen_vocab_size,
        chunk_elements,
        inplace,
    ):
        ctx.set_materialize_grads(False)
        rank, world = group_rank_size(group)
        T, v_local = z.shape
        start = rank * v_local
        valid = _valid_columns(v_local, start, vocab_size)
        # the teacher's and reference's real columns: at least the student's
        valid_f = max(valid, _valid_columns(v_local, start, frozen_vocab_size))
        wide = valid_f > valid
        dev = z.device
        has_ref, has_k = u is not None, thr is not None
        ninf = float("-inf")
        mx = torch.full((3, T), ninf, device=dev)  # local maxima of z, t, u
        st = torch.zeros((12, T), device=dev)
        local_t = target - start
        has_t = (local_t >= 0) & (local_t < valid)
        local_t = torch.where(has_t, local_t, torch.zeros_like(local_t))
        # scratch, student's width: 0 z (fp32 copy), 2 z - m, 3 e_z, 6 products, and a bool mask
        # for the top-k cells; frozen roles' width: 1 t / u (fp32 copy), 4 t - m / u - m, 5 exp
        zb = ChunkBuffers(T, valid, chunk_elements, dev)
        fb = ChunkBuffers(T, valid_f, chunk_elements, dev) if wide else zb
        for a, b in row_chunks(T, valid_f, chunk_elements) if valid_f > 0 else ():
            n = b - a
            tq = as_fp32(t[a:b, :valid_f], fb, 1)
            mq = tq.amax(dim=-1)
            mx[1, a:b] = mq
            qs = torch.sub(tq, _finite_or_zero(mq).unsqueeze(-1), out=fb.get(4, n))
            eq = torch.exp(qs, out=fb.get(5, n))
            st[SQ, a:b] = eq.sum(dim=-1)
            if valid > 0:
                x = as_fp32(z[a:b, :valid], zb, 0)  # a view for fp32: never modified in place
                mz = x.amax(dim=-1)
                mx[0, a:b] = mz
                st[ZY, a:b] = x.gather(1, local_t[a:b].unsqueeze(1)).squeeze(1)
                # not in K: the same comparison as in the backward, so both see the same cells
                out = torch.lt(x, thr[a:b].unsqueeze(-1), out=zb.mask(n)) if has_k else None
                xs = torch.sub(x, mz.unsqueeze(-1), out=zb.get(2, n))
                e = torch.exp(xs, out=zb.get(3, n))
                st[SZ, a:b] = e.sum(dim=-1)
                st[EZ, a:b] = _rowdot(e, xs, zb.get(6, n))
                if has_k:
                    st[TZ, a:b] = _rowsum_where(out, e, zb.get(6, n))
                    st[TQ, a:b] = _rest_mass(out, eq, valid, zb.get(6, n))
                    e.masked_fill_(out, 0.0)  # from here on e is e restricted to K
                    st[KM, a:b] = e.sum(dim=-1)
                    st[KZ, a:b] = _rowdot(e, xs, zb.get(6, n))
                else:
                    st[KM, a:b], st[KZ, a:b] = st[SZ, a:b], st[EZ, a:b]
                st[KQ, a:b] = _rowdot(e, qs[:, :valid], zb.get(6, n))
            elif has_k:  # no student token here: the slice's teacher mass is all in the rest cell
                st[TQ, a:b] = st[SQ, a:b]
            if has_ref:
                tr = as_fp32(u[a:b, :valid_f], fb, 1)
                mr = tr.amax(dim=-1)
                mx[2, a:b] = mr
                rs = torch.sub(tr, _finite_or_zero(mr).unsqueeze(-1), out=fb.get(4, n))
                er = torch.exp(rs, out=fb.get(5, n))
                st[SR, a:b] = er.sum(dim=-1)
                if valid > 0:
                    if has_k:
                        st[TR, a:b] = _rest_mass(out, er, valid, zb.get(6, n))
                    st[KR, a:b] = _rowdot(e, rs[:, :valid], zb.get(6, n))
                elif has_k:
                    st[TR, a:b] = st[SR, a:b]
        del zb, fb

        # Combine: move every rank's sums from its own maxima to the global ones.
        M = mx.clone()
        if world > 1:
            dist.all_reduce(M, op=dist.ReduceOp.MAX, group=group)
        finite = torch.isfinite(mx)
        shift = torch.where(finite, mx - M, torch.zeros_like(mx))  # m_local - m_global (0: empty)
        c = torch.where(finite, torch.exp(shift), torch.zeros_like(mx))  # rescale factors
        dz, dq, dr = shift
        cz, cq, cr = c
        red = torch.stack(
            [
                cz * st[SZ],
                cz * (st[EZ] + dz * st[SZ]),
                cq * st[SQ],
                cr * st[SR],
                cz * st[KM],
                cz * (st[KZ] + dz * st[KM]),
                cz * (st[KQ] + dq * st[KM]),
                cz * (st[KR] + dr * st[KM]),
                cz * st[TZ],
                cq * st[TQ],
                cr * st[TR],
                torch.where(has_t, st[ZY], torch.zeros_like(st[ZY])),
            ]
        )
        if world > 1:
            dist.all_reduce(red, group=group)

        Mz, Mq, Mr = M
        log_sz, log_sq = red[SZ].log(), red[SQ].log()
        lse_z, lse_q = Mz + log_sz, Mq + log_sq
        logp_y = red[ZY] - lse_z
        entropy = log_sz - red[EZ] / red[SZ]
        pk = red[KM] / red[SZ]
        # E over the cells of log p, log q (log r): the K cells + the rest cell
        e_logp = red[KZ] / red[SZ] - pk * log_sz
        e_logq = red[KQ] / red[SZ] - pk * log_sq
        p_rest = red[TZ] / red[SZ]
        has_rest = p_rest > 0
        zero = torch.zeros_like(p_rest)
        if has_k:
            log_p_rest = p_rest.clamp(min=_TINY).log()
            log_q_rest = (red[TQ] / red[SQ]).clamp(min=_TINY).log()
            e_logp = e_logp + torch.where(has_rest, p_rest * log_p_rest, zero)
            e_logq = e_logq + torch.where(has_rest, p_rest * log_q_rest, zero)
            a_rest = log_p_rest - lam * log_q_rest
        kl = e_logp - e_logq
        obj = kl.clone()  # a distinct tensor: kl is marked non-differentiable below
        if has_ref:
            log_sr = red[SR].log()
            lse_r = Mr + log_sr
            e_logr = red[KR] / red[SZ] - pk * log_sr
            if has_k:
                log_r_rest = (red[TR] / red[SR]).clamp(min=_TINY).log()
                e_logr = e_logr + torch.where(has_rest, p_rest * log_r_rest, zero)
                a_rest = a_rest + (lam - 1.0) * log_r_rest
            obj = kl + (lam - 1.0) * (e_logr - e_logq)
        else:
            lse_r = zero
        if has_k:
            a_rest = torch.where(has_rest, a_rest, zero)
        else:
            a_rest = zero

        ctx.group, ctx.valid, ctx.chunk_elements, ctx.inplace = (
            group,
            valid,
            chunk_elements,
            inplace,
        )
        ctx.has_ref, ctx.has_k = has_ref, has_k
        ctx.save_for_backward(
            z, t, u if has_ref else z, lam, thr if has_k else lam, lse_z, lse_q, lse_r, obj, a_rest
        )
        ctx.mark_non_differentiable(logp_y, entropy, kl)
        return obj, logp_y, entropy, kl

    @staticmethod
    def backward(ctx, g_obj, *_unused):
        z, t, u, lam, thr, lse_z, lse_q, lse_r, obj, a_rest = ctx.saved_tensors
        if g_obj is None:
            return (None,) * 11
        valid = ctx.valid
        T, v_local = z.shape
        grad = z if ctx.inplace else torch.empty_like(z)
        g = g_obj.float()
        if valid < v_local:
            grad[:, valid:].zero_()
        bufs = ChunkBuffers(T, valid, ctx.chunk_elements, z.device)
        for a, b in row_chunks(T, valid, ctx.chunk_elements) if valid > 0 else ():
            n = b - a
            x = as_fp32(z[a:b, :valid], bufs, 0)
            lamc = lam[a:b].unsqueeze(-1)
            # A(i) - J = log p_i - lam log q_i + (lam - 1) log r_i - J            (see (*))
            tq = as_fp32(t[a:b, :valid], bufs, 1)
            adv = torch.sub(tq, lse_q[a:b].unsqueeze(-1), out=bufs.get(2, n)).mul_(-lamc)
            if ctx.has_ref:
                tr = as_fp32(u[a:b, :valid], bufs, 1)
                lr = torch.sub(tr, lse_r[a:b].unsqueeze(-1), out=bufs.get(3, n))
                adv.add_(lr.mul_(lamc - 1.0))
            logp = torch.sub(x, lse_z[a:b].unsqueeze(-1), out=bufs.get(3, n))
            adv.add_(logp).sub_(obj[a:b].unsqueeze(-1))
            if ctx.has_k:
                rest = (a_rest[a:b] - obj[a:b]).unsqueeze(-1).expand_as(adv)
                keep = torch.ge(x, thr[a:b].unsqueeze(-1), out=bufs.mask(n))
                adv = torch.where(keep, adv, rest, out=bufs.get(4, n))
            gc = logp.exp_().mul_(adv).mul_(g[a:b].unsqueeze(-1))
            grad[a:b, :valid] = gc
        del bufs
        return grad, None, None, None, None, None, None, None, None, None, None


def _finite_or_zero(m: torch.Tensor) -> torch.Tensor:
    """A row maximum to shift by: 0 where the row is all ``-inf`` (a frozen role's columns beyond
    its own vocabulary), so that its ``exp`` is 0 rather than NaN."""
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _rest_mass(not_k: torch.Tensor, e: torch.Tensor, valid: int, scratch: torch.Tensor):
    """A frozen role's rest-cell mass on this slice: its ``exp`` over the student's columns not in
    K, plus all of it beyond the student's vocabulary (tokens the student cannot produce)."""
    rest = _rowsum_where(not_k, e[:, :valid], scratch)
    return rest + e[:, valid:].sum(dim=-1) if e.shape[1] > valid else rest


def _rowdot(a: torch.Tensor, b: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """``sum_j a_ij b_ij`` per row through a reused scratch buffer (a batched ``bmm`` is ~5x
    slower on the host; ``vecdot`` allocates a temporary per call)."""
    return torch.mul(a, b, out=scratch).sum(dim=-1)


def _rowsum_where(mask: torch.Tensor, x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """``sum_j x_ij`` over the entries where ``mask`` is True, through a scratch buffer."""
    return torch.mul(x, mask, out=scratch).sum(dim=-1)  # x is finite (exp of shifted logits)


def vocab_parallel_gopd_objective(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    lam: float | torch.Tensor = 1.0,
    group=None,
    *,
    ref_logits: torch.Tensor | None = None,
    vocab_size: int | None = None,
    frozen_vocab_size: int | None = None,
    top_k: int | None = None,
    chunk_elements: int = 1 << 20,
    inplace_backward: bool = True,
) -> GOPDObjective:
    """Per-position G-OPD objective ``J`` (full vocabulary, or the student's top-k + rest cell).

    Args:
        student_logits: ``[..., V_local]`` this TP rank's vocabulary slice, any float dtype.
        teacher_logits: ``[..., V_local]`` the teacher's slice (same partition), no gradient.
        target: ``[...]`` the sampled token ids (only for the reported ``student_logprobs``).
        lam: lambda, a float or a tensor broadcastable to ``target`` (e.g. ``[B, 1]``).
        group: the tensor-parallel process group (None: one rank holds the whole vocabulary).
        ref_logits: ``[..., V_local]`` the reference's slice; may be None only if lambda == 1
            everywhere (the caller checks; here the reference terms are then dropped).
        vocab_size: number of real vocabulary entries; columns beyond it are padding.
        frozen_vocab_size: the teacher's and reference's real vocabulary (default:
            ``vocab_size``), at least the student's: their softmaxes run over their own rows (HF
            models of one tokenizer may have different embedding rows, e.g. Qwen2.5-7B's 152064
            and Qwen2.5-1.5B's 151936). Their logits are ``-inf`` where a role's own vocabulary
            ends earlier (several teachers in one batch). The student puts no mass on the extra
            tokens: they add to the frozen roles' normalisers (and top-k's rest cell) only.
        top_k: None for the full vocabulary, else the number of student tokens kept per position.
        chunk_elements: elements per fp32 scratch buffer (up to seven are allocated).
        inplace_backward: write the gradient into the student logits' storage.

    Returns:
        :class:`GOPDObjective` of ``[...]`` fp32 tensors; ``objective`` carries the gradient (*).
    """
    if student_logits.shape != teacher_logits.shape or student_logits.shape[:-1] != target.shape:
        raise ValueError(
            f"student {tuple(student_logits.shape)}, teacher {tuple(teacher_logits.shape)} and "
            f"target {tuple(target.shape)} do not match"
        )
    if ref_logits is not None and ref_logits.shape != student_logits.shape:
        raise ValueError(f"reference logits {tuple(ref_logits.shape)} do not match the student's")
    lead = target.shape
    v_local = student_logits.shape[-1]
    z = student_logits.reshape(-1, v_local)
    t = teacher_logits.detach().reshape(-1, v_local)
    u = None if ref_logits is None else ref_logits.detach().reshape(-1, v_local)
    tg = target.reshape(-1).long()
    lam_t = torch.as_tensor(lam, dtype=torch.float32, device=z.device)
    lam_t = lam_t.expand(lead).reshape(-1).contiguous()
    if u is None and not bool(torch.all(lam_t == 1.0)):
        raise ValueError("lambda != 1 needs the reference's logits (ref_logits)")
    thr = None
    if top_k is not None:
        thr = topk_threshold(
            z.detach(), top_k, group, vocab_size=vocab_size, chunk_elements=chunk_elements
        )
        if bool(torch.isinf(thr).all()):  # k covers the vocabulary: the full objective
            thr = None
    if frozen_vocab_size is not None and vocab_size is not None and frozen_vocab_size < vocab_size:
        raise ValueError(
            f"frozen_vocab_size {frozen_vocab_size} is smaller than the student's {vocab_size}: "
            "the teacher has no log-prob for tokens the student can produce"
        )
    out = _VocabParallelGOPD.apply(
        z,
        t,
        u,
        tg,
        lam_t,
        thr,
        group,
        vocab_size,
        vocab_size if frozen_vocab_size is None else frozen_vocab_size,
        chunk_elements,
        inplace_backward,
    )
    return GOPDObjective(*(o.view(lead) for o in out))
