#!/usr/bin/env python
"""What the checkpoint checksums cost: a training save of a student (model + Adam state) with and
without them, and the verification a resume does, as ratios measured in one run.

    python benchmarks/bench_checkpoint_integrity.py [--hidden 1024] [--layers 8] [--ranks 1] [--json]

The save is ``save_training_checkpoint`` (dist checkpoints of the model and the optimizer, RNG,
trainer state); "without" is the same save with the checksum step replaced by a no-op. The
verification is ``verify_checksums`` over the saved directory (what ``--load`` does first).
Files are read back from the page cache right after they were written, as in a real save.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _run(hidden: int, layers: int, root: str, repeats: int):
    from megatron_gopd.models import CheckpointMeta, build_gpt
    from megatron_gopd.models.arch import ModelArch
    from megatron_gopd.models.checksums import verify_checksums
    from megatron_gopd.trainer import checkpointing
    from megatron_gopd.trainer.update import OptimConfig, build_optimizer

    arch = ModelArch(
        family="qwen3",
        hf_architecture="Qwen3ForCausalLM",
        vocab_size=32000,
        padded_vocab_size=32768,
        hidden_size=hidden,
        ffn_hidden_size=hidden * 3,
        num_layers=layers,
        num_attention_heads=hidden // 64,
        num_query_groups=max(1, hidden // 256),
        head_dim=64,
        norm_eps=1e-6,
        rope_theta=1e6,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        qkv_bias=False,
        qk_norm=True,
    )
    model = build_gpt(arch, spec="local", seed=1)
    opt = build_optimizer(model, OptimConfig(), train_iters=10, bf16=False)
    for p in model.parameters():  # one real Adam step, so that the state exists
        p.main_grad.normal_()
    opt.optimizer.step()
    meta = CheckpointMeta(arch=arch, hf_config={}, extra={})
    state = {"scheduler": opt.scheduler.state_dict(), "data": {}}

    def save(step: int) -> float:
        t0 = time.perf_counter()
        checkpointing.save_training_checkpoint(
            root, step, model=model, optimizer=opt.optimizer, meta=meta, trainer_state=state
        )
        return time.perf_counter() - t0

    real = checkpointing.write_checksums
    with_sums, without, verify = [], [], []
    for i in range(repeats):
        with_sums.append(save(2 * i + 1))
        checkpointing.write_checksums = lambda path: None
        without.append(save(2 * i + 2))
        checkpointing.write_checksums = real
        t0 = time.perf_counter()
        assert verify_checksums(checkpointing.iteration_dir(root, 2 * i + 1))
        verify.append(time.perf_counter() - t0)
    size = sum(p.stat().st_size for p in checkpointing.iteration_dir(root, 1).rglob("*"))
    return dict(
        parameters_m=sum(p.numel() for p in model.parameters()) / 1e6,
        checkpoint_gib=size / 2**30,
        save_s=min(without),
        save_with_checksums_s=min(with_sums),
        verify_s=min(verify),
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--ranks", type=int, default=1, help="gloo ranks (data parallel)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from megatron_gopd.parallel import ParallelConfig
    from megatron_gopd.testing import run_distributed

    root = tempfile.mkdtemp(prefix="gopd-bench-ckpt-")
    try:
        r = run_distributed(
            _run,
            args.ranks,
            args.hidden,
            args.layers,
            root,
            args.repeats,
            parallel=ParallelConfig(),
            timeout=3600,
        )[0]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    r["save_ratio"] = r["save_with_checksums_s"] / r["save_s"]
    r["verify_ratio_to_save"] = r["verify_s"] / r["save_s"]
    r["hash_gib_per_s"] = r["checkpoint_gib"] / max(r["verify_s"], 1e-9)
    if args.json:
        print(json.dumps(r))
    else:
        print(
            f"{r['parameters_m']:.0f}M parameters, checkpoint {r['checkpoint_gib']:.2f} GiB, "
            f"{args.ranks} rank(s): save {r['save_s']:.2f} s, with checksums "
            f"{r['save_with_checksums_s']:.2f} s ({r['save_ratio']:.2f}x); verify at load "
            f"{r['verify_s']:.2f} s ({r['verify_ratio_to_save']:.2f}x the save, "
            f"{r['hash_gib_per_s']:.2f} GiB/s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
