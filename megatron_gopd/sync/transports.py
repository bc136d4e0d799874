"""How a bucket of HF-named tensors gets from trainer rank 0 into the rollout servers.

Three transports, each SGLang's own endpoint(s) in SGLang's protocol order:

``tensor`` (colocated: trainer and servers share GPUs / a host)
    ``POST /update_weights_from_tensor`` per bucket with the pickled tensors
    (:mod:`megatron_gopd.sync.wire`): CUDA IPC handles on GPU, bytes on CPU.
``distributed`` (separate GPUs / hosts)
    once: ``POST /init_weights_update_group`` to every server *while* rank 0 joins the same
    group as its rank 0 (the servers take ranks ``rank_offset + tp_rank``); per bucket:
    ``POST /update_weights_from_distributed`` with names/dtypes/shapes *while* rank 0
    broadcasts the data (one flat uint8 buffer per bucket with ``flatten``, SGLang's
    ``load_format="flattened_bucket"``). NCCL on GPU, gloo on CPU.
``disk`` (fallback: no shared GPU, no network path for NCCL, but a shared file system)
    the buckets are written as safetensors shards of an HF directory (renamed into place when
    complete), then ``POST /update_weights_from_disk``.

The HTTP calls that block until the trainer side has acted (group init, distributed updates) run
in threads while rank 0 does its part.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch

from megatron_gopd.rollout.protocol import http_json
from megatron_gopd.utils import GopdError, free_port, get_logger

__all__ = ["DiskTransport", "DistributedTransport", "SyncError", "TensorTransport"]

log = get_logger(__name__)

Named = list[tuple[str, torch.Tensor]]


class SyncError(GopdError):
    """Weight sync failed; the message names the server and the step."""


def _post(url: str, path: str, payload: Any, timeout: float) -> Any:
    try:
        status, body = http_json(url + path, payload, timeout=timeout)
    except OSError as e:
        raise SyncError(f"{url}{path}: server unreachable ({e})") from None
    if status != 200 or (isinstance(body, dict) and body.get("success") is False):
        msg = body.get("message") if isinstance(body, dict) else body
        raise SyncError(f"{url}{path} failed (HTTP {status}): {str(msg)[:500]}")
    return body


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


class _Transport:
    def __init__(self, urls: Sequence[str], tp_sizes: Sequence[int], timeout_s: float):
        self.urls = list(urls)
        self.tp_sizes = list(tp_sizes)
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(max_workers=len(self.urls) + 1)

    def _post_all(self, path: str, payload_for) -> list[Future]:
        return [
            self._pool.submit(_post, u, path, payload_for(i), self.timeout_s)
            for i, u in enumerate(self.urls)
        ]

    @staticmethod
    def _wait(futures: list[Future]) -> None:
        errors = []
        for f in futures:
            try:
                f.result()
            except SyncError as e:
                errors.append(str(e))
        if errors:
            raise SyncError("; ".join(errors))

    def begin(self, version: str) -> None:
        pass

    def send(self, named: Named, *, last: bool, version: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._pool.shutdown(wait=False)


class TensorTransport(_Transport):
    """``/update_weights_from_tensor``; see :mod:`megatron_gopd.sync.wire` for the payload."""

    def send(self, named: Named, *, last: bool, version: str) -> None:
        from megatron_gopd.sync.wire import serialize_named_tensors, sglang_serializer

        load_format = None
        obj: Any = named
        if named[0][1].is_cuda and sglang_serializer() is not None:
            # SGLang's own bucket class: one CUDA IPC handle per bucket instead of per tensor
            from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

            if len({t.dtype for _, t in named}) == 1:
                b = FlattenedTensorBucket(named_tensors=named)
                obj = {"flattened_tensor": b.get_flattened_tensor(), "metadata": b.get_metadata()}
                load_format = "flattened_bucket"
        payload = serialize_named_tensors(obj)
        futures = self._post_all(
            "/update_weights_from_tensor",
            lambda i: {
                # one entry per server TP rank; each rank reads its own
                "serialized_named_tensors": [payload] * self.tp_sizes[i],
                "load_format": load_format,
                "flush_cache": last,
                **({"weight_version": version} if last else {}),
            },
        )
        self._wait(futures)  # the server copied the data: the tensors may be freed now


class DistributedTransport(_Transport):
    """``/init_weights_update_group`` + ``/update_weights_from_distributed``."""

    def __init__(
        self,
        urls: Sequence[str],
        tp_sizes: Sequence[int],
        timeout_s: float,
        *,
        backend: str,
        master_address: str,
        master_port: int | None,
        group_name: str,
        flatten: bool,
    ):
        super().__init__(urls, tp_sizes, timeout_s)
        self.backend = backend
        self.master_address = master_address
        self.master_port = master_port
        self.group_name = group_name
        self.flatten = flatten
        self.pg = None

    def begin(self, version: str) -> None:
        if self.pg is not None:
            return
        from datetime import timedelta

        from megatron_gopd.sync.process_group import init_custom_process_group

        world = 1 + sum(self.tp_sizes)
        offsets = [1 + sum(self.tp_sizes[:i]) for i in range(len(self.urls))]
        port = self.master_port or free_port()
        futures = self._post_all(
            "/init_weights_update_group",
            lambda i: {
                "master_address": self.master_address,
                "master_port": port,
                "rank_offset": offsets[i],
                "world_size": world,
                "group_name": self.group_name,
                "backend": self.backend,
            },
        )
        # The trainer joins in a thread too: if a server refuses (wrong backend, no route), fail
        # now with its message instead of waiting out the rendezvous timeout.
        join = self._pool.submit(
            init_custom_process_group,
            backend=self.backend,
            init_method=f"tcp://{self.master_address}:{port}",
            world_size=world,
            rank=0,
            group_name=self.group_name,
            timeout=timedelta(seconds=self.timeout_s),
        )
        remaining = {*futures, join}
        while remaining:
            done, remaining = wait(remaining, return_when=FIRST_EXCEPTION)
            for f in done:
                if f.exception() is None:
                    continue
                if f is join:
                    raise SyncError(
                        f"joining the weight-update group {self.group_name} "
                        f"(tcp://{self.master_address}:{port}, world {world}) failed: "
                        f"{f.exception()}"
                    )
                raise SyncError(f"creating the weight-update group failed: {f.exception()}")
        self.pg = join.result()
        self._wait(futures)
        log.info("weight-update group %s: trainer + %d server rank(s)", self.group_name, world - 1)

    def send(self, named: Named, *, last: bool, version: str) -> None:
        import torch.distributed as dist

        from megatron_gopd.sync.wire import flatten_bucket

        flat = flatten_bucket(named) if self.flatten else None
        futures = self._post_all(
            "/update_weights_from_distributed",
            lambda i: {
                "names": [n for n, _ in named],
                "dtypes": [_dtype_name(t.dtype) for _, t in named],
                "shapes": [list(t.shape) for _, t in named],
                "group_name": self.group_name,
                "flush_cache": last,
                "load_format": "flattened_bucket" if flat is not None else None,
                **({"weight_version": version} if last else {}),
            },
        )
        if flat is not None:
            dist.broadcast(flat[0], src=0, group=self.pg)
        else:
            for _, t in named:
                dist.broadcast(t, src=0, group=self.pg)
        self._wait(futures)

    def close(self) -> None:
        import contextlib

        import torch.distributed as dist

        if self.pg is not None:
            for u in self.urls:
                with contextlib.suppress(SyncError):
                    _post(u, "/destroy_weights_update_group", {"group_name": self.group_name}, 30)
            with contextlib.suppress(Exception):
                dist.destroy_process_group(self.pg)
            self.pg = None
        super().close()


class DiskTransport(_Transport):
    """HF export to ``disk_dir`` + ``/update_weights_from_disk`` (the directory must be visible to
    the servers under the same path)."""

    def __init__(
        self,
        urls: Sequence[str],
        tp_sizes: Sequence[int],
        timeout_s: float,
        *,
        disk_dir: str,
        hf_config: dict,
        keep: int,
    ):
        super().__init__(urls, tp_sizes, timeout_s)
        self.root = Path(disk_dir)
        self.hf_config = hf_config
        self.keep = max(int(keep), 1)
        self._tmp: Path | None = None
        self._shards: list[tuple[str, list[str], int]] = []

    def begin(self, version: str) -> None:
        import tempfile

        self.root.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".weights-{version}.tmp-", dir=self.root))
        self._shards = []

    def send(self, named: Named, *, last: bool, version: str) -> None:
        from safetensors.torch import save_file

        assert self._tmp is not None, "begin() first"
        fname = f"model-{len(self._shards) + 1:05d}.safetensors"
        save_file(
            {n: t.detach().cpu().contiguous() for n, t in named},
            str(self._tmp / fname),
            metadata={"format": "pt"},
        )
        size = sum(t.numel() * t.element_size() for _, t in named)
        self._shards.append((fname, [n for n, _ in named], size))
        if last:
            self._publish(version)

    def _publish(self, version: str) -> None:
        assert self._tmp is not None
        weight_map = {n: f for f, names, _ in self._shards for n in names}
        index = {
            "metadata": {"total_size": sum(s for *_, s in self._shards)},
            "weight_map": weight_map,
        }
        (self._tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (self._tmp / "config.json").write_text(json.dumps(self.hf_config, indent=2) + "\n")
        final = self.root / f"weights-{version}"
        if final.exists():
            shutil.rmtree(final)
        self._tmp.rename(final)
        self._tmp = None
        futures = self._post_all(
            "/update_weights_from_disk",
            lambda i: {
                "model_path": str(final.resolve()),
                "flush_cache": True,
                "weight_version": version,
            },
        )
        self._wait(futures)
        self._prune(final)

    def _prune(self, current: Path) -> None:
        olds = sorted(
            (p for p in self.root.glob("weights-*") if p != current and p.is_dir()),
            key=lambda p: p.stat().st_mtime,
        )
        for p in olds[: max(len(olds) - (self.keep - 1), 0)]:
            shutil.rmtree(p, ignore_errors=True)

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
        super().close()


def wait_healthy(urls: Sequence[str], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    for u in urls:
        while True:
            try:
                if http_json(u + "/health", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SyncError(f"{u} is not healthy")
            time.sleep(0.2)
