"""How a bucket of HF-named tensors gets from the trainer into the rollout servers.

Three transports, each SGLang's own endpoint(s) in SGLang's protocol order:

``tensor`` (colocated: the servers run on the trainer's GPUs)
    ``POST /update_weights_from_tensor`` per bucket, ``serialized_named_tensors[i]`` for server
    TP rank ``i``: a CUDA IPC handle of the bucket *made on that rank's own GPU* by the trainer
    rank that shares the GPU (an IPC handle opens only on its own node, and SGLang's
    device-UUID patch maps it to the GPU it was made on). Every bucket is therefore broadcast to
    every trainer rank, each feeding rank serializes its handle, the handles are gathered to
    global rank 0 over gloo, and rank 0 makes the HTTP calls (slime's
    ``update_weight_from_tensor.py`` does the same per engine). After each bucket the feeding
    ranks free their copy and call ``torch.cuda.ipc_collect()``. Collective over all ranks.
    Server ``k``, TP rank ``t`` is fed by global rank ``offset + sum(tp[:k]) + t``: the servers
    cover the trainer's GPUs in rank order (the Slurm launcher's colocated layout).
``distributed`` (the servers have GPUs of their own, on this or other nodes)
    once: ``POST /init_weights_update_group`` to every server *while* rank 0 joins the same group
    as its rank 0 (servers take ranks ``rank_offset + tp_rank``) at an address the servers can
    route to; per bucket: ``POST /update_weights_from_distributed`` *while* rank 0 broadcasts
    (one flat uint8 buffer per bucket, ``load_format="flattened_bucket"``, from SGLang 0.5.6;
    one broadcast per tensor before). NCCL on GPU, gloo on CPU. NCCL refuses two ranks of one
    communicator on one GPU, which is why colocated servers cannot use this.
``disk`` (fallback: a shared file system, no GPU path)
    the buckets are written as safetensors shards of an HF directory (renamed into place when
    complete), then ``POST /update_weights_from_disk``.

SGLang 0.5.21+ accepts tensor and distributed updates only inside a weight-update session:
:meth:`_Transport.begin` opens it (``/begin_weight_update``) on the servers that need it and
:meth:`_Transport.finish` closes it, also after a failure. Each server's version decides
(:class:`~megatron_gopd.rollout.protocol.SGLangFeatures`).

The HTTP calls that block until the trainer side has acted (group init, distributed updates) run
in threads while rank 0 does its part.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_gopd.rollout.protocol import ServerAuth, SGLangFeatures, http_json
from megatron_gopd.utils import GopdError, free_port, get_logger

__all__ = [
    "DiskTransport",
    "DistributedTransport",
    "SyncError",
    "TensorLayout",
    "TensorTransport",
]

log = get_logger(__name__)

Named = list[tuple[str, torch.Tensor]]


class SyncError(GopdError):
    """Weight sync failed; the message names the server and the step."""


def _post(url: str, path: str, payload: Any, timeout: float, auth: ServerAuth | None) -> Any:
    try:
        status, body = http_json(url + path, payload, timeout=timeout, auth=auth)
    except OSError as e:
        raise SyncError(f"{url}{path}: server unreachable ({e})") from None
    if status == 401:
        raise SyncError(
            f"{url}{path}: HTTP 401, the server wants an API key (GOPD_ROLLOUT_API_KEY, or "
            "GOPD_ROLLOUT_ADMIN_API_KEY for a server with --admin-api-key)"
        )
    if status != 200 or (isinstance(body, dict) and body.get("success") is False):
        msg = body.get("message") if isinstance(body, dict) else body
        raise SyncError(f"{url}{path} failed (HTTP {status}): {str(msg)[:500]}")
    return body


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


class _Transport:
    """Rank 0's side of a transport: the servers, their TP sizes and versions, their keys."""

    collective = False  # True: every trainer rank takes part in each bucket

    def __init__(
        self,
        urls: Sequence[str],
        tp_sizes: Sequence[int],
        timeout_s: float,
        *,
        features: Sequence[SGLangFeatures] | None = None,
        auth: ServerAuth | None = None,
    ):
        self.urls = list(urls)
        self.tp_sizes = list(tp_sizes)
        self.timeout_s = timeout_s
        self.features = list(features) if features is not None else [SGLangFeatures()] * len(urls)
        self.auth = auth
        self._pool = ThreadPoolExecutor(max_workers=len(self.urls) + 1)
        self._sessions: list[str] = []

    def _call(self, url: str, path: str, payload: Any, timeout: float | None = None) -> Any:
        return _post(url, path, payload, self.timeout_s if timeout is None else timeout, self.auth)

    def _post_all(self, path: str, payload_for, urls: Sequence[str] | None = None) -> list[Future]:
        return [
            self._pool.submit(self._call, u, path, payload_for(i))
            for i, u in enumerate(urls if urls is not None else self.urls)
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

    # ------------------------------------------------------------------ sessions (0.5.21+)

    uses_sessions = True

    def begin(self, version: str) -> None:
        """Before the first bucket: open a weight-update session where the server needs one (a
        session left open by a trainer that died is closed first)."""
        if not self.uses_sessions:
            return
        need = [u for u, f in zip(self.urls, self.features) if f.weight_update_session]
        for u in need:
            try:
                self._call(u, "/begin_weight_update", {}, timeout=60)
            except SyncError as e:
                if "already open" not in str(e):
                    raise
                self._call(u, "/end_weight_update", {}, timeout=60)
                self._call(u, "/begin_weight_update", {}, timeout=60)
            self._sessions.append(u)

    def finish(self) -> None:
        """After the last bucket, or a failure: close the sessions :meth:`begin` opened."""
        sessions, self._sessions = self._sessions, []
        errors = []
        for u in sessions:
            try:
                self._call(u, "/end_weight_update", {}, timeout=60)
            except SyncError as e:
                errors.append(str(e))
        if errors:
            raise SyncError("; ".join(errors))

    def send(self, named: Named, *, last: bool, version: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        with contextlib.suppress(SyncError):
            self.finish()
        self._pool.shutdown(wait=False)


# ---------------------------------------------------------------------------------- tensor


@dataclass(frozen=True)
class TensorLayout:
    """Which trainer rank feeds which server TP rank (known to every rank)."""

    tp_sizes: tuple[int, ...]
    offset: int = 0  # global rank feeding TP rank 0 of the first server

    def feeders(self, server: int) -> list[int]:
        start = self.offset + sum(self.tp_sizes[:server])
        return list(range(start, start + self.tp_sizes[server]))

    @property
    def fed_ranks(self) -> set[int]:
        return set(range(self.offset, self.offset + sum(self.tp_sizes)))

    def check(self, world_size: int) -> None:
        end = self.offset + sum(self.tp_sizes)
        if end > world_size:
            raise GopdError(
                f"colocated servers with TP sizes {list(self.tp_sizes)} from GPU {self.offset} "
                f"need trainer ranks {self.offset}..{end - 1}, but the job has {world_size}: "
                "each server TP rank must sit on a trainer rank's GPU (its CUDA IPC handle is "
                "made there)"
            )


def _sorted_for_flattening(named: Named) -> Named:
    """Larger element sizes first, so that every tensor of a flattened bucket starts at an offset
    its dtype can view (SGLang 0.5.23 refuses unaligned tensors)."""
    return sorted(named, key=lambda nt: -nt[1].element_size())


class TensorTransport(_Transport):
    """``/update_weights_from_tensor`` with per-GPU handles; see the module docstring.

    Every rank constructs one (``urls`` empty on ranks other than 0) with the same ``layout`` and
    calls :meth:`step` for every bucket. ``device_index``: this rank's GPU on its node (CPU: the
    local rank), whose identity a CUDA IPC handle carries.
    """

    collective = True

    def __init__(
        self,
        urls: Sequence[str],
        layout: TensorLayout,
        timeout_s: float,
        *,
        device_index: int,
        features: Sequence[SGLangFeatures] | None = None,
        auth: ServerAuth | None = None,
    ):
        import torch.distributed as dist

        super().__init__(urls, layout.tp_sizes, timeout_s, features=features, auth=auth)
        self.layout = layout
        self.device_index = device_index
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.on_cuda = torch.cuda.is_available()
        if self.on_cuda:
            from megatron_gopd.sync.wire import sglang_serializer

            if sglang_serializer() is None:
                raise GopdError(
                    "--weight-sync tensor needs the sglang package in the trainer's environment: "
                    "its serializer puts the GPU's UUID into CUDA IPC handles, which SGLang "
                    "needs to open them on the right device (pip install -e '.[gpu]')"
                )
            # object collectives (handles, status) on the CPU: a gloo group
            self.objects = dist.new_group(backend="gloo")
        else:
            self.objects = dist.group.WORLD

    def send(self, named: Named, *, last: bool, version: str) -> None:  # pragma: no cover
        raise SyncError("the tensor transport is collective: use step() on every rank")

    def step(self, named: Named | None, *, last: bool, version: str, skip: bool) -> str | None:
        """One bucket, on every rank (``named`` on rank 0). ``skip`` (rank 0): an earlier error;
        the bucket is not sent. Returns the error of this bucket (on every rank), or None."""
        import torch.distributed as dist

        from megatron_gopd import platform
        from megatron_gopd.sync.wire import flatten_bucket

        head = None
        if self.rank == 0 and not skip:
            flat, meta = flatten_bucket(_sorted_for_flattening(named))
            head = (
                int(flat.numel()),
                [(m.name, m.shape, m.dtype, m.start_idx, m.end_idx) for m in meta],
            )
        box = [head]
        dist.broadcast_object_list(box, src=0, group=self.objects)
        head = box[0]
        if head is None:
            return None
        nbytes, meta = head
        if self.rank != 0:
            flat = torch.empty(nbytes, dtype=torch.uint8, device=platform.device())
        if self.world > 1:
            dist.broadcast(flat, src=0)
        close = None
        try:
            payload = None
            if self.rank in self.layout.fed_ranks:
                payload, close = self._serialize(flat, meta)
            payloads: list = [None] * self.world if self.rank == 0 else None
            dist.gather_object(payload, payloads, dst=0, group=self.objects)
            error = None
            if self.rank == 0:
                try:
                    self._wait(
                        self._post_all(
                            "/update_weights_from_tensor",
                            lambda i: {
                                "serialized_named_tensors": [
                                    payloads[r] for r in self.layout.feeders(i)
                                ],
                                "load_format": "flattened_bucket",
                                "flush_cache": last,
                                **({"weight_version": version} if last else {}),
                            },
                        )
                    )
                except SyncError as e:
                    error = str(e)
            box = [error]
            dist.broadcast_object_list(box, src=0, group=self.objects)
        finally:
            # the servers copied the bucket (or failed): release the producer side
            if close is not None:
                close()
            del flat
            if self.on_cuda:
                torch.cuda.ipc_collect()
                torch.cuda.empty_cache()
        return box[0]

    def _serialize(self, flat: torch.Tensor, meta):
        from megatron_gopd.sync import wire

        if self.on_cuda:
            from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata

            ser = wire.sglang_serializer()
            metas = [
                FlattenedTensorMetadata(
                    name=n, shape=s, dtype=d, start_idx=a, end_idx=b, numel=(b - a) // d.itemsize
                )
                for n, s, d, a, b in meta
            ]
            return ser.serialize(
                {"flattened_tensor": flat, "metadata": metas}, output_str=True
            ), None
        handle, close = wire.share_cpu_tensor(flat, self.device_index)
        metas = [
            wire.FlattenedTensorMetadata(n, s, d, a, b, (b - a) // d.itemsize)
            for n, s, d, a, b in meta
        ]
        return wire.serialize_named_tensors({"flattened_tensor": handle, "metadata": metas}), close


# ---------------------------------------------------------------------------------- distributed


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
        features: Sequence[SGLangFeatures] | None = None,
        auth: ServerAuth | None = None,
    ):
        super().__init__(urls, tp_sizes, timeout_s, features=features, auth=auth)
        self.backend = backend
        self.master_address = master_address
        self.master_port = master_port
        self.group_name = group_name
        # one broadcast per bucket needs every server to know load_format (SGLang 0.5.6+); an
        # older one would wait for one broadcast per tensor and the group would desynchronise
        self.flatten = flatten and all(f.flattened_distributed for f in self.features)
        if flatten and not self.flatten:
            old = [u for u, f in zip(self.urls, self.features) if not f.flattened_distributed]
            log.warning(
                "%s predate SGLang 0.5.6 (no flattened_bucket): one broadcast per tensor",
                ", ".join(old),
            )
        self.pg = None

    def begin(self, version: str) -> None:
        if self.pg is None:
            self._join()
        super().begin(version)

    def _join(self) -> None:
        from datetime import timedelta

        from megatron_gopd.sync.process_group import init_custom_process_group, tcp_url

        world = 1 + sum(self.tp_sizes)
        offsets = [1 + sum(self.tp_sizes[:i]) for i in range(len(self.urls))]
        port = self.master_port or free_port()
        # a bracketed IPv6 address works with both SGLang spellings (f"tcp://{addr}:{port}"
        # before 0.5.23, NetworkAddress after, which strips the brackets)
        addr = f"[{self.master_address}]" if ":" in self.master_address else self.master_address
        futures = self._post_all(
            "/init_weights_update_group",
            lambda i: {
                "master_address": addr,
                "master_port": port,
                "rank_offset": offsets[i],
                "world_size": world,
                "group_name": self.group_name,
                "backend": self.backend,
            },
        )
        # The trainer joins in a thread too: if a server refuses (wrong backend, no route), fail
        # now with its message instead of waiting out the rendezvous timeout.
        url = tcp_url(self.master_address, port)
        join = self._pool.submit(
            init_custom_process_group,
            backend=self.backend,
            init_method=url,
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
                        f"joining the weight-update group {self.group_name} ({url}, world "
                        f"{world}) failed: {f.exception()}"
                    )
                raise SyncError(f"creating the weight-update group failed: {f.exception()}")
        self.pg = join.result()
        self._wait(futures)
        log.info(
            "weight-update group %s at %s: trainer + %d server rank(s)",
            self.group_name,
            url,
            world - 1,
        )

    def send(self, named: Named, *, last: bool, version: str) -> None:
        import torch.distributed as dist

        from megatron_gopd.sync.wire import flatten_bucket

        if self.flatten:
            named = _sorted_for_flattening(named)
        flat = flatten_bucket(named) if self.flatten else None
        futures = self._post_all(
            "/update_weights_from_distributed",
            lambda i: {
                "names": [n for n, _ in named],
                "dtypes": [_dtype_name(t.dtype) for _, t in named],
                "shapes": [list(t.shape) for _, t in named],
                "group_name": self.group_name,
                "flush_cache": last,
                **({"load_format": "flattened_bucket"} if flat is not None else {}),
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
        import torch.distributed as dist

        if self.pg is not None:
            for u in self.urls:
                with contextlib.suppress(SyncError):
                    self._call(
                        u, "/destroy_weights_update_group", {"group_name": self.group_name}, 30
                    )
            with contextlib.suppress(Exception):
                dist.destroy_process_group(self.pg)
            self.pg = None
        super().close()


# ---------------------------------------------------------------------------------- disk


class DiskTransport(_Transport):
    """HF export to ``disk_dir`` + ``/update_weights_from_disk`` (the directory must be visible to
    the servers under the same path)."""

    uses_sessions = False  # /update_weights_from_disk needs no session

    def __init__(
        self,
        urls: Sequence[str],
        tp_sizes: Sequence[int],
        timeout_s: float,
        *,
        disk_dir: str,
        hf_config: dict,
        keep: int,
        features: Sequence[SGLangFeatures] | None = None,
        auth: ServerAuth | None = None,
    ):
        super().__init__(urls, tp_sizes, timeout_s, features=features, auth=auth)
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
