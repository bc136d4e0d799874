"""Evaluation through the rollout client and the CPU server (SGLang's API) over real HTTP."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("megatron_gopd.rollout", reason="the rollout client is not in this checkout")

from megatron_gopd.evaluation import EvalConfig, HFGenerator, RolloutClientGenerator, evaluate
from megatron_gopd.evaluation.__main__ import main
from megatron_gopd.evaluation.sandbox import Sandbox, SandboxLimits
from megatron_gopd.evaluation.testing import make_tiny_tokenizer
from megatron_gopd.rollout import (
    ClientConfig,
    RolloutClient,
    RolloutServers,
    ServerLaunchConfig,
)
from megatron_gopd.testing import make_tiny_hf_model

SAMPLES = Path(__file__).resolve().parents[1] / "megatron_gopd" / "evaluation" / "samples"
BENCHMARKS = [
    f"math=math:{SAMPLES / 'math_sample.jsonl'}",
    f"lcb=livecodebench:{SAMPLES / 'livecodebench_sample.jsonl'}",
]


def records(out: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((out / "records").glob("*.jsonl"))}


def test_cpu_server_matches_in_process_greedy(tmp_path):
    path = tmp_path / "tiny"
    tok = make_tiny_tokenizer(path)
    make_tiny_hf_model(
        path, vocab_size=len(tok), max_position_embeddings=1024, eos_token_id=tok.eos_token_id
    )
    sandbox = Sandbox(SandboxLimits(cpu_seconds=5, wall_seconds=20, memory_bytes=512 << 20))
    cfg = EvalConfig(n_samples=2, temperature=0.0, max_new_tokens=6)
    with RolloutServers(ServerLaunchConfig(backend="cpu", model_path=str(path))) as servers:
        client = RolloutClient(servers.urls, ClientConfig(progress=False))
        gen = RolloutClientGenerator(client, stop_token_ids=[tok.eos_token_id])
        evaluate(gen, tok, BENCHMARKS, tmp_path / "a", cfg, sandbox=sandbox)
        # the CLI's --rollout-urls path, same server
        argv = ["--rollout-urls", *servers.urls, "--tokenizer", str(path), "--n-samples", "2"]
        argv += ["--temperature", "0", "--max-new-tokens", "6", "--output-dir", str(tmp_path / "b")]
        assert main([*argv, "--benchmark", BENCHMARKS[0], "--benchmark", BENCHMARKS[1]]) == 0
    assert records(tmp_path / "a") == records(tmp_path / "b")  # deterministic at temperature 0
    # greedy through the server = greedy in process (same model, same prompts)
    hf = HFGenerator(path, eos_token_ids=[tok.eos_token_id])
    evaluate(hf, tok, BENCHMARKS, tmp_path / "hf", cfg, sandbox=sandbox)
    assert records(tmp_path / "a") == records(tmp_path / "hf")
