"""``gopd-score`` end to end under a real torchrun (TP=2), against HF transformers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_gopd.testing import make_tiny_hf_model, make_tiny_tokenizer
from tests.test_parity_hf import TOL, convert, hf_logprobs

REPO = Path(__file__).resolve().parents[1]


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("score_cli")
    tok = make_tiny_tokenizer(d / "hf")
    hf = make_tiny_hf_model(d / "hf", "qwen3", vocab_size=len(tok), seed=3)
    hf.config._attn_implementation = "eager"
    convert(d / "hf", d / "mc")
    return d, tok, hf.eval()


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--sequence-parallel"]], ids=["tp2", "tp2-sp"])
def test_gopd_score_under_torchrun_matches_hf(model_dir, extra):
    d, tok, hf = model_dir
    lines = [
        {"input_ids": [1, 7, 8, 9, 10, 11, 12], "prompt_len": 3, "id": "a"},
        {"text": "hello world", "prompt_len": 0},
        {"prompt": "12+34=", "response": "46", "domain": "math"},
    ]
    (d / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "megatron_gopd.scoring",
            "--load",
            str(d / "mc"),
            "--input",
            str(d / "in.jsonl"),
            "--output",
            str(d / "out.jsonl"),
            "--tensor-model-parallel-size",
            "2",
            "--micro-batch-size",
            "2",
            *extra,
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = [json.loads(x) for x in (d / "out.jsonl").read_text().splitlines()]
    assert len(out) == 3 and out[0]["id"] == "a" and out[2]["domain"] == "math"
    seqs = [
        out[0]["input_ids"],
        tok("hello world")["input_ids"],
        tok("12+34=")["input_ids"] + tok("46", add_special_tokens=False)["input_ids"],
    ]
    assert out[1]["input_ids"] == seqs[1] and out[2]["input_ids"] == seqs[2]
    ref = hf_logprobs(hf, seqs)
    for rec, r in zip(out, ref, strict=True):
        start = max(rec["prompt_len"], 1) - 1
        got = torch.tensor(rec["logprobs"])
        assert got.shape[0] == len(rec["input_ids"]) - max(rec["prompt_len"], 1)
        assert (got - r[start:]).abs().max().item() <= TOL


def test_gopd_score_reports_a_malformed_line(model_dir, tmp_path):
    d, _, _ = model_dir
    (tmp_path / "in.jsonl").write_text('{"input_ids": [1, 2, 3]}\n\n{"input_ids": [1, 2,\n')
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_gopd.scoring",
            "--load",
            str(d / "mc"),
            "--input",
            str(tmp_path / "in.jsonl"),
            "--output",
            str(tmp_path / "out.jsonl"),
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: {tmp_path / 'in.jsonl'}:3: not valid JSON")
    )
    assert not (tmp_path / "out.jsonl").exists()
