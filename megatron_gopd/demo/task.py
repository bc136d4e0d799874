"""The tiny demo's synthetic, verifiable task: reverse a short string of letters.

``<|user|>cabdh</s><|assistant|>`` -> ``hdbac</s>``. A correct answer is checkable exactly, the
task needs attention to the right positions (so a 2-layer model learns it only partly in a few
dozen steps, while a 4-layer model learns it fully), and everything runs on a CPU in seconds.

Teacher and student are made here from scratch with plain supervised steps in transformers, then
saved as Hugging Face directories: the demo then goes through the same path a user's models take
(conversion, Megatron training, rollouts through the server API, weight sync).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

ALPHABET = "abcdefgh"
TOKENIZER_ALPHABET = ALPHABET + " "


@dataclass(frozen=True)
class ModelSpec:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    sft_steps: int


TEACHER = ModelSpec(hidden=64, layers=4, heads=4, kv_heads=2, sft_steps=500)
STUDENT = ModelSpec(hidden=48, layers=2, heads=4, kv_heads=2, sft_steps=70)


def example(rng: random.Random) -> tuple[str, str]:
    s = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(3, 6)))
    return s, s[::-1]


def write_prompts(path: Path, n: int, seed: int) -> Path:
    """jsonl of ``{"prompt", "answer", "domain"}`` lines (the trainer's --prompt-data format)."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            s, ans = example(rng)
            f.write(json.dumps({"prompt": s, "answer": ans, "domain": "reverse"}) + "\n")
    return path


def make_tokenizer(path: Path):
    from megatron_gopd.testing import make_tiny_tokenizer

    return make_tiny_tokenizer(path, alphabet=TOKENIZER_ALPHABET)


def _prompt_ids(tok, s: str) -> list[int]:
    ids = tok.apply_chat_template(
        [{"role": "user", "content": s}], add_generation_prompt=True, tokenize=True
    )
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def make_model(tok, spec: ModelSpec, seed: int):
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=spec.hidden,
        intermediate_size=2 * spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        head_dim=spec.hidden // spec.heads,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def supervised_train(
    model, tok, steps: int, *, batch_size: int = 64, lr: float = 3e-3, seed: int = 0
) -> float:
    """Plain next-token SFT on the response tokens; returns the last loss."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    eos = tok.eos_token_id
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        batch = []
        for _ in range(batch_size):
            s, ans = example(rng)
            batch.append(
                (_prompt_ids(tok, s), tok(ans, add_special_tokens=False)["input_ids"] + [eos])
            )
        T = max(len(p) + len(r) for p, r in batch)
        x = torch.zeros(batch_size, T, dtype=torch.long)
        y = torch.full((batch_size, T), -100)
        for i, (p, r) in enumerate(batch):
            x[i, : len(p) + len(r)] = torch.tensor(p + r)
            y[i, len(p) : len(p) + len(r)] = torch.tensor(r)
        loss = model(input_ids=x, labels=y).loss  # transformers shifts the labels
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


@torch.no_grad()
def accuracy(
    model, tok, prompts: list[dict], *, n_samples: int, temperature: float, seed: int
) -> tuple[float, float]:
    """avg@n accuracy and mean response length (tokens) of sampled answers, as in the paper's
    evaluation (temperature 1.0, average over samples)."""
    model.eval()
    torch.manual_seed(seed)
    correct = total = length = 0
    for rec in prompts:
        ids = torch.tensor([_prompt_ids(tok, rec["prompt"])])
        out = model.generate(
            ids.expand(n_samples, -1),
            max_new_tokens=10,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_k=None,
            top_p=None,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        for row in out[:, ids.shape[1] :]:
            toks = row.tolist()
            if tok.eos_token_id in toks:
                toks = toks[: toks.index(tok.eos_token_id) + 1]
            text = tok.decode(toks, skip_special_tokens=True)
            correct += text == rec["answer"]
            length += len(toks)
            total += 1
    return correct / total, length / total
