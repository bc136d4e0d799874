"""Process groups: torch.distributed start-up, Megatron's model-parallel layout, and the one home
of the rank and collective helpers every other module uses.

All roles (student, teachers, reference) live in one job and share the same TP/PP/DP groups, so
this is done once per process, before any model is built. The helpers below work in a world of
one too (no torch.distributed at all): a single-process run needs no torchrun.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_gopd import platform
from megatron_gopd.flags import flag
from megatron_gopd.utils import GopdError

__all__ = [
    "ParallelConfig",
    "all_gather_object",
    "barrier",
    "broadcast_object",
    "destroy",
    "first_rank",
    "init_distributed",
    "initialize",
    "is_rank0",
    "raise_any_rank_error",
    "raise_rank0_error",
    "rank",
    "world_size",
]


@dataclass(frozen=True)
class ParallelConfig:
    """The model-parallel layout shared by every role of the job (Megatron-LM's flag names)."""

    FLAG_GROUP = "parallelism and batches (Megatron-LM names)"

    tensor_model_parallel_size: int = flag(
        1, help="tensor-parallel ranks per model (splits attention heads, MLP and vocabulary)"
    )
    pipeline_model_parallel_size: int = flag(1, help="pipeline stages per model (splits layers)")
    sequence_parallel: bool = flag(
        False,
        help="split activations between layers along the sequence over the TP ranks (all "
        "roles; needs TP > 1; sequences are padded to a multiple of TP)",
    )
    expert_model_parallel_size: int = flag(
        1,
        help="expert-parallel ranks of mixture-of-experts roles (an MoE teacher or reference): "
        "each holds num_experts / EP experts; dense roles ignore it",
    )

    @property
    def tp(self) -> int:
        return self.tensor_model_parallel_size

    @property
    def pp(self) -> int:
        return self.pipeline_model_parallel_size

    @property
    def ep(self) -> int:
        return self.expert_model_parallel_size

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1 or self.ep < 1:
            raise GopdError("tensor/pipeline/expert model parallel sizes must be >= 1")
        if self.sequence_parallel and self.tp == 1:
            raise GopdError("--sequence-parallel needs --tensor-model-parallel-size > 1")

    def validate(self, world_size: int) -> None:
        mp = self.tp * self.pp
        if world_size % mp:
            raise GopdError(
                f"{world_size} process(es) cannot hold TP*PP = {self.tp}*{self.pp} = {mp} model "
                f"shards: launch a multiple of {mp} ranks (torchrun --nproc-per-node ...)"
            )
        # megatron-core carves the expert-parallel groups out of the TP x DP ranks of each stage
        if world_size % (mp * self.ep):
            raise GopdError(
                f"{world_size} process(es) cannot hold TP*PP*EP = {self.tp}*{self.pp}*{self.ep} = "
                f"{mp * self.ep} expert shards: EP must divide the data-parallel size "
                f"{world_size // mp}"
            )


def init_distributed(backend: str | None = None, timeout_minutes: int = 30) -> None:
    """Start torch.distributed from torchrun's environment (or as a single process).

    A plain ``python -m ...`` run without torchrun variables becomes a world of one.
    """
    platform.setup()
    _checkpoint_queue_dies_with_us()
    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    if "MASTER_PORT" not in os.environ:
        from megatron_gopd.utils import free_port

        os.environ["MASTER_PORT"] = str(free_port())
    if platform.cuda_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(
        backend=backend or platform.default_backend(),
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )


def _checkpoint_queue_dies_with_us() -> None:
    """dist_checkpointing's writer queue lives in a Manager process (spawn; fork on CPU, see
    ``platform``), which outlives a trainer killed with SIGKILL: make it one that exits with us."""
    if not platform.cuda_available():
        return  # platform's CPU patch does it
    try:
        import megatron.core.dist_checkpointing.strategies.filesystem_async as fsa
    except ImportError:
        return
    from megatron_gopd.utils import parent_bound_manager

    def _queue(*_a, **_k):
        if getattr(fsa, "_results_queue", None) is None:
            fsa._results_queue = parent_bound_manager("spawn").Queue()
        return fsa._results_queue

    for name in ("_get_write_results_queue", "get_write_results_queue"):  # 0.16.x, 0.19.x
        if hasattr(fsa, name):
            setattr(fsa, name, _queue)


def initialize(cfg: ParallelConfig, seed: int = 1234) -> None:
    """Megatron model-parallel groups + its tensor-parallel RNG tracker."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    init_distributed()
    cfg.validate(dist.get_world_size())
    if ps.model_parallel_is_initialized():
        if (
            ps.get_tensor_model_parallel_world_size(),
            ps.get_pipeline_model_parallel_world_size(),
            ps.get_expert_model_parallel_world_size(),
        ) != (cfg.tp, cfg.pp, cfg.ep):
            raise RuntimeError("model parallel groups already initialized with other sizes")
        return
    ps.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tp,
        pipeline_model_parallel_size=cfg.pp,
        expert_model_parallel_size=cfg.ep,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------- rank helpers


def rank() -> int:
    """This process's global rank (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_rank0() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0, group=None) -> Any:
    """``obj`` from global rank ``src`` on every rank of ``group`` (pickled; small objects only)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def first_rank(group=None) -> int:
    """The global rank of the first rank of ``group`` (0 without torch.distributed)."""
    if not dist.is_initialized():
        return 0
    return dist.get_process_group_ranks(group or dist.group.WORLD)[0]


def raise_rank0_error(error: str | None) -> None:
    """Every rank raises rank 0's error (a :class:`GopdError` with its message), so that none is
    left waiting in a collective for a rank that gave up; a no-op when ``error`` is None there."""
    error = broadcast_object(error)
    if error is not None:
        raise GopdError(error)


def all_gather_object(obj: Any, group=None) -> list[Any]:
    """``obj`` of every rank of ``group``, in rank order (pickled; small objects only)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def raise_any_rank_error(error: str | None) -> None:
    """Collective: if any rank has an error, every rank raises the lowest rank's (a
    :class:`GopdError`), so that a problem one rank found (a file it read, a write that failed)
    stops all of them together instead of leaving the others in the next collective."""
    errors = [e for e in all_gather_object(error) if e is not None]
    if errors:
        raise GopdError(errors[0])
