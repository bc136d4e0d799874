"""megatron_gopd: Generalized On-Policy Distillation (G-OPD / ExOPD) on Megatron-Core."""

import importlib.util as _ilu
import sys as _sys

__version__ = "0.1.0.dev0"


class _PagedStashPlaceholder:
    """megatron-core 0.19.x imports triton unconditionally in one MoE module reached from the
    pipeline schedules (``transformer/moe/ops/paged_stash.py``). On a CPU machine without the
    ~1 GB triton wheel we serve a placeholder for that module only; its kernels are CUDA-only
    MoE code that dense models never launch. An import hook (not an eager check) so that
    ``import megatron_gopd`` does not import megatron-core (~9 s): processes that never touch
    megatron, such as the CPU rollout server, start fast. Inert when triton is installed and on
    megatron-core 0.16.x, which has no such module."""

    NAME = "megatron.core.transformer.moe.ops.paged_stash"

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.NAME or _ilu.find_spec("triton") is not None:
            return None
        import importlib.machinery

        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        return None

    def exec_module(self, mod):
        def _unavailable(*_a, **_k):
            raise RuntimeError("triton is not installed: MoE paged stash is unavailable")

        mod.GLOBAL_BLOCK_SIZE = 1024
        mod.paged_stash_copy_kernel = mod.paged_stash_pop_kernel = _unavailable


if not any(isinstance(f, _PagedStashPlaceholder) for f in _sys.meta_path):
    _sys.meta_path.insert(0, _PagedStashPlaceholder())
