"""Give the GPU to colocated rollout servers while they sample, and take it back bit for bit.

With ``--rollout-colocate`` the SGLang servers share the training GPUs. SGLang releases its own
memory while the trainer works (``/release_memory_occupation``); this module does the converse
around each rollout, as slime's ``--offload-train`` does: every device storage the trainer holds
(the student's parameters and gradient buffers, Megatron's DDP buffers, the optimizer's fp32 main
parameters and Adam moments, the frozen roles' weights when they live on the device) is copied to
(pinned) host memory and its device storage resized to zero, then PyTorch's cache is released.
Onload resizes each storage back and copies the bytes in: the same storages, so every view
(parameters inside DDP's contiguous buffer, ``main_grad``, optimizer state) stays valid, and the
values are bit-identical.

Working at the storage level is what makes it complete and exact: a tensor-level move
(``p.data = p.data.cpu()``) would break the views Megatron's DDP and distributed optimizer keep
into their buffers, and would miss the tensors nobody lists.

On a machine without CUDA the same round trip runs between two host buffers: nothing is gained,
but the CPU tests exercise exactly the code a GPU runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from megatron_gopd import platform
from megatron_gopd.utils import get_logger

__all__ = ["TrainOffloader", "trainer_tensors"]

log = get_logger(__name__)


def trainer_tensors(student, optimizer=None, frozen: Iterable = ()) -> Iterator[torch.Tensor]:
    """Every tensor the trainer keeps between steps: the student's chunks (parameters, their
    ``main_grad`` and ``grad``, buffers), Megatron DDP's parameter and gradient buffers, the
    optimizer's parameter groups and state (through a ChainedOptimizer too), and the frozen
    roles' parameters and buffers. Duplicates (views of one storage) are fine."""
    ddp = getattr(optimizer, "ddp", None)
    megatron_opt = getattr(optimizer, "optimizer", None)
    chunks = list(getattr(student, "chunks", [student]))
    if ddp is not None:
        chunks.append(ddp)
        for buf in [*getattr(ddp, "buffers", []), *getattr(ddp, "expert_parallel_buffers", [])]:
            for name in ("param_data", "grad_data"):
                t = getattr(buf, name, None)
                if isinstance(t, torch.Tensor):
                    yield t
    for module in chunks:
        for p in module.parameters():
            yield p
            for extra in (getattr(p, "main_grad", None), p.grad):
                if isinstance(extra, torch.Tensor):
                    yield extra
        for b in torch.nn.Module.buffers(module):
            if b is not None:
                yield b
    for opt in getattr(megatron_opt, "chained_optimizers", None) or (
        [megatron_opt] if megatron_opt is not None else []
    ):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                yield p
                if p.grad is not None:
                    yield p.grad
        for state in inner.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    yield v
    for role in frozen:
        for module in role.chunks:
            yield from module.parameters()
            yield from (b for b in module.buffers() if b is not None)


class TrainOffloader:
    """Offload / onload the trainer's device memory; see the module docstring.

    ``student``: the student :class:`~megatron_gopd.models.build.RoleModel`; ``optimizer``: the
    trainer's :class:`~megatron_gopd.trainer.update.Optimizer` (DDP + Megatron optimizer);
    ``frozen``: teachers and references. Collects the storages at each offload, so roles that
    move their own weights (``--offload-frozen``) are seen where they are at that moment.
    """

    def __init__(self, student, optimizer=None, frozen: Iterable = ()):
        self.student, self.optimizer, self.frozen = student, optimizer, list(frozen)
        self._saved: list[tuple[torch.UntypedStorage, torch.Tensor, int]] = []
        # host buffers kept between steps (pinning memory is slow): size -> free buffers
        self._pool: dict[int, list[torch.Tensor]] = {}

    @property
    def offloaded(self) -> bool:
        return bool(self._saved)

    def _storages(self) -> list[torch.UntypedStorage]:
        device_type = platform.device().type
        seen: dict[int, torch.UntypedStorage] = {}
        tensors = trainer_tensors(self.student, self.optimizer, self.frozen)
        for t in tensors:
            if t.device.type != device_type:
                continue  # already on the host (a frozen role between its passes)
            s = t.untyped_storage()
            if s.nbytes() and s.data_ptr() not in seen:
                seen[s.data_ptr()] = s
        return list(seen.values())

    @torch.no_grad()
    def offload(self) -> int:
        """Device -> host for every trainer storage; returns the bytes freed on the device."""
        if self._saved:
            return 0
        cuda = platform.cuda_available()
        saved, total = [], 0
        for s in self._storages():
            n = s.nbytes()
            free = self._pool.get(n)
            host = free.pop() if free else torch.empty(n, dtype=torch.uint8, pin_memory=cuda)
            host.untyped_storage().copy_(s, non_blocking=cuda)
            saved.append((s, host, n))
            total += n
        if cuda:
            torch.cuda.synchronize()
        for s, _, _ in saved:
            s.resize_(0)
        self._saved = saved
        if cuda:
            torch.cuda.empty_cache()
        log.debug("offloaded %d storages, %.1f MiB", len(saved), total / 2**20)
        return total

    @torch.no_grad()
    def onload(self) -> None:
        """Host -> device, into the same storages, bit for bit."""
        if not self._saved:
            return
        cuda = platform.cuda_available()
        for s, host, n in self._saved:
            s.resize_(n)
            s.copy_(host.untyped_storage(), non_blocking=cuda)
        if cuda:
            torch.cuda.synchronize()
        for _, host, n in self._saved:
            self._pool.setdefault(n, []).append(host)
        self._saved = []

    def resident_bytes(self) -> int:
        """Bytes of trainer storages on the device now (0 while offloaded)."""
        return sum(s.nbytes() for s in self._storages())
