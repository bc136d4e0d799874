#!/usr/bin/env python
"""Export a megatron_gopd checkpoint (converted or trained) to a Hugging Face directory.

    python tools/convert_megatron_to_hf.py --load runs/exopd/ --out hf/exopd-step200

``--load`` takes a checkpoint directory or a trainer save directory (its latest iteration).
The output (safetensors shards + config.json + tokenizer) loads with transformers'
``AutoModelForCausalLM.from_pretrained``; it appears only when the export succeeded.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_gopd.utils import check_writable, cli_errors

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--load", required=True, help="megatron_gopd checkpoint or trainer save directory"
    )
    p.add_argument("--out", required=True, help="output HF directory (must not exist or be empty)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast weights (default: as stored)")
    p.add_argument("--max-shard-size-gb", type=float, default=5.0)
    return p


@cli_errors
def main(argv=None):
    args = build_parser().parse_args(argv)
    check_writable(args.out, "--out", directory=True)  # before the conversion, not after it
    import torch

    from megatron_gopd.convert.checkpoint import convert_megatron_to_hf

    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    out = convert_megatron_to_hf(
        args.load, args.out, dtype=dtype, max_shard_bytes=int(args.max_shard_size_gb * 1024**3)
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
