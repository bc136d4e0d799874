"""Shared helpers for the trainer's end-to-end tests."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from megatron_gopd.testing import make_tiny_distillation_world

__all__ = ["make_world", "read_metrics", "torchrun_env", "torchrun_train", "train_args"]


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
        # seeded rollouts (the resume tests compare runs number for number) need it, as on SGLang
        "--sglang-enable-deterministic-inference",
        "--rollout-batch-size",
        "8",
        "--n-samples-per-prompt",
        "2",
        "--max-response-len",
        "8",
        "--micro-batch-size",
        "4",
        "--max-prompt-len",
        "32",
        "--max-tokens-per-microbatch",
        "64",  # packed micro-batches of a few samples each (packing is on by default)
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


REPO = Path(__file__).resolve().parents[1]


def torchrun_train(args: list[str], nproc: int = 2) -> list[str]:
    """A real ``torchrun ... -m megatron_gopd.train ARGS`` command line."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "megatron_gopd.train",
        *args,
    ]


def torchrun_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
