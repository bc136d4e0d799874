"""The model side of our CPU stand-in for SGLang: sampling, prefill scoring and weight updates with
the Hugging Face ``transformers`` model of the student.

Semantics follow SGLang 0.5.23 where a trainer can observe them:

* **Reported log-probs** of sampled tokens are ``log_softmax(logits / T)`` of the token, taken
  *before* top-k / top-p truncation, as SGLang's sampler returns them (``log(probs)`` of the
  temperature-scaled softmax); with ``T == 0`` (greedy) they are ``log_softmax(logits)``. Setting
  ``SGLANG_RETURN_ORIGINAL_LOGPROB=1`` reports untempered log-probs, as in SGLang. Prompt
  log-probs (``input_token_logprobs``, prefill scoring) are never tempered.
* Sampling: temperature, then top-k, then top-p on the sorted probabilities (SGLang's
  ``top_k_top_p_min_p_sampling_from_probs_torch``), then a multinomial draw. As in SGLang, a
  request's ``sampling_seed`` only counts with ``--enable-deterministic-inference``
  (``deterministic=True``): it then seeds a generator of its own, so seeded samples do not depend
  on what else the server is doing, and a request without one uses SGLang's default seed 42.
  Otherwise every draw comes from the server generator (``--random-seed``) and seeds are ignored.
* Request ids: each sample runs under a rid; ``/abort_request`` stops the in-flight rid it names
  exactly (SGLang's tokenizer manager drops unknown rids; it does not match prefixes).
* Stops: a token in ``stop_token_ids`` or the model's EOS ids (unless ``ignore_eos``) ends the
  sample with ``{"type": "stop", "matched": id}``, the stop token included in ``output_ids``;
  ``max_new_tokens`` or the context length ends it with ``{"type": "length", "length": k}``;
  ``/abort_request`` ends it with ``{"type": "abort", ...}`` and the tokens generated so far.
* Weight updates take HF names (``model.layers.0.self_attn.q_proj.weight``); a tied model ignores
  ``lm_head.weight`` as SGLang's Llama/Qwen loaders do. An update is validated whole (names,
  shapes) before the first copy, so a bad update leaves the old weights in place.

Batching, as SGLang's scheduler does it: every request in flight runs in one batch. A request's
samples join a waiting queue; between two decode steps the scheduler admits waiting rows (at most
``max_running_requests`` rows in the batch, ``max_prefill_tokens`` prompt tokens per step), runs
one forward over the prompts of the newly admitted rows and the last token of every running row,
packed into one sequence without padding, samples every row, and retires finished and aborted
rows. Each row keeps its keys and values in a slot of its own and attends to that slot only. With
``deterministic=True`` the forward is batch-invariant, as SGLang's deterministic inference is: the
linear layers compute row by row and attention groups only rows of equal shape, so a seeded
request gives the same bits whatever else runs (a plain batched GEMM changes a row's bits with
the batch, by up to 1e-5 here); without it rows are grouped more coarsely and the bits depend on
the company, as SGLang's default kernels' do.

The model runs in the checkpoint's dtype unless told otherwise, with eager attention's maths, so
that its log-probs are a faithful fp32 reference for the parity tests. ``enable_fp32_lm_head`` is SGLang's
``--enable-fp32-lm-head`` (fp32 logits from a bf16 model, as the trainer computes them);
``device`` runs the model on a GPU (sampling stays on the host).
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from megatron_gopd.cpu_server.batch import (
    ABORT,
    ROWS_ATTENTION,
    GenItem,
    KVPool,
    Request,
    Row,
    StepRows,
    batch_invariant_linears,
    hidden_positions,
    register_rows_attention,
    rows_forward,
    rowwise_linear,
)

__all__ = ["CpuEngine", "GenItem", "input_token_logprobs"]


class CpuEngine:
    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "auto",
        context_length: int | None = None,
        random_seed: int = 0,
        deterministic: bool = False,
        enable_fp32_lm_head: bool = False,
        device: str = "cpu",
        max_running_requests: int = 256,
        max_prefill_tokens: int = 16384,
    ):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.model_path = model_path
        config = AutoConfig.from_pretrained(model_path)
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        self.device = torch.device(device)
        register_rows_attention()
        self.model = (
            AutoModelForCausalLM.from_pretrained(
                model_path, dtype=torch_dtype, attn_implementation=ROWS_ATTENTION
            )
            .eval()
            .to(self.device)
        )
        self.model.requires_grad_(False)
        if deterministic:
            batch_invariant_linears(self.model)
        if enable_fp32_lm_head:
            _fp32_lm_head(self.model.get_output_embeddings(), batch_invariant=deterministic)
        self.config = config
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.context_length = int(
            context_length or getattr(config, "max_position_embeddings", 4096)
        )
        self.vocab_size = int(config.vocab_size)
        self.eos_ids = _eos_ids(model_path, config)
        self.generator = torch.Generator().manual_seed(random_seed)
        self.deterministic = deterministic
        self.weight_version = "default"
        self.return_original_logprob = os.environ.get(
            "SGLANG_RETURN_ORIGINAL_LOGPROB", ""
        ).lower() in ("1", "true", "yes")
        # one model step at a time (the scheduler's, or a weight update between two)
        self.model_lock = threading.Lock()
        self.max_running_requests = max(1, int(max_running_requests))
        self.max_prefill_tokens = max(1, int(max_prefill_tokens))
        self._queue_lock = threading.Lock()  # the waiting queue and the scheduler's life
        self._pending: deque[Row] = deque()
        self._scheduler: threading.Thread | None = None
        self._pool = KVPool()  # the scheduler's
        self._state_lock = threading.Lock()
        self._running = 0
        self._inflight: set[str] = set()
        self._aborted: set[str] = set()
        self._abort_epoch = 0
        self._groups: dict[str, Any] = {}
        # False after the weights were released and resumed without a CPU backup (SGLang's
        # memory saver then hands back uninitialised memory) until every tensor was loaded again
        self.weights_valid = True
        self._reloaded: set[str] = set()

    # ------------------------------------------------------------------ bookkeeping

    @property
    def busy(self) -> bool:
        with self._state_lock:
            return self._running > 0

    def register(self, rids: list[str]) -> None:
        """Claim the rids of a request before it runs; a rid already in flight is refused as
        SGLang 0.5.23 refuses it (``ValueError``, answered 400)."""
        with self._state_lock:
            dup = next((r for r in rids if r in self._inflight), None)
            if dup is None and len(set(rids)) < len(rids):
                dup = next(r for r in rids if rids.count(r) > 1)
            if dup is not None:
                raise ValueError(f"Duplicate request ID detected: {dup}")
            self._inflight.update(rids)

    def abort(self, rid: str | None, abort_all: bool) -> bool:
        """Abort every request, or the in-flight request ``rid`` (exact); an unknown rid is
        ignored, as SGLang ignores it. Returns whether anything was marked."""
        with self._state_lock:
            if abort_all:
                self._abort_epoch += 1
                return True
            if rid and rid in self._inflight:
                self._aborted.add(rid)
                return True
            return False

    def _is_aborted(self, rid: str, epoch: int) -> bool:
        with self._state_lock:
            return epoch != self._abort_epoch or rid in self._aborted

    # ------------------------------------------------------------------ generation

    def generate(self, items: list[GenItem]) -> list[GenItem]:
        """Generate every item (their rids claimed with :meth:`register`). The items join the
        scheduler's batch, where they run with every other request in flight; this returns
        when all of them are finished."""
        with self._state_lock:
            self._running += 1
            epoch = self._abort_epoch
        req = Request(len(items))
        try:
            if items:
                with self._queue_lock:
                    self._pending.extend(Row(it, req, epoch) for it in items)
                    self._start_scheduler()
                req.done.wait()
            if req.error is not None:
                raise req.error
        finally:
            with self._state_lock:
                self._running -= 1
                for it in items:
                    self._aborted.discard(it.rid)
                    self._inflight.discard(it.rid)
        return items

    def release(self, rids: list[str]) -> None:
        """Give back rids claimed by a request that then did not run."""
        with self._state_lock:
            self._inflight.difference_update(rids)

    def _start_scheduler(self) -> None:
        """(under ``_queue_lock``) A scheduler thread while there is work; it ends when idle."""
        if self._scheduler is None:
            self._scheduler = threading.Thread(
                target=self._schedule, name="cpu-engine-scheduler", daemon=True
            )
            self._scheduler.start()

    def _schedule(self) -> None:
        """The scheduler loop: admit waiting rows (up to ``max_running_requests`` rows and
        ``max_prefill_tokens`` prompt tokens per step), run one forward over the prompts of the
        admitted rows and the last token of every running row, sample, retire finished rows."""
        active: list[Row] = []
        while True:
            with self._queue_lock:
                if not self._pending and not active:
                    # idle: the thread ends (a new one starts with the next request), so that
                    # no thread of ours is left inside torch when the interpreter exits
                    self._scheduler = None
                    self._pool = KVPool()  # and the caches' memory goes back
                    return
                admitted, budget = [], self.max_prefill_tokens
                while self._pending and len(active) + len(admitted) < self.max_running_requests:
                    n = len(self._pending[0].item.input_ids)
                    if admitted and n > budget:
                        break
                    budget -= n
                    admitted.append(self._pending.popleft())
            try:
                active = self._step(active, admitted)
            except BaseException as e:  # a model failure fails its requests, not the server
                for row in active + admitted:
                    row.req.fail(e)
                active = []

    @torch.no_grad()
    def _step(self, active: list[Row], admitted: list[Row]) -> list[Row]:
        for row in admitted:
            row.slot = self._pool.take()
        rows = []
        for row in active + admitted:
            # a request that failed already answered its caller: its waiting rows are not run
            if row.req.error is not None or self._is_aborted(row.item.rid, row.epoch):
                self._finish(row, ABORT)
            else:
                rows.append(row)
        if not rows:
            return []
        logits = self._forward_rows(rows, self._pool)
        sampling = []
        for row, lg in zip(rows, logits):
            it = row.item
            if not row.prefilled:
                row.prefilled = True
                if it.return_logprob:
                    it.input_logprobs = input_token_logprobs(lg, it.input_ids, it.logprob_start_len)
            if self._is_aborted(it.rid, row.epoch):
                self._finish(row, ABORT)
            elif row.at_length(self.context_length):
                self._finish(row, {"type": "length", "length": len(it.output_ids)})
            else:
                sampling.append((row, lg[-1]))
        if not sampling:
            return []
        drawn = self._sample_rows(
            torch.stack([lg for _, lg in sampling]), [row for row, _ in sampling]
        )
        still = []
        for (row, _), (tok, lp) in zip(sampling, drawn):
            it, p = row.item, row.params
            it.output_ids.append(tok)
            if it.return_logprob:
                it.output_logprobs.append(lp)
            if tok in p["stop_token_ids"] or (not p["ignore_eos"] and tok in self.eos_ids):
                self._finish(row, {"type": "stop", "matched": tok})
            elif row.at_length(self.context_length):
                self._finish(row, {"type": "length", "length": len(it.output_ids)})
            else:
                row.feed = [tok]
                still.append(row)
        return still

    def _finish(self, row: Row, finish: dict[str, Any]) -> None:
        row.item.finish = dict(finish)
        if row.slot is not None:
            self._pool.give(row.slot)
            row.slot = None
        row.req.one_done()

    def _forward_rows(self, rows: list[Row], pool: KVPool) -> list[torch.Tensor]:
        """One forward over every row's ``feed`` tokens, packed into one sequence (no padding):
        linear layers see all tokens at once, attention runs over each row's own cache in
        ``pool``, rows of equal shape together (:func:`rows_attention`). Returns per row the
        fp32 logits (on the host) of its last token, or of all its fed tokens while a prompt
        whose log-probs were asked for is prefilled."""
        ids, pos, tok_slot, keep, spans = [], [], [], [], []
        shapes: dict[tuple[int, int], tuple[list[int], list[int], list[int]]] = {}
        off = 0
        for row in rows:
            n, p0 = len(row.feed), row.length
            ids += row.feed
            pos += range(p0, p0 + n)
            tok_slot += [row.slot] * n
            # deterministic: rows of equal shape only (batch-invariant); else every row with
            # as many new tokens, its cache padded to the group's longest and masked
            toks, slots, totals = shapes.setdefault(
                (n, p0 + n if self.deterministic else 0), ([], [], [])
            )
            toks += range(off, off + n)
            slots.append(row.slot)
            totals.append(p0 + n)
            it = row.item  # prompt log-probs asked for: every prompt position's logits
            whole = not row.prefilled and it.return_logprob and 0 <= it.logprob_start_len < n
            spans.append((len(keep), n if whole else 1))
            keep += range(off, off + n) if whole else [off + n - 1]
            off += n
        dev = self.device
        ctx = StepRows(
            pool=pool,
            slots=pool.n_slots,
            length=max(max(tot) for _, _, tot in shapes.values()),
            tok_slot=torch.tensor(tok_slot, device=dev),
            tok_pos=torch.tensor(pos, device=dev),
            groups=[
                (
                    n,
                    max(tot),
                    torch.tensor(t, device=dev),
                    torch.tensor(sl, device=dev),
                    hidden_positions(n, tot, dev),
                )
                for (n, _), (t, sl, tot) in shapes.items()
            ],
        )
        with self.model_lock, rows_forward(ctx):
            out = self.model(
                input_ids=torch.tensor([ids], device=dev),
                position_ids=torch.tensor([pos], device=dev),
                use_cache=False,
                logits_to_keep=torch.tensor(keep, device=dev),
            )
        for row in rows:
            row.length += len(row.feed)
        logits = out.logits[0].float().cpu()
        return [logits[a : a + n] for a, n in spans]

    def _sample_rows(self, logits: torch.Tensor, rows: list[Row]) -> list[tuple[int, float]]:
        """Next token and its reported log-prob for each row from its last logits ``[R, V]``:
        rows with the same sampling parameters together; a row with a generator of its own
        (deterministic mode) draws from it."""
        out: list[tuple[int, float]] = [(0, 0.0)] * len(rows)
        kinds: dict[tuple, list[int]] = {}
        for i, row in enumerate(rows):
            p = row.params
            kinds.setdefault((p["temperature"], p["top_k"], p["top_p"]), []).append(i)
        for (t, top_k, top_p), idx in kinds.items():
            lg = logits[idx]
            if top_k == 1:  # greedy (SGLang maps temperature 0 to top_k 1)
                tok = lg.argmax(dim=-1)
                lp = F.log_softmax(lg, dim=-1).gather(1, tok[:, None]).squeeze(1)
                for j, i in enumerate(idx):
                    out[i] = (int(tok[j]), float(lp[j]))
                continue
            logprobs = F.log_softmax(lg / t, dim=-1)
            reported = F.log_softmax(lg, dim=-1) if self.return_original_logprob else logprobs
            probs = logprobs.exp()
            order = None
            if top_k < probs.shape[1] or top_p < 1.0:  # truncation on the sorted probabilities
                probs, order = torch.sort(probs, dim=-1, descending=True)
                if top_k < probs.shape[1]:
                    probs[:, top_k:] = 0.0
                if top_p < 1.0:
                    cum = torch.cumsum(probs, dim=-1)
                    probs[(cum - probs) > top_p] = 0.0
            gens = [rows[i].generator(self.deterministic) for i in idx]
            if gens[0] is None:
                choice = torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
            else:
                choice = torch.cat(
                    [torch.multinomial(probs[j], 1, generator=g) for j, g in enumerate(gens)]
                )
            tok = choice if order is None else order.gather(1, choice[:, None]).squeeze(1)
            lp = reported.gather(1, tok[:, None]).squeeze(1)
            for j, i in enumerate(idx):
                out[i] = (int(tok[j]), float(lp[j]))
        return out

    # ------------------------------------------------------------------ weights

    def _params(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.model.named_parameters())

    def load_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy HF-named tensors into the model; all-or-nothing. Returns the number loaded."""
        params = self._params()
        staged = []
        for name, t in named:
            if self.tied and name == "lm_head.weight":
                continue
            if name not in params:
                raise ValueError(f"unknown parameter {name!r} for {type(self.model).__name__}")
            if tuple(t.shape) != tuple(params[name].shape):
                raise ValueError(
                    f"{name}: shape {tuple(t.shape)} does not match the model's "
                    f"{tuple(params[name].shape)}"
                )
            staged.append((params[name], t))
        with self.model_lock, torch.no_grad():
            for p, t in staged:
                p.copy_(t.to(p.dtype))
            if not self.weights_valid:
                names = {id(p): n for n, p in params.items()}
                self._reloaded.update(names[id(p)] for p, _ in staged)
                if self._reloaded >= set(params) - ({"lm_head.weight"} if self.tied else set()):
                    self.weights_valid, self._reloaded = True, set()
        return len(staged)

    def invalidate_weights(self) -> None:
        """What resuming released weights without a CPU backup leaves: memory with no meaning
        (NaN here, so that a rollout from it cannot pass for a good one)."""
        with self.model_lock, torch.no_grad():
            for p in self.model.parameters():
                p.fill_(float("nan"))
            self.weights_valid, self._reloaded = False, set()

    def checksums(self) -> dict[str, str]:
        """``/weights_checker`` action ``checksum``: a 64-bit hex hash per parameter (SGLang
        hashes its own fused, TP-sharded tensors; ours are the HF tensors)."""
        import hashlib

        out = {}
        with self.model_lock:
            for name, p in self.model.named_parameters():
                data = p.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes()
                out[name] = hashlib.blake2b(data, digest_size=8).hexdigest()
        return out

    def load_from_disk(self, model_path: str) -> int:
        from megatron_gopd.convert.hf_io import HFWeights

        weights = HFWeights(model_path)
        n = self.load_weights((k, weights[k]) for k in weights)
        self.model_path = model_path
        return n

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> list | None:
        """First ``truncate_size`` rows of a parameter, or None where SGLang cannot say: it
        implements this for Llama (and its subclasses), Granite, OPT, Exaone4 and EmbeddingGemma2
        only; Qwen2/Qwen3 answer 400 "Get parameter by name failed"."""
        archs = set(getattr(self.config, "architectures", None) or [])
        if not archs & _GET_WEIGHTS_BY_NAME_ARCHS:
            return None
        params = self._params()
        if name == "lm_head.weight" and self.tied:
            name = "model.embed_tokens.weight"
        if name not in params:
            return None
        return params[name].detach().to(torch.float32).cpu().numpy().tolist()[:truncate_size]

    # ------------------------------------------------------------------ distributed updates

    def init_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str,
        backend: str,
        timeout_s: float = 300.0,
    ) -> None:
        """Join the weight-update group as rank ``rank_offset`` (+ tp_rank, 0 here), waiting at
        most ``timeout_s`` for the trainer's store (an unreachable master fails, not hangs)."""
        from datetime import timedelta

        from megatron_gopd.sync.process_group import init_custom_process_group, tcp_url

        if backend not in ("gloo",):
            raise ValueError(f"the CPU server supports the gloo backend only, not {backend!r}")
        if group_name in self._groups:
            raise ValueError(f"a weight-update group named {group_name!r} exists already")
        self._groups[group_name] = init_custom_process_group(
            backend=backend,
            init_method=tcp_url(master_address, master_port),
            world_size=world_size,
            rank=rank_offset,
            group_name=group_name,
            timeout=timedelta(seconds=timeout_s),
        )

    def destroy_group(self, group_name: str) -> bool:
        import torch.distributed as dist

        pg = self._groups.pop(group_name, None)
        if pg is None:
            return False
        dist.destroy_process_group(pg)
        return True

    def receive_distributed(
        self,
        names: list[str],
        dtypes: list[str],
        shapes: list[list[int]],
        group_name: str,
        load_format: str | None,
    ) -> list[tuple[str, torch.Tensor]]:
        """Receive one broadcast from rank 0 of the group, in SGLang's order."""
        import torch.distributed as dist

        if group_name not in self._groups:
            raise ValueError(
                f"Group {group_name} not in {list(self._groups)}. "
                "Please call `init_weights_update_group` first."
            )
        pg = self._groups[group_name]
        tdt = [getattr(torch, d) for d in dtypes]
        if load_format == "flattened_bucket":
            sizes = [torch.Size(s).numel() * d.itemsize for s, d in zip(shapes, tdt)]
            buf = torch.empty(sum(sizes), dtype=torch.uint8)
            dist.broadcast(buf, src=0, group=pg)
            out, off = [], 0
            for name, s, d, n in zip(names, shapes, tdt, sizes):
                out.append((name, buf[off : off + n].view(d).reshape(s)))
                off += n
            return out
        out = []
        for name, s, d in zip(names, shapes, tdt):
            t = torch.empty(s, dtype=d)
            dist.broadcast(t, src=0, group=pg)
            out.append((name, t))
        return out

    # ------------------------------------------------------------------ health

    def health_generate(self) -> None:
        """One prefill step, skipped while requests run (they prove the model works)."""
        if not self.busy:
            pool = KVPool()
            row = Row(GenItem("health", [0], {}), Request(1), 0)
            row.slot = pool.take()
            with torch.no_grad():
                self._forward_rows([row], pool)


def input_token_logprobs(
    logits_SV: torch.Tensor, ids: list[int], logprob_start_len: int
) -> list[float | None]:
    """SGLang 0.5.23's ``input_token_logprobs`` values of a prompt ``ids`` (``logits_SV``: the
    model's fp32 logits at every prompt position), never tempered.

    With ``L = logprob_start_len`` SGLang computes the log-probs predicted from positions ``L``
    onward and reports one entry per token ``ids[L:]``: ``[None] + computed[:-1]``
    (``scheduler_components/logprob_result_processor.py``, ``_process_input_token_logprobs``:
    "add None at start, remove last (sampling token)"), so entry 0 is always None and entry
    ``j >= 1`` is ``log p(ids[L + j] | ids[:L + j])``. ``L == -1`` with ``return_logprob`` becomes
    ``len(ids)`` (the scheduler): no entries. To score ``ids[P:]`` a client sends ``L = P - 1``
    and drops entry 0. ``L > len(ids)`` is refused before this is called.
    """
    n = len(ids)
    start = n if logprob_start_len < 0 else logprob_start_len
    if start >= n:
        return []
    lp = F.log_softmax(logits_SV[start : n - 1].float(), dim=-1)
    nxt = torch.tensor(ids[start + 1 :], dtype=torch.long)
    return [None, *lp.gather(1, nxt[:, None]).squeeze(1).tolist()]


# SGLang 0.5.23 models with a ``get_weights_by_name`` (srt/models/*.py), by HF architecture
_GET_WEIGHTS_BY_NAME_ARCHS = {
    "LlamaForCausalLM",
    "Phi3ForCausalLM",
    "InternLM3ForCausalLM",
    "GraniteForCausalLM",
    "OPTForCausalLM",
    "Exaone4ForCausalLM",
    "Gemma2Model",
}


def _fp32_lm_head(head: torch.nn.Module, batch_invariant: bool = False) -> None:
    """SGLang's ``--enable-fp32-lm-head``: the LM head's logits are fp32, its bf16 operands
    multiplied with fp32 accumulation and not rounded back to bf16 (the same function the trainer
    uses, :func:`megatron_gopd.vocab_parallel.output_layer.fp32_logits`; row by row when
    ``batch_invariant``). A no-op for an fp32 model."""
    from megatron_gopd.vocab_parallel.output_layer import fp32_logits

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        if batch_invariant:
            out = rowwise_linear(hidden.float(), head.weight.float())
        else:
            out = fp32_logits(hidden, head.weight)
        return out if head.bias is None else out + head.bias.float()

    head.forward = forward


def _eos_ids(model_path: str, config) -> set[int]:
    ids: set[int] = set()
    sources = [getattr(config, "eos_token_id", None)]
    try:
        from transformers import GenerationConfig

        sources.append(GenerationConfig.from_pretrained(model_path).eos_token_id)
    except Exception:
        pass
    for e in sources:
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(int(x) for x in e)
    return ids
