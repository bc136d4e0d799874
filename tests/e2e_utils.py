"""Shared helpers for the trainer's end-to-end tests."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_gopd.testing import make_tiny_distillation_world

__all__ = ["make_world", "read_metrics", "train_args"]


def make_world(root: Path) -> dict[str, Path]:
    return make_tiny_distillation_world(root)


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
        "--eval-grader",
        "exact",
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
