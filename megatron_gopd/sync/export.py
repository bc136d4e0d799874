"""Export a live (TP/PP-sharded) role to a Hugging Face directory, streaming one shard at a time.

Collective over all ranks (the gather of :func:`~megatron_gopd.sync.gather.iter_hf_tensors`); global
rank 0 writes. The directory appears atomically. Used to start rollout servers from the weights the
trainer holds (initial or resumed).
"""

from __future__ import annotations

from pathlib import Path

from megatron_gopd import parallel
from megatron_gopd.convert.hf_io import HFShardWriter, atomic_output_dir
from megatron_gopd.sync.gather import iter_hf_tensors

__all__ = ["export_role_to_hf"]


def export_role_to_hf(
    role,
    out: str | Path,
    *,
    tokenizer=None,
    hf_config: dict | None = None,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Write ``role``'s weights (HF names, unsharded) to ``out``, replacing an earlier export."""
    import shutil

    from megatron_gopd.sync.syncer import _hf_config_of

    out = Path(out)
    if not parallel.is_rank0():
        for _ in iter_hf_tensors(role):  # contribute shards; rank 0 writes
            pass
    else:
        if out.exists():
            shutil.rmtree(out)
        with atomic_output_dir(out) as tmp:
            writer = HFShardWriter(tmp, max_shard_bytes=max_shard_bytes)
            for name, t in iter_hf_tensors(role):
                writer.add(name, t)
            writer.close(hf_config or _hf_config_of(role))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
    parallel.barrier()
    return out
