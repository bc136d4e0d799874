"""SGLang's native HTTP API: the part of its schema we speak, pinned to the releases we read.

One module for both sides, so the client and our CPU test server cannot drift apart:

* request building (``/generate`` bodies, sampling parameters),
* response parsing with validation (a malformed response is an error naming server and request),
* the request checks SGLang applies, with its three error shapes (see :func:`check_generate`).

Pinned to **SGLang 0.5.23** (``srt/entrypoints/http_server.py``, ``srt/managers/io_struct.py``,
``api/v1/api_types.py``, ``srt/sampling/sampling_params.py``). The request fields we send and the
response fields we read (``input_ids``, ``sampling_params``, ``return_logprob``,
``logprob_start_len``, ``output_ids``, ``meta_info.{finish_reason, output_token_logprobs,
input_token_logprobs}``) are the same back to 0.5.4 (the floor of our ``[gpu]`` extra); what
changed since is the rejection of unknown sampling keys, which 0.5.23 answers with the schema
contract's 400 (``{"error": "unknown field ..."}``).
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from megatron_gopd.utils import GopdError

__all__ = [
    "ADMIN_PATHS",
    "MEMORY_TAGS",
    "SAMPLING_PARAM_FIELDS",
    "SGLANG_SCHEMA_VERSION",
    "ContractError",
    "GenerateOutput",
    "ProtocolError",
    "RequestError",
    "SGLangFeatures",
    "SamplingConfig",
    "ServerAuth",
    "check_generate",
    "http_json",
    "parse_generate_output",
    "redact_command",
]

SGLANG_SCHEMA_VERSION = "0.5.23"

# SGLang's SamplingParams fields in its declaration order (the order of the 400 message).
SAMPLING_PARAM_FIELDS = (
    "max_new_tokens",
    "stop",
    "stop_token_ids",
    "stop_regex",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "min_new_tokens",
    "n",
    "json_schema",
    "regex",
    "ebnf",
    "structural_tag",
    "ignore_eos",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "no_stop_trim",
    "stream_interval",
    "logit_bias",
    "sampling_seed",
    "custom_params",
    "beam_width",
    "watermark",
    "choice",
)
_FLOAT_KEYS = {
    "temperature",
    "top_p",
    "min_p",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
}
_INT_KEYS = {
    "max_new_tokens",
    "top_k",
    "min_new_tokens",
    "n",
    "stream_interval",
    "sampling_seed",
    "beam_width",
}
_BOOL_KEYS = {
    "ignore_eos",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "no_stop_trim",
}
TOP_K_ALL = 1 << 30

# ---------------------------------------------------------------------------------- versions

# What changed between the SGLang releases we support, bisected over the PyPI wheels (grep of
# ``srt/entrypoints/http_server.py``, ``srt/managers/io_struct.py``, ``srt/constants.py``,
# ``srt/utils/auth.py`` of 0.5.4, 0.5.4.post3, 0.5.5-0.5.5.post3, 0.5.6-0.5.10, 0.5.15.post1,
# 0.5.18-0.5.23). Each entry: the first release that has it.
_FIRST = {
    # /release_memory_occupation knows the "cuda_graph" tag and releases it by default
    "cuda_graph_tag": "0.5.4.post3",
    # UpdateWeightsFromDistributedReqInput.load_format ("flattened_bucket": one broadcast per
    # bucket); older servers drop the field and expect one broadcast per tensor
    "flattened_distributed": "0.5.6",
    # /weights_checker (checksums of the served parameters), /server_info, /model_info
    "weights_checker": "0.5.6",
    # --admin-api-key and per-endpoint auth levels (srt/utils/auth.py)
    "admin_api_key": "0.5.8",
    # /ready* needs no key
    "ready_is_public": "0.5.20",
    # update_weights_from_tensor / _distributed fail unless between /begin_weight_update and
    # /end_weight_update
    "weight_update_session": "0.5.21",
}

# SGLang's memory tags (srt/constants.py: GPU_MEMORY_TYPE_*). 0.5.4 knows the first two only but
# accepts "cuda_graph" in a release/resume list (it only records it), so sending all three works
# on every version.
MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")

# The endpoints SGLang 0.5.23 decorates with ``auth_level(AuthLevel.ADMIN_OPTIONAL)``: with
# ``--admin-api-key`` set they take that key only; otherwise ``--api-key``. Every other path but
# /health*, /metrics* (and /ready* from 0.5.20) takes ``--api-key``.
ADMIN_PATHS = frozenset(
    {
        "/flush_cache",
        "/abort_request",
        "/update_weights_from_disk",
        "/update_weights_from_tensor",
        "/update_weights_from_distributed",
        "/init_weights_update_group",
        "/destroy_weights_update_group",
        "/begin_weight_update",
        "/end_weight_update",
        "/update_weight_version",
        "/get_weights_by_name",
        "/weights_checker",
        "/release_memory_occupation",
        "/resume_memory_occupation",
        "/pause_generation",
        "/continue_generation",
    }
)


def _version(text: str):
    from packaging.version import InvalidVersion, Version

    try:
        return Version(text)
    except InvalidVersion:
        return None


@dataclass(frozen=True)
class SGLangFeatures:
    """What a server of a given SGLang version does differently (see ``_FIRST``).

    ``version`` is the server's own (``/get_server_info["version"]``); an unparsable one (a fork,
    a dev build) is taken as the pinned schema version.
    """

    version: str = SGLANG_SCHEMA_VERSION

    def has(self, feature: str) -> bool:
        v = _version(self.version) or _version(SGLANG_SCHEMA_VERSION)
        return v >= _version(_FIRST[feature])

    @property
    def flattened_distributed(self) -> bool:
        return self.has("flattened_distributed")

    @property
    def weights_checker(self) -> bool:
        return self.has("weights_checker")

    @property
    def weight_update_session(self) -> bool:
        return self.has("weight_update_session")

    @property
    def admin_api_key(self) -> bool:
        return self.has("admin_api_key")

    @property
    def ready_is_public(self) -> bool:
        return self.has("ready_is_public")

    @property
    def default_memory_tags(self) -> tuple[str, ...]:
        """What ``/release_memory_occupation`` without tags releases."""
        if self.has("cuda_graph_tag"):
            return ("kv_cache", "weights", "cuda_graph")
        return ("weights", "kv_cache")

    @property
    def server_info_path(self) -> str:
        return "/server_info" if self.weights_checker else "/get_server_info"


# ---------------------------------------------------------------------------------- auth


@dataclass(frozen=True)
class ServerAuth:
    """The keys a client sends (``Authorization: Bearer KEY``), as SGLang checks them.

    ``api_key``: the servers' ``--api-key``; ``admin_api_key``: their ``--admin-api-key``
    (0.5.8+), which the admin endpoints (:data:`ADMIN_PATHS`) then require instead. Never printed:
    ``repr`` hides the values.
    """

    api_key: str | None = field(default=None, repr=False)
    admin_api_key: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, environ=None) -> ServerAuth:
        """``GOPD_ROLLOUT_API_KEY`` / ``GOPD_ROLLOUT_ADMIN_API_KEY`` (the Slurm launcher sets the
        first for the servers it starts; secrets stay out of command lines and run configs)."""
        import os

        env = os.environ if environ is None else environ
        return cls(
            env.get("GOPD_ROLLOUT_API_KEY") or None, env.get("GOPD_ROLLOUT_ADMIN_API_KEY") or None
        )

    def headers(self, path: str) -> dict[str, str]:
        key = self.admin_api_key if (self.admin_api_key and _path(path) in ADMIN_PATHS) else None
        key = key or self.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def __bool__(self) -> bool:
        return bool(self.api_key or self.admin_api_key)


def _path(url_or_path: str) -> str:
    from urllib.parse import urlparse

    return urlparse(url_or_path).path or url_or_path


_SECRET_FLAGS = ("--api-key", "--admin-api-key")


def redact_command(cmd: list[str]) -> list[str]:
    """A command line with the values of ``--api-key`` / ``--admin-api-key`` replaced, for logs."""
    out, hide = [], False
    for a in cmd:
        if hide:
            out.append("***")
            hide = False
        elif a in _SECRET_FLAGS:
            out.append(a)
            hide = True
        elif a.startswith(tuple(f"{f}=" for f in _SECRET_FLAGS)):
            out.append(a.split("=", 1)[0] + "=***")
        else:
            out.append(a)
    return out


class ProtocolError(GopdError):
    """A server answered something that is not SGLang's schema (names server and request)."""


class RequestError(GopdError):
    """A server refused a request (HTTP 4xx): our request is wrong, retrying will not help."""

    def __init__(self, message: str, status: int = 400, body: Any = None):
        super().__init__(message)
        self.status = status
        self.body = body


# ---------------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling parameters of a rollout, as SGLang names them.

    ``seed`` makes sampling reproducible: every sample gets its own ``sampling_seed`` derived from
    (seed, prompt index, sample index). Real SGLang honours ``sampling_seed`` when launched with
    ``--enable-deterministic-inference`` (the launcher's ``deterministic=True``).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 1024
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise GopdError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise GopdError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k != -1 and self.top_k < 1:
            raise GopdError(f"top_k must be -1 (disabled) or >= 1, got {self.top_k}")
        if self.max_new_tokens < 0:
            raise GopdError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")

    def to_sglang(self, n: int = 1, sampling_seed: int | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_new_tokens": self.max_new_tokens,
            "n": n,
        }
        if self.stop_token_ids:
            params["stop_token_ids"] = list(self.stop_token_ids)
        if self.ignore_eos:
            params["ignore_eos"] = True
        if sampling_seed is not None:
            params["sampling_seed"] = sampling_seed
        return params

    def sample_seed(self, prompt_index: int, sample_index: int) -> int | None:
        """A per-sample seed in [0, 2**63): SGLang seeds by (seed, position), so the n samples of
        one prompt must not share a seed or they would be identical."""
        if self.seed is None:
            return None
        x = (self.seed * 1_000_003 + prompt_index) * 1_000_033 + sample_index
        # splitmix64 finaliser: nearby indices give unrelated seeds
        x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        return (x ^ (x >> 31)) >> 1


# ---------------------------------------------------------------------------------- responses


@dataclass
class GenerateOutput:
    """One item of a ``/generate`` answer (one sample of one prompt)."""

    output_ids: list[int]
    finish_reason: str  # "stop" | "length" | "abort"
    output_logprobs: list[float] | None = None
    # log p(x_t | x_<t) for prompt positions >= logprob_start_len; None for position 0
    input_logprobs: list[float | None] | None = None
    prompt_tokens: int | None = None
    weight_version: str | None = None
    abort_message: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, repr=False)


def _bad(where: str, what: str) -> ProtocolError:
    return ProtocolError(f"malformed /generate response from {where}: {what}")


def _logprob_list(where: str, key: str, entries: Any, ids: list[int] | None) -> list:
    if not isinstance(entries, list):
        raise _bad(where, f"meta_info.{key} is {type(entries).__name__}, expected a list")
    vals = []
    for i, e in enumerate(entries):
        if not (isinstance(e, (list, tuple)) and len(e) == 3):
            raise _bad(where, f"meta_info.{key}[{i}] is not a [logprob, token_id, text] triple")
        lp, tok = e[0], e[1]
        if lp is not None and not isinstance(lp, (int, float)):
            raise _bad(where, f"meta_info.{key}[{i}] has a non-numeric logprob {lp!r}")
        if ids is not None and tok != ids[i]:
            raise _bad(where, f"meta_info.{key}[{i}] is for token {tok}, the output has {ids[i]}")
        vals.append(None if lp is None else float(lp))
    return vals


def parse_generate_output(
    item: Any, *, where: str, want_logprobs: bool, input_ids: list[int] | None = None
) -> GenerateOutput:
    """Validate and parse one response item. ``where`` names server and request for errors."""
    if not isinstance(item, dict):
        raise _bad(where, f"item is {type(item).__name__}, expected an object")
    if "error" in item:
        raise ProtocolError(f"{where} answered an error inside a 200 response: {item['error']}")
    ids = item.get("output_ids")
    meta = item.get("meta_info")
    if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
        raise _bad(where, "no integer list 'output_ids'")
    if not isinstance(meta, dict):
        raise _bad(where, "no object 'meta_info'")
    fr = meta.get("finish_reason")
    if not isinstance(fr, dict) or fr.get("type") not in ("stop", "length", "abort"):
        raise _bad(where, f"meta_info.finish_reason is {fr!r}")
    out = GenerateOutput(
        output_ids=ids,
        finish_reason=fr["type"],
        prompt_tokens=meta.get("prompt_tokens"),
        weight_version=meta.get("weight_version"),
        abort_message=fr.get("message") if fr["type"] == "abort" else None,
        meta=meta,
    )
    if want_logprobs:
        if "output_token_logprobs" not in meta:
            raise _bad(where, "return_logprob was set but meta_info has no output_token_logprobs")
        lps = _logprob_list(where, "output_token_logprobs", meta["output_token_logprobs"], None)
        if len(lps) != len(ids):
            raise _bad(where, f"{len(lps)} output_token_logprobs for {len(ids)} output_ids")
        toks = [e[1] for e in meta["output_token_logprobs"]]
        if toks != ids:
            raise _bad(where, "output_token_logprobs token ids differ from output_ids")
        if any(lp is None for lp in lps):
            raise _bad(where, "an output token has a null logprob")
        out.output_logprobs = lps
        if "input_token_logprobs" in meta and meta["input_token_logprobs"] is not None:
            out.input_logprobs = _logprob_list(
                where, "input_token_logprobs", meta["input_token_logprobs"], None
            )
    return out


# ---------------------------------------------------------------------------------- request checks


class ContractError(ValueError):
    """SGLang's schema-contract violation (serde's wording): answered as 400 ``{"error": str}``."""


class ValidationError(ValueError):
    """FastAPI's body validation failure: answered as 400 in SGLang's ErrorResponse shape."""


def error_body(kind: str, message: str) -> dict[str, Any]:
    """The three 400 shapes of SGLang 0.5.23's native API.

    ``contract``: ``api_contract.generate_contract_error`` -> ``{"error": "<serde text>"}``;
    ``value``: ``_create_error_response`` (ValueError in the tokenizer manager) ->
    ``{"error": {"message": ...}}``; ``validation``: the RequestValidationError handler ->
    ``{"object": "error", "message", "type": "Bad Request", "param": null, "code": 400}``.
    """
    if kind == "contract":
        return {"error": message}
    if kind == "value":
        return {"error": {"message": message}}
    if kind == "validation":
        return {
            "object": "error",
            "message": message,
            "type": "Bad Request",
            "param": None,
            "code": 400,
        }
    raise ValueError(kind)


def _unexpected(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"boolean `{'true' if v else 'false'}`"
    if isinstance(v, int):
        return f"integer `{v}`"
    if isinstance(v, float):
        return f"floating point `{v}`"
    if isinstance(v, str):
        return f'string "{v}"'
    if isinstance(v, list):
        return "sequence"
    if isinstance(v, dict):
        return "map"
    return type(v).__name__


def _invalid(v: Any, expected: str) -> ContractError:
    return ContractError(f"invalid type: {_unexpected(v)}, expected {expected}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_sampling_params(sp: Any) -> None:
    if not isinstance(sp, dict):
        raise _invalid(sp, "a value or an array of values for SamplingParamsOrList")
    for key, x in sp.items():
        if key not in SAMPLING_PARAM_FIELDS:
            listed = ", ".join(f"`{f}`" for f in SAMPLING_PARAM_FIELDS)
            raise ContractError(f"unknown field `{key}`, expected one of {listed}")
        if x is None:
            continue
        if key in _FLOAT_KEYS and not (isinstance(x, (int, float)) and not isinstance(x, bool)):
            raise _invalid(x, "f64")
        if key in _INT_KEYS and not _is_int(x):
            raise _invalid(x, "i64")
        if key in _BOOL_KEYS and not isinstance(x, bool):
            raise _invalid(x, "a boolean")
        if key == "stop_token_ids":
            if not isinstance(x, list):
                raise _invalid(x, "a sequence")
            for e in x:
                if not _is_int(e):
                    raise _invalid(e, "i64")


def _is_token_list(v: Any) -> bool:
    return isinstance(v, list) and all(_is_int(t) for t in v)


def check_generate(body: Any) -> None:
    """Apply SGLang's checks to a ``/generate`` body, in SGLang's order.

    Raises :class:`ValidationError` (FastAPI's dataclass parse), :class:`ContractError` (the
    schema contract) or ``ValueError`` (the tokenizer manager's normalisation and
    ``SamplingParams.verify``); the server turns each into its 400 shape via :func:`error_body`.
    Checks that need the model (context length, vocabulary) are the server's.
    """
    if not isinstance(body, dict):
        raise ValidationError("Input should be a valid dictionary or object to extract fields from")
    ids = body.get("input_ids")
    if ids is not None and not (
        _is_token_list(ids) or (isinstance(ids, list) and all(_is_token_list(s) for s in ids))
    ):
        raise ValidationError("input_ids: Input should be a list of integers or of integer lists")
    for key in ("return_logprob",):
        v = body.get(key)
        if v is not None and not isinstance(v, bool) and not isinstance(v, list):
            raise ValidationError(f"{key}: Input should be a valid boolean")
    # ---- contract stage
    sp = body.get("sampling_params")
    if sp is not None:
        for one in sp if isinstance(sp, list) else [sp]:
            _check_sampling_params(one)
    lsl = body.get("logprob_start_len")
    if lsl is not None and not _is_int(lsl) and not isinstance(lsl, list):
        raise _invalid(lsl, "a value or an array of values for Int64OrList")
    # ---- tokenizer-manager stage
    if body.get("text") is None and ids is None and body.get("input_embeds") is None:
        raise ValueError("Either text, input_ids or input_embeds should be provided.")
    if ids is not None and len(ids) == 0:
        raise ValueError("input_ids cannot be empty.")
    if ids is not None and isinstance(ids[0], list) and any(len(s) == 0 for s in ids):
        raise ValueError("input_ids cannot be empty.")
    sps = sp if isinstance(sp, list) else [sp or {}]
    n0 = sps[0].get("n", 1) if sps else 1
    for one in sps:
        if one.get("n", 1) != n0:
            raise ValueError(
                "The parallel_sample_num should be the same for all samples in sample params."
            )
        verify_sampling_params(one)


def verify_sampling_params(sp: dict[str, Any]) -> None:
    """``SamplingParams.verify`` of SGLang 0.5.23 for the fields we implement."""
    t = sp.get("temperature", 1.0)
    if t is None:
        t = 1.0
    if not math.isfinite(t) or t < 0.0:
        raise ValueError(f"temperature must be a non-negative finite number, got {t}.")
    top_p = sp.get("top_p", 1.0) if sp.get("top_p") is not None else 1.0
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
    top_k = sp.get("top_k", TOP_K_ALL)
    top_k = TOP_K_ALL if top_k is None else top_k
    if 0 <= t < 1e-6:
        top_k = 1  # greedy
    if top_k == -1:
        top_k = TOP_K_ALL
    if top_k < 1:
        raise ValueError(f"top_k must be -1 (disable) or at least 1, got {top_k}.")
    mnt = sp.get("max_new_tokens", 128)
    if mnt is not None and mnt < 0:
        raise ValueError(f"max_new_tokens must be at least 0, got {mnt}.")
    n = sp.get("n", 1)
    if n is not None and n < 1:
        raise ValueError(f"n must be at least 1, got {n}.")
    seed = sp.get("sampling_seed")
    if seed is not None and not -(2**63) <= seed <= 2**63 - 1:
        raise ValueError(f"sampling_seed must be in [-2**63, 2**63 - 1], got {seed}.")


# ---------------------------------------------------------------------------------- admin calls


def http_json(
    url: str,
    payload: Any = None,
    *,
    method: str | None = None,
    timeout: float = 60.0,
    auth: ServerAuth | None = None,
) -> tuple[int, Any]:
    """One blocking JSON request (admin endpoints; generation uses the async client).

    Returns ``(status, parsed body or text)``; raises ``OSError`` when the server is unreachable.
    ``auth``: the keys to send (the admin key to admin endpoints, when there is one).
    """
    data = None if payload is None else json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    if auth:
        headers.update(auth.headers(url))
    req = urllib.request.Request(
        url,
        data=data,
        method=method or ("POST" if data is not None else "GET"),
        headers=headers,
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    text = raw.decode("utf-8", errors="replace")
    try:
        return status, json.loads(text) if text else None
    except json.JSONDecodeError:
        return status, text
