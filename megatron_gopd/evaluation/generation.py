"""The generation interface evaluation needs, prompt encoding, and an in-process HF generator.

Evaluation only sees token ids: the :class:`Generator` protocol takes tokenized prompts and returns
``n`` completions per prompt as ``(response_token_ids, finish_reason)``. The project's rollout
client (SGLang's native ``/generate`` with ``input_ids``, or the protocol-compatible CPU server)
satisfies it with a thin adapter; :class:`HFGenerator` is the in-process implementation used by
``gopd-eval --hf-model`` and the tests. Tokenization, the chat template and decoding are done once,
here, by :class:`PromptEncoder`, so that every backend sees the same ids.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

from megatron_gopd.utils import GopdError

__all__ = [
    "ChatFormat",
    "Completion",
    "Generator",
    "HFGenerator",
    "PromptEncoder",
    "RolloutClientGenerator",
]


class Completion(NamedTuple):
    """One sampled response: its token ids (the stop token included when one ended it) and why it
    ended: ``stop`` (EOS / stop token), ``length`` (``max_new_tokens``) or ``abort``."""

    token_ids: list[int]
    finish_reason: str


@runtime_checkable
class Generator(Protocol):
    """Anything that samples completions of tokenized prompts.

    Returns one list of ``n`` :class:`Completion` per prompt, in prompt order. ``temperature == 0``
    means greedy decoding. ``seed`` makes sampling reproducible where the backend supports it
    (exactly so for :class:`HFGenerator`; SGLang only with its deterministic-inference mode).
    """

    def generate(
        self,
        prompts_token_ids: Sequence[Sequence[int]],
        *,
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int,
    ) -> list[list[Completion]]: ...


@dataclass(frozen=True)
class ChatFormat:
    """How a benchmark prompt becomes tokens: through the tokenizer's chat template (a single user
    turn, after an optional system prompt, with the generation prompt appended) or as raw text
    (base models). ``template_kwargs`` go to the template, e.g. ``{"enable_thinking": True}``."""

    use_chat_template: bool = True
    system_prompt: str | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)


class PromptEncoder:
    """Text <-> token ids with one tokenizer and one :class:`ChatFormat`."""

    def __init__(self, tokenizer, chat: ChatFormat | None = None) -> None:
        self.tokenizer = tokenizer
        self.chat = chat or ChatFormat()
        if self.chat.use_chat_template and not getattr(tokenizer, "chat_template", None):
            raise GopdError(
                "the tokenizer has no chat template: pass --no-chat-template to use raw prompts"
            )

    def render(self, user_text: str) -> str:
        """The exact prompt text the model sees (recorded with each sample)."""
        if not self.chat.use_chat_template:
            return user_text
        messages = [{"role": "user", "content": user_text}]
        if self.chat.system_prompt:
            messages.insert(0, {"role": "system", "content": self.chat.system_prompt})
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **self.chat.template_kwargs
        )

    def encode(self, user_text: str) -> list[int]:
        text = self.render(user_text)
        # a chat template writes its own BOS; a raw prompt gets the tokenizer's special tokens
        ids = self.tokenizer(text, add_special_tokens=not self.chat.use_chat_template)["input_ids"]
        return list(ids)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)


def _prompt_seed(seed: int, prompt_ids: Sequence[int]) -> int:
    """A per-prompt seed from the run seed and the prompt's content: the samples of a prompt do
    not depend on which other prompts share the call, nor on their order."""
    h = hashlib.sha256(f"{seed}:{','.join(map(str, prompt_ids))}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


class HFGenerator:
    """Generates with a ``transformers`` causal LM in this process (CPU or one GPU).

    Meant for small models and tests: one prompt at a time, its ``n`` samples as one batch. Greedy
    at temperature 0 (computed once, repeated ``n`` times); real sampling otherwise, reproducible
    from ``seed`` (torch's global RNG is restored afterwards, so a trainer's RNG stream is not
    disturbed)."""

    def __init__(
        self,
        model_or_path,
        *,
        eos_token_ids: Sequence[int] | None = None,
        device: str | None = None,
        dtype: str = "float32",
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        if isinstance(model_or_path, str | bytes) or hasattr(model_or_path, "__fspath__"):
            try:
                model = AutoModelForCausalLM.from_pretrained(
                    str(model_or_path), dtype=getattr(torch, dtype)
                )
            except OSError as e:
                raise GopdError(f"cannot load a HF model from {model_or_path}: {e}") from None
        else:
            model = model_or_path
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()
        eos = eos_token_ids
        if eos is None:
            eos = model.generation_config.eos_token_id
            eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if not eos:
            raise GopdError("the model declares no eos_token_id: pass eos_token_ids")
        self.eos_token_ids = list(eos)

    def generate(
        self,
        prompts_token_ids: Sequence[Sequence[int]],
        *,
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int,
    ) -> list[list[Completion]]:
        import torch

        out: list[list[Completion]] = []
        dev = torch.device(self.device)
        cuda_rngs = [dev.index or 0] if dev.type == "cuda" else []  # fork_rng takes indices
        with torch.random.fork_rng(devices=cuda_rngs), torch.no_grad():
            for ids in prompts_token_ids:
                inp = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
                greedy = temperature == 0
                kwargs: dict[str, Any] = dict(
                    max_new_tokens=max_new_tokens,
                    eos_token_id=self.eos_token_ids,
                    pad_token_id=self.eos_token_ids[0],
                    attention_mask=torch.ones_like(inp),
                )
                if greedy:
                    kwargs.update(do_sample=False, num_return_sequences=1)
                else:
                    torch.manual_seed(_prompt_seed(seed, ids))
                    kwargs.update(
                        do_sample=True,
                        temperature=temperature,
                        top_p=top_p,
                        top_k=0,
                        num_return_sequences=n,
                    )
                seqs = self.model.generate(inp, **kwargs)[:, inp.shape[1] :].tolist()
                comps = [self._trim(s, max_new_tokens) for s in seqs]
                out.append(comps * n if greedy else comps)
        return out

    def _trim(self, seq: list[int], max_new_tokens: int) -> Completion:
        for i, t in enumerate(seq):
            if t in self.eos_token_ids:
                return Completion(seq[: i + 1], "stop")
        return Completion(seq[:max_new_tokens], "length")


class RolloutClientGenerator:
    """The rollout client (``megatron_gopd.rollout.RolloutClient``: SGLang or the CPU server) as a
    :class:`Generator`. The trainer passes the client it rolls out with (after the weight push,
    with that ``weight_version``); ``gopd-eval --rollout-urls`` would build one from URLs.

    Prompts the client skips (longer than the server's context budget) come back as an empty
    ``abort`` completion, so they count as wrong rather than vanish from the denominator."""

    def __init__(
        self,
        client,
        *,
        stop_token_ids: Sequence[int] = (),
        weight_version: str | None = None,
    ) -> None:
        self.client = client
        self.stop_token_ids = tuple(stop_token_ids)
        self.weight_version = weight_version

    def generate(
        self,
        prompts_token_ids: Sequence[Sequence[int]],
        *,
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int,
    ) -> list[list[Completion]]:
        from megatron_gopd.rollout import RolloutPrompt, SamplingConfig

        prompts = [
            RolloutPrompt(prompt_ids=list(ids), domain="eval", prompt_index=i)
            for i, ids in enumerate(prompts_token_ids)
        ]
        sampling = SamplingConfig(
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            stop_token_ids=self.stop_token_ids,
            seed=seed,
        )
        samples = self.client.sample(prompts, n, sampling, weight_version=self.weight_version)
        out = [[Completion([], "abort") for _ in range(n)] for _ in prompts]
        for s in samples:
            out[s.prompt_index][s.sample_index] = Completion(list(s.response_ids), s.finish_reason)
        return out
