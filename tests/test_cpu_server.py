"""The CPU stand-in for SGLang under attack, and where it must fail the way SGLang fails.

A hostile or buggy client must not be able to stall the server (unbounded requests, stalled
bodies, type errors that become 500s, a weight-update group to nowhere), and with ``--api-key``
nobody without the key may change the weights. Each check is made over real HTTP (raw sockets
where the request itself is malformed) against a server process.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_gopd.rollout.protocol import http_json
from megatron_gopd.testing import make_tiny_hf_model
from megatron_gopd.utils import free_port

KEY, ADMIN = "k-normal-5c1f", "k-admin-77e0"


class Server:
    def __init__(self, model: Path, tmp: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"server-{self.port}.log"
        cmd = [sys.executable, "-m", "megatron_gopd.cpu_server", "--model-path", str(model)]
        cmd += ["--port", str(self.port), *args]
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if http_json(self.url + "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.1)

    def stop(self):
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("cpu_server")
    make_tiny_hf_model(d / "hf", "qwen3", seed=2)
    return d


@pytest.fixture(scope="module")
def server(model):
    s = Server(model / "hf", model, "--request-read-timeout", "2", "--dist-timeout", "3")
    yield s
    s.stop()


def raw_request(port: int, head: bytes, body: bytes = b"", wait_s: float = 10.0) -> bytes:
    """Send ``head`` + ``body`` and return whatever comes back within ``wait_s``."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as s:
        s.sendall(head + body)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except TimeoutError:
            pass
    return out


# ---------------------------------------------------------------------------------- bounded work


def test_a_request_for_a_million_samples_is_refused_at_once(server):
    t0 = time.monotonic()
    status, body = http_json(
        server.url + "/generate",
        {"input_ids": [1, 2, 3], "sampling_params": {"n": 1_000_000, "max_new_tokens": 4}},
        timeout=10,
    )
    assert status == 400 and time.monotonic() - t0 < 2.0
    assert "1000000 samples" in body["error"]["message"]
    # as many tokens through a batch of long prompts: refused by the token budget
    batch = {"input_ids": [[5] * 200] * 1000, "sampling_params": {"max_new_tokens": 50}}
    status, body = http_json(server.url + "/generate", batch, timeout=10)
    assert status == 400 and "--max-total-tokens" in body["error"]["message"]
    # and past the context length, as SGLang 0.5.23 words it
    status, body = http_json(
        server.url + "/generate",
        {"input_ids": [5] * 200, "sampling_params": {"max_new_tokens": 100}},
        timeout=10,
    )
    assert status == 400
    assert body["error"]["message"].startswith("Requested token count exceeds the model's")
    # the server is as responsive as before
    t0 = time.monotonic()
    ok = http_json(
        server.url + "/generate",
        {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}},
        timeout=10,
    )
    assert ok[0] == 200 and time.monotonic() - t0 < 2.0


# ---------------------------------------------------------------------------------- HTTP edge cases


@pytest.mark.parametrize(
    "path,body",
    [
        ("/get_weights_by_name", {"name": "model.norm.weight", "truncate_size": "abc"}),
        ("/get_weights_by_name", {"name": 5}),
        ("/flush_cache?timeout=abc", None),
        ("/flush_cache?timeout=-1", None),
        ("/abort_request", {"rid": ["a", "b"]}),
        ("/release_memory_occupation", {"tags": "weights"}),
        ("/init_weights_update_group", {"master_address": 1, "master_port": "x"}),
        ("/update_weights_from_distributed", {"names": "a", "dtypes": [], "shapes": []}),
    ],
)
def test_type_errors_are_400_not_500(server, path, body):
    status, got = http_json(server.url + path, body, method="POST")
    assert status == 400, (status, got)


@pytest.mark.parametrize("length", [b"abc", b"-5"])
def test_an_invalid_content_length_is_400(server, length):
    out = raw_request(
        server.port,
        b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: " + length + b"\r\n\r\n",
    )
    assert out.startswith(b"HTTP/1.1 400"), out[:200]


def test_a_body_shorter_than_its_content_length_does_not_hold_the_handler(server):
    """Content-Length 1000, 10 bytes sent, connection kept open: the server answers 400 and
    hangs up after its read timeout (2 s here), instead of waiting forever."""
    t0 = time.monotonic()
    out = raw_request(
        server.port,
        b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n",
        b'{"input_id',
        wait_s=20,
    )
    took = time.monotonic() - t0
    assert out.startswith(b"HTTP/1.1 400") and b"ended after 10 of 1000 bytes" in out, out[:300]
    assert took < 10, took


def test_a_weight_update_group_with_an_unreachable_master_fails_in_time(server):
    t0 = time.monotonic()
    status, body = http_json(
        server.url + "/init_weights_update_group",
        {
            "master_address": "127.0.0.1",
            "master_port": free_port(),  # nobody listens
            "rank_offset": 1,
            "world_size": 2,
            "group_name": "nowhere",
            "backend": "gloo",
        },
        timeout=60,
    )
    assert status == 400 and body["success"] is False
    assert time.monotonic() - t0 < 30  # --dist-timeout 3 (SGLang's default would be 30 min)
    assert "Failed to initialize custom process group" in body["message"]


# ---------------------------------------------------------------------------------- auth


@pytest.fixture(scope="module")
def keyed(model):
    s = Server(model / "hf", model, "--api-key", KEY, "--admin-api-key", ADMIN)
    yield s
    s.stop()


def _post(url, path, body, key=None, scheme="Bearer"):
    import json
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"{scheme} {key}"
    req = urllib.request.Request(url + path, json.dumps(body).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


GEN = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2}}
DISK = {"model_path": "/nonexistent"}


def test_with_api_keys_nobody_else_generates_or_touches_the_weights(keyed):
    u = keyed.url
    # what SGLang 0.5.23 leaves open
    assert http_json(u + "/health")[0] == 200 and http_json(u + "/health_generate")[0] == 200
    # generation: the API key, in SGLang's Bearer form (scheme case-insensitive)
    assert _post(u, "/generate", GEN) == (401, b'{"error": "Unauthorized"}')
    assert _post(u, "/generate", GEN, "wrong")[0] == 401
    assert _post(u, "/generate", GEN, KEY)[0] == 200
    assert _post(u, "/generate", GEN, KEY, scheme="bearer")[0] == 200
    # weights, memory, abort, version: the admin key only (the API key is not enough)
    for path, body in [
        ("/update_weights_from_disk", DISK),
        ("/update_weight_version", {"new_version": "evil"}),
        ("/release_memory_occupation", {}),
        ("/abort_request", {"abort_all": True}),
        ("/init_weights_update_group", {"master_address": "h", "master_port": 1}),
    ]:
        assert _post(u, path, body)[0] == 401, path
        assert _post(u, path, body, KEY)[0] == 401, path
    status, _ = _post(u, "/update_weights_from_disk", DISK, ADMIN)
    assert status == 400  # through the gate; the path does not exist
    status, body = http_json(u + "/model_info", auth=None)
    assert status == 401


def test_sglang_0_5_4_keys_work_its_way(model):
    """Before 0.5.8 one key guards everything but /health* and /metrics*, compared as the exact
    string "Bearer KEY"; --admin-api-key does not exist."""
    s = Server(model / "hf", model, "--api-key", KEY, "--emulate-version", "0.5.4")
    try:
        assert http_json(s.url + "/health")[0] == 200
        assert _post(s.url, "/update_weights_from_disk", DISK)[0] == 401
        assert _post(s.url, "/generate", GEN, KEY, scheme="bearer")[0] == 401
        assert _post(s.url, "/generate", GEN, KEY)[0] == 200
        assert _post(s.url, "/server_info", {}, KEY)[0] == 404  # /get_server_info only
        assert http_json(s.url + "/get_server_info", auth=None)[0] == 401
    finally:
        s.stop()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_gopd.cpu_server",
            "--model-path",
            "x",
            "--admin-api-key",
            ADMIN,
            "--emulate-version",
            "0.5.4",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "--admin-api-key" in out.stderr


# ---------------------------------------------------------------------------------- start-up


def test_its_own_process_group_never_takes_its_http_port(monkeypatch):
    """The server's process group comes up before the HTTP server binds. A free port from the OS
    may be the HTTP port itself, just released by whoever picked it (the launcher, a test): CI saw
    the group take it and the server exit with 'cannot listen'. Here the OS hands out that port."""
    import types

    import torch.distributed as dist

    import megatron_gopd.utils
    from megatron_gopd.cpu_server.server import CpuServer, ServerOptions

    http_port = free_port()
    monkeypatch.setattr(megatron_gopd.utils, "free_port", lambda: http_port)
    urls: list[str] = []
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: urls.append(kw["init_method"]))
    for _ in range(20):  # SGLang's choice is random: draw it a few times
        CpuServer.init_process_group(types.SimpleNamespace(opts=ServerOptions(port=http_port)))
    ports = {int(u.rsplit(":", 1)[1]) for u in urls}
    assert len(urls) == 20 and http_port not in ports
    assert all(http_port + 100 <= p <= http_port + 1000 + 42 * 50 for p in ports)  # SGLang's window
    # a port given with --nccl-port is used as given
    CpuServer.init_process_group(types.SimpleNamespace(opts=ServerOptions(port=1, nccl_port=4321)))
    assert urls[-1].endswith(":4321")
