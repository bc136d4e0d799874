"""Offline helpers for evaluation tests and demos: a tiny tokenizer, a scripted generator.

Model hubs are unreachable here, and ``megatron_gopd.testing.make_tiny_hf_model`` saves no
tokenizer: :func:`make_tiny_tokenizer` trains a byte-level BPE tokenizer (any text encodes) with a
ChatML chat template in well under a second. :class:`ScriptedGenerator` answers with texts chosen
by a function (e.g. right with probability p), so the whole pipeline (prompting, grading, the
sandbox, the statistics) can be exercised with known right and wrong answers.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

from megatron_gopd.evaluation.generation import Completion

__all__ = [
    "CHATML_TEMPLATE",
    "SAMPLES_DIR",
    "ScriptedGenerator",
    "make_tiny_tokenizer",
    "sample_benchmark_specs",
]

# the tiny benchmark samples shipped with the package (public formats, a few problems each)
SAMPLES_DIR = Path(__file__).resolve().parent / "samples"


def sample_benchmark_specs(
    *,
    math: str = "math",
    hmmt: str = "hmmt-style",
    humaneval: str = "humaneval+",
    mbpp: str = "mbpp+",
    livecodebench: str = "livecodebench",
) -> list[str]:
    """``NAME=FORMAT:PATH`` specs (``gopd-eval --benchmark``) of the five shipped samples, under
    the given names."""
    return [
        f"{math}=math:{SAMPLES_DIR / 'math_sample.jsonl'}",
        f"{hmmt}=math:{SAMPLES_DIR / 'hmmt_style_sample.jsonl'}",
        f"{humaneval}=evalplus:{SAMPLES_DIR / 'humaneval_plus_sample.jsonl'}",
        f"{mbpp}=evalplus:{SAMPLES_DIR / 'mbpp_plus_sample.jsonl'}",
        f"{livecodebench}=livecodebench:{SAMPLES_DIR / 'livecodebench_sample.jsonl'}",
    ]


CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "def add(a, b):\n    return a + b\n",
    "```python\nprint(sum(map(int, input().split())))\n```",
    "The answer is $\\frac{1}{2}$ so \\boxed{2}.",
    "class Solution:\n    def runningSum(self, nums):\n        return nums\n",
]


def make_tiny_tokenizer(path: str | Path, vocab_size: int = 300):
    """Train and save (``save_pretrained``) a byte-level BPE tokenizer of ``vocab_size`` ids
    (256 bytes + 3 special tokens + merges); returns the ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(str(path))
    return fast


class ScriptedGenerator:
    """A :class:`~megatron_gopd.evaluation.generation.Generator` whose responses come from
    ``respond(prompt_text, sample_index, rng) -> str``; ``rng`` is seeded from ``seed`` and the
    prompt, so the responses are reproducible. Responses end with EOS (``stop``) unless they run
    past ``max_new_tokens`` (cut, ``length``)."""

    def __init__(self, tokenizer, respond: Callable[[str, int, random.Random], str]) -> None:
        self.tokenizer = tokenizer
        self.respond = respond

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
        out = []
        eos = self.tokenizer.eos_token_id
        for ids in prompts_token_ids:
            prompt = self.tokenizer.decode(list(ids))
            rng = random.Random(f"{seed}:{prompt}")
            comps = []
            for j in range(n):
                resp = self.tokenizer(self.respond(prompt, j, rng), add_special_tokens=False)
                toks = [*resp["input_ids"], eos]
                if len(toks) > max_new_tokens:
                    comps.append(Completion(toks[:max_new_tokens], "length"))
                else:
                    comps.append(Completion(toks, "stop"))
            out.append(comps)
        return out
