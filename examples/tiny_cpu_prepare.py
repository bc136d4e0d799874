#!/usr/bin/env python
"""Make the inputs of the tiny CPU recipes.

    python examples/tiny_cpu_prepare.py DIR

tiny-cpu-score.sh: DIR/hf (a tiny random Qwen3), DIR/mcore (converted), DIR/tokens.jsonl.
tiny-cpu-train.sh: DIR/student, DIR/teacher, DIR/teacher_base (converted checkpoints of tiny random
models sharing a character tokenizer), DIR/train.jsonl and DIR/eval.jsonl (prompts).
"""

import json
import sys
from pathlib import Path

SEQUENCE_LENGTHS = (5, 17, 33)


def prepare(out_dir: str) -> None:
    """Everything in this process: every conversion here, none in a forked rank (a fork of a
    process that has run a gloo group hangs)."""
    import torch

    from megatron_gopd.convert.checkpoint import convert_hf_to_megatron
    from megatron_gopd.testing import TINY_DIMS, make_tiny_distillation_world, make_tiny_hf_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    make_tiny_hf_model(out / "hf", "qwen3")
    convert_hf_to_megatron(out / "hf", out / "mcore")
    g = torch.Generator().manual_seed(0)
    with (out / "tokens.jsonl").open("w") as f:
        for n in SEQUENCE_LENGTHS:
            ids = torch.randint(0, TINY_DIMS["vocab_size"], (n,), generator=g).tolist()
            f.write(json.dumps({"input_ids": ids, "prompt_len": 2}) + "\n")
    make_tiny_distillation_world(out, fork=False)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    prepare(sys.argv[1])
    print(f"wrote the tiny models, checkpoints and data under {sys.argv[1]}")
