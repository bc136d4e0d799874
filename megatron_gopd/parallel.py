"""Process groups: torch.distributed start-up and Megatron's model-parallel layout.

All roles (student, teachers, reference) live in one job and share the same TP/PP/DP groups, so
this is done once per process, before any model is built.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_gopd import platform
from megatron_gopd.utils import GopdError

__all__ = ["ParallelConfig", "destroy", "init_distributed", "initialize"]


@dataclass(frozen=True)
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False

    @property
    def tp(self) -> int:
        return self.tensor_model_parallel_size

    @property
    def pp(self) -> int:
        return self.pipeline_model_parallel_size

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1:
            raise GopdError("tensor/pipeline model parallel sizes must be >= 1")
        if self.sequence_parallel and self.tp == 1:
            raise GopdError("--sequence-parallel needs --tensor-model-parallel-size > 1")

    def validate(self, world_size: int) -> None:
        mp = self.tp * self.pp
        if world_size % mp:
            raise GopdError(
                f"{world_size} process(es) cannot hold TP*PP = {self.tp}*{self.pp} = {mp} model "
                f"shards: launch a multiple of {mp} ranks (torchrun --nproc-per-node ...)"
            )


def init_distributed(backend: str | None = None, timeout_minutes: int = 30) -> None:
    """Start torch.distributed from torchrun's environment (or as a single process).

    A plain ``python -m ...`` run without torchrun variables becomes a world of one.
    """
    platform.setup()
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
        ) != (cfg.tp, cfg.pp):
            raise RuntimeError("model parallel groups already initialized with other sizes")
        return
    ps.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tp,
        pipeline_model_parallel_size=cfg.pp,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
