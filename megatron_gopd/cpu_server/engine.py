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

The model runs in the checkpoint's dtype unless told otherwise, with eager attention, so that its
log-probs are a faithful fp32 reference for the parity tests. ``enable_fp32_lm_head`` is SGLang's
``--enable-fp32-lm-head`` (fp32 logits from a bf16 model, as the trainer computes them);
``device`` runs the model on a GPU (sampling stays on the host).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from megatron_gopd.rollout.protocol import TOP_K_ALL

__all__ = ["CpuEngine", "GenItem", "input_token_logprobs"]


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
    ):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.model_path = model_path
        config = AutoConfig.from_pretrained(model_path)
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        self.device = torch.device(device)
        self.model = (
            AutoModelForCausalLM.from_pretrained(
                model_path, dtype=torch_dtype, attn_implementation="eager"
            )
            .eval()
            .to(self.device)
        )
        self.model.requires_grad_(False)
        if enable_fp32_lm_head:
            _fp32_lm_head(self.model.get_output_embeddings())
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
        # one model step at a time; requests interleave between steps
        self.model_lock = threading.Lock()
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

    @torch.no_grad()
    def generate(self, items: list[GenItem]) -> list[GenItem]:
        """Generate every item (their rids claimed with :meth:`register`); items with the same
        prompt run as one batch."""
        with self._state_lock:
            self._running += 1
            epoch = self._abort_epoch
        try:
            groups: dict[tuple[int, ...], list[GenItem]] = {}
            for it in items:
                groups.setdefault(tuple(it.input_ids), []).append(it)
            for prompt, group in groups.items():
                self._generate_group(list(prompt), group, epoch)
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

    def _forward(self, input_ids: torch.Tensor, cache=None):
        """Logits (fp32, on the host, where sampling runs) and the KV cache (on the device)."""
        with self.model_lock:
            out = self.model(
                input_ids=input_ids.to(self.device), past_key_values=cache, use_cache=True
            )
        return out.logits.float().cpu(), out.past_key_values

    def _generate_group(self, prompt: list[int], items: list[GenItem], epoch: int) -> None:
        b, n_prompt = len(items), len(prompt)
        ids = torch.tensor([prompt] * b, dtype=torch.long)
        logits, cache = self._forward(ids)
        for it in items:
            if it.return_logprob:
                it.input_logprobs = input_token_logprobs(logits[0], prompt, it.logprob_start_len)
        last = logits[:, -1]
        params = [_normalize(it.params) for it in items]
        # SGLang: sampling_seed counts only in deterministic mode, where None means 42
        gens = [
            torch.Generator().manual_seed(
                (42 if p["sampling_seed"] is None else p["sampling_seed"]) % 2**63
            )
            if self.deterministic
            else None
            for p in params
        ]
        active = list(range(b))
        step = 0
        while True:
            still = []
            for i in active:
                it, p = items[i], params[i]
                if self._is_aborted(it.rid, epoch):
                    it.finish = {
                        "type": "abort",
                        "message": "Abort request",
                        "status_code": None,
                        "err_type": None,
                    }
                    continue
                if len(it.output_ids) >= p["max_new_tokens"] or n_prompt + step >= (
                    self.context_length
                ):
                    it.finish = {"type": "length", "length": len(it.output_ids)}
                    continue
                tok, lp = self._sample(last[i], p, gens[i])
                it.output_ids.append(tok)
                if it.return_logprob:
                    it.output_logprobs.append(lp)
                if tok in p["stop_token_ids"] or (not p["ignore_eos"] and tok in self.eos_ids):
                    it.finish = {"type": "stop", "matched": tok}
                    continue
                still.append(i)
            active = still
            if not active:
                return
            step += 1
            nxt = torch.tensor([[it.output_ids[-1] if it.output_ids else 0] for it in items])
            logits, cache = self._forward(nxt, cache)
            last = logits[:, -1]

    def _sample(
        self, logits: torch.Tensor, p: dict[str, Any], gen: torch.Generator | None
    ) -> tuple[int, float]:
        t = p["temperature"]
        if p["top_k"] == 1:  # greedy (SGLang maps temperature 0 to top_k 1)
            tok = int(torch.argmax(logits))
            return tok, float(F.log_softmax(logits, dim=-1)[tok])
        scaled = logits / t
        logprobs = F.log_softmax(scaled, dim=-1)
        probs = logprobs.exp()
        sorted_p, idx = torch.sort(probs, descending=True)
        if p["top_k"] < sorted_p.numel():
            sorted_p[p["top_k"] :] = 0.0
        if p["top_p"] < 1.0:
            cum = torch.cumsum(sorted_p, dim=0)
            sorted_p[(cum - sorted_p) > p["top_p"]] = 0.0
        choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen or self.generator)
        tok = int(idx[choice])
        lp = F.log_softmax(logits, dim=-1)[tok] if self.return_original_logprob else logprobs[tok]
        return tok, float(lp)

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
            self._forward(torch.tensor([[0]]))


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


def _fp32_lm_head(head: torch.nn.Module) -> None:
    """SGLang's ``--enable-fp32-lm-head``: the LM head's logits are fp32, its bf16 operands
    multiplied with fp32 accumulation and not rounded back to bf16 (the same function the trainer
    uses, :func:`megatron_gopd.vocab_parallel.output_layer.fp32_logits`). A no-op for an fp32
    model."""
    from megatron_gopd.vocab_parallel.output_layer import fp32_logits

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        out = fp32_logits(hidden, head.weight)
        return out if head.bias is None else out + head.bias.float()

    head.forward = forward


def _normalize(sp: dict[str, Any]) -> dict[str, Any]:
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
