"""A CPU server that speaks SGLang's native HTTP API, for tests and the tiny CPU demo.

SGLang cannot run on CPU-only machines (its HTTP server imports the CUDA-built ``sgl_kernel``), so
the rollout client, the launcher and weight sync are exercised against this stand-in::

    python -m megatron_gopd.cpu_server --model-path HF_DIR [--port 30000]

Same endpoints, request checks, response and error shapes as SGLang 0.5.23 (see
:mod:`megatron_gopd.rollout.protocol`) for what a trainer uses: ``/generate`` (``input_ids`` only:
the server always runs as with ``--skip-tokenizer-init``), ``/health``, ``/health_generate``,
``/flush_cache`` (refused while requests run, as SGLang does), ``/abort_request``,
``/update_weights_from_tensor``, ``/init_weights_update_group`` +
``/update_weights_from_distributed`` (gloo) + ``/destroy_weights_update_group``,
``/update_weights_from_disk``, ``/get_weights_by_name``, ``/release_memory_occupation`` and
``/resume_memory_occupation`` (no-ops that keep the weights), ``/model_info``, ``/server_info``.
Model semantics are in :mod:`megatron_gopd.cpu_server.engine`.

Stdlib ``http.server`` with a thread per request: no web framework in the base install, and the
model is the bottleneck anyway (one model step at a time; requests interleave between steps).
It binds 127.0.0.1 unless told otherwise: it executes weight updates for anyone who can reach it.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from megatron_gopd.rollout.protocol import (
    SGLANG_SCHEMA_VERSION,
    ContractError,
    ValidationError,
    check_generate,
    error_body,
)
from megatron_gopd.utils import cli_errors, get_logger

__all__ = ["CpuServer", "main"]

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


class _Reply(Exception):
    def __init__(self, status: int, body: Any = None, text: str | None = None):
        self.status, self.body, self.text = status, body, text


def _value_error(msg: str) -> _Reply:
    return _Reply(400, error_body("value", msg))


def _require(body: Any, *keys: str) -> dict:
    if not isinstance(body, dict):
        raise _Reply(400, error_body("validation", "Input should be a valid dictionary"))
    for k in keys:
        if k not in body:
            raise _Reply(400, error_body("validation", f"{k}: Field required"))
    return body


class CpuServer:
    """Routes SGLang's endpoints to a :class:`~megatron_gopd.cpu_server.engine.CpuEngine`."""

    def __init__(self, engine, host: str = "127.0.0.1", port: int = 30000):
        self.engine = engine
        self.host, self.port = host, port
        self.memory_released: set[str] = set()
        self.httpd: ThreadingHTTPServer | None = None
        self.routes = {
            "/health": self.health,
            "/health_generate": self.health_generate,
            "/ready": self.health,
            "/generate": self.generate,
            "/flush_cache": self.flush_cache,
            "/abort_request": self.abort_request,
            "/model_info": self.model_info,
            "/get_model_info": self.model_info,
            "/server_info": self.server_info,
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

    # ------------------------------------------------------------------ health / info

    def health(self, body, query):
        raise _Reply(200, text="")

    def health_generate(self, body, query):
        self.engine.health_generate()
        raise _Reply(200, text="")

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
        return {
            "model_path": self.engine.model_path,
            "host": self.host,
            "port": self.port,
            "tp_size": 1,
            "context_length": self.engine.context_length,
            "skip_tokenizer_init": True,
            "version": f"megatron_gopd-cpu (SGLang {SGLANG_SCHEMA_VERSION} schema)",
        }

    # ------------------------------------------------------------------ generation

    def generate(self, body, query):
        from megatron_gopd.cpu_server.engine import GenItem

        try:
            check_generate(body)
        except ValidationError as e:
            raise _Reply(400, error_body("validation", str(e))) from None
        except ContractError as e:
            raise _Reply(400, error_body("contract", str(e))) from None
        except ValueError as e:
            raise _value_error(str(e)) from None
        if body.get("input_ids") is None:
            raise _value_error("the CPU server needs input_ids (it runs as --skip-tokenizer-init)")
        if body.get("stream"):
            raise _value_error("stream=true is not supported by megatron_gopd's CPU server")
        ids = body["input_ids"]
        single = isinstance(ids[0], int)
        prompts = [ids] if single else ids
        sp = body.get("sampling_params") or {}
        sps = sp if isinstance(sp, list) else [sp] * len(prompts)
        if len(sps) != len(prompts):
            raise _value_error(
                f"sampling_params has {len(sps)} entries for a batch of {len(prompts)}"
            )
        for one in sps:
            for k, neutral in _UNSUPPORTED_NEUTRAL.items():
                v = one.get(k)
                if v is not None and v != neutral and v not in ({}, [], ""):
                    raise _value_error(f"sampling_params.{k} is not supported by the CPU server")
        n = int(sps[0].get("n", 1) or 1)
        rlp = _per_item(body.get("return_logprob"), len(prompts), False)
        lsl = _per_item(body.get("logprob_start_len"), len(prompts), -1)
        rid = body.get("rid")
        rids = _per_item(rid, len(prompts), None)
        eng = self.engine
        for p in prompts:
            if len(p) >= eng.context_length:
                raise _value_error(
                    f"The input ({len(p)} tokens) is longer than the model's context length "
                    f"({eng.context_length} tokens)."
                )
            bad = [t for t in p if not 0 <= t < eng.vocab_size]
            if bad:
                raise _value_error(
                    f"The input_ids {bad[:4]} contain values outside the vocabulary "
                    f"[0, {eng.vocab_size})."
                )
        items = []
        for i, p in enumerate(prompts):
            base = rids[i] or uuid.uuid4().hex
            for j in range(n):
                items.append(
                    GenItem(
                        rid=base if n == 1 else f"{base}-{j}",
                        input_ids=list(p),
                        params=sps[i],
                        return_logprob=bool(rlp[i]),
                        logprob_start_len=int(lsl[i]),
                    )
                )
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
        timeout = float(query.get("timeout", ["0"])[0])
        deadline = time.time() + timeout
        while self.engine.busy and time.time() < deadline:
            time.sleep(0.01)
        if self.engine.busy:
            raise _Reply(400, text="Flush cache failed: there are running or waiting requests.\n")
        raise _Reply(
            200,
            text="Cache flushed.\nPlease check backend logs for more details. (When there are "
            "running or waiting requests, the operation will not be performed.)\n",
        )

    def abort_request(self, body, query):
        body = _require(body)
        self.engine.abort(body.get("rid"), bool(body.get("abort_all", False)))
        raise _Reply(200, text="")

    # ------------------------------------------------------------------ weights

    def _weights_result(self, fn, body) -> dict[str, Any]:
        if body.get("abort_all_requests"):
            self.engine.abort(None, True)
        try:
            n = fn()
        except Exception as e:
            log.warning("weight update failed: %s", e)
            raise _Reply(
                400, {"success": False, "message": f"Failed to update weights: {e}."}
            ) from None
        if body.get("weight_version") is not None:
            self.engine.weight_version = str(body["weight_version"])
        return {"success": True, "message": f"Succeeded to update {n} parameter(s)."}

    def update_weights_from_tensor(self, body, query):
        from megatron_gopd.sync.wire import deserialize_named_tensors

        body = _require(body, "serialized_named_tensors")
        payloads = body["serialized_named_tensors"]
        if not isinstance(payloads, list) or not payloads:
            raise _Reply(400, error_body("validation", "serialized_named_tensors: list required"))

        def load():
            named = deserialize_named_tensors(payloads[0], body.get("load_format"))
            return self.engine.load_weights(named)

        return self._weights_result(load, body)

    def init_weights_update_group(self, body, query):
        body = _require(body, "master_address", "master_port", "rank_offset", "world_size")
        try:
            self.engine.init_group(
                body["master_address"],
                int(body["master_port"]),
                int(body["rank_offset"]),
                int(body["world_size"]),
                body.get("group_name", "weight_update_group"),
                body.get("backend", "nccl"),
            )
        except Exception as e:
            raise _Reply(
                400,
                {"success": False, "message": f"Failed to initialize custom process group: {e}."},
            ) from None
        return {"success": True, "message": "Succeeded to initialize custom process group."}

    def destroy_weights_update_group(self, body, query):
        body = _require(body)
        if self.engine.destroy_group(body.get("group_name", "weight_update_group")):
            return {"success": True, "message": "Succeeded to destroy custom process group."}
        raise _Reply(
            400, {"success": False, "message": "The group to be destroyed does not exist."}
        )

    def update_weights_from_distributed(self, body, query):
        body = _require(body, "names", "dtypes", "shapes")
        if not len(body["names"]) == len(body["dtypes"]) == len(body["shapes"]):
            raise _Reply(400, error_body("validation", "names, dtypes, shapes differ in length"))

        def load():
            named = self.engine.receive_distributed(
                body["names"],
                body["dtypes"],
                body["shapes"],
                body.get("group_name", "weight_update_group"),
                body.get("load_format"),
            )
            return self.engine.load_weights(named)

        return self._weights_result(load, body)

    def update_weights_from_disk(self, body, query):
        body = _require(body, "model_path")
        out = self._weights_result(lambda: self.engine.load_from_disk(body["model_path"]), body)
        return {**out, "num_paused_requests": 0}

    def update_weight_version(self, body, query):
        body = _require(body, "new_version")
        self.engine.weight_version = str(body["new_version"])
        return {
            "success": True,
            "message": f"Weight version updated to {body['new_version']}",
            "new_version": body["new_version"],
        }

    def get_weights_by_name(self, body, query):
        body = _require(body, "name")
        out = self.engine.get_weights_by_name(body["name"], int(body.get("truncate_size", 100)))
        if out is None:
            raise _value_error("Get parameter by name failed")
        return out

    def release_memory_occupation(self, body, query):
        self.memory_released.update((body or {}).get("tags") or ["weights", "kv_cache"])
        return None

    def resume_memory_occupation(self, body, query):
        self.memory_released.difference_update((body or {}).get("tags") or ["weights", "kv_cache"])
        return None

    # ------------------------------------------------------------------ serving

    def serve(self, ready: threading.Event | None = None) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):  # quiet: the trainer's log is the one to read
                pass

            def _handle(self):
                url = urlparse(self.path)
                fn = server.routes.get(url.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    if fn is None:
                        raise _Reply(404, {"detail": "Not Found"})
                    try:
                        body = json.loads(raw) if raw else None
                    except json.JSONDecodeError as e:
                        raise _Reply(
                            400, error_body("validation", f"JSON decode error: {e.msg}")
                        ) from None
                    result = fn(body, parse_qs(url.query))
                    self._send(200, json.dumps(result).encode(), "application/json")
                except _Reply as r:
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
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout, abort): nothing to tell it

            do_GET = do_POST = do_PUT = _handle

        ThreadingHTTPServer.daemon_threads = True
        ThreadingHTTPServer.request_queue_size = 256
        self.httpd = ThreadingHTTPServer((self.host, self.port), Handler)
        self.port = self.httpd.server_address[1]
        log.info(
            "CPU rollout server on http://%s:%d (%s)", self.host, self.port, self.engine.model_path
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
            raise _value_error(f"expected {n} values, got {len(value)}")
        return value
    return [value] * n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megatron_gopd.cpu_server",
        description="CPU stand-in for an SGLang server (native API) running an HF model.",
    )
    p.add_argument("--model-path", required=True, help="Hugging Face model directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--context-length", type=int, default=None)
    p.add_argument("--random-seed", type=int, default=0)
    p.add_argument("--tp-size", type=int, default=1, help="only 1 (accepted for compatibility)")
    p.add_argument("--skip-tokenizer-init", action="store_true", help="always on (accepted)")
    p.add_argument(
        "--enable-fp32-lm-head",
        action="store_true",
        help="as SGLang's: the LM head computes fp32 logits (bf16 products, fp32 accumulation)",
    )
    p.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:N")
    return p


@cli_errors
def main(argv: list[str] | None = None) -> int:
    import torch

    from megatron_gopd.cpu_server.engine import CpuEngine
    from megatron_gopd.utils import GopdError

    args = build_parser().parse_args(argv)
    if args.tp_size != 1:
        raise GopdError("the CPU server runs one process: --tp-size must be 1")
    torch.set_num_threads(1)  # one core per server: several run side by side in tests
    engine = CpuEngine(
        args.model_path,
        dtype=args.dtype,
        context_length=args.context_length,
        random_seed=args.random_seed,
        enable_fp32_lm_head=args.enable_fp32_lm_head,
        device=args.device,
    )
    server = CpuServer(engine, args.host, args.port)
    try:
        server.serve()
    except OSError as e:
        raise GopdError(f"cannot listen on {args.host}:{args.port}: {e.strerror}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
