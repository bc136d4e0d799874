"""The rollout client against our CPU server over real HTTP on 127.0.0.1.

References are independent of the server: the HF model run in this process (full forward, no KV
cache) for log-probs, and the sampling rules themselves for stop ids / lengths / seeds.
"""

import asyncio
import contextlib
import dataclasses
import itertools
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
import torch.nn.functional as F

from megatron_gopd.rollout import (
    ClientConfig,
    ProtocolError,
    RolloutClient,
    RolloutError,
    RolloutPrompt,
    RolloutServers,
    SamplingConfig,
    ServerLaunchConfig,
)
from megatron_gopd.rollout.protocol import SAMPLING_PARAM_FIELDS, http_json
from megatron_gopd.testing import make_tiny_hf_model

TOL = 1e-4


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("client")
    hf = make_tiny_hf_model(d / "hf", "qwen2", tied=True, seed=3)
    hf.config._attn_implementation = "eager"
    # seeded sampling is reproducible only with --enable-deterministic-inference, as in SGLang
    cfg = ServerLaunchConfig(backend="cpu", model_path=str(d / "hf"), deterministic=True)
    with RolloutServers(cfg) as servers:
        yield servers, hf.eval()


def prompts(k, length=6, offset=0):
    g = torch.Generator().manual_seed(offset)
    return [
        RolloutPrompt(
            torch.randint(0, 250, (length + i % 3,), generator=g).tolist(),
            "math",
            {"i": i},
            offset + i,
        )
        for i in range(k)
    ]


def hf_token_logprobs(model, prompt, response, temperature=1.0):
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    lp = F.log_softmax(logits[len(prompt) - 1 : -1] / temperature, dim=-1)
    return lp.gather(1, torch.tensor(response)[:, None]).squeeze(1), logits[len(prompt) - 1 : -1]


def test_n_samples_with_server_logprobs(served):
    servers, hf = served
    client = RolloutClient(servers.urls, ClientConfig(progress=False))
    ps = prompts(3)
    samples = client.sample(ps, n=4, sampling=SamplingConfig(max_new_tokens=8, seed=1))
    assert [(s.prompt_index, s.sample_index) for s in samples] == [
        (p.prompt_index, j) for p in ps for j in range(4)
    ]
    assert all(s.domain == "math" and s.metadata["i"] == s.prompt_index for s in samples)
    assert all(len(s.response_ids) == 8 and s.finish_reason == "length" for s in samples)
    assert len({tuple(s.response_ids) for s in samples}) == 12  # n samples differ
    worst = 0.0
    for s in samples:
        ref, _ = hf_token_logprobs(hf, s.prompt_ids, s.response_ids)
        worst = max(worst, (torch.tensor(s.rollout_logprobs_T) - ref).abs().max().item())
    assert worst <= TOL
    assert client.last_report.responses == 12 and client.last_report.tokens == 96


def test_temperature_top_k_top_p(served):
    """Reported log-probs are log_softmax(logits / T) before truncation (SGLang's choice); the
    sampled tokens respect top-k."""
    servers, hf = served
    client = RolloutClient(servers.urls, ClientConfig(progress=False))
    cfg = SamplingConfig(temperature=0.7, top_k=5, top_p=0.9, max_new_tokens=6, seed=2)
    for s in client.sample(prompts(2), n=3, sampling=cfg):
        ref, logits = hf_token_logprobs(hf, s.prompt_ids, s.response_ids, temperature=0.7)
        assert (torch.tensor(s.rollout_logprobs_T) - ref).abs().max().item() <= TOL
        top5 = logits.topk(5, dim=-1).indices
        assert all(t in top5[k] for k, t in enumerate(s.response_ids))


def test_stop_ids_and_greedy(served):
    servers, hf = served
    client = RolloutClient(servers.urls, ClientConfig(progress=False))
    p = prompts(1, offset=7)
    free = client.sample(p, n=1, sampling=SamplingConfig(temperature=0.0, max_new_tokens=10))[0]
    # greedy = argmax of the reference model, token by token; log-probs untempered
    ref, logits = hf_token_logprobs(hf, free.prompt_ids, free.response_ids)
    assert free.response_ids == logits.argmax(-1).tolist()
    assert (torch.tensor(free.rollout_logprobs_T) - ref).abs().max().item() <= TOL
    stop = free.response_ids[3]
    first = free.response_ids.index(stop)
    cut = client.sample(
        p, n=1, sampling=SamplingConfig(temperature=0.0, max_new_tokens=10, stop_token_ids=(stop,))
    )[0]
    assert cut.finish_reason == "stop"
    assert cut.response_ids == free.response_ids[: first + 1]  # stop token included
    assert len(cut.rollout_logprobs_T) == len(cut.response_ids)


def test_seed_makes_sampling_deterministic(served):
    servers, _ = served
    ps = prompts(4, offset=11)
    one = RolloutClient(servers.urls, ClientConfig(progress=False))
    batched = RolloutClient(servers.urls, ClientConfig(progress=False, prompts_per_request=3))
    cfg = SamplingConfig(max_new_tokens=6, seed=123)
    a = one.sample(ps, n=2, sampling=cfg)
    b = batched.sample(ps, n=2, sampling=cfg)  # other batching, same samples
    c = one.sample(ps, n=2, sampling=SamplingConfig(max_new_tokens=6, seed=124))
    assert [s.response_ids for s in a] == [s.response_ids for s in b]
    assert [s.rollout_logprobs_T for s in a] == [s.rollout_logprobs_T for s in b]
    assert [s.response_ids for s in a] != [s.response_ids for s in c]


def test_unseeded_batched_request_uses_n(served):
    servers, _ = served
    client = RolloutClient(servers.urls, ClientConfig(progress=False, prompts_per_request=2))
    samples = client.sample(prompts(3), n=2, sampling=SamplingConfig(max_new_tokens=4))
    assert [(s.prompt_index, s.sample_index) for s in samples] == [
        (i, j) for i in range(3) for j in range(2)
    ]
    assert client.last_report.requests == 2


def test_prefill_scoring_matches_hf(served):
    servers, hf = served
    client = RolloutClient(servers.urls, ClientConfig(progress=False))
    seqs = [[*p.prompt_ids, 5, 9, 200] for p in prompts(3, offset=5)]
    for seq, got in zip(seqs, client.score(seqs)):
        ref, _ = hf_token_logprobs(hf, seq[:1], seq[1:])
        assert (torch.tensor(got) - ref).abs().max().item() <= TOL


def test_prompts_over_the_context_budget_are_skipped(served):
    servers, _ = served
    client = RolloutClient(servers.urls, ClientConfig(progress=False, context_length=20))
    ps = [*prompts(2), RolloutPrompt(list(range(1, 16)), prompt_index=9)]
    samples = client.sample(ps, n=1, sampling=SamplingConfig(max_new_tokens=8))
    assert sorted({s.prompt_index for s in samples}) == [0, 1]
    assert client.last_report.skipped_too_long == 1


# ---------------------------------------------------------------------------------- bad requests


SGLANG_UNKNOWN_FIELD = "unknown field `foo`, expected one of " + ", ".join(
    f"`{f}`" for f in SAMPLING_PARAM_FIELDS
)

BAD = [
    (
        {"input_ids": [], "sampling_params": {}},
        {"error": {"message": "input_ids cannot be empty."}},
    ),
    ({"input_ids": [1, 2], "sampling_params": {"foo": 1}}, {"error": SGLANG_UNKNOWN_FIELD}),
    (
        {"input_ids": [1, 2], "sampling_params": {"temperature": "hot"}},
        {"error": 'invalid type: string "hot", expected f64'},
    ),
    (
        {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1.5}},
        {"error": "invalid type: floating point `1.5`, expected i64"},
    ),
    (
        {"input_ids": [1, 2], "sampling_params": {"top_p": 0.0}},
        {"error": {"message": "top_p must be in (0, 1], got 0.0."}},
    ),
    (
        {"input_ids": [1, 2], "sampling_params": {"temperature": -1.0}},
        {"error": {"message": "temperature must be a non-negative finite number, got -1.0."}},
    ),
    (
        {"input_ids": [[1, 2], [3]], "sampling_params": [{"n": 2}, {"n": 1}]},
        {
            "error": {
                "message": "The parallel_sample_num should be the same for all samples in sample params."
            }
        },
    ),
    (
        {"sampling_params": {}},
        {"error": {"message": "Either text, input_ids or input_embeds should be provided."}},
    ),
]


@pytest.mark.parametrize("body,expected", BAD, ids=[str(i) for i in range(len(BAD))])
def test_cpu_server_rejects_what_sglang_rejects(served, body, expected):
    servers, _ = served
    status, got = http_json(servers.urls[0] + "/generate", body)
    assert status == 400
    assert got == expected


def test_validation_error_shape(served):
    servers, _ = served
    status, got = http_json(servers.urls[0] + "/generate", {"input_ids": "abc"})
    assert status == 400
    assert set(got) == {"object", "message", "type", "param", "code"}
    assert got["object"] == "error" and got["code"] == 400 and got["type"] == "Bad Request"


def test_too_long_prompt_rejected_by_server(served):
    servers, _ = served
    status, got = http_json(servers.urls[0] + "/generate", {"input_ids": list(range(256))})
    assert status == 400
    assert got["error"]["message"].startswith("The input (256 tokens) is longer than the model's")


# ---------------------------------------------------------------------------------- malformed answers


class _Liar(BaseHTTPRequestHandler):
    body = b'[{"output_ids": [1, 2], "meta_info": {"finish_reason": {"type": "stop"}}}]'

    def log_message(self, *a):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)


def test_malformed_response_names_server_and_request():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Liar)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        client = RolloutClient([url], ClientConfig(progress=False, context_length=100))
        with pytest.raises(ProtocolError) as e:
            client.sample(prompts(1), n=1, sampling=SamplingConfig(max_new_tokens=2))
        msg = str(e.value)
        assert url in msg and "request gopd-" in msg and "output_token_logprobs" in msg
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_admin_calls(served):
    servers, _ = served
    client = RolloutClient(servers.urls, ClientConfig(progress=False))
    assert client.health() == {servers.urls[0]: True}
    assert client.health(generate=True) == {servers.urls[0]: True}
    client.release_memory(["weights"])
    assert client.released_memory(servers.urls[0]) == {"weights"}
    client.resume_memory()  # what it released, no more: SGLang raises on other tags
    assert client.released_memory(servers.urls[0]) == set()
    status, body = http_json(servers.urls[0] + "/resume_memory_occupation", {"tags": ["kv_cache"]})
    assert status == 400 and "KeyError" in body["error"]["message"]
    client.abort()
    client.flush_cache()
    info = client.server_info(servers.urls[0])
    assert info["tp_size"] == 1 and "0.5.23" in info["version"]
    assert json.loads(json.dumps(info))  # plain JSON


def _server_idle_after(url: str, timeout_s: float) -> float | None:
    """Seconds until the server is idle (SGLang flushes its cache only then), or None."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if http_json(url + "/flush_cache", method="POST")[0] == 200:
            return time.monotonic() - t0
        time.sleep(0.02)
    return None


@pytest.mark.parametrize("seeded", [False, True], ids=["unseeded", "seeded"])
def test_a_cancelled_rollout_aborts_its_requests_on_the_server(served, seeded):
    """A rollout that stops half-way (an error elsewhere, Ctrl-C) aborts what it started: the
    server is idle at once instead of generating every sample to the end. SGLang aborts exact
    request ids only, and gives the children of an n > 1 request random ones."""
    servers, _ = served
    url = servers.urls[0]
    client = RolloutClient(servers.urls, ClientConfig(progress=False))
    cfg = SamplingConfig(max_new_tokens=240, ignore_eos=True, seed=5 if seeded else None)
    full = time.monotonic()
    client.sample(prompts(16, length=4), n=4, sampling=cfg)
    full = time.monotonic() - full

    async def cancel_midway():
        task = asyncio.create_task(client.asample(prompts(16, length=4), n=4, sampling=cfg))
        while (
            client.last_report.requests == 0
            or http_json(url + "/flush_cache", method="POST")[0] == 200
        ):
            await asyncio.sleep(0.01)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(cancel_midway())
    idle = _server_idle_after(url, timeout_s=full + 30)
    print(f"uninterrupted rollout {full:.2f}s; idle {idle}s after the cancel")
    # the server batches all 64 samples: the whole rollout is ~1-3 s on 2 cores
    assert full > 1.0 and idle is not None and idle < 0.5, (idle, full)


def test_flush_cache_retries_while_busy(served):
    """SGLang refuses to flush while requests run; the client retries until the server is idle."""
    servers, _ = served
    client = RolloutClient(servers.urls, ClientConfig(progress=False))
    cfg = SamplingConfig(max_new_tokens=60, ignore_eos=True)
    t = threading.Thread(target=client.sample, args=(prompts(4), 4, cfg))
    t.start()
    busy_seen = False
    while t.is_alive() and not busy_seen:
        busy_seen = http_json(servers.urls[0] + "/flush_cache", method="POST")[0] == 400
    client.flush_cache(timeout_s=60)  # returns only once a flush succeeded
    t.join()
    assert busy_seen


# ---------------------------------------------------------------------------------- launcher


def test_sglang_command_has_the_rl_flags():
    cfg = ServerLaunchConfig(
        backend="sglang",
        model_path="/models/student-hf",
        num_servers=2,
        tp_size=4,
        base_gpu_id=0,
        mem_fraction_static=0.7,
        enable_memory_saver=True,
        deterministic=True,
        fp32_lm_head=True,
        extra_args=("--disable-radix-cache",),
    )
    cmd = RolloutServers(cfg).command(1, 30001)
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    flags = dict(itertools.pairwise(cmd))
    assert flags["--model-path"] == "/models/student-hf" and flags["--port"] == "30001"
    assert flags["--tp-size"] == "4" and flags["--base-gpu-id"] == "4"  # server 1: GPUs 4..7
    assert flags["--mem-fraction-static"] == "0.7"
    for f in (
        "--enable-memory-saver",
        "--skip-tokenizer-init",
        "--enable-deterministic-inference",
        "--enable-fp32-lm-head",
    ):
        assert f in cmd
    assert cmd[-1] == "--disable-radix-cache"
    # the CPU stand-in takes the same switch; without it, neither gets one
    cpu = RolloutServers(dataclasses.replace(cfg, backend="cpu", tp_size=1)).command(0, 30000)
    assert "--enable-fp32-lm-head" in cpu
    plain = RolloutServers(dataclasses.replace(cfg, fp32_lm_head=False)).command(0, 30000)
    assert "--enable-fp32-lm-head" not in plain


def test_attach_to_running_servers(served):
    from megatron_gopd.utils import GopdError, free_port

    servers, _ = served
    attached = RolloutServers(
        ServerLaunchConfig(backend="attach", urls=tuple(servers.urls))
    ).start()
    assert attached.urls == servers.urls and attached.tp_size(servers.urls[0]) == 1
    assert attached.replace(servers.urls[0]) is None  # not ours to restart
    attached.stop()  # stops nothing it did not start
    assert RolloutClient(servers.urls).health() == {servers.urls[0]: True}
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(GopdError, match="do not answer /health"):
        RolloutServers(ServerLaunchConfig(backend="attach", urls=(dead,))).start()
    with pytest.raises(GopdError, match="needs their URLs"):
        ServerLaunchConfig(backend="attach")


def test_answers_from_another_weight_version_are_not_used(served):
    servers, _ = served
    client = RolloutClient(servers.urls, ClientConfig(progress=False))
    version = http_json(servers.urls[0] + "/model_info")[1]["weight_version"]
    cfg = SamplingConfig(max_new_tokens=2)
    assert len(client.sample(prompts(2), 1, cfg, weight_version=version)) == 2
    with pytest.raises(RolloutError, match="stale weights") as e:
        client.sample(prompts(2), 1, cfg, weight_version="step-999")
    assert servers.urls[0] in str(e.value)
    assert client.last_report.stale_servers == servers.urls
