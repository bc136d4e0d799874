"""The one place that adapts megatron-core to a CPU-only torch build.

megatron-core has no CPU code path: it allocates on ``torch.cuda.current_device()`` (~180 call
sites), hard-codes ``device="cuda"`` in the pipeline schedules, optimizer and grad clipping, checks
``param.type() == 'torch.cuda.FloatTensor'`` in the optimizer, calls ``torch.cuda.synchronize``,
keeps its tensor-parallel RNG states on the CUDA generator, and (0.19.x) touches CUDA streams.
Everything below redirects those to the CPU. It is what our CI and the tiny demo run on; on a
machine where CUDA is available :func:`setup` does nothing at all (tested in
``tests/test_platform.py``).

Each patch is one named group so that a reader can see what needs what:

========== ===============================================================================
group      why
========== ===============================================================================
device     ``torch.cuda.current_device()`` returns the CPU device (megatron allocations).
mode       a TorchFunctionMode rewrites ``device="cuda[:N]"`` in factory calls and
           ``Tensor.to("cuda")``; ``Tensor.cuda()`` is the identity.
type       ``Tensor.type()`` of a CPU tensor reports the ``torch.cuda.*`` name that the
           optimizer's dtype checks expect.
sync       ``synchronize`` / ``empty_cache`` / memory counters are no-ops.
rng        the tensor-parallel RNG tracker forks the CPU generator instead of CUDA's.
streams    dummy ``torch.cuda.Stream`` / ``current_stream`` (0.19.x DDP grad sync).
ckptq      dist_checkpointing's async writer queue uses a fork Manager instead of spawn
           (spawn re-imports ``__main__``: 6-15 s per first save on 2 cores), one that
           exits with the trainer (a plain Manager outlives a SIGKILLed parent).
recompute  activation recomputation re-runs layers inside ``backward``, where the ``mode``
           group's TorchFunctionMode is not active (autograd pops it), so the recomputed
           forward runs under it explicitly; and 0.16/0.19's ``CheckpointWithoutOutput`` takes
           ``fp8=False`` for fp8 on and reaches Transformer Engine's fp8 state: off without TE.
moe        the MoE token dispatcher on the CPU: split sizes as numpy (``all_to_all_single``
           rejects CPU tensors there), stream events that exist, and (0.16.x) the fused-kernel
           names its router references even without Transformer Engine.
========== ===============================================================================

The triton placeholder for megatron-core 0.19.x on machines without triton lives in
``megatron_gopd/__init__.py`` because it must run before megatron is imported.
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch

__all__ = ["cuda_available", "is_patched", "setup", "transformer_config_overrides"]

_CPU = torch.device("cpu")
_lock = threading.Lock()
_patched: set[str] = set()

ALL_GROUPS = ("device", "mode", "type", "sync", "rng", "streams", "ckptq", "moe", "recompute")


def cuda_available() -> bool:
    """True when torch can use a CUDA device (then nothing here is applied)."""
    return torch.cuda.is_available()


def is_patched() -> bool:
    return bool(_patched)


def _is_cuda_device(d) -> bool:
    if isinstance(d, str):
        return d.startswith("cuda")
    if isinstance(d, torch.device):
        return d.type == "cuda"
    return False


class _CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """Sends every ``device="cuda..."`` factory call and ``.to("cuda")`` to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dev = kwargs.get("device")
        if dev is not None and _is_cuda_device(dev):
            kwargs = dict(kwargs, device=_CPU)
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


class _DummyEvent:
    def record(self, *a, **k):
        pass

    def wait(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


class _DummyStream:
    def __init__(self, *a, **k):
        pass

    def wait_stream(self, *a, **k):
        pass

    def wait_event(self, *a, **k):
        pass

    def record_event(self, *a, **k):
        return _DummyEvent()  # the MoE all-to-all dispatcher synchronizes on it

    def synchronize(self):
        pass

    def query(self):
        return True


def _patch_device():
    torch.cuda.current_device = lambda: _CPU


def _patch_mode():
    # Stays active for the life of the process, like torch.set_default_device.
    _CudaToCpuMode().__enter__()
    torch.Tensor.cuda = lambda self, *a, **k: self


def _patch_type():
    orig_type = torch.Tensor.type

    def _type(self, dtype=None, non_blocking=False, **kw):
        if dtype is None and not kw:
            name = orig_type(self)
            if self.device.type == "cpu" and not name.startswith("torch.cuda."):
                name = name.replace("torch.", "torch.cuda.", 1)
            return name
        return orig_type(self, dtype, non_blocking, **kw)

    torch.Tensor.type = _type


def _patch_sync():
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda *a, **k: None
    for name in (
        "memory_allocated",
        "max_memory_allocated",
        "memory_reserved",
        "max_memory_reserved",
    ):
        setattr(torch.cuda, name, lambda *a, **k: 0)
    torch.cuda.reset_peak_memory_stats = lambda *a, **k: None


def _patch_rng():
    import megatron.core.tensor_parallel.random as mrandom

    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.manual_seed_all = lambda seed: None
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


def _patch_streams():
    torch.cuda.current_stream = lambda *a, **k: _DummyStream()
    torch.cuda.default_stream = lambda *a, **k: _DummyStream()
    torch.cuda.Stream = _DummyStream
    torch.cuda.stream = lambda s: contextlib.nullcontext()


def _patch_ckptq():
    import megatron.core.dist_checkpointing.strategies.filesystem_async as fsa

    from megatron_gopd.utils import parent_bound_manager

    def _queue(*_a, **_k):
        if getattr(fsa, "_results_queue", None) is None:
            fsa._results_queue = parent_bound_manager("fork").Queue()
        return fsa._results_queue

    if hasattr(fsa, "_get_write_results_queue"):  # 0.16.x
        fsa._get_write_results_queue = _queue
    if hasattr(fsa, "get_write_results_queue"):  # 0.19.x
        fsa.get_write_results_queue = _queue


def _patch_moe():
    import megatron.core.transformer.moe.moe_utils as mu
    import megatron.core.transformer.moe.token_dispatcher as td

    if not getattr(mu, "HAVE_TE", True):
        # 0.16.x references these names in the router whether or not TE imported them
        for name in (
            "fused_compute_score_for_moe_aux_loss",
            "fused_moe_aux_loss",
            "fused_permute",
            "fused_permute_with_probs",
            "fused_sort_chunks_by_index",
            "fused_sort_chunks_by_index_with_probs",
            "fused_topk_with_score_function",
            "fused_unpermute",
            "te_general_gemm",
        ):
            if not hasattr(mu, name):
                setattr(mu, name, None)
    original = mu.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        # on CUDA the split sizes are copied to the host; here they are there already, and
        # all_to_all_single wants them as a list / array, not a tensor
        if torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy() if as_numpy else tensor
        return original(tensor, as_numpy, record_stream)

    mu.maybe_move_tensor_to_cpu = td.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _patch_recompute():
    import megatron.core.tensor_parallel.random as tpr

    for cls in (tpr.CheckpointFunction, getattr(tpr, "CheckpointWithoutOutputFunction", None)):
        if cls is None:
            continue
        original = cls.backward

        def backward(ctx, *grads, _original=original):
            with _CudaToCpuMode():
                return _original(ctx, *grads)

        cls.backward = staticmethod(backward)
    holder = getattr(tpr, "CheckpointWithoutOutput", None)
    if holder is not None:
        original_init = holder.__init__

        def __init__(self, fp8=False, *args, _original=original_init, **kwargs):
            _original(self, fp8, *args, **kwargs)
            self.fp8 = False  # no Transformer Engine without CUDA

        holder.__init__ = __init__


_PATCHES = {
    "device": _patch_device,
    "mode": _patch_mode,
    "type": _patch_type,
    "sync": _patch_sync,
    "rng": _patch_rng,
    "streams": _patch_streams,
    "ckptq": _patch_ckptq,
    "recompute": _patch_recompute,
    "moe": _patch_moe,
}


def setup(groups: tuple[str, ...] = ALL_GROUPS) -> bool:
    """Apply the CPU adaptations once per process. Returns True if anything is patched.

    Inert when CUDA is available, and when ``MEGATRON_GOPD_NO_CPU_SHIM=1`` (to debug the shim
    itself). Idempotent and thread-safe.
    """
    if cuda_available() or os.environ.get("MEGATRON_GOPD_NO_CPU_SHIM") == "1":
        return False
    unknown = set(groups) - set(_PATCHES)
    if unknown:
        raise ValueError(f"unknown platform patch group(s): {sorted(unknown)}")
    with _lock:
        for g in groups:
            if g not in _patched:
                _PATCHES[g]()
                _patched.add(g)
    return bool(_patched)


def transformer_config_overrides() -> dict:
    """TransformerConfig fields that must differ on a CPU-only build (empty with CUDA).

    The fused kernels are CUDA/TE/apex code, and the batched p2p path calls
    ``torch.cuda.synchronize`` after every exchange.
    """
    if cuda_available():
        return {}
    return dict(
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        batch_p2p_comm=False,
        batch_p2p_sync=False,
    )


def default_backend() -> str:
    """torch.distributed backend for this machine."""
    return "nccl" if cuda_available() else "gloo"


def device() -> torch.device:
    """Where model tensors live: the local GPU, or the CPU."""
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return _CPU
