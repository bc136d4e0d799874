"""A process group with members outside the trainer's world: trainer rank 0 + the rollout servers.

``torch.distributed`` has no public API for a group that is not a subgroup of the default world,
so this follows SGLang's ``init_custom_process_group`` (``srt/utils/common.py``), which the server
side runs for ``/init_weights_update_group``: rendezvous on a TCP store, prefix the store with the
group name, build the backend with torch's group helper, and map group ranks to themselves so that
``broadcast(src=0, group=pg)`` means group rank 0. Used by the trainer (rank 0 of the group) and by
our CPU server (ranks ``rank_offset + tp_rank``), exactly as SGLang's workers do.
"""

from __future__ import annotations

from datetime import timedelta

__all__ = ["init_custom_process_group"]


def init_custom_process_group(
    *,
    backend: str,
    init_method: str,
    world_size: int,
    rank: int,
    group_name: str,
    timeout: timedelta | None = None,
):
    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
        default_pg_timeout,
        rendezvous,
    )

    timeout = timeout or default_pg_timeout
    store, rank, world_size = next(rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    pg, _ = _new_process_group_helper(
        world_size,
        rank,
        [],
        Backend(backend),
        store,
        group_name=group_name,
        backend_options=None,
        timeout=timeout,
    )
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg
