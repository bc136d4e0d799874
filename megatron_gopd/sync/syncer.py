"""Push the student's weights to the rollout servers after every update.

::

    syncer = WeightSyncer(SyncConfig(transport="distributed"), urls=lambda: servers.urls,
                          tp_size_of=servers.tp_size, features_of=servers.features, auth=auth)
    ...
    report = syncer.push(student, version=str(step))   # collective over all trainer ranks
    syncer.close()

:meth:`WeightSyncer.push` streams the full HF-named tensors (:mod:`megatron_gopd.sync.gather`) in
buckets of ``bucket_bytes`` whose boundaries every rank knows, and hands each bucket to the
transport (:mod:`megatron_gopd.sync.transports`): rank 0 alone for ``distributed`` and ``disk``,
every rank for ``tensor`` (each feeds the server TP rank on its own GPU). The last bucket carries
``flush_cache`` and the weight version. Each server's SGLang version (``features_of``) decides
what it is sent (weight-update sessions from 0.5.21, flattened broadcasts from 0.5.6).

``check=True`` (``--weight-sync-check``) verifies each push with what SGLang offers, and says
which applied (:attr:`SyncReport.checked`):

* **exact rows** of chosen tensors (``/get_weights_by_name``, first ``check_rows`` rows) against
  what was sent, where the server's model implements that endpoint (SGLang: Llama-family models;
  not Qwen2/Qwen3);
* **checksums** (``/weights_checker``, SGLang 0.5.6+): SGLang hashes its own fused, TP-sharded
  parameters with a GPU hash, which the trainer cannot recompute from HF tensors, so what can be
  verified is that every server of one TP layout holds the same weights, and that each server's
  weights changed from one push to the next exactly when the trainer's did (the trainer keeps a
  digest of what it sent);
* a server that offers neither (SGLang < 0.5.6 serving Qwen) is an error: the check cannot be
  done, and the user asked for it.

Failure handling: a transport error on rank 0 does not leave the other ranks waiting in a
collective: rank 0 stops sending, still takes part in the gather to the end, and every rank raises
the same :class:`SyncError` afterwards.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from megatron_gopd import parallel
from megatron_gopd.rollout.protocol import ServerAuth, SGLangFeatures, http_json
from megatron_gopd.sync.gather import iter_hf_buckets
from megatron_gopd.sync.transports import (
    DiskTransport,
    DistributedTransport,
    SyncError,
    TensorLayout,
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
    # None: this host's address on the route to the servers (loopback only if they are all local)
    master_address: str | None = None
    master_port: int | None = None  # None: a free port
    group_name: str = "gopd_weight_sync"
    flatten: bool = True  # one broadcast per bucket, where the servers' SGLang has it (0.5.6+)
    # tensor: the global rank that feeds TP rank 0 of the first server (servers cover the trainer
    # GPUs from there, in rank order)
    tensor_offset: int = 0
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
    # check mode, per server: max |server - trainer| over the rows read back where the model
    # serves them, and the servers' checksums (/weights_checker)
    check_max_diff: dict[str, float] = field(default_factory=dict)
    check_checksums: dict[str, str] = field(default_factory=dict)
    checked: list[str] = field(default_factory=list)  # what the check could verify

    def summary(self) -> str:
        s = (
            f"weights {self.version}: {self.tensors} tensors, {self.bytes / 2**20:.1f} MiB in "
            f"{self.buckets} bucket(s), {self.seconds:.2f}s"
        )
        if self.check_max_diff:
            s += f"; check max diff {max(self.check_max_diff.values()):.3g}"
        if self.checked:
            s += f"; checked: {', '.join(self.checked)}"
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

    ``urls``: the servers, or a callable returning the current list (servers may be restarted);
    only global rank 0 needs them. ``tp_size_of(url)``: a server's TP size
    (``RolloutServers.tp_size``; default 1). ``features_of(url)``: what its SGLang version does
    (``RolloutServers.features``; default the pinned schema's). ``auth``: the servers' keys.
    ``hf_config``: the HF config.json written by the disk transport (default: from the role's
    checkpoint, else derived from its architecture). ``device_index``: this rank's GPU on its
    node (the tensor transport's handles are made there; default the local rank).
    """

    def __init__(
        self,
        config: SyncConfig,
        urls: Sequence[str] | Callable[[], Sequence[str]],
        *,
        tp_size_of: Callable[[str], int] | None = None,
        features_of: Callable[[str], SGLangFeatures] | None = None,
        auth: ServerAuth | None = None,
        hf_config: dict | None = None,
        device_index: int | None = None,
    ):
        self.config = config
        self._urls = urls
        self._tp_size_of = tp_size_of or (lambda url: 1)
        self._features_of = features_of or (lambda url: SGLangFeatures())
        self.auth = auth
        self._hf_config = hf_config
        self._device_index = device_index
        self._transport = None
        self._transport_urls: list[str] = []
        self._features: list[SGLangFeatures] = []
        self._pushes = 0
        self._last_check: tuple[str, dict[str, str]] | None = None

    def _current_urls(self) -> list[str]:
        urls = self._urls() if callable(self._urls) else self._urls
        return [u.rstrip("/") for u in urls]

    def _plan(self, role) -> tuple:
        """Rank 0: the transport for the current servers (a new one when the set changed).
        Returns what every rank must know: ``("tensor", layout)`` or ``(kind, None)``."""
        cfg = self.config
        urls = self._current_urls()
        if self._transport is not None and urls == self._transport_urls:
            layout = self._transport.layout if cfg.transport == "tensor" else None
            return cfg.transport, layout
        if self._transport is not None:  # a server was replaced: a new group with the new set
            self._transport.close()
            self._transport = None
        if not urls:
            raise SyncError("no rollout server to push the weights to")
        tp = [self._tp_size_of(u) for u in urls]
        feats = [self._features_of(u) for u in urls]
        self._transport_urls, self._features = urls, feats
        if cfg.transport == "tensor":
            import torch.distributed as dist

            layout = TensorLayout(tuple(tp), cfg.tensor_offset)
            layout.check(dist.get_world_size() if dist.is_initialized() else 1)
            return "tensor", layout
        if cfg.transport == "distributed":
            from megatron_gopd import platform
            from megatron_gopd.sync.process_group import routable_address

            backend = cfg.backend or ("nccl" if platform.cuda_available() else "gloo")
            self._transport = DistributedTransport(
                urls,
                tp,
                cfg.timeout_s,
                backend=backend,
                master_address=cfg.master_address or routable_address(urls),
                master_port=cfg.master_port,
                # a fresh name per server set: survivors keep no stale group under it
                group_name=f"{cfg.group_name}-{self._pushes}",
                flatten=cfg.flatten,
                features=feats,
                auth=self.auth,
            )
        else:
            self._transport = DiskTransport(
                urls,
                tp,
                cfg.timeout_s,
                disk_dir=str(cfg.disk_dir),
                hf_config=self._hf_config or _hf_config_of(role),
                keep=cfg.keep_disk_versions,
                features=feats,
                auth=self.auth,
            )
        return cfg.transport, None

    def _tensor_transport(self, layout: TensorLayout) -> TensorTransport:
        """Every rank: the collective tensor transport for ``layout`` (created together)."""
        t = self._transport
        if isinstance(t, TensorTransport) and t.layout == layout:
            return t
        if t is not None:
            t.close()
        rank0 = parallel.is_rank0()
        self._transport = TensorTransport(
            self._transport_urls if rank0 else [],
            layout,
            self.config.timeout_s,
            device_index=self._local_device(),
            features=self._features if rank0 else [],
            auth=self.auth,
        )
        return self._transport

    def _local_device(self) -> int:
        if self._device_index is not None:
            return self._device_index
        import os

        if torch.cuda.is_available():
            return torch.cuda.current_device()
        return int(os.environ.get("LOCAL_RANK", "0"))

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
        digest: list[torch.Tensor] = []
        plan: tuple = ("error", None)
        if rank0:
            try:
                plan = self._plan(role)
            except Exception as e:
                plan = ("error", _describe(e))
        kind, detail = parallel.broadcast_object(plan)
        if kind == "error":
            self._pushes += 1
            raise SyncError(f"weight sync {version} failed: {detail}")
        tensor = self._tensor_transport(detail) if kind == "tensor" else None
        transport = self._transport if rank0 else None
        error: str | None = None
        if rank0:
            try:
                transport.begin(version)
            except Exception as e:
                error = _describe(e)
        for bucket, last in iter_hf_buckets(role, cfg.bucket_bytes, dtype=dtype):
            if rank0:
                for name, t in bucket:
                    report.tensors += 1
                    report.bytes += t.numel() * t.element_size()
                    if name in checks:
                        sent_rows[name] = t[: cfg.check_rows].detach().float().cpu().clone()
                    if cfg.check:
                        d = t.detach().double()
                        digest.append(torch.stack([d.sum(), d.square().sum()]))
            if tensor is not None:
                failed = tensor.step(bucket, last=last, version=version, skip=error is not None)
                if rank0 and error is None:
                    error = failed
                    report.buckets += failed is None
            elif rank0 and error is None:
                try:
                    transport.send(bucket, last=last, version=version)
                    report.buckets += 1
                except Exception as e:
                    error = _describe(e)
        if rank0:
            try:
                transport.finish()
            except Exception as e:
                error = error or _describe(e)
            if error is None and cfg.check:
                try:
                    key = hashlib.sha256(torch.stack(digest).cpu().numpy().tobytes()).hexdigest()
                    self._check(report, sent_rows, checks, key)
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

    # ------------------------------------------------------------------ check

    def _get(self, url: str, path: str, payload) -> tuple[int, object]:
        try:
            return http_json(url + path, payload, timeout=60, auth=self.auth)
        except OSError as e:
            raise SyncError(f"sync check: {url} unreachable ({e})") from None

    def _check(
        self, report: SyncReport, sent: dict[str, torch.Tensor], names: set[str], digest: str
    ) -> None:
        """See the module docstring: exact rows where served, checksums where SGLang has them."""
        missing = sorted(names - set(sent))
        if missing:
            raise SyncError(f"sync check: the trainer sent no tensor named {missing[0]}")
        order = sorted(names)
        checksums: dict[str, str] = {}
        rows_ok: list[str] = []
        for url, feat in zip(self._transport_urls, self._features):
            worst = None
            for name in order:
                status, body = self._get(
                    url,
                    "/get_weights_by_name",
                    {"name": name, "truncate_size": self.config.check_rows},
                )
                if status != 200 and "Get parameter by name failed" in str(body):
                    break  # this model has no get_weights_by_name in SGLang (Qwen2/Qwen3...)
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
                worst = max(worst or 0.0, diff)
            if worst is not None:
                report.check_max_diff[url] = worst
                rows_ok.append(url)
            if feat.weights_checker:
                status, body = self._get(url, "/weights_checker", {"action": "checksum"})
                if status != 200 or not isinstance(body, dict) or not body.get("success"):
                    raise SyncError(f"sync check: {url}/weights_checker failed: {str(body)[:300]}")
                checksums[url] = str(body["per_engine_checksum"])
            elif worst is None:
                raise SyncError(
                    f"--weight-sync-check cannot verify {url}: SGLang {feat.version} has no "
                    "/weights_checker (0.5.6+) and serves /get_weights_by_name for Llama-family "
                    "models only; upgrade SGLang or drop --weight-sync-check"
                )
        tp = dict(zip(self._transport_urls, self.transport_tp_sizes()))
        by_layout: dict[int, dict[str, list[str]]] = {}
        for url, c in checksums.items():
            by_layout.setdefault(tp[url], {}).setdefault(c, []).append(url)
        for size, groups in by_layout.items():
            if len(groups) > 1:
                parts = "; ".join(f"{', '.join(us)}: {c[:12]}" for c, us in groups.items())
                raise SyncError(
                    f"sync check: the TP-{size} servers hold different weights ({parts})"
                )
        if self._last_check is not None:
            last_digest, last_sums = self._last_check
            trainer_changed = digest != last_digest
            for url, c in checksums.items():
                if url not in last_sums:
                    continue  # a new (restarted) server: nothing to compare with
                if trainer_changed and c == last_sums[url]:
                    raise SyncError(
                        f"sync check: {url} still holds the previous weights although the "
                        "trainer's changed: the push did not reach its model"
                    )
                if not trainer_changed and c != last_sums[url]:
                    raise SyncError(
                        f"sync check: {url}'s weights changed although the trainer sent the same"
                    )
        self._last_check = (digest, checksums)
        report.check_checksums = checksums
        if rows_ok:
            report.checked.append(f"exact rows on {len(rows_ok)} server(s)")
        if checksums:
            report.checked.append(f"checksums on {len(checksums)} server(s)")

    def transport_tp_sizes(self) -> list[int]:
        return [self._tp_size_of(u) for u in self._transport_urls]

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
