"""Scoring parity with Hugging Face transformers, as numbers: the table behind tests/test_parity_hf.py.

For each tiny random HF model the tests make (Llama, Llama-3 rope scaling, Qwen2, Qwen3; tied and
untied embeddings), converted with the project's tool and scored by megatron-core at (TP, PP) in
(1,1), (2,1), (1,2), (2,2) on CPU gloo in fp32, print the largest |log-prob difference| against
``transformers`` on the same sequences (the tests' tolerance is 1e-4). Then the negative controls:
the same Qwen3 model converted with one deliberate mapping bug each (interleaved QKV layout, q/k
norms swapped, wrong rope theta, gate/up swapped), which must land far above the tolerance.

    python benchmarks/parity_hf.py          # ~3 minutes on 2 cores
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("GOPD_LOG_LEVEL", "WARNING")  # the table only (also in the forked ranks)

from megatron_gopd.utils import quiet_expected_warnings

quiet_expected_warnings()

import torch  # noqa: E402
import transformers  # noqa: E402

from megatron_gopd.testing import make_tiny_hf_model, run_distributed  # noqa: E402
from tests.test_parity_hf import (  # noqa: E402
    LAYOUTS,
    MODELS,
    TOL,
    _convert_with_bug,
    _sequences,
    convert,
    hf_logprobs,
    max_diff,
    score,
)

NEGATIVE_CONTROLS = ("qkv_layout", "swapped_qk_norm", "rope_theta", "gate_up_swapped")


def main() -> None:
    torch.set_num_threads(1)  # before any op: ranks are forked from this process
    transformers.utils.logging.disable_progress_bar()  # the table only
    work = Path(tempfile.mkdtemp(prefix="parity_hf_"))
    print(f"max |log-prob difference| vs transformers (fp32, tolerance {TOL:g})")
    print(f"{'model':16s}" + "".join(f"  {f'TP{tp} PP{pp}':>8s}" for tp, pp in LAYOUTS))
    for family, tied in MODELS:
        name = f"{family}-{'tied' if tied else 'untied'}"
        hf = make_tiny_hf_model(work / name, family, tied=tied, seed=1)
        hf.config._attn_implementation = "eager"
        convert(work / name, work / f"{name}-mcore")
        seqs = _sequences(hf.config.vocab_size)
        ref = hf_logprobs(hf.eval(), seqs)
        row = [
            max(max_diff(o, ref) for o in score(work / f"{name}-mcore", seqs, tp, pp))
            for tp, pp in LAYOUTS
        ]
        print(f"{name:16s}" + "".join(f"  {d:8.1e}" for d in row), flush=True)

    hf = make_tiny_hf_model(work / "negative", "qwen3", seed=2)
    hf.config._attn_implementation = "eager"
    seqs = _sequences(hf.config.vocab_size, seed=3)
    ref = hf_logprobs(hf.eval(), seqs)
    print("negative controls (qwen3, TP1 PP1): max |log-prob difference|")
    for bug in NEGATIVE_CONTROLS:
        run_distributed(_convert_with_bug, 1, str(work / "negative"), str(work / bug), bug)
        diff = max_diff(score(work / bug, seqs, 1, 1)[0], ref)
        print(f"  {bug:16s} {diff:.3f}  ({diff / TOL:.0f}x the tolerance)", flush=True)


if __name__ == "__main__":
    main()
