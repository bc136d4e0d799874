"""Full, HF-named tensors of a (TP/PP-sharded) Megatron role, streamed to one rank.

:func:`iter_hf_tensors` is collective over all ranks of the job and yields, on global rank 0 only,
``(hf_name, tensor)`` for every weight of the model in HF's unsharded layout:

1. each pipeline stage walks its parameters in a fixed order (names with *global* layer indices);
2. the TP group all-gathers each TP-partitioned parameter and merges the shards with
   :func:`~megatron_gopd.convert.mapping.merge_tp_shards` (gate/up de-interleaved);
3. a stage other than the first sends the merged tensor to global rank 0 (point-to-point);
4. rank 0 maps it with :func:`~megatron_gopd.convert.mapping.megatron_param_to_hf` (q/k/v and
   gate/up split, vocabulary padding stripped; a tied output layer yields nothing, so the
   embedding is sent once).

Only data-parallel replica 0 does the work; other replicas return at once. Peak extra memory on
rank 0 is one full parameter plus what the caller buffers (one bucket).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
import torch.distributed as dist

from megatron_gopd.convert.mapping import (
    canonical_name,
    megatron_param_to_hf,
    merge_tp_shards,
    tp_partition_dim,
)
from megatron_gopd.models.build import unwrap_model

__all__ = ["iter_hf_tensors", "local_params"]

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def local_params(role) -> list[tuple[str, torch.nn.Parameter]]:
    """This stage's parameters as (canonical megatron name with global layer index, param)."""
    out = []
    for chunk in role.chunks:
        gpt = unwrap_model(chunk)
        layers = gpt.decoder.layers
        for name, p in gpt.named_parameters():
            name = canonical_name(name)
            m = _LAYER.match(name)
            if m:
                global_idx = layers[int(m.group(1))].layer_number - 1
                name = f"decoder.layers.{global_idx}.{m.group(2)}"
            out.append((name, p))
    return out


@torch.no_grad()
def iter_hf_tensors(
    role, *, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    from megatron.core import parallel_state as ps

    if ps.get_data_parallel_rank() != 0:
        return
    arch = role.arch
    tp = ps.get_tensor_model_parallel_world_size()
    tp_group = ps.get_tensor_model_parallel_group()
    pp = ps.get_pipeline_model_parallel_world_size()
    pp_rank = ps.get_pipeline_model_parallel_rank()
    leader = ps.get_tensor_model_parallel_rank() == 0
    rank = dist.get_rank()

    mine = [
        (n, p)
        for n, p in local_params(role)
        # a tied output layer on the last stage is a copy of the embedding: HF has no such tensor
        if not (arch.tie_word_embeddings and n == "output_layer.weight")
    ]
    # every stage leader learns every stage's plan: (name, merged shape, dtype) in stream order
    plan = [(n, _merged_shape(n, p.shape, tp), p.dtype) for n, p in mine]
    plans: list = [None] * pp
    leaders: list = [None] * pp
    if pp > 1:
        pp_group = ps.get_pipeline_model_parallel_group()
        dist.all_gather_object(plans, plan, group=pp_group)
        dist.all_gather_object(leaders, rank, group=pp_group)
    else:
        plans, leaders = [plan], [rank]
    sender = leaders[0]  # global rank 0 (dp 0, tp 0, pp 0)

    for stage in range(pp):
        for i, (name, shape, pdtype) in enumerate(plans[stage]):
            full = None
            if stage == pp_rank:
                p = mine[i][1].detach()
                if tp > 1 and tp_partition_dim(name) is not None:
                    shards = [torch.empty_like(p) for _ in range(tp)]
                    dist.all_gather(shards, p.contiguous(), group=tp_group)
                    full = merge_tp_shards(name, shards)
                else:
                    full = p
            if not leader:
                continue
            if stage != 0:
                if rank == leaders[stage]:
                    dist.send(full.contiguous(), dst=sender)
                    continue
                if rank != sender:
                    continue
                full = torch.empty(shape, dtype=pdtype, device=_device())
                dist.recv(full, src=leaders[stage])
            if rank != sender:
                continue
            for hf_name, t in megatron_param_to_hf(arch, name, full):
                yield hf_name, (t if dtype is None else t.to(dtype)).contiguous()


def _merged_shape(name: str, shape: torch.Size, tp: int) -> tuple[int, ...]:
    dim = tp_partition_dim(name) if tp > 1 else None
    s = list(shape)
    if dim is not None:
        s[dim] *= tp
    return tuple(s)


def _device() -> torch.device:
    from megatron_gopd import platform

    return platform.device()
