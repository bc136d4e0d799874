"""benchmarks/gpu_check.py --dry-run: every check of the GPU check on the CPU with tiny sizes, as
one command prints one JSON object (the GPU run is the same code with CUDA and real sizes)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    p = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        timeout=600,
    )
    out = json.loads(p.stdout)  # one JSON object, nothing else on stdout
    failed = {k: v.get("error") for k, v in out["checks"].items() if not v.get("ok")}
    assert p.returncode == 0 and out["ok"], failed
    assert out["dry_run"] and list(out["checks"]) == [
        "env",
        "parity",
        "loss_bench",
        "output_layer_bench",
        "train",
        "mfu",
    ]
    c = out["checks"]
    assert c["env"]["megatron.core"] and c["env"]["cuda_available"] is False
    # the tests' fp32 parity tolerance holds on the device; bf16 is reported against both
    assert all(v["max"] <= 1e-4 for v in c["parity"]["fp32"].values())
    assert set(c["parity"]["bf16_vs_fp32_model"]) == {"qwen3-tied", "llama-untied"}
    assert [r["dtype"] for r in c["loss_bench"]["results"]] == ["bf16"]
    assert set(c["output_layer_bench"]["cost"][0]["candidates"]) == {
        "megatron",
        "bf16_gopd",
        "fp32_gopd",
    }
    fp32, bf16 = c["train"]["fp32_T0.6"], c["train"]["bf16_full_vocab_offload"]
    assert fp32["steps"] == bf16["steps"] == 2
    assert max(fp32["rollout_abs_log_ratio"]) <= 1e-4
    assert all(x is not None for x in bf16["kl_teacher_exact"])
    assert c["mfu"]["model_tflops_per_s"] > 0 and c["mfu"]["mfu"] is None  # no peak for a CPU
    assert out["seconds"] < 470
