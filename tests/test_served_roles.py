"""Teachers and references served by SGLang (``--teacher-urls``, ``--ref-urls``).

The CPU server stands in for SGLang: its prefill answers follow SGLang 0.5.23's exact layout
(``logprob_start_len``, ``input_token_logprobs`` with a null first entry), checked here against
the HF model run in this process; the served teacher's log-probs are checked against the
Megatron-hosted teacher's; and the trainer's metrics are compared step by step between a run with
hosted roles and one with served roles.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
import torch.nn.functional as F

from megatron_gopd.rollout import (
    ClientConfig,
    ProtocolError,
    RolloutClient,
    RolloutServers,
    ServerLaunchConfig,
)
from megatron_gopd.rollout.protocol import http_json
from megatron_gopd.testing import run_distributed
from megatron_gopd.trainer.config import build_config, parse_args
from megatron_gopd.trainer.routing import Routing, parse_url_map
from megatron_gopd.utils import GopdError
from tests.e2e_utils import make_world, read_metrics, train_args

TOL = 1e-4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("served"))


def _server(hf_dir, n=1):
    # fp32 checkpoints: --enable-fp32-lm-head is a no-op, set as the Slurm recipes set it
    return RolloutServers(
        ServerLaunchConfig(backend="cpu", model_path=str(hf_dir), num_servers=n, fp32_lm_head=True)
    )


@pytest.fixture(scope="module")
def teacher_server(world):
    with _server(world["teacher"].parent / "hf" / "teacher") as s:
        yield s


@pytest.fixture(scope="module")
def base_server(world):
    with _server(world["teacher_base"].parent / "hf" / "teacher_base") as s:
        yield s


@pytest.fixture(scope="module")
def teacher2_server(world):
    with _server(world["teacher2"].parent / "hf" / "teacher2") as s:
        yield s


@pytest.fixture(scope="module")
def teacher_hf(world):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(world["teacher"].parent / "hf" / "teacher"), attn_implementation="eager"
    ).eval()


def _hf_logprobs(model, ids):
    """log p(ids[t] | ids[:t]) for t = 1..len-1, from a full forward of the HF model."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    lp = F.log_softmax(logits[:-1], dim=-1)
    return lp.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)


SEQS = [
    [3, 7, 9, 11, 4, 5, 6, 8],
    [5, 4, 3, 12, 13, 2],
    [9, 9, 8, 7, 6, 5, 4, 3, 2, 10],
    [6, 7],
    [11, 3, 4, 5, 6],
]


# ---------------------------------------------------------------------------------- the server


@pytest.mark.parametrize("start", [0, 1, 3, 5, -1])
def test_input_token_logprobs_follow_sglang(teacher_server, teacher_hf, start):
    """SGLang 0.5.23: entries for ``ids[L:]``, the first always null (its predicting position is
    not computed), entry j = log p(ids[L + j] | ids[:L + j]); L = -1 with return_logprob: none."""
    ids = SEQS[0]
    status, body = http_json(
        teacher_server.urls[0] + "/generate",
        {
            "input_ids": ids,
            "sampling_params": {"max_new_tokens": 0},
            "return_logprob": True,
            "logprob_start_len": start,
        },
    )
    assert status == 200, body
    assert body["output_ids"] == [] and body["meta_info"]["output_token_logprobs"] == []
    entries = body["meta_info"]["input_token_logprobs"]
    if start < 0:
        assert entries == []
        return
    assert [e[1] for e in entries] == ids[start:]
    assert entries[0][0] is None
    ref = _hf_logprobs(teacher_hf, ids)  # ref[t - 1] = log p(ids[t] | ids[:t])
    got = torch.tensor([e[0] for e in entries[1:]])
    assert (got - ref[start:]).abs().max().item() <= 1e-5


def test_logprob_start_len_past_the_input_is_refused(teacher_server):
    status, body = http_json(
        teacher_server.urls[0] + "/generate",
        {
            "input_ids": [3, 4, 5],
            "sampling_params": {"max_new_tokens": 0},
            "return_logprob": True,
            "logprob_start_len": 4,
        },
    )
    assert status == 400
    assert "req.logprob_start_len=4 is higher than the number of input tokens" in str(body)


def test_batched_scoring_of_response_tokens_matches_hf(teacher_server, teacher_hf):
    """Many sequences per request, each scored from its own first response position."""
    client = RolloutClient(teacher_server.urls, ClientConfig(progress=False))
    first = [5, 2, 1, 1, 3]
    got = client.score(SEQS, first=first, per_request=2)
    assert client.last_report.requests == 3
    for ids, f, lp in zip(SEQS, first, got):
        assert len(lp) == len(ids) - f
        ref = _hf_logprobs(teacher_hf, ids)[f - 1 :]
        assert (torch.tensor(lp) - ref).abs().max().item() <= 1e-5


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_failover_from_a_dead_url(teacher_server, teacher_hf):
    client = RolloutClient(
        [_dead_url(), *teacher_server.urls],
        ClientConfig(progress=False, backoff_s=0.01, health_timeout_s=1.0),
        name="teacher:default",
    )
    got = client.score(SEQS, first=[1] * len(SEQS), per_request=1)
    rep = client.last_report
    assert len(rep.dead_servers) == 1 and rep.failovers >= 1
    for ids, lp in zip(SEQS, got):
        assert (torch.tensor(lp) - _hf_logprobs(teacher_hf, ids)).abs().max().item() <= 1e-5


class _ShortAnswer(BaseHTTPRequestHandler):
    """Answers every prefill with one input log-prob too few."""

    def log_message(self, *a):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        items = []
        for ids, start in zip(body["input_ids"], body["logprob_start_len"]):
            entries = [[None, ids[start], None]] + [[-1.0, t, None] for t in ids[start + 1 : -1]]
            items.append(
                {
                    "output_ids": [],
                    "meta_info": {
                        "finish_reason": {"type": "length", "length": 0},
                        "output_token_logprobs": [],
                        "input_token_logprobs": entries,
                    },
                }
            )
        data = json.dumps(items).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_a_wrong_number_of_logprobs_names_the_sample():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _ShortAnswer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        client = RolloutClient([url], ClientConfig(progress=False))
        with pytest.raises(ProtocolError) as e:
            client.score(SEQS[:2], first=[5, 2], per_request=2, names=["sample 0", "sample 1"])
        assert "prefill scoring of sample 0" in str(e.value)
        assert "expected 4 input_token_logprobs" in str(e.value)
    finally:
        httpd.shutdown()
        httpd.server_close()


# ---------------------------------------------------------------------------------- hosted == served


def _megatron_teacher_logprobs(ckpt, seqs):
    from megatron_gopd.models.build import build_role
    from megatron_gopd.scoring import score_sequences

    role = build_role("teacher", ckpt, frozen=True)
    return [lp.tolist() for lp in score_sequences(role, seqs)]


def test_served_teacher_equals_the_megatron_hosted_teacher(world, teacher_server):
    """The same checkpoint hosted in Megatron (TP 2) and served (CPU server from its HF
    directory): the log-probs of every token agree within 1e-4 (fp32)."""
    from megatron_gopd.parallel import ParallelConfig

    hosted = run_distributed(
        _megatron_teacher_logprobs,
        2,
        str(world["teacher"]),
        SEQS,
        parallel=ParallelConfig(tensor_model_parallel_size=2),
    )[0]
    served = RolloutClient(teacher_server.urls, ClientConfig(progress=False)).score(
        SEQS, per_request=4
    )
    for h, s in zip(hosted, served):
        assert len(h) >= len(s)
        diff = (torch.tensor(h[: len(s)]) - torch.tensor(s)).abs().max().item()
        assert diff <= TOL, diff


# ---------------------------------------------------------------------------------- flags and routing


def test_url_maps_parse_domains_and_lists():
    m = parse_url_map(
        ["math=http://a:1,http://b:2/;code=http://c:3", "http://d:4"], "--teacher-urls"
    )
    assert m == {
        "math": ("http://a:1", "http://b:2"),
        "code": ("http://c:3",),
        "default": ("http://d:4",),
    }
    with pytest.raises(GopdError, match="not a list of server URLs"):
        parse_url_map(["math=a:1"], "--teacher-urls")
    with pytest.raises(GopdError, match="given twice"):
        parse_url_map(["math=http://a:1", "math=http://b:1"], "--teacher-urls")


def test_routing_mixes_hosted_and_served_roles():
    r = Routing(
        teachers={"default": "/ckpt/t"},
        teacher_urls={"code": ("http://t:1",)},
        references={"default": "/ckpt/s"},
        reference_urls={"math": ("http://r:1", "http://r:2")},
        lambdas={"math": 1.25, "code": 1.25},
    )
    r.check()
    routes = r.resolve(["math", "code", "chat"])
    assert routes["math"].teacher == "default" and not routes["math"].teacher_served
    assert routes["math"].reference_urls == ("http://r:1", "http://r:2")
    assert routes["code"].teacher_urls == ("http://t:1",)
    assert routes["code"].reference == "default" and not routes["code"].reference_served
    assert routes["chat"].reference is None  # lambda 1: no reference, served or not
    assert routes.teacher_keys == ["default"] and routes.served_teachers == {
        "code": ("http://t:1",)
    }
    assert routes.reference_keys == ["default"]
    assert routes.served_references == {"math": ("http://r:1", "http://r:2")}
    # lambda 1 everywhere: a served reference is never asked
    opd = Routing(teacher_urls={"default": ("http://t:1",)}, reference_urls={"default": ("u",)})
    assert opd.resolve(["math"]).served_references == {}


def _cfg(world, *extra):
    return build_config(
        parse_args(
            [
                "--student-load",
                str(world["student"]),
                "--prompt-data",
                str(world["train"]),
                *extra,
            ]
        )
    )


def test_served_roles_refusals(world):
    with pytest.raises(GopdError, match="both --teacher-load and --teacher-urls"):
        _cfg(world, "--teacher-load", "math=/t", "--teacher-urls", "math=http://t:1")
    with pytest.raises(GopdError, match=r"--teacher-urls: a teacher served by SGLang scores at "):
        _cfg(world, "--teacher-urls", "http://t:1", "--rollout-temperature", "0.7")
    with pytest.raises(GopdError, match="pass --teacher-temperature 1"):
        _cfg(world, "--teacher-urls", "http://t:1", "--teacher-temperature", "0.5")
    with pytest.raises(GopdError, match="--gopd-estimator full_vocab needs the teacher's whole"):
        _cfg(world, "--teacher-urls", "http://t:1", "--gopd-estimator", "full_vocab")
    with pytest.raises(GopdError, match="top_k needs the teacher's log-probs of the student's"):
        _cfg(world, "--teacher-urls", "http://t:1", "--gopd-estimator", "top_k")
    with pytest.raises(GopdError, match="--ref-urls: a reference served by SGLang"):
        _cfg(
            world,
            "--teacher-load",
            "/t",
            "--ref-urls",
            "http://r:1",
            "--gopd-lambda",
            "1.25",
            "--ref-temperature",
            "0.8",
        )
    # a served teacher at temperature 1 with a tempered hosted reference is fine, and so is a
    # served reference that lambda == 1 never asks
    cfg = _cfg(world, "--teacher-urls", "http://t:1", "--ref-temperature", "0.8")
    assert cfg.routing.teacher_urls == {"default": ("http://t:1",)}
    assert cfg.routing.references == {"default": str(world["student"])}
    cfg = _cfg(
        world,
        "--teacher-load",
        "/t",
        "--ref-urls",
        "http://r:1",
        "--rollout-temperature",
        "0.7",
    )
    assert cfg.routing.references == {}


def test_unreachable_served_teacher_is_refused_before_any_model(world, tmp_path):
    args = train_args(
        world,
        tmp_path / "run",
        "--teacher-urls",
        _dead_url(),
        "--tensor-model-parallel-size",
        "1",
        steps=1,
    )
    from megatron_gopd.train import train

    def run():
        from megatron_gopd.trainer import stages as T

        built = []
        orig = T.build_role
        T.build_role = lambda *a, **k: built.append(a) or orig(*a, **k)
        try:
            train(build_config(parse_args(args)))
        except GopdError as e:
            return str(e), built
        return None, built

    (msg, built), *_ = run_distributed(run, 1)
    assert msg is not None and "no server of the teacher 'default' answers /health" in msg
    assert built == []


# ---------------------------------------------------------------------------------- end to end


def _train(args):
    from megatron_gopd.train import train

    train(build_config(parse_args(args)))


def _same_metrics(a_dir, b_dir, steps):
    a = {m["step"]: m for m in read_metrics(a_dir)}
    b = {m["step"]: m for m in read_metrics(b_dir)}
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    for step in a:
        # every metric but wall-clock ones: the loss, KLs, advantages, entropy, gradient norm...
        keys = {k for k in a[step] if not k.startswith(("time/", "perf/"))}
        assert keys == {k for k in b[step] if not k.startswith(("time/", "perf/"))}
        assert {"train/loss", "train/kl_teacher", "train/advantage_std", "optim/grad_norm"} <= keys
        for key in sorted(keys):
            assert abs(a[step][key] - b[step][key]) <= TOL, (step, key, a[step][key], b[step][key])
    return a, b


def test_hosted_and_served_roles_give_the_same_run(world, teacher_server, base_server, tmp_path):
    """Reward correction (lambda 1.25) with the teacher and its base hosted in Megatron, then the
    same run with both served by SGLang (CPU servers on their HF directories): every logged
    metric agrees step by step within 1e-4 (measured: 4e-7). TP 2: the served scores reach both
    ranks."""
    steps = 2
    common = ("--gopd-lambda", "1.25", "--eval-interval", "0")
    hosted = train_args(
        world,
        tmp_path / "hosted",
        "--teacher-load",
        str(world["teacher"]),
        "--ref-load",
        str(world["teacher_base"]),
        *common,
        steps=steps,
    )
    served = train_args(
        world,
        tmp_path / "served",
        "--teacher-urls",
        ",".join(teacher_server.urls),
        "--ref-urls",
        ",".join(base_server.urls),
        "--served-sequences-per-request",
        "3",
        *common,
        steps=steps,
    )
    run_distributed(_train, 2, hosted, timeout=900)
    run_distributed(_train, 2, served, timeout=900)
    a, b = _same_metrics(tmp_path / "hosted", tmp_path / "served", steps)
    for step in a:
        # the served reference was asked as often as the hosted one ran
        assert b[step]["counters/reference_sequences"] == a[step]["counters/reference_sequences"]
        assert b[step]["counters/reference_sequences"] > 0


def test_one_domain_served_another_hosted(world, teacher2_server, tmp_path):
    """Two domains: math's teacher hosted, code's served (same checkpoint as the all-hosted run's
    code teacher); plain OPD, so neither reference is built nor asked. Same metrics."""
    steps = 2
    common = ("--prompt-data", str(world["train2"]), "--eval-interval", "0")
    hosted = train_args(
        world,
        tmp_path / "hosted",
        "--teacher-load",
        f"math={world['teacher']}",
        "--teacher-load",
        f"code={world['teacher2']}",
        *common,
        steps=steps,
    )
    mixed = train_args(
        world,
        tmp_path / "mixed",
        "--teacher-load",
        f"math={world['teacher']}",
        "--teacher-urls",
        f"code={','.join(teacher2_server.urls)}",
        *common,
        steps=steps,
    )
    run_distributed(_train, 2, hosted, timeout=900)
    run_distributed(_train, 2, mixed, timeout=900)
    a, b = _same_metrics(tmp_path / "hosted", tmp_path / "mixed", steps)
    for step in a:
        assert a[step]["train/math/kl_teacher"] != a[step]["train/code/kl_teacher"]
        assert b[step]["counters/reference_sequences"] == 0
