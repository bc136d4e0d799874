r"""The output layer in fp32, chunk by chunk, with autograd: final hidden states in, per-token
quantities out, never more than one chunk of ``[tokens, V / TP]`` logits alive.

Why fp32. A bf16 model's output layer rounds its logits to bf16 (8 significant bits: a logit near
20 is known to 0.06 - 0.125). Log-probs of a bf16 model scored that way are off by 0.02 on
average and 0.1 at worst against the same model with fp32 logits, and the G-OPD advantage is a
difference of such log-probs. Here each logit is the product of the bf16 hidden state and bf16
weight row accumulated *and kept* in fp32: on CUDA ``torch.mm(h, W^T, out_dtype=float32)`` (bf16
operands, no fp32 copy of the weight), elsewhere one fp32 copy of the weight per pass. SGLang's
``--enable-fp32-lm-head`` computes its logits the same way (0.5.23: the same ``out_dtype`` GEMM;
0.5.4: an fp32 upcast), so the rollout engine and the trainer see the same logits up to summation
order, and the teacher and the reference are scored the same way.

Why chunked. megatron-core's output layer materialises ``[S, B, V / TP]`` logits in the model
dtype and its cross-entropy an fp32 copy of them (bf16: 6 bytes per logit). Here the rows (tokens)
go through chunks of ``chunk_rows``: each chunk's fp32 logits are reduced to per-token values by a
*head* (the vocab-parallel log-prob, or the G-OPD objective) and dropped. The backward recomputes
each chunk's logits, runs the head's backward on them (which writes the logits' gradient into
their own storage) and turns that into the gradients of the hidden states and of the weight::

    z = h W^T / T        dL/dh = (dL/dz) W / T        dL/dW = (dL/dz)^T h / T

so the peak is one chunk of logits plus, for the weight, an fp32 gradient accumulator of its size
(and, off CUDA, the fp32 copy of the weight): with a 152k vocabulary and 8k tokens per micro-batch
a 256 MiB chunk instead of 2.3 GiB of bf16 logits and their 4.6 GiB fp32 copy.

Temperature. ``z = h W^T / T``: the policy is ``pi_T = softmax(z)``, what the rollout engine samples
from at temperature ``T`` and whose log-prob it reports. ``d log pi_T(y) / d (h W^T) = (e_y -
pi_T) / T``: the gradient of the tempered policy, which is the objective's (see
:mod:`megatron_gopd.trainer.loss`).

Tensor parallelism. ``weight`` is this rank's ``[V / TP, H]`` slice; the head reduces over the TP
group. The gradient returned for ``hidden`` is this rank's share (its vocabulary slice's
contribution): the caller sums it over the group, as megatron-core's output layer does, by passing
the hidden states through ``copy_to_tensor_model_parallel_region`` (or, under sequence parallelism,
``gather_from_sequence_parallel_region``) first: see :func:`megatron_gopd.models.build.output_rows`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_gopd.vocab_parallel.chunking import DEFAULT_CHUNK_ELEMENTS, group_rank_size
from megatron_gopd.vocab_parallel.gopd_objective import GOPDObjective, vocab_parallel_gopd_objective
from megatron_gopd.vocab_parallel.logprobs import vocab_parallel_logprobs

__all__ = [
    "FrozenLogits",
    "OutputLayer",
    "Weight",
    "fp32_logits",
    "output_layer_gopd_objective",
    "output_layer_logprobs",
]

# (n, V_local) fp32 logits -> per-row outputs; a and b are the chunk's rows
Head = Callable[[torch.Tensor, int, int], Sequence[torch.Tensor]]

_MM_OUT_DTYPE: dict[tuple[str, torch.dtype], bool] = {}


def _mm_out_dtype_works(weight: torch.Tensor) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` runs for ``weight``'s device and dtype
    (CUDA with bf16/fp16 in recent torch; not on the host, where it raises)."""
    if weight.dtype not in (torch.bfloat16, torch.float16) or weight.device.type != "cuda":
        return False
    key = (str(weight.device), weight.dtype)
    if key not in _MM_OUT_DTYPE:
        a = torch.zeros((2, 2), dtype=weight.dtype, device=weight.device)
        try:
            ok = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError):
            ok = False
        _MM_OUT_DTYPE[key] = ok
    return _MM_OUT_DTYPE[key]


class Weight:
    """An output weight ``[V_local, H]`` as this pass multiplies by it: products of its own dtype,
    accumulated and returned in fp32. Half-precision weights on CUDA are used as they are
    (``out_dtype`` GEMMs); otherwise one fp32 copy is made here, once per pass (none for an fp32
    weight)."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self.mixed = _mm_out_dtype_works(weight)
        self.w32 = None if self.mixed else weight.detach().float()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[n, H] -> [n, V_local]`` fp32."""
        if self.mixed:
            return torch.mm(hidden.to(self.weight.dtype), self.weight.t(), out_dtype=torch.float32)
        return F.linear(hidden.float(), self.w32)

    def grad_hidden(self, g_logits: torch.Tensor) -> torch.Tensor:
        """``[n, V_local]`` fp32 logits gradient -> ``[n, H]`` fp32."""
        if self.mixed:  # bf16 operands, as megatron-core's own output-layer backward has
            return torch.mm(g_logits.to(self.weight.dtype), self.weight, out_dtype=torch.float32)
        return g_logits @ self.w32

    def add_grad_weight(self, acc: torch.Tensor, g_logits: torch.Tensor, hidden: torch.Tensor):
        """``acc += g_logits^T hidden`` (``acc``: fp32 ``[V_local, H]``)."""
        if self.mixed:
            dt = self.weight.dtype
            acc += torch.mm(g_logits.t().to(dt), hidden.to(dt), out_dtype=torch.float32)
        else:
            acc.addmm_(g_logits.t(), hidden.float())


def fp32_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``hidden @ weight^T`` as fp32 logits (one call; :class:`Weight` for many)."""
    shape = hidden.shape
    return Weight(weight).logits(hidden.reshape(-1, shape[-1])).view(*shape[:-1], -1)


def _row_ranges(n_rows: int, rows: int):
    for a in range(0, n_rows, rows):
        yield a, min(n_rows, a + rows)


class _ChunkedOutputLayer(torch.autograd.Function):
    """``head(hidden @ weight^T / T)`` chunk by chunk; see the module docstring. The first
    ``n_grad`` outputs of the head are differentiable, the rest are not."""

    @staticmethod
    def forward(ctx, hidden, weight, head, temperature, rows, n_grad):
        ctx.set_materialize_grads(False)
        w = Weight(weight)
        outs: list[torch.Tensor] = []
        n = hidden.shape[0]
        for a, b in _row_ranges(n, rows):
            z = w.logits(hidden[a:b])
            if temperature != 1.0:
                z.div_(temperature)  # a division, as SGLang's sampler does: same rounding
            res = head(z, a, b)
            if not outs:
                outs = [torch.empty((n, *r.shape[1:]), dtype=r.dtype, device=r.device) for r in res]
            for o, r in zip(outs, res, strict=True):
                o[a:b] = r
            del z, res
        del w
        ctx.head, ctx.temperature, ctx.rows, ctx.n_grad = head, temperature, rows, n_grad
        ctx.save_for_backward(hidden, weight)
        ctx.mark_non_differentiable(*outs[n_grad:])
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        hidden, weight = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        grads = grads[: ctx.n_grad]
        if all(g is None for g in grads) or not (need_h or need_w):
            return None, None, None, None, None, None
        w = Weight(weight)
        T = ctx.temperature
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        )
        for a, b in _row_ranges(hidden.shape[0], ctx.rows):
            z = w.logits(hidden[a:b])
            if T != 1.0:
                z.div_(T)
            z.requires_grad_(True)
            with torch.enable_grad():
                res = ctx.head(z, a, b)
                pairs = [(r, g[a:b]) for r, g in zip(res, grads) if g is not None]
                torch.autograd.backward([r for r, _ in pairs], [g for _, g in pairs])
            gz = z.grad
            del z, res, pairs
            if T != 1.0:
                gz.div_(T)
            if need_h:
                grad_h[a:b] = w.grad_hidden(gz)
            if need_w:
                w.add_grad_weight(grad_w, gz, hidden[a:b])
            del gz
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None


def default_chunk_rows(v_local: int, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    """Rows per chunk of logits: ``chunk_elements`` fp32 values (256 MiB by default)."""
    return max(1, chunk_elements // max(1, v_local))


@dataclass(frozen=True)
class OutputLayer:
    """One role's output layer applied to its final hidden states, not yet computed:
    ``logits = hidden @ weight^T / temperature`` (fp32, see the module docstring).

    ``hidden``: ``[N, H]``, one row per token (differentiable for the student); ``weight``: this
    TP rank's ``[V_local, H]`` slice; ``vocab_size``: the role's real vocabulary (columns at or
    beyond it are Megatron's padding)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    vocab_size: int
    temperature: float = 1.0

    @property
    def v_local(self) -> int:
        return self.weight.shape[0]

    def apply(self, head: Head, n_grad: int, rows: int | None = None) -> tuple[torch.Tensor, ...]:
        """``head`` over every chunk of rows, with autograd to ``hidden`` and ``weight``."""
        rows = rows or default_chunk_rows(self.v_local)
        return _ChunkedOutputLayer.apply(
            self.hidden, self.weight, head, float(self.temperature), rows, n_grad
        )


@dataclass(frozen=True)
class FrozenLogits:
    """The logits of frozen roles (teachers, a reference) for the rows of a micro-batch, computed
    per chunk of rows on demand, without gradient. Each part is one role's :class:`OutputLayer`
    over some rows: ``parts[i]`` covers rows ``row_index[i]`` (a LongTensor into the micro-batch's
    ``N`` token rows) in that order. Multi-teacher batches route rows to their domain's teacher.

    ``vocab_size`` (the largest of the parts') bounds the columns read; a part whose own real
    vocabulary is smaller has ``-inf`` logits beyond it (probability 0, as its own softmax has)."""

    parts: tuple[OutputLayer, ...]
    row_index: tuple[torch.Tensor, ...]
    n_rows: int

    @classmethod
    def single(cls, layer: OutputLayer) -> FrozenLogits:
        n = layer.hidden.shape[0]
        return cls((layer,), (torch.arange(n, device=layer.hidden.device),), n)

    @property
    def vocab_size(self) -> int:
        return max(p.vocab_size for p in self.parts)

    @property
    def v_local(self) -> int:
        return self.parts[0].v_local

    def __post_init__(self):
        if len({p.v_local for p in self.parts}) > 1:
            raise ValueError("frozen roles with different vocabulary slices in one batch")
        # token row -> (part, row within the part)
        owner = torch.full((self.n_rows,), -1, dtype=torch.long)
        local = torch.zeros((self.n_rows,), dtype=torch.long)
        for i, idx in enumerate(self.row_index):
            owner[idx.cpu()] = i
            local[idx.cpu()] = torch.arange(len(idx))
        if bool((owner < 0).any()):
            raise ValueError("every row needs a frozen role")
        object.__setattr__(self, "_owner", owner)
        object.__setattr__(self, "_local", local)
        object.__setattr__(self, "_weights", [None] * len(self.parts))

    def logits(self, a: int, b: int, group=None) -> torch.Tensor:
        """fp32 ``[b - a, V_local]`` logits of rows ``[a, b)`` (each divided by its role's
        temperature), ``-inf`` beyond each role's real vocabulary."""
        out = None
        rank, _ = group_rank_size(group)
        start = rank * self.v_local
        owner, local = self._owner[a:b], self._local[a:b]
        for i, part in enumerate(self.parts):
            sel = torch.nonzero(owner == i).squeeze(1)
            if not len(sel):
                continue
            if self._weights[i] is None:  # one weight copy per part and micro-batch (host)
                self._weights[i] = Weight(part.weight)
            rows = local[sel].to(part.hidden.device)
            z = self._weights[i].logits(part.hidden[rows])
            if part.temperature != 1.0:
                z.div_(part.temperature)
            cut = part.vocab_size - start
            if part.vocab_size < self.vocab_size and cut < self.v_local:
                z[:, max(cut, 0) :] = float("-inf")
            if out is None and len(sel) == b - a:
                out = z
                break
            if out is None:
                out = torch.empty((b - a, self.v_local), dtype=torch.float32, device=z.device)
            out[sel.to(out.device)] = z
        assert out is not None  # every row has a part (checked at construction)
        return out


def output_layer_logprobs(
    student: OutputLayer,
    target: torch.Tensor,
    group=None,
    *,
    with_entropy: bool = False,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``log pi(target)`` per row (and the entropy) from a role's fp32 output layer, chunked.

    Differentiable in ``student.hidden`` and ``student.weight`` through the log-prob (the entropy
    is a detached metric). ``target``: ``[N]`` token ids. ``chunk_elements`` sizes the log-prob's
    own scratch buffers, ``chunk_rows`` the logits chunks (default: 256 MiB of fp32 logits).
    """
    tg = target.reshape(-1)

    def head(z, a, b):
        lp, ent = vocab_parallel_logprobs(
            z,
            tg[a:b],
            group,
            vocab_size=student.vocab_size,
            with_entropy=with_entropy,
            chunk_elements=chunk_elements,
            overwrite_logits=True,  # these logits have no other reader
        )
        return (lp, ent) if with_entropy else (lp,)

    out = student.apply(head, n_grad=1, rows=chunk_rows)
    return out[0], (out[1] if with_entropy else None)


def output_layer_gopd_objective(
    student: OutputLayer,
    teacher: FrozenLogits,
    target: torch.Tensor,
    lam: torch.Tensor,
    group=None,
    *,
    ref: FrozenLogits | None = None,
    top_k: int | None = None,
    chunk_elements: int = 1 << 20,
    chunk_rows: int | None = None,
) -> GOPDObjective:
    """:func:`~megatron_gopd.vocab_parallel.vocab_parallel_gopd_objective` on fp32 logits made
    chunk by chunk from the student's output layer (with autograd) and the frozen roles'.

    ``target``: ``[N]``; ``lam``: ``[N]`` per-row lambda. Returns per-row ``[N]`` tensors."""
    tg = target.reshape(-1)
    lam_n = torch.as_tensor(lam, dtype=torch.float32, device=tg.device).expand(tg.shape)
    frozen_vocab = max(teacher.vocab_size, ref.vocab_size if ref is not None else 0)

    def head(z, a, b):
        out = vocab_parallel_gopd_objective(
            z,
            teacher.logits(a, b, group),
            tg[a:b],
            lam_n[a:b],
            group,
            ref_logits=None if ref is None else ref.logits(a, b, group),
            vocab_size=student.vocab_size,
            frozen_vocab_size=frozen_vocab,
            top_k=top_k,
            chunk_elements=chunk_elements,
        )
        return tuple(out)

    rows = chunk_rows or default_chunk_rows(student.v_local, DEFAULT_CHUNK_ELEMENTS // 3)
    return GOPDObjective(*student.apply(head, n_grad=1, rows=rows))
