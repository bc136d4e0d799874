"""CPU demo of the evaluation pipeline: several runs -> comparison table + plot vs lambda.

    python examples/evaluation/demo_report.py --out examples/evaluation/output

Runs, all through ``evaluate()`` on the shipped sample benchmarks (real prompting, math-verify
grading, the code sandbox, bootstrap intervals):

- ``tiny-random``: a real random tiny Qwen3 (``make_tiny_hf_model``) sampling at temperature 1.0
  with the in-process HF generator; it scores 0, as it should.
- ``base``, ``teacher``, ``OPD (lambda=1)``, ``G-OPD lambda=0.5``, ``ExOPD (lambda=1.25, 1.5)``:
  **synthetic** responses from a scripted generator that answers right with a chosen probability
  per run (and per problem, around it) and writes longer responses for larger lambda. They are
  not model outputs: they exist to exercise the tables and plots with a realistic spread. Point
  ``--run`` of ``python -m megatron_gopd.evaluation.report`` at real evaluation dirs for real ones.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
from pathlib import Path

import torch

from megatron_gopd.evaluation import EvalConfig, HFGenerator, Sandbox, SandboxLimits, evaluate
from megatron_gopd.evaluation.report import comparison, comparison_markdown, load_run, plot_vs
from megatron_gopd.evaluation.testing import (
    ScriptedGenerator,
    make_tiny_tokenizer,
    sample_benchmark_specs,
)
from megatron_gopd.testing import make_tiny_hf_model

BENCHMARKS = sample_benchmark_specs()
RIGHT = {
    "What is $1+1$": "\\boxed{2}",
    "frac{1}{2}+": "\\boxed{\\frac{3}{4}}",
    "x^2 < 4": "\\boxed{(-2, 2)}",
    "2^{10}": "\\boxed{24}",
    "sqrt{12}": "\\boxed{10}",
    "sin(": "\\boxed{0.5}",
    "def add": "```python\ndef add(a, b):\n    return a + b\n```",
    "def mean": "```python\ndef mean(xs):\n    return sum(xs) / len(xs)\n```",
    "max_of_three": "```python\ndef max_of_three(a, b, c):\n    return max(a, b, c)\n```",
    "reverse_words": "```python\ndef reverse_words(s):\n    return ' '.join(s.split()[::-1])\n```",
    "Print A+B": "```python\nprint(sum(map(int, input().split())))\n```",
    "runningSum": "```python\nclass Solution:\n    def runningSum(self, nums):\n        return list(accumulate(nums))\n```",
}
# (run name, tags, probability of a right answer, mean filler words): synthetic, see the docstring
SYNTHETIC = [
    ("base", {"run": "base"}, 0.30, 40),
    ("teacher", {"run": "teacher"}, 0.80, 90),
    ("G-OPD λ=0.5", {"run": "G-OPD", "lambda": 0.5}, 0.50, 55),
    ("OPD λ=1", {"run": "OPD", "lambda": 1.0}, 0.62, 70),
    ("ExOPD λ=1.25", {"run": "ExOPD", "lambda": 1.25}, 0.70, 85),
    ("ExOPD λ=1.5", {"run": "ExOPD", "lambda": 1.5}, 0.66, 105),
]


def scripted(p_right: float, words: int):
    def respond(prompt: str, j: int, rng) -> str:
        key = next(k for k in RIGHT if k in prompt)
        # problems differ in difficulty: shift p by a fixed per-problem offset in [-0.25, 0.25]
        offset = int(hashlib.sha256(key.encode()).hexdigest(), 16) % 51 / 100 - 0.25
        right = rng.random() < min(max(p_right + offset, 0.0), 1.0)
        code = "```" in RIGHT[key]
        wrong = "```python\nprint(0)\n```" if code else f"\\boxed{{{rng.randint(-9, -1)}}}"
        filler = " ".join(["step"] * max(1, int(rng.gauss(words, words / 4))))
        return f"Let me think. {filler}. " + (RIGHT[key] if right else wrong)

    return respond


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="examples/evaluation/output")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    shutil.rmtree(out / "runs", ignore_errors=True)
    model_dir = out / "runs" / "_tiny_model"
    tok = make_tiny_tokenizer(model_dir)
    make_tiny_hf_model(
        model_dir, vocab_size=len(tok), max_position_embeddings=1024, eos_token_id=tok.eos_token_id
    )
    sandbox = Sandbox(SandboxLimits(cpu_seconds=5, wall_seconds=20, memory_bytes=512 << 20))
    cfg = EvalConfig(n_samples=None, temperature=1.0, max_new_tokens=400, seed=0)
    dirs = []
    hf = HFGenerator(model_dir, eos_token_ids=[tok.eos_token_id])
    tiny_cfg = EvalConfig(n_samples=4, temperature=1.0, max_new_tokens=24, seed=0)
    evaluate(
        hf,
        tok,
        BENCHMARKS,
        out / "runs" / "tiny-random",
        tiny_cfg,
        sandbox=sandbox,
        tags={"run": "tiny-random"},
    )
    dirs.append(("tiny-random", out / "runs" / "tiny-random"))
    for name, tags, p, words in SYNTHETIC:
        d = out / "runs" / name.replace(" ", "_")
        evaluate(
            ScriptedGenerator(tok, scripted(p, words)),
            tok,
            BENCHMARKS,
            d,
            cfg,
            sandbox=sandbox,
            tags=tags,
        )
        dirs.append((name, d))
    cmp = comparison([load_run(d, n) for n, d in dirs], baseline="base")
    md = comparison_markdown(cmp)
    note = (
        "Runs other than tiny-random are SYNTHETIC (scripted responses, see demo_report.py); "
        "samples per problem: 32 math, 4 code (the paper's defaults).\n\n"
    )
    (out / "comparison.md").write_text(note + md, encoding="utf-8")
    png = plot_vs(
        cmp, "lambda", out / "accuracy_length_vs_lambda.png", title="G-OPD sweep (synthetic demo)"
    )
    print(note + md)
    print(f"table: {out / 'comparison.md'}\nplot:  {png}")


if __name__ == "__main__":
    main()
