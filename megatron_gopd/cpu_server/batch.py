"""The batch the CPU engine's scheduler runs (see :mod:`megatron_gopd.cpu_server.engine`): the
samples (rows) with their requests, the pool of per-row key/value slots, the attention over a
packed batch of rows that reads each row's own slot, and the row-wise (batch-invariant) linear
layers of ``--enable-deterministic-inference``."""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from megatron_gopd.rollout.protocol import TOP_K_ALL

__all__ = [
    "ABORT",
    "ROWS_ATTENTION",
    "GenItem",
    "KVPool",
    "Request",
    "Row",
    "StepRows",
    "batch_invariant_linears",
    "hidden_positions",
    "normalize_sampling",
    "register_rows_attention",
    "rows_forward",
    "rowwise_linear",
]


@dataclass
class GenItem:
    """One sample to generate (SGLang expands a batch with n samples into such items)."""

    rid: str
    input_ids: list[int]
    params: dict[str, Any]
    return_logprob: bool = False
    logprob_start_len: int = -1
    # filled by generation
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    input_logprobs: list[float | None] | None = None
    finish: dict[str, Any] | None = None


def normalize_sampling(sp: dict[str, Any]) -> dict[str, Any]:
    """SGLang's SamplingParams defaults and special cases (temperature 0 -> top_k 1)."""
    t = sp.get("temperature")
    t = 1.0 if t is None else float(t)
    top_k = sp.get("top_k")
    top_k = TOP_K_ALL if top_k in (None, -1) else int(top_k)
    if 0 <= t < 1e-6:
        t, top_k = 1.0, 1
    mnt = sp.get("max_new_tokens")
    return {
        "temperature": t,
        "top_p": 1.0 if sp.get("top_p") is None else float(sp["top_p"]),
        "top_k": top_k,
        "max_new_tokens": 128 if mnt is None else int(mnt),
        "stop_token_ids": set(sp.get("stop_token_ids") or ()),
        "ignore_eos": bool(sp.get("ignore_eos") or False),
        "sampling_seed": sp.get("sampling_seed"),
    }


ABORT = {"type": "abort", "message": "Abort request", "status_code": None, "err_type": None}


class Request:
    """One ``generate`` call waiting for its rows."""

    def __init__(self, n_rows: int):
        self.left = n_rows
        self.done = threading.Event()
        self.error: BaseException | None = None
        if n_rows == 0:
            self.done.set()

    def one_done(self) -> None:
        self.left -= 1
        if self.left == 0:
            self.done.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done.set()


class KVPool:
    """The keys and values of every running row: per layer one ``[slots, kv_heads, capacity,
    head_dim]`` tensor each, row ``r`` in slot ``r.slot`` with its first ``r.length`` positions
    valid. A row reads its own slot only (no neighbours, no padding in what it attends to), so
    its attention does not depend on what else runs. Grown by doubling as slots and lengths are
    needed; made on the first layer's call (shapes and dtype from its keys)."""

    def __init__(self):
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.n_slots = 0
        self._free: list[int] = []

    def take(self) -> int:
        if self._free:
            return self._free.pop()
        self.n_slots += 1
        return self.n_slots - 1

    def give(self, slot: int) -> None:
        self._free.append(slot)

    def layer(self, layer: int, like: torch.Tensor, slots: int, length: int):
        """Layer ``layer``'s (keys, values), with room for ``slots`` slots of ``length``."""
        k = self.k.get(layer)
        if k is None or k.shape[0] < slots or k.shape[2] < length:
            old_s, old_l = (0, 0) if k is None else (k.shape[0], k.shape[2])
            s, n = max(slots, 2 * old_s), max(length, 2 * old_l, 16)
            heads, dim = like.shape[1], like.shape[3]
            for store in (self.k, self.v):
                new = like.new_zeros((s, heads, n, dim))
                if store.get(layer) is not None:
                    new[:old_s, :, :old_l] = store[layer]
                store[layer] = new
        return self.k[layer], self.v[layer]


@dataclass
class StepRows:
    """What one forward's attention needs: the pool, its required size, each packed token's
    slot and position, and the rows grouped as ``(n_new, longest total, token indices in the
    packed sequence, slots, the positions hidden from each query or None)``."""

    pool: KVPool
    slots: int
    length: int
    tok_slot: torch.Tensor
    tok_pos: torch.Tensor
    groups: list[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor | None]]


class Row:
    """One sample in the scheduler's batch."""

    def __init__(self, item: GenItem, req: Request, epoch: int):
        self.item, self.req, self.epoch = item, req, epoch
        self.params = normalize_sampling(item.params)
        self.n_prompt = len(item.input_ids)
        self.feed: list[int] = list(item.input_ids)
        self.prefilled = False
        self.slot: int | None = None
        self.length = 0  # tokens in its cache
        self._gen: torch.Generator | None = None

    def at_length(self, context_length: int) -> bool:
        k = len(self.item.output_ids)
        return k >= self.params["max_new_tokens"] or self.n_prompt + k >= context_length

    def generator(self, deterministic: bool) -> torch.Generator | None:
        """SGLang: ``sampling_seed`` counts only in deterministic mode, where None means 42;
        such a row draws from a generator of its own, whatever else runs."""
        if not deterministic:
            return None
        if self._gen is None:
            seed = self.params["sampling_seed"]
            self._gen = torch.Generator().manual_seed((42 if seed is None else seed) % 2**63)
        return self._gen


# the rows of the forward being run by this thread (a StepRows)
CURRENT = threading.local()


@contextlib.contextmanager
def rows_forward(ctx: StepRows):
    """The rows of the forward this thread runs inside the block (read by :func:`rows_attention`)."""
    CURRENT.ctx = ctx
    try:
        yield
    finally:
        CURRENT.ctx = None


ROWS_ATTENTION = "gopd_rows"


def rows_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """HF attention over a packed batch ``[1, heads, tokens, head_dim]`` whose rows are
    described by ``CURRENT.ctx``: the new keys/values go to each row's slot of the pool, and each
    row's queries attend causally to its own slot (eager attention's maths: scaled scores, fp32
    softmax, weighted values; grouped-query heads share their key/value head as ``repeat_kv``
    does). With deterministic inference, only rows of equal shape run as one batched product,
    whose per-row results do not depend on how many rows it holds: a row's numbers are the same
    alone or in any batch. Otherwise rows with as many new tokens run together, each masked to
    its own length (fewer, larger products; the bits then depend on the company, as SGLang's
    default kernels' do)."""
    ctx: StepRows = CURRENT.ctx
    keys, values = ctx.pool.layer(module.layer_idx, key, ctx.slots, ctx.length)
    keys[ctx.tok_slot, :, ctx.tok_pos] = key[0].transpose(0, 1)
    values[ctx.tok_slot, :, ctx.tok_pos] = value[0].transpose(0, 1)
    n_q, n_tok, d = query.shape[1], query.shape[2], query.shape[3]
    n_kv = key.shape[1]
    groups = n_q // n_kv
    out = query.new_empty(n_tok, n_q, d)
    q_all = query[0]
    for n, total, toks, slots, hidden in ctx.groups:
        g = slots.numel()
        q = q_all[:, toks].view(n_kv, groups, g, n, d).permute(2, 0, 1, 3, 4)
        q = q.reshape(g, n_kv, groups * n, d)
        k, v = keys[slots, :, :total], values[slots, :, :total]  # [g, n_kv, total, d]
        w = torch.matmul(q, k.transpose(-1, -2)).mul_(scaling)  # [g, n_kv, groups * n, total]
        if hidden is not None:
            w = w.view(g, n_kv, groups, n, total).masked_fill(hidden, torch.finfo(w.dtype).min)
            w = w.view(g, n_kv, groups * n, total)
        w = F.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
        o = torch.matmul(w, v).view(g, n_kv, groups, n, d).permute(0, 3, 1, 2, 4)
        out[toks] = o.reshape(g * n, n_q, d)
    return out.unsqueeze(0), None


def hidden_positions(n: int, totals: list[int], device) -> torch.Tensor | None:
    """The positions each query of a group must not see, ``[g, 1, 1, n, longest]`` (None: none):
    row r's query j sits at position ``totals[r] - n + j`` and sees the positions up to it."""
    longest = max(totals)
    if n == 1 and min(totals) == longest:
        return None
    ends = torch.tensor(totals, device=device)
    qpos = ends[:, None] - n + torch.arange(n, device=device)[None, :]  # [g, n]
    hidden = torch.arange(longest, device=device)[None, None, :] > qpos[:, :, None]
    return hidden[:, None, None]


def register_rows_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ROWS_ATTENTION, rows_attention)


def rowwise_linear(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """``x @ weight^T (+ bias)`` one row at a time (a batched ``[1, in] x [in, out]`` product):
    each row's result is independent of how many rows come with it. A plain ``F.linear``
    is not: its GEMM blocks the rows, and a row's bits change with the batch (measured here:
    up to 1e-5 on 64-4096 wide layers) -- the CPU twin of SGLang's batch-invariant kernels."""
    shape = x.shape
    x3 = x.reshape(-1, 1, shape[-1])
    y = torch.bmm(x3, weight.t().unsqueeze(0).expand(x3.shape[0], -1, -1))
    if bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], weight.shape[0])


def batch_invariant_linears(model: torch.nn.Module) -> None:
    """Every ``nn.Linear`` of ``model`` computes row by row (``--enable-deterministic-inference``)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.forward = lambda x, m=m: rowwise_linear(x, m.weight, m.bias)
