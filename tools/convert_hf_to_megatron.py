#!/usr/bin/env python
"""Convert a Hugging Face Llama / Qwen2 / Qwen3 checkpoint into a megatron_gopd checkpoint.

    python tools/convert_hf_to_megatron.py --hf-dir Qwen3-4B --out ckpt/qwen3-4b

The output is a megatron-core dist checkpoint (torch_dist) that loads at any TP/PP, plus
gopd_model.json (the architecture, so no model flags are needed later) and the tokenizer files.
Nothing is left behind on failure: the output appears only when the conversion succeeded.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_gopd.utils import check_writable, cli_errors

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-dir", required=True, help="HF model directory (config.json + weights)")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        help="store weights in this dtype (default: the HF config's torch_dtype)",
    )
    p.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=1024,
        help="pad the vocabulary to a multiple of this (default 1024: loads at TP<=8)",
    )
    return p


@cli_errors
def main(argv=None):
    args = build_parser().parse_args(argv)
    check_writable(args.out, "--out", directory=True)  # before the conversion, not after it
    import torch

    from megatron_gopd.convert.checkpoint import convert_hf_to_megatron

    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    arch = convert_hf_to_megatron(
        args.hf_dir, args.out, dtype=dtype, vocab_divisor=args.make_vocab_size_divisible_by
    )
    print(f"wrote {args.out}: {arch.describe()}, {arch.num_parameters() / 1e6:.1f}M parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
