"""Shared fixtures for the trainer's end-to-end tests: tiny tokenizer, models, prompt data."""

from __future__ import annotations

import json
import random
from pathlib import Path

from megatron_gopd.testing import make_tiny_hf_model, make_tiny_tokenizer, run_distributed

ALPHABET = "abcdefgh "


def _convert(hf_dir, out_dir):
    from megatron_gopd.convert.checkpoint import convert_hf_to_megatron

    convert_hf_to_megatron(hf_dir, out_dir)


def make_world(root: Path) -> dict[str, Path]:
    """Tokenizer + student (2 layers) + teacher and its "pre-RL base" (4 layers, wider) + data.

    Random models: what the tests check (the reverse KL to the teacher falls, log-probs agree,
    routing, resumption) does not need trained ones."""
    tok = make_tiny_tokenizer(root / "tok", alphabet=ALPHABET)
    small = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=len(tok),
        max_position_embeddings=64,
    )
    big = dict(small, hidden_size=64, intermediate_size=128, num_hidden_layers=4, head_dim=16)
    paths = {}
    for name, dims, seed in (
        ("student", small, 1),
        ("teacher", big, 2),
        ("teacher2", big, 3),
        ("teacher_base", big, 4),
    ):
        hf = root / "hf" / name
        make_tiny_hf_model(hf, "qwen3", seed=seed, tied=True, **dims)
        tok.save_pretrained(str(hf))
        run_distributed(_convert, 1, str(hf), str(root / name))
        paths[name] = root / name
    rng = random.Random(0)

    def lines(n, domains):
        out = []
        for i in range(n):
            s = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 6)))
            out.append(
                {"prompt": s, "answer": s[::-1], "domain": domains[i % len(domains)], "id": i}
            )
        return out

    for name, n, domains in (
        ("train", 64, ["math"]),
        ("eval", 16, ["math"]),
        ("train2", 64, ["math", "code"]),
        ("eval2", 16, ["math", "code"]),
    ):
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps(x) + "\n" for x in lines(n, domains)))
        paths[name] = path
    return paths


def train_args(w: dict[str, Path], save: Path, *extra: str, steps: int = 4) -> list[str]:
    return [
        "--student-load",
        str(w["student"]),
        "--prompt-data",
        str(w["train"]),
        "--eval-prompt-data",
        str(w["eval"]),
        "--eval-interval",
        str(steps),
        "--eval-n-samples",
        "2",
        "--apply-chat-template",
        "--rollout-engine",
        "cpu",
        "--rollout-batch-size",
        "8",
        "--n-samples-per-prompt",
        "2",
        "--max-response-len",
        "8",
        "--micro-batch-size",
        "4",
        "--lr",
        "3e-3",
        "--train-iters",
        str(steps),
        "--save",
        str(save),
        "--seed",
        "7",
        "--no-progress",
        "--tensor-model-parallel-size",
        "2",
        *extra,
    ]


def read_metrics(save: Path) -> list[dict]:
    return [json.loads(x) for x in (save / "metrics.jsonl").read_text().splitlines()]
