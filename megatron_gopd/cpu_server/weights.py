"""The CPU server's weight and memory endpoints (SGLang's admin API): weight-update sessions,
updates from tensors (CPU stand-ins for CUDA IPC handles), from a torch.distributed broadcast and
from disk, the weight version, ``/get_weights_by_name``, ``/weights_checker``, and the memory
saver's release/resume bookkeeping. Mixed into :class:`~megatron_gopd.cpu_server.server.CpuServer`,
whose ``engine``, ``opts``, ``features`` and state they use."""

from __future__ import annotations

from typing import Any

from megatron_gopd.cpu_server.replies import Reply, fail, invalid, require, typed, value_error
from megatron_gopd.utils import get_logger

__all__ = ["WeightEndpoints"]

log = get_logger("megatron_gopd.cpu_server")  # the server's logger


class WeightEndpoints:
    def _check_session(self, what: str) -> None:
        if self.features.weight_update_session and not self._session_open:
            raise fail(f"{what} must run between begin_weight_update() and end_weight_update()")

    def _weights_result(self, fn, body) -> dict[str, Any]:
        if typed(body, "abort_all_requests", bool, False):
            self.engine.abort(None, True)
        try:
            n = fn()
        except Reply:
            raise
        except Exception as e:
            log.warning("weight update failed: %s", e)
            raise fail(f"Failed to update weights: {e}.") from None
        version = body.get("weight_version")
        if version is not None:
            self.engine.weight_version = str(version)
        if typed(body, "flush_cache", bool, True) and self.engine.busy:
            raise fail(
                "Weights were updated, but the cache was not flushed because requests are still "
                "running or queued. Retract or finish them, then call /flush_cache."
            )
        msg = f"Succeeded to update {n} parameter(s)."
        if version is not None:
            msg += f" Weight version updated to {version}."
        return {"success": True, "message": msg}

    def begin_weight_update(self, body, query):
        with self._admin_lock:
            if self._session_open:
                raise fail(
                    "a weight-update session is already open; call end_weight_update() first"
                )
            self._session_open = True
        return {"success": True, "message": "Success"}

    def end_weight_update(self, body, query):
        with self._admin_lock:
            if not self._session_open:
                raise fail("no weight-update session is open; call begin_weight_update() first")
            self._session_open = False
        return {"success": True, "message": "Success"}

    def update_weights_from_tensor(self, body, query):
        from megatron_gopd.sync.wire import deserialize_named_tensors

        body = require(body, "serialized_named_tensors")
        payloads = body["serialized_named_tensors"]
        if not isinstance(payloads, list) or not all(isinstance(x, str) for x in payloads):
            raise invalid("serialized_named_tensors: Input should be a valid list of strings")
        load_format = typed(body, "load_format", str)
        self._check_session("update_weights_from_tensor")
        if len(payloads) < self.opts.tp_size:
            raise fail(
                f"Failed to update weights: list index out of range ({len(payloads)} "
                f"serialized_named_tensors for tp_size {self.opts.tp_size})."
            )

        def load():
            # each TP rank deserializes its own entry (SGLang: deserialize_own_rank); a CUDA IPC
            # handle (here its CPU stand-in) opens only on its own node and GPU
            sources: list[str] = []
            per_rank = [
                deserialize_named_tensors(
                    payloads[t],
                    load_format,
                    device=self._device_uuid(t),
                    tp_rank=t,
                    sources=sources,
                )
                for t in range(self.opts.tp_size)
            ]
            self.last_tensor_sources = sources
            return self.engine.load_weights(per_rank[0])

        return self._weights_result(load, body)

    def _device_uuid(self, tp_rank: int) -> str:
        from megatron_gopd.sync.wire import cpu_device_uuid

        return cpu_device_uuid(self.opts.base_gpu_id + tp_rank)

    def init_weights_update_group(self, body, query):
        body = require(body, "master_address", "master_port", "rank_offset", "world_size")
        address = typed(body, "master_address", str)
        port = typed(body, "master_port", int)
        offset = typed(body, "rank_offset", int)
        world = typed(body, "world_size", int)
        name = typed(body, "group_name", str, "weight_update_group")
        backend = typed(body, "backend", str, "nccl")
        if self.opts.tp_size != 1:
            raise fail("the CPU server joins weight-update groups with tp_size 1 only")
        try:
            self.engine.init_group(
                address, port, offset, world, name, backend, timeout_s=self.opts.dist_timeout_s
            )
        except Exception as e:
            raise fail(f"Failed to initialize custom process group: {e}.") from None
        return {"success": True, "message": "Succeeded to initialize custom process group."}

    def destroy_weights_update_group(self, body, query):
        body = require(body)
        if self.engine.destroy_group(typed(body, "group_name", str, "weight_update_group")):
            return {"success": True, "message": "Succeeded to destroy custom process group."}
        raise fail("The group to be destroyed does not exist.")

    def update_weights_from_distributed(self, body, query):
        body = require(body, "names", "dtypes", "shapes")
        names, dtypes, shapes = body["names"], body["dtypes"], body["shapes"]
        if not all(isinstance(x, list) for x in (names, dtypes, shapes)) or not (
            len(names) == len(dtypes) == len(shapes)
        ):
            raise invalid("names, dtypes, shapes: lists of the same length required")
        self._check_session("update_weights_from_distributed")
        # before 0.5.6 the field does not exist: the server expects one broadcast per tensor
        load_format = body.get("load_format") if self.features.flattened_distributed else None

        def load():
            named = self.engine.receive_distributed(
                names,
                dtypes,
                shapes,
                typed(body, "group_name", str, "weight_update_group"),
                load_format,
            )
            return self.engine.load_weights(named)

        return self._weights_result(load, body)

    def update_weights_from_disk(self, body, query):
        body = require(body, "model_path")
        path = typed(body, "model_path", str)
        out = self._weights_result(lambda: self.engine.load_from_disk(path), body)
        return {**out, "num_paused_requests": 0}

    def update_weight_version(self, body, query):
        body = require(body, "new_version")
        self.engine.weight_version = str(body["new_version"])
        return {
            "success": True,
            "message": f"Weight version updated to {body['new_version']}",
            "new_version": body["new_version"],
        }

    def get_weights_by_name(self, body, query):
        body = require(body, "name")
        name = typed(body, "name", str)
        truncate = typed(body, "truncate_size", int, 100)
        out = self.engine.get_weights_by_name(name, truncate)
        if out is None:
            raise value_error("Get parameter by name failed")
        return out

    def weights_checker(self, body, query):
        body = body if body is not None else {}
        body = require(body)
        action = typed(body, "action", str, "checksum")
        if action != "checksum":
            raise fail(f"Unsupported action={action!r} (the CPU server computes checksums only)")
        import hashlib

        sums = self.engine.checksums()
        per_gpu = hashlib.sha256(
            "".join(f"{k}:{v};" for k, v in sorted(sums.items())).encode()
        ).hexdigest()
        tp = self.opts.tp_size
        ranks = [
            {
                "checksums": sums,
                "per_gpu_checksum": per_gpu,
                "parallelism_info": [
                    {"role": "target", "tp_rank": t, "tp_size": tp, "rank": t, "size": tp}
                ],
            }
            for t in range(tp)
        ]
        engine_sum = hashlib.sha256()
        for r in ranks:
            engine_sum.update(r["per_gpu_checksum"].encode())
        return {
            "success": True,
            "message": "Success.",
            "ranks": ranks,
            "per_engine_checksum": engine_sum.hexdigest(),
        }

    # ------------------------------------------------------------------ memory

    def _tags(self, body) -> list[str]:
        body = body if body is not None else {}
        tags = typed(require(body), "tags", list)
        if tags and not all(isinstance(t, str) for t in tags):
            raise invalid("tags: Input should be a list of strings")
        return list(tags) if tags else list(self.features.default_memory_tags)

    def release_memory_occupation(self, body, query):
        tags = self._tags(body)
        with self._admin_lock:
            if self.engine.busy:
                # an assertion in SGLang's scheduler
                raise value_error(
                    "release_memory_occupation should be called only when server is idle."
                )
            self.memory_released.update(tags)
        return None

    def resume_memory_occupation(self, body, query):
        tags = self._tags(body)
        with self._admin_lock:
            missing = [t for t in tags if t not in self.memory_released]
            if missing:
                # offload_tags.remove(tag) in SGLang's scheduler
                raise value_error(
                    f"KeyError: {missing[0]!r}: resuming memory that was not released"
                )
            self.memory_released.difference_update(tags)
            if (
                "weights" in tags
                and self.opts.enable_memory_saver
                and not self.opts.enable_weights_cpu_backup
            ):
                self.engine.invalidate_weights()
        return None

    # ------------------------------------------------------------------ serving
