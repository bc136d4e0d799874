"""The payload of ``/update_weights_from_tensor``: named tensors pickled the way SGLang reads them.

SGLang (0.5.23, ``MultiprocessingSerializer`` + ``SafeUnpickler`` in ``srt/utils/common.py``)
takes ``serialized_named_tensors``: one base64 string per server TP rank, each a pickle of either
``[(hf_name, tensor), ...]`` (``load_format=None``) or, with ``load_format="flattened_bucket"``,
``{"flattened_tensor": uint8 tensor, "metadata": [FlattenedTensorMetadata, ...]}``.

* CUDA tensors travel as CUDA IPC handles: ``ForkingPickler`` with torch's reductions (SGLang's
  own serializer when it is importable, which also patches the device mapping). The sender must
  keep the tensors alive until the server answered.
* CPU tensors travel **by value** (a plain pickle, whose storages SGLang's ``SafeUnpickler``
  rebuilds through its safe ``torch.load``), or, for the colocated path, as a **CPU stand-in for a
  CUDA IPC handle** (:class:`CpuIpcHandle`): the bytes in a POSIX shared-memory segment, named
  with the device they were made on (:func:`cpu_device_uuid`, the stand-in for the GPU UUID that
  SGLang's ``monkey_patch_torch_reductions`` puts into CUDA handles). Like a CUDA handle it opens
  only on its own node, and our CPU server opens it only on the TP rank's own device, so a
  handle sent to the wrong server fails here as it fails on GPUs. (``ForkingPickler`` would pass
  CPU storages as file descriptors through ``multiprocessing.resource_sharer``, which only works
  between processes of one multiprocessing family.)

:func:`deserialize_named_tensors` is the receiving side for our CPU server, with the same
allow-list idea as SGLang's unpickler: torch's rebuild functions and plain containers only.
"""

from __future__ import annotations

import base64
import io
import pickle
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "CpuIpcHandle",
    "FlattenedTensorMetadata",
    "cpu_device_uuid",
    "deserialize_named_tensors",
    "flatten_bucket",
    "serialize_named_tensors",
    "sglang_serializer",
    "share_cpu_tensor",
]


def cpu_node_id() -> str:
    """This machine as a CUDA IPC handle would know it: the host and its network namespace (the
    test cluster's emulated nodes are namespaces of one host); ``GOPD_CPU_NODE_ID`` overrides it
    (tests that pose as several nodes in one namespace)."""
    import os
    import socket

    override = os.environ.get("GOPD_CPU_NODE_ID")
    if override:
        return override
    try:
        ns = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        ns = 0
    return f"{socket.gethostname()}:{ns}"


def cpu_device_uuid(index: int) -> str:
    """The CPU stand-in for ``torch.cuda.get_device_properties(index).uuid``."""
    return f"CPU-{cpu_node_id()}-{int(index)}"


@dataclass
class CpuIpcHandle:
    """A CPU tensor shared like a CUDA IPC handle: a shared-memory segment and the device (node
    and GPU index) it belongs to. The producer keeps the segment until the consumer answered
    (:func:`share_cpu_tensor` returns the closer), as CUDA IPC needs the producer's tensor alive."""

    device_uuid: str
    shm_name: str
    nbytes: int
    dtype: torch.dtype
    shape: tuple

    def open(self, expected_device_uuid: str | None) -> torch.Tensor:
        if expected_device_uuid is not None and self.device_uuid != expected_device_uuid:
            node = self.device_uuid.rsplit("-", 1)[0]
            if node != expected_device_uuid.rsplit("-", 1)[0]:
                # sglang.srt.utils.patch_torch._device_from_maybe_uuid's error
                raise RuntimeError(
                    f"Invalid device_uuid={self.device_uuid}: a handle made on another node"
                )
            raise RuntimeError(
                f"a handle made on {self.device_uuid} reached the TP rank on "
                f"{expected_device_uuid}: each TP rank must read the handle of its own GPU"
            )
        with open(_shm_path(self.shm_name), "rb") as f:
            data = bytearray(f.read(self.nbytes))
        if len(data) != self.nbytes:
            raise RuntimeError(f"shared tensor {self.shm_name} is truncated")
        buf = (
            torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        )
        return buf.view(self.dtype).reshape(self.shape)


def _shm_path(name: str) -> str:
    import os
    import tempfile

    root = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    return os.path.join(root, name)


def share_cpu_tensor(t: torch.Tensor, device_index: int):
    """``(CpuIpcHandle, close)``: ``t``'s bytes in a new shared-memory file; ``close()`` removes
    it (the stand-in for ``torch.cuda.ipc_collect()`` once the consumer is done)."""
    import os
    import uuid

    data = t.detach().contiguous().view(torch.uint8).flatten().numpy().tobytes()
    name = f"gopd-ipc-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    path = _shm_path(name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    handle = CpuIpcHandle(cpu_device_uuid(device_index), name, len(data), t.dtype, tuple(t.shape))

    def close():
        import contextlib

        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    return handle, close


@dataclass
class FlattenedTensorMetadata:
    """Field-for-field stand-in for ``sglang.srt.weight_sync.tensor_bucket.FlattenedTensorMetadata``."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int


def flatten_bucket(named: list[tuple[str, torch.Tensor]]):
    """``[(name, tensor)]`` -> (one uint8 tensor, metadata) in SGLang's FlattenedTensorBucket
    layout: each tensor's bytes back to back, offsets in bytes. Returns None when the bucket
    mixes dtypes so that a tensor would start at an offset its dtype cannot view."""
    flat, meta, off = [], [], 0
    for name, t in named:
        if off % t.element_size():
            return None
        b = t.detach().contiguous().flatten().view(torch.uint8)
        meta.append(
            FlattenedTensorMetadata(name, t.shape, t.dtype, off, off + b.numel(), b.numel())
        )
        flat.append(b)
        off += b.numel()
    return torch.cat(flat), meta


def sglang_serializer():
    """SGLang's ``MultiprocessingSerializer`` (patched for CUDA IPC), or None without SGLang."""
    try:
        from sglang.srt.utils import MultiprocessingSerializer
        from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    except Exception:
        return None
    monkey_patch_torch_reductions()
    return MultiprocessingSerializer


def serialize_named_tensors(obj: Any) -> str:
    """Base64 pickle of ``obj`` (a named-tensor list or a flattened-bucket dict)."""
    on_cuda = any(t.is_cuda for t in _tensors(obj))
    if on_cuda:
        ser = sglang_serializer()
        if ser is not None:
            return ser.serialize(obj, output_str=True)
        from multiprocessing.reduction import ForkingPickler

        import torch.multiprocessing  # noqa: F401  (registers the CUDA IPC reductions)

        buf = io.BytesIO()
        ForkingPickler(buf).dump(obj)
        return base64.b64encode(buf.getvalue()).decode()
    return base64.b64encode(pickle.dumps(obj)).decode()


def _tensors(obj: Any):
    items = [obj["flattened_tensor"]] if isinstance(obj, dict) else [t for _, t in obj]
    yield from (t for t in items if isinstance(t, torch.Tensor))


def _load_storage(data: bytes):
    storage = torch.load(io.BytesIO(data), weights_only=True)
    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise pickle.UnpicklingError(f"expected a torch storage, got {type(storage).__name__}")
    return storage


class _Unpickler(pickle.Unpickler):
    _ALLOWED = {
        ("builtins", n) for n in ("list", "tuple", "dict", "int", "float", "str", "bytes")
    } | {
        ("collections", "OrderedDict"),
        ("copyreg", "__newobj__"),
        ("copyreg", "_reconstructor"),
        ("torch", "Size"),
        ("torch", "dtype"),
        ("torch._utils", "_rebuild_tensor"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_tensor_v3"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch._tensor", "_rebuild_from_type_v2"),
        ("torch.storage", "UntypedStorage"),
        ("torch.storage", "TypedStorage"),
        ("torch", "Tensor"),
        ("torch.nn.parameter", "Parameter"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _load_storage
        if (module, name) == (__name__, "CpuIpcHandle"):
            return CpuIpcHandle
        if (module, name) == (__name__, "FlattenedTensorMetadata"):
            return FlattenedTensorMetadata
        if module == "sglang.srt.weight_sync.tensor_bucket" and name == "FlattenedTensorMetadata":
            return FlattenedTensorMetadata
        if module == "torch" and (name.endswith(("Storage", "Tensor")) or _is_dtype(name)):
            return getattr(torch, name)
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"blocked unsafe global ({module}.{name}) in a weight update")


def _is_dtype(name: str) -> bool:
    return isinstance(getattr(torch, name, None), torch.dtype)


def deserialize_named_tensors(
    payload: str,
    load_format: str | None,
    *,
    device: str | None = None,
    tp_rank: int = 0,
    sources: list[str] | None = None,
) -> list[tuple[str, torch.Tensor]]:
    """One TP rank's entry of ``serialized_named_tensors``; ``device``: that rank's device uuid
    (:func:`cpu_device_uuid`), which a :class:`CpuIpcHandle` must have been made on.
    ``sources`` collects where the tensors came from: a handle's device, or ``"value"``."""
    data = base64.b64decode(payload, validate=True)
    obj = _Unpickler(io.BytesIO(data)).load()
    if sources is not None:
        items = [obj["flattened_tensor"]] if isinstance(obj, dict) else [t for _, t in obj]
        sources.extend(t.device_uuid if isinstance(t, CpuIpcHandle) else "value" for t in items[:1])
    if load_format == "flattened_bucket":
        flat = obj["flattened_tensor"]
        if isinstance(flat, CpuIpcHandle):
            flat = flat.open(device)
        return [
            (m.name, flat[m.start_idx : m.end_idx].view(m.dtype).reshape(m.shape))
            for m in obj["metadata"]
        ]
    if load_format not in (None, "direct"):
        raise ValueError(f"Unknown load_format={load_format}")
    if not isinstance(obj, (list, tuple)):
        raise ValueError("serialized_named_tensors must hold a list of (name, tensor) pairs")
    return [(str(n), t.open(device) if isinstance(t, CpuIpcHandle) else t) for n, t in obj]
