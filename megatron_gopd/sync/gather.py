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

:func:`iter_hf_buckets` groups the same stream into buckets whose boundaries *every* rank of the
job knows (they follow from the parameter plan, which every rank computes), and yields once per
bucket on every rank (the tensors on rank 0, None elsewhere): a transport can then run a
collective of its own per bucket, e.g. hand each bucket to the trainer rank that shares a GPU with
a colocated server.
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

__all__ = ["iter_hf_buckets", "iter_hf_tensors", "local_params"]

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
    walk = _Walk(role, dtype)
    for stage, i in walk.positions():
        yield from walk.step(stage, i)


@torch.no_grad()
def iter_hf_buckets(
    role, bucket_bytes: int, *, dtype: torch.dtype | None = None
) -> Iterator[tuple[list[tuple[str, torch.Tensor]] | None, bool]]:
    """``(bucket, last)`` per bucket of at most ``bucket_bytes`` (one parameter may exceed it),
    on every rank of the job at the same points: ``bucket`` is the HF-named tensors on global
    rank 0 and None elsewhere. Collective over all ranks, data-parallel replicas included."""
    from megatron.core import parallel_state as ps

    walk = _Walk(role, dtype)
    replica0 = ps.get_data_parallel_rank() == 0
    buckets: list[list[tuple[int, int]]] = []
    size = 0
    for stage, i in walk.positions():
        _, shape, pdtype = walk.plans[stage][i]
        itemsize = (dtype or pdtype).itemsize
        nbytes = int(torch.Size(shape).numel()) * itemsize
        if not buckets or (buckets[-1] and size + nbytes > bucket_bytes):
            buckets.append([])
            size = 0
        buckets[-1].append((stage, i))
        size += nbytes
    for k, positions in enumerate(buckets):
        named: list[tuple[str, torch.Tensor]] = []
        if replica0:
            for stage, i in positions:
                named.extend(walk.step(stage, i))
        yield (named if walk.rank == walk.sender else None), k == len(buckets) - 1


class _Walk:
    """The gather of :func:`iter_hf_tensors`, one plan position at a time. The plan (every
    stage's parameters: name, merged shape, dtype) is known to every rank."""

    def __init__(self, role, dtype: torch.dtype | None):
        from megatron.core import parallel_state as ps

        arch = role.arch
        self.arch, self.dtype = arch, dtype
        self.tp = ps.get_tensor_model_parallel_world_size()
        self.tp_group = ps.get_tensor_model_parallel_group()
        pp = self.pp = ps.get_pipeline_model_parallel_world_size()
        self.pp_rank = ps.get_pipeline_model_parallel_rank()
        self.leader = ps.get_tensor_model_parallel_rank() == 0
        self.rank = dist.get_rank()
        self.mine = [
            (n, p)
            for n, p in local_params(role)
            # a tied output layer on the last stage is a copy of the embedding: HF has none
            if not (arch.tie_word_embeddings and n == "output_layer.weight")
        ]
        # every stage leader learns every stage's plan: (name, merged shape, dtype) in order
        plan = [(n, _merged_shape(n, p.shape, self.tp), p.dtype) for n, p in self.mine]
        plans: list = [None] * pp
        leaders: list = [None] * pp
        if pp > 1:
            pp_group = ps.get_pipeline_model_parallel_group()
            dist.all_gather_object(plans, plan, group=pp_group)
            dist.all_gather_object(leaders, self.rank, group=pp_group)
        else:
            plans, leaders = [plan], [self.rank]
        self.plans, self.leaders = plans, leaders
        self.sender = 0  # global rank 0: dp 0, tp 0, pp 0

    def positions(self):
        for stage in range(self.pp):
            for i in range(len(self.plans[stage])):
                yield stage, i

    def step(self, stage: int, i: int) -> list[tuple[str, torch.Tensor]]:
        """Plan position ``(stage, i)``: collective within data-parallel replica 0; the HF
        tensors on global rank 0, ``[]`` elsewhere."""
        name, shape, pdtype = self.plans[stage][i]
        full = None
        if stage == self.pp_rank:
            p = self.mine[i][1].detach()
            if self.tp > 1 and tp_partition_dim(name) is not None:
                shards = [torch.empty_like(p) for _ in range(self.tp)]
                dist.all_gather(shards, p.contiguous(), group=self.tp_group)
                full = merge_tp_shards(name, shards)
            else:
                full = p
        if not self.leader:
            return []
        if stage != 0:
            if self.rank == self.leaders[stage]:
                dist.send(full.contiguous(), dst=self.sender)
                return []
            if self.rank != self.sender:
                return []
            full = torch.empty(shape, dtype=pdtype, device=_device())
            dist.recv(full, src=self.leaders[stage])
        if self.rank != self.sender:
            return []
        dtype = self.dtype
        return [
            (hf_name, (t if dtype is None else t.to(dtype)).contiguous())
            for hf_name, t in megatron_param_to_hf(self.arch, name, full)
        ]


def _merged_shape(name: str, shape: torch.Size, tp: int) -> tuple[int, ...]:
    dim = tp_partition_dim(name) if tp > 1 else None
    s = list(shape)
    if dim is not None:
        s[dim] *= tp
    return tuple(s)


def _device() -> torch.device:
    from megatron_gopd import platform

    return platform.device()
