"""megatron_gopd: Generalized On-Policy Distillation (G-OPD / ExOPD) on Megatron-Core."""

import importlib.util as _ilu
import sys as _sys
import types as _types

__version__ = "0.1.0.dev0"


def _install_triton_placeholder() -> None:
    """megatron-core 0.19.x imports triton unconditionally in one MoE module reached from the
    pipeline schedules (``transformer/moe/ops/paged_stash.py``). On a CPU machine without the
    ~1 GB triton wheel we register a placeholder for that module only; its kernels are CUDA-only
    MoE code that dense models never launch. No-op when triton is installed or megatron has no
    such module (0.16.x)."""
    name = "megatron.core.transformer.moe.ops.paged_stash"
    if name in _sys.modules or _ilu.find_spec("triton") is not None:
        return
    # find_spec on a megatron submodule would import megatron itself (~9 s): read the version
    from importlib import metadata

    try:
        major, minor = (int(x) for x in metadata.version("megatron-core").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return
    if (major, minor) < (0, 19):
        return

    def _unavailable(*_a, **_k):
        raise RuntimeError("triton is not installed: MoE paged stash is unavailable")

    mod = _types.ModuleType(name)
    mod.GLOBAL_BLOCK_SIZE = 1024
    mod.paged_stash_copy_kernel = mod.paged_stash_pop_kernel = _unavailable
    _sys.modules[name] = mod


_install_triton_placeholder()
