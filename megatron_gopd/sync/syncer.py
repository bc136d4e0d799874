"""Push the student's weights to the rollout servers after every update.

::

    syncer = WeightSyncer(SyncConfig(transport="distributed"), urls=lambda: servers.urls,
                          tp_size_of=servers.tp_size)
    ...
    report = syncer.push(student, version=str(step))   # collective over all trainer ranks
    syncer.close()

:meth:`WeightSyncer.push` streams the full HF-named tensors (:mod:`megatron_gopd.sync.gather`) to
rank 0 in buckets of ``bucket_bytes`` and hands each bucket to the transport
(:mod:`megatron_gopd.sync.transports`); the last bucket carries ``flush_cache`` and the weight
version. With ``check=True`` it then reads a few rows of chosen tensors back from every server
(``/get_weights_by_name``) and compares them with what it sent.

Failure handling: a transport error on rank 0 does not leave the other ranks waiting in a
collective: rank 0 stops sending, still takes part in the gather to the end, and every rank raises
the same :class:`SyncError` afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from megatron_gopd import parallel
from megatron_gopd.rollout.protocol import http_json
from megatron_gopd.sync.gather import iter_hf_tensors
from megatron_gopd.sync.transports import (
    DiskTransport,
    DistributedTransport,
    SyncError,
    TensorTransport,
)
from megatron_gopd.utils import GopdError, get_logger

__all__ = ["SyncConfig", "SyncError", "SyncReport", "WeightSyncer"]

log = get_logger(__name__)

TRANSPORTS = ("tensor", "distributed", "disk")


@dataclass(frozen=True)
class SyncConfig:
    transport: str = "distributed"  # tensor | distributed | disk
    bucket_bytes: int = 512 * 1024**2
    dtype: str | None = None  # cast before sending (e.g. "bfloat16"); None: the trainer's dtype
    timeout_s: float = 600.0
    # distributed
    backend: str | None = None  # None: nccl with CUDA, gloo without
    master_address: str = "127.0.0.1"
    master_port: int | None = None  # None: a free port
    group_name: str = "gopd_weight_sync"
    flatten: bool = True  # one broadcast per bucket (SGLang's load_format="flattened_bucket")
    # disk
    disk_dir: str | None = None
    keep_disk_versions: int = 1
    # sync check
    check: bool = False
    check_names: tuple[str, ...] | None = None  # None: a set covering every layout case
    check_rows: int = 4
    check_tol: float = 0.0  # max |server - sent|; raise it when the server's dtype is lower

    def __post_init__(self):
        if self.transport not in TRANSPORTS:
            raise GopdError(
                f"unknown weight sync transport {self.transport!r} ({', '.join(TRANSPORTS)})"
            )
        if self.transport == "disk" and not self.disk_dir:
            raise GopdError("the disk weight sync transport needs a directory (disk_dir)")
        if self.bucket_bytes < 1:
            raise GopdError("bucket_bytes must be positive")


@dataclass
class SyncReport:
    version: str
    tensors: int = 0
    bytes: int = 0
    buckets: int = 0
    seconds: float = 0.0
    # per server: max |server - trainer| over the checked rows (check mode)
    check_max_diff: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        s = (
            f"weights {self.version}: {self.tensors} tensors, {self.bytes / 2**20:.1f} MiB in "
            f"{self.buckets} bucket(s), {self.seconds:.2f}s"
        )
        if self.check_max_diff:
            s += f"; check max diff {max(self.check_max_diff.values()):.3g}"
        return s


def default_check_names(arch) -> list[str]:
    """Tensors that exercise every layout case: vocabulary padding, q/k/v and gate/up splits,
    row-parallel layers, norms, tied or untied head."""
    last = arch.num_layers - 1
    names = [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        f"model.layers.{last}.self_attn.o_proj.weight",
        f"model.layers.{last}.mlp.down_proj.weight",
        f"model.layers.{last}.input_layernorm.weight",
        "model.norm.weight",
    ]
    if arch.qkv_bias:
        names.append("model.layers.0.self_attn.k_proj.bias")
    if arch.qk_norm:
        names.append("model.layers.0.self_attn.q_norm.weight")
    if not arch.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


class WeightSyncer:
    """Collective weight push Megatron -> rollout servers; see the module docstring.

    ``urls``: the servers, or a callable returning the current list (servers may be restarted).
    ``tp_size_of(url)``: a server's TP size (``RolloutServers.tp_size``); default 1.
    ``hf_config``: the HF config.json written by the disk transport (default: from the role's
    checkpoint, else derived from its architecture).
    """

    def __init__(
        self,
        config: SyncConfig,
        urls: Sequence[str] | Callable[[], Sequence[str]],
        *,
        tp_size_of: Callable[[str], int] | None = None,
        hf_config: dict | None = None,
    ):
        self.config = config
        self._urls = urls
        self._tp_size_of = tp_size_of or (lambda url: 1)
        self._hf_config = hf_config
        self._transport = None
        self._transport_urls: list[str] = []
        self._pushes = 0

    def _current_urls(self) -> list[str]:
        urls = self._urls() if callable(self._urls) else self._urls
        return [u.rstrip("/") for u in urls]

    def _make_transport(self, role):
        cfg = self.config
        urls = self._current_urls()
        if self._transport is not None and urls == self._transport_urls:
            return self._transport
        if self._transport is not None:  # a server was replaced: a new group with the new set
            self._transport.close()
        tp = [self._tp_size_of(u) for u in urls]
        if cfg.transport == "tensor":
            t = TensorTransport(urls, tp, cfg.timeout_s)
        elif cfg.transport == "distributed":
            from megatron_gopd import platform

            backend = cfg.backend or ("nccl" if platform.cuda_available() else "gloo")
            t = DistributedTransport(
                urls,
                tp,
                cfg.timeout_s,
                backend=backend,
                master_address=cfg.master_address,
                master_port=cfg.master_port,
                # a fresh name per server set: survivors keep no stale group under it
                group_name=f"{cfg.group_name}-{self._pushes}",
                flatten=cfg.flatten,
            )
        else:
            t = DiskTransport(
                urls,
                tp,
                cfg.timeout_s,
                disk_dir=str(cfg.disk_dir),
                hf_config=self._hf_config or _hf_config_of(role),
                keep=cfg.keep_disk_versions,
            )
        self._transport, self._transport_urls = t, urls
        return t

    def push(self, role, *, version: str | None = None) -> SyncReport:
        """Send ``role``'s weights to every server. Collective: every trainer rank calls it."""
        cfg = self.config
        rank0 = parallel.is_rank0()
        version = version if version is not None else str(self._pushes)
        report = SyncReport(version=version)
        t0 = time.monotonic()
        dtype = getattr(torch, cfg.dtype) if cfg.dtype else None
        checks = set(cfg.check_names or default_check_names(role.arch)) if cfg.check else set()
        sent_rows: dict[str, torch.Tensor] = {}
        error: str | None = None
        transport = None
        if rank0:
            try:
                transport = self._make_transport(role)
                transport.begin(version)
            except Exception as e:
                error = _describe(e)
        bucket: list[tuple[str, torch.Tensor]] = []
        size = 0
        pending = None  # one bucket held back, so that the last one is known as last

        def flush(named, last):
            nonlocal error
            if error is not None:
                return
            try:
                transport.send(named, last=last, version=version)
                report.buckets += 1
            except Exception as e:
                error = _describe(e)

        for name, t in iter_hf_tensors(role, dtype=dtype):
            report.tensors += 1
            report.bytes += t.numel() * t.element_size()
            if name in checks:
                sent_rows[name] = t[: cfg.check_rows].detach().float().cpu().clone()
            nbytes = t.numel() * t.element_size()
            if bucket and size + nbytes > cfg.bucket_bytes:
                if pending is not None:
                    flush(pending, last=False)
                pending, bucket, size = bucket, [], 0
            bucket.append((name, t))
            size += nbytes
        if rank0:
            if pending is not None:
                flush(pending, last=False)
            if bucket:
                flush(bucket, last=True)
            if error is None and cfg.check:
                try:
                    report.check_max_diff = self._check(sent_rows, checks)
                except Exception as e:
                    error = _describe(e)
        self._pushes += 1
        report.seconds = time.monotonic() - t0
        # every rank raises the same error, none waits forever for rank 0
        error = parallel.broadcast_object(error)
        if error is not None:
            raise SyncError(f"weight sync {version} failed: {error}")
        if rank0:
            log.info("%s", report.summary())
        return report

    def _check(self, sent: dict[str, torch.Tensor], names: set[str]) -> dict[str, float]:
        missing = sorted(names - set(sent))
        if missing:
            raise SyncError(f"sync check: the trainer sent no tensor named {missing[0]}")
        out = {}
        for url in self._transport_urls:
            worst = 0.0
            for name in sorted(names):
                try:
                    status, body = http_json(
                        url + "/get_weights_by_name",
                        {"name": name, "truncate_size": self.config.check_rows},
                        timeout=60,
                    )
                except OSError as e:
                    raise SyncError(f"sync check: {url} unreachable ({e})") from None
                if status != 200 or not isinstance(body, list):
                    raise SyncError(
                        f"sync check: {url} cannot report {name} (HTTP {status}: {str(body)[:200]})"
                    )
                got = torch.tensor(body, dtype=torch.float32)
                want = sent[name]
                if got.shape != want.shape:
                    raise SyncError(
                        f"sync check: {url} has {name} rows of shape {tuple(got.shape)}, "
                        f"the trainer sent {tuple(want.shape)}"
                    )
                diff = (got - want).abs().max().item() if got.numel() else 0.0
                if diff > self.config.check_tol:
                    raise SyncError(
                        f"sync check: {url} holds {name} differing from the trainer's by {diff:.3g} "
                        f"(tolerance {self.config.check_tol:g})"
                    )
                worst = max(worst, diff)
            out[url] = worst
        return out

    def close(self) -> None:
        """Rank 0: leave the weight-update group (servers destroy theirs), stop helper threads."""
        if self._transport is not None:
            self._transport.close()
            self._transport = None


def _describe(e: Exception) -> str:
    """A transport failure as one line for every rank; a bug also gets its traceback logged."""
    if not isinstance(e, GopdError):
        log.exception("weight sync failed on rank 0")
        return f"{type(e).__name__}: {e}"
    return str(e)


def _hf_config_of(role) -> dict:
    from megatron_gopd.convert.checkpoint import hf_config_for

    if role.checkpoint:
        from megatron_gopd.models import read_checkpoint_meta

        meta = read_checkpoint_meta(role.checkpoint)
        if meta.hf_config:
            return dict(meta.hf_config)
    return hf_config_for(role.arch)
