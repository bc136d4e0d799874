"""A CPU server that speaks SGLang's native HTTP API, for tests and the tiny CPU demo.

SGLang cannot run on CPU-only machines (its HTTP server imports the CUDA-built ``sgl_kernel``), so
the rollout client, the launcher and weight sync are exercised against this stand-in::

    python -m megatron_gopd.cpu_server --model-path HF_DIR [--port 30000] [--api-key KEY]

It is only worth something if it fails where SGLang fails, so it copies SGLang's behaviour where
a trainer can trip over it, for the SGLang version it reports (``--emulate-version``, default the
pinned schema, 0.5.23; the differences are :class:`~megatron_gopd.rollout.protocol.SGLangFeatures`):

* Endpoints, request checks, response and error shapes of what a trainer uses (see
  :mod:`megatron_gopd.rollout.protocol`): ``/generate`` (``input_ids`` only: the server always
  runs as with ``--skip-tokenizer-init``), ``/health``, ``/health_generate``, ``/flush_cache``
  (refused while requests run), ``/abort_request`` (exact rids; ``n > 1`` children get random
  rids, as in SGLang), the weight updates (``/update_weights_from_tensor``,
  ``/init_weights_update_group`` + ``/update_weights_from_distributed`` over gloo,
  ``/update_weights_from_disk``), ``/begin_weight_update`` / ``/end_weight_update`` (required
  around tensor and distributed updates from 0.5.21), ``/weights_checker`` (0.5.6+),
  ``/get_weights_by_name`` (Llama-family models only, as in SGLang), the memory endpoints,
  ``/model_info`` and ``/server_info`` (0.5.6+; ``/get_*`` aliases always).
* Start-up: like SGLang's scheduler, the server creates its own torch.distributed group over
  ``tcp://HOST:NCCL_PORT`` before it answers ``/health``; started from a torchrun worker's
  environment (``TORCHELASTIC_USE_AGENT_STORE``) it waits for a store nobody serves, as SGLang does.
* ``--api-key`` / ``--admin-api-key``: SGLang's auth levels (``srt/utils/auth.py``); 401
  ``{"error": "Unauthorized"}``. ``/server_info`` echoes the keys, as SGLang's does.
* Memory: ``/release_memory_occupation`` and ``/resume_memory_occupation`` keep SGLang's tag
  bookkeeping (resuming a tag that was not released fails; releasing needs an idle server); with
  ``--enable-memory-saver`` released memory is gone: generation is refused until everything is
  resumed, and resumed weights are garbage (NaN) until the next full update unless
  ``--enable-weights-cpu-backup``.
* Limits: a ``/generate`` over ``--max-request-samples`` samples or ``--max-total-tokens`` tokens
  (samples x (prompt + max_new_tokens)), or asking past the context length, is a 400 before any
  work; request bodies are read with a socket timeout and a size limit.

Model semantics are in :mod:`megatron_gopd.cpu_server.engine`. Stdlib ``http.server`` with a thread
per connection (no web framework in the base install): handler threads hand their samples to the
engine's scheduler, which runs every request in flight as one batch (``--max-running-requests``,
``--max-prefill-tokens``), and wait for them. It binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import argparse
import hmac
import json
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from megatron_gopd.cpu_server.replies import Reply, invalid, require, typed, value_error
from megatron_gopd.cpu_server.weights import WeightEndpoints
from megatron_gopd.rollout.protocol import (
    ADMIN_PATHS,
    SGLANG_SCHEMA_VERSION,
    ContractError,
    SGLangFeatures,
    ValidationError,
    check_generate,
    error_body,
)
from megatron_gopd.utils import GopdError, cli_errors, get_logger, port_available

__all__ = ["CpuServer", "ServerOptions", "main"]

log = get_logger("megatron_gopd.cpu_server")  # not __name__: also run as __main__

# sampling fields SGLang accepts that this server does not implement, with their neutral values
_UNSUPPORTED_NEUTRAL = {
    "stop": None,
    "stop_regex": None,
    "min_p": 0.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_new_tokens": 0,
    "json_schema": None,
    "regex": None,
    "ebnf": None,
    "structural_tag": None,
    "logit_bias": None,
    "custom_params": None,
    "beam_width": None,
    "watermark": None,
    "choice": None,
}


def nccl_port_near(http_port: int, host: str = "127.0.0.1") -> int:
    """The port of the server's own process group when none is given, chosen as SGLang's
    ``PortArgs.init_new`` does: ``port + randint(100, 1000)``, stepping by 42 (down by 43 above
    60000) until one is free. Never the HTTP port, which is not bound yet at this point: a free
    port from the OS may be that very port, just released by whoever picked it (seen in CI:
    the group took it and the HTTP server could not listen)."""
    import random

    port = http_port + random.randint(100, 1000)
    for _ in range(2000):
        if port != http_port and 1024 < port < 65536 and port_available(host, port):
            return port
        port = port + 42 if port < 60000 else port - 43
    raise GopdError(
        f"no free port near {http_port} for the server's process group: pass --nccl-port"
    )


@dataclass(frozen=True)
class ServerOptions:
    """How the stand-in behaves (SGLang's flag names where SGLang has the setting)."""

    host: str = "127.0.0.1"
    port: int = 30000
    emulate_version: str = SGLANG_SCHEMA_VERSION
    api_key: str | None = field(default=None, repr=False)
    admin_api_key: str | None = field(default=None, repr=False)
    tp_size: int = 1
    base_gpu_id: int = 0
    nccl_port: int | None = None  # None: a free port
    dist_timeout_s: float = 300.0  # its own group at start-up, and weight-update groups
    enable_memory_saver: bool = False
    enable_weights_cpu_backup: bool = False
    max_request_samples: int = 1024
    max_total_tokens: int = 1 << 17
    read_timeout_s: float = 60.0  # per socket read of a request
    max_body_bytes: int = 8 << 30

    @property
    def features(self) -> SGLangFeatures:
        return SGLangFeatures(self.emulate_version)


class CpuServer(WeightEndpoints):
    """Routes SGLang's endpoints to a :class:`~megatron_gopd.cpu_server.engine.CpuEngine`."""

    def __init__(self, engine, options: ServerOptions | None = None):
        self.engine = engine
        self.opts = options or ServerOptions()
        self.features = self.opts.features
        self.host, self.port = self.opts.host, self.opts.port
        # SGLang's offload_tags: what /release_memory_occupation took away
        self.memory_released: set[str] = set()
        self._session_open = False  # /begin_weight_update .. /end_weight_update (0.5.21+)
        # per TP rank, where the last tensor update came from: a handle's device, or "value"
        self.last_tensor_sources: list[str] = []
        self._admin_lock = threading.Lock()
        self.httpd: ThreadingHTTPServer | None = None
        self.routes = {
            "/health": self.health,
            "/health_generate": self.health_generate,
            "/generate": self.generate,
            "/flush_cache": self.flush_cache,
            "/abort_request": self.abort_request,
            "/get_model_info": self.model_info,
            "/get_server_info": self.server_info,
            "/update_weights_from_tensor": self.update_weights_from_tensor,
            "/init_weights_update_group": self.init_weights_update_group,
            "/destroy_weights_update_group": self.destroy_weights_update_group,
            "/update_weights_from_distributed": self.update_weights_from_distributed,
            "/update_weights_from_disk": self.update_weights_from_disk,
            "/update_weight_version": self.update_weight_version,
            "/get_weights_by_name": self.get_weights_by_name,
            "/release_memory_occupation": self.release_memory_occupation,
            "/resume_memory_occupation": self.resume_memory_occupation,
        }
        if self.features.weights_checker:  # 0.5.6 added these (and renamed the /get_ ones)
            self.routes.update(
                {
                    "/model_info": self.model_info,
                    "/server_info": self.server_info,
                    "/weights_checker": self.weights_checker,
                }
            )
        if self.features.ready_is_public:
            self.routes["/ready"] = self.health
        if self.features.weight_update_session:
            self.routes["/begin_weight_update"] = self.begin_weight_update
            self.routes["/end_weight_update"] = self.end_weight_update

    # ------------------------------------------------------------------ auth

    def authorized(self, method: str, path: str, header: str | None) -> bool:
        """SGLang's decision (``srt/utils/auth.py::decide_request_auth`` in 0.5.8+; before, one
        key compared as the exact string ``"Bearer KEY"``)."""
        api, admin = self.opts.api_key, self.opts.admin_api_key
        if method == "OPTIONS" or path.startswith(("/health", "/metrics")):
            return True
        if path.startswith("/ready") and self.features.ready_is_public:
            return True
        if not self.features.admin_api_key:
            return api is None or hmac.compare_digest(header or "", f"Bearer {api}")

        def bearer(expected: str) -> bool:
            parts = (header or "").split(" ", 1)
            if len(parts) != 2 or parts[0].lower() != "bearer":
                return False
            return hmac.compare_digest(parts[1], expected)

        if path in ADMIN_PATHS:
            if admin:
                return bearer(admin)
            return bearer(api) if api else True
        return bearer(api) if api else True

    # ------------------------------------------------------------------ health / info

    def health(self, body, query):
        raise Reply(200, text="")

    def health_generate(self, body, query):
        if self._memory_gone():
            raise Reply(503, text="")
        self.engine.health_generate()
        raise Reply(200, text="")

    def model_info(self, body, query):
        cfg = self.engine.config
        return {
            "model_path": self.engine.model_path,
            "tokenizer_path": None,
            "is_generation": True,
            "weight_version": self.engine.weight_version,
            "model_type": getattr(cfg, "model_type", None),
            "architectures": getattr(cfg, "architectures", None),
        }

    def server_info(self, body, query):
        o = self.opts
        # SGLang returns every server argument here, the keys included: never log it raw
        return {
            "model_path": self.engine.model_path,
            "host": o.host,
            "port": self.port,
            "tp_size": o.tp_size,
            "base_gpu_id": o.base_gpu_id,
            "nccl_port": o.nccl_port,
            "api_key": o.api_key,
            "admin_api_key": o.admin_api_key,
            "enable_memory_saver": o.enable_memory_saver,
            "enable_deterministic_inference": self.engine.deterministic,
            "context_length": self.engine.context_length,
            "skip_tokenizer_init": True,
            "version": o.emulate_version,
            "gopd_cpu_server": True,
            "gopd_device_uuids": [self._device_uuid(t) for t in range(o.tp_size)],
            "gopd_memory_released": sorted(self.memory_released),
            "gopd_last_tensor_update_sources": self.last_tensor_sources,
        }

    # ------------------------------------------------------------------ generation

    def _memory_gone(self) -> str | None:
        """Why generation cannot run now, or None."""
        if self.opts.enable_memory_saver and self.memory_released:
            return (
                f"the server's {', '.join(sorted(self.memory_released))} memory is released "
                "(SGLang would fault here): /resume_memory_occupation first"
            )
        if not self.engine.weights_valid:
            return (
                "the weights were released and resumed without --enable-weights-cpu-backup: "
                "they hold garbage until the next full weight update"
            )
        return None

    def generate(self, body, query):
        from megatron_gopd.cpu_server.engine import GenItem

        try:
            check_generate(body)
        except ValidationError as e:
            raise invalid(str(e)) from None
        except ContractError as e:
            raise Reply(400, error_body("contract", str(e))) from None
        except ValueError as e:
            raise value_error(str(e)) from None
        if body.get("input_ids") is None:
            raise value_error("the CPU server needs input_ids (it runs as --skip-tokenizer-init)")
        if body.get("stream"):
            raise value_error("stream=true is not supported by megatron_gopd's CPU server")
        ids = body["input_ids"]
        single = isinstance(ids[0], int)
        prompts = [ids] if single else ids
        sp = body.get("sampling_params") or {}
        sps = sp if isinstance(sp, list) else [sp] * len(prompts)
        if len(sps) != len(prompts):
            raise value_error(
                f"sampling_params has {len(sps)} entries for a batch of {len(prompts)}"
            )
        for one in sps:
            for k, neutral in _UNSUPPORTED_NEUTRAL.items():
                v = one.get(k)
                if v is not None and v != neutral and v not in ({}, [], ""):
                    raise value_error(f"sampling_params.{k} is not supported by the CPU server")
        n = int(sps[0].get("n", 1) or 1)
        rlp = _per_item(body.get("return_logprob"), len(prompts), False)
        lsl = _per_item(body.get("logprob_start_len"), len(prompts), -1)
        eng = self.engine
        total = 0
        for p, one in zip(prompts, sps):
            if len(p) >= eng.context_length:
                raise value_error(
                    f"The input ({len(p)} tokens) is longer than the model's context length "
                    f"({eng.context_length} tokens)."
                )
            mnt = one.get("max_new_tokens")
            mnt = 128 if mnt is None else int(mnt)
            if len(p) + mnt > eng.context_length:
                raise value_error(
                    "Requested token count exceeds the model's maximum context length of "
                    f"{eng.context_length} tokens. You requested a total of {len(p) + mnt} "
                    f"tokens: {len(p)} tokens from the input messages and {mnt} tokens for the "
                    "completion. Please reduce the number of tokens in the input messages or "
                    "the completion to fit within the limit."
                )
            total += n * (len(p) + mnt)
        for p, start in zip(prompts, lsl):
            if isinstance(start, int) and start > len(p):
                # SGLang's scheduler aborts the request with this message
                raise value_error(
                    f"req.logprob_start_len={start} is higher than the number of input tokens "
                    f"len(req.origin_input_ids)={len(p)}. Please use a smaller logprob_start_len."
                )
            bad = [t for t in p if not 0 <= t < eng.vocab_size]
            if bad:
                raise value_error(
                    f"The input_ids {bad[:4]} contain values outside the vocabulary "
                    f"[0, {eng.vocab_size})."
                )
        # bounded work per request, checked before anything is allocated for it
        samples = n * len(prompts)
        if samples > self.opts.max_request_samples:
            raise value_error(
                f"The request asks for {samples} samples ({len(prompts)} prompt(s) x n={n}); this "
                f"server runs at most {self.opts.max_request_samples} per request "
                "(--max-request-samples): split it."
            )
        if total > self.opts.max_total_tokens:
            raise value_error(
                f"The request needs up to {total} tokens (samples x (prompt + max_new_tokens)); "
                f"this server takes at most {self.opts.max_total_tokens} per request "
                "(--max-total-tokens): split it."
            )
        why = self._memory_gone()
        if why:
            raise value_error(why)
        rids = _item_rids(body.get("rid"), len(prompts), n, single)
        items = [
            GenItem(
                rid=rids[i * n + j],
                input_ids=list(p),
                params=sps[i],
                return_logprob=bool(rlp[i]),
                logprob_start_len=int(lsl[i]),
            )
            for i, p in enumerate(prompts)
            for j in range(n)
        ]
        try:
            eng.register([it.rid for it in items])
        except ValueError as e:
            raise value_error(str(e)) from None
        t0 = time.time()
        eng.generate(items)
        outs = [self._item_json(it, time.time() - t0) for it in items]
        return outs[0] if single and n == 1 else outs

    def _item_json(self, it, latency: float) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "id": it.rid,
            "finish_reason": it.finish,
            "prompt_tokens": len(it.input_ids),
            "weight_version": self.engine.weight_version,
            "completion_tokens": len(it.output_ids),
            "cached_tokens": 0,
            "e2e_latency": latency,
        }
        if it.return_logprob:
            meta["output_token_logprobs"] = [
                [lp, t, None] for lp, t in zip(it.output_logprobs, it.output_ids)
            ]
            start = len(it.input_ids) - len(it.input_logprobs or [])
            meta["input_token_logprobs"] = [
                [lp, t, None] for lp, t in zip(it.input_logprobs or [], it.input_ids[start:])
            ]
        return {"output_ids": list(it.output_ids), "meta_info": meta}

    def flush_cache(self, body, query):
        try:
            timeout = float(query.get("timeout", ["0"])[0])
        except ValueError:
            raise invalid("timeout: Input should be a valid number") from None
        if not timeout >= 0:
            raise invalid("timeout: Input should be greater than or equal to 0")
        deadline = time.time() + timeout
        while self.engine.busy and time.time() < deadline:
            time.sleep(0.01)
        if self.engine.busy:
            raise Reply(400, text="Flush cache failed: there are running or waiting requests.\n")
        raise Reply(
            200,
            text="Cache flushed.\nPlease check backend logs for more details. (When there are "
            "running or waiting requests, the operation will not be performed.)\n",
        )

    def abort_request(self, body, query):
        body = require(body)
        rid = typed(body, "rid", str)
        abort_all = typed(body, "abort_all", bool, False)
        self.engine.abort(rid, abort_all)
        raise Reply(200, text="")

    # ------------------------------------------------------------------ weights

    def init_process_group(self) -> None:
        """What SGLang's scheduler does before the server is healthy: its own torch.distributed
        group over ``tcp://HOST:NCCL_PORT`` (``srt/distributed/bootstrap.py``), through torch's
        rendezvous, which honours a torchrun worker's ``TORCHELASTIC_USE_AGENT_STORE``."""
        from datetime import timedelta

        import torch.distributed as dist

        from megatron_gopd.sync.process_group import tcp_url

        port = self.opts.nccl_port or nccl_port_near(self.opts.port, self.opts.host)
        url = tcp_url(self.opts.host or "127.0.0.1", port)
        log.info("init torch distributed begin (%s)", url)
        dist.init_process_group(
            backend="gloo",
            init_method=url,
            world_size=1,
            rank=0,
            timeout=timedelta(seconds=self.opts.dist_timeout_s),
        )
        log.info("init torch distributed ends")

    def serve(self, ready: threading.Event | None = None) -> None:
        server = self
        opts = self.opts

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # headers and body are two writes: without TCP_NODELAY the body waits for the
            # client's delayed ACK of the headers (up to 40 ms per answer on Linux)
            disable_nagle_algorithm = True
            timeout = opts.read_timeout_s  # a stalled client cannot hold a handler forever

            def log_message(self, fmt, *args):  # quiet: the trainer's log is the one to read
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding"):
                    self.close_connection = True
                    raise invalid("chunked request bodies are not supported: send Content-Length")
                raw = self.headers.get("Content-Length")
                try:
                    length = int(raw) if raw is not None else 0
                    if length < 0:
                        raise ValueError
                except ValueError:
                    self.close_connection = True
                    raise invalid(f"invalid Content-Length {raw!r}") from None
                if length > opts.max_body_bytes:
                    self.close_connection = True
                    raise Reply(413, {"detail": "Request body too large"})
                data = bytearray()
                try:
                    while len(data) < length:
                        chunk = self.rfile.read1(min(length - len(data), 1 << 20))
                        if not chunk:
                            break
                        data += chunk
                except TimeoutError:
                    pass
                if len(data) != length:
                    self.close_connection = True
                    raise invalid(f"request body ended after {len(data)} of {length} bytes")
                return bytes(data)

            def _handle(self):
                url = urlparse(self.path)
                fn = server.routes.get(url.path)
                try:
                    raw = self._body()
                    if not server.authorized(
                        self.command, url.path, self.headers.get("Authorization")
                    ):
                        raise Reply(401, {"error": "Unauthorized"})
                    if fn is None:
                        raise Reply(404, {"detail": "Not Found"})
                    try:
                        body = json.loads(raw) if raw else None
                    except ValueError as e:
                        raise invalid(f"JSON decode error: {e}") from None
                    result = fn(body, parse_qs(url.query))
                    self._send(200, json.dumps(result).encode(), "application/json")
                except Reply as r:
                    if r.text is not None:
                        self._send(r.status, r.text.encode(), "text/plain; charset=utf-8")
                    else:
                        self._send(r.status, json.dumps(r.body).encode(), "application/json")
                except Exception as e:  # a bug here: answer 500 like uvicorn, keep serving
                    log.exception("error serving %s", url.path)
                    self._send(500, f"Internal Server Error: {e}".encode(), "text/plain")

            def _send(self, status: int, data: bytes, ctype: str):
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(data)))
                    if self.close_connection:
                        self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError, TimeoutError):
                    pass  # the client gave up (timeout, abort): nothing to tell it

            do_GET = do_POST = do_PUT = _handle

        import socket

        class _Server(ThreadingHTTPServer):
            daemon_threads = True
            # no list of handler threads to join at close: socketserver walks that list on
            # every request (quadratic in a rollout's requests); daemon threads need no join
            block_on_close = False
            request_queue_size = 256
            address_family = socket.AF_INET6 if ":" in self.host else socket.AF_INET

        self.httpd = _Server((self.host, self.port), Handler)
        self.port = self.httpd.server_address[1]
        log.info(
            "CPU rollout server on http://%s:%d (%s, as SGLang %s)",
            self.host,
            self.port,
            self.engine.model_path,
            opts.emulate_version,
        )
        if ready is not None:
            ready.set()
        self.httpd.serve_forever(poll_interval=0.2)

    def shutdown(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()


def _per_item(value: Any, n: int, default: Any) -> list[Any]:
    if value is None:
        return [default] * n
    if isinstance(value, list):
        if len(value) != n:
            raise value_error(f"expected {n} values, got {len(value)}")
        return value
    return [value] * n


def _item_rids(rid: Any, n_prompts: int, n: int, single: bool) -> list[str]:
    """SGLang's request ids for the samples of one request: a single prompt keeps its rid; a
    batch with one string rid gets ``rid_i``; a list of rids must match the batch; with ``n > 1``
    every sample gets a fresh random rid (the caller's cannot abort them)."""
    if rid is not None and not isinstance(rid, (str, list)):
        raise invalid("rid: Input should be a valid string or list of strings")
    if isinstance(rid, list):
        if single or len(rid) != n_prompts:
            raise value_error(
                "The specified rids length mismatch with the batch_size for batch processing."
            )
        if not all(isinstance(r, str) for r in rid):
            raise invalid("rid: Input should be a valid list of strings")
        base = list(rid)
    elif rid is None:
        base = [uuid.uuid4().hex for _ in range(n_prompts)]
    else:
        base = [rid] if single else [f"{rid}_{i}" for i in range(n_prompts)]
    if n == 1:
        return base
    return [uuid.uuid4().hex for _ in range(n_prompts * n)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megatron_gopd.cpu_server",
        description="CPU stand-in for an SGLang server (native API) running an HF model.",
    )
    d = ServerOptions()
    p.add_argument(
        "--config", help="YAML file of these options (SGLang's --config; keys without --)"
    )
    p.add_argument("--model-path", required=True, help="Hugging Face model directory")
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--context-length", type=int, default=None)
    p.add_argument("--random-seed", type=int, default=0)
    p.add_argument(
        "--tp-size",
        type=int,
        default=d.tp_size,
        help="tensor-parallel ranks it poses as: each reads its own entry of a tensor update",
    )
    p.add_argument("--base-gpu-id", type=int, default=d.base_gpu_id)
    p.add_argument("--nccl-port", type=int, default=None, help="its own group's port (free)")
    p.add_argument("--dist-timeout", type=float, default=d.dist_timeout_s, help="seconds")
    p.add_argument("--skip-tokenizer-init", action="store_true", help="always on (accepted)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--admin-api-key", default=None, help="SGLang 0.5.8+")
    p.add_argument(
        "--enable-deterministic-inference",
        action="store_true",
        help="honour sampling_seed (SGLang ignores it otherwise)",
    )
    p.add_argument("--enable-memory-saver", action="store_true")
    p.add_argument("--enable-weights-cpu-backup", action="store_true")
    p.add_argument(
        "--emulate-version",
        default=d.emulate_version,
        help="the SGLang version whose behaviour (and /server_info version) it shows",
    )
    p.add_argument(
        "--max-request-samples",
        type=int,
        default=d.max_request_samples,
        help="most samples (prompts x n) one /generate may ask for (more: 400)",
    )
    p.add_argument(
        "--max-total-tokens",
        type=int,
        default=d.max_total_tokens,
        help="most tokens one /generate may need, samples x (prompt + max_new_tokens) (more: 400)",
    )
    p.add_argument(
        "--request-read-timeout",
        type=float,
        default=d.read_timeout_s,
        help="seconds a request's socket may stall before the server answers 400 and hangs up",
    )
    p.add_argument(
        "--enable-fp32-lm-head",
        action="store_true",
        help="as SGLang's: the LM head computes fp32 logits (bf16 products, fp32 accumulation)",
    )
    p.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:N")
    p.add_argument(
        "--max-running-requests",
        type=int,
        default=256,
        help="as SGLang's: most samples decoded together in one batch (the rest wait)",
    )
    p.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=16384,
        help="as SGLang's: most prompt tokens admitted into the batch per step",
    )
    return p


def _with_config_file(argv: list[str]) -> list[str]:
    """SGLang's ``--config FILE.yaml``: its keys become options placed before the others (so that
    a secret such as the API key need not appear on the command line)."""
    if "--config" not in argv:
        return argv
    i = argv.index("--config")
    if i + 1 >= len(argv):
        raise GopdError("--config needs a YAML file")
    path = argv[i + 1]
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise GopdError(f"cannot read --config {path}: {e}") from None
    if not isinstance(data, dict):
        raise GopdError(f"--config {path} must hold a mapping")
    extra: list[str] = []
    for k, v in data.items():
        flag = "--" + str(k).replace("_", "-")
        if isinstance(v, bool):
            extra += [flag] if v else []
        else:
            extra.append(f"{flag}={v}")  # a value may start with "-"
    return extra + argv[:i] + argv[i + 2 :]


@cli_errors
def main(argv: list[str] | None = None) -> int:
    import torch

    from megatron_gopd.cpu_server.engine import CpuEngine

    argv = _with_config_file(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    opts = ServerOptions(
        host=args.host,
        port=args.port,
        emulate_version=args.emulate_version,
        api_key=args.api_key,
        admin_api_key=args.admin_api_key,
        tp_size=args.tp_size,
        base_gpu_id=args.base_gpu_id,
        nccl_port=args.nccl_port,
        dist_timeout_s=args.dist_timeout,
        enable_memory_saver=args.enable_memory_saver,
        enable_weights_cpu_backup=args.enable_weights_cpu_backup,
        max_request_samples=args.max_request_samples,
        max_total_tokens=args.max_total_tokens,
        read_timeout_s=args.request_read_timeout,
    )
    if args.admin_api_key and not opts.features.admin_api_key:
        raise GopdError(
            f"unrecognized arguments: --admin-api-key (SGLang {opts.emulate_version} has none)"
        )
    if args.tp_size < 1:
        raise GopdError("--tp-size must be >= 1")
    torch.set_num_threads(1)  # one core per server: several run side by side in tests
    engine = CpuEngine(
        args.model_path,
        dtype=args.dtype,
        context_length=args.context_length,
        random_seed=args.random_seed,
        deterministic=args.enable_deterministic_inference,
        enable_fp32_lm_head=args.enable_fp32_lm_head,
        device=args.device,
        max_running_requests=args.max_running_requests,
        max_prefill_tokens=args.max_prefill_tokens,
    )
    server = CpuServer(engine, opts)
    try:
        server.init_process_group()
    except Exception as e:
        raise GopdError(f"initialising torch.distributed failed: {e}") from None
    try:
        server.serve()
    except OSError as e:
        raise GopdError(f"cannot listen on {args.host}:{args.port}: {e.strerror}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
