"""One training step's model work, padded (the old way) vs packed, on long-tailed lengths.

A synthetic workload shaped like reasoning rollouts, scaled to a CPU: ``--sequences`` sequences
whose lengths are log-normal (median ~250 tokens, clipped to [16, 2048]; the distribution is
printed), a tiny Qwen3-shaped student, a teacher twice its depth and width, and a reference of the
student's shape. One step's model work is timed as the trainer does it:

    scoring    the teacher's and the reference's forward passes over every sequence
    update     the student's forward + backward + optimizer step on every sequence

``padded``: micro-batches of ``--micro-batch-size`` rows; scoring pads every micro-batch to the
longest sequence of the whole call and the update every row to the longest of the batch (what
``gopd-train --no-packing`` does). ``packed``: whole sequences end to end in micro-batches of at
most ``--max-tokens`` tokens (the default: the padded micro-batch's worst case), balanced by first-
fit decreasing, the attention kept inside each sequence.

Printed per mode: padding efficiency (real tokens / tokens the models process), wall time and peak
memory of each phase and of the step, and packed's time and memory as ratios to padded, measured
in one run (each mode in a fresh forked process, so that peaks do not mix; CPU peak memory:
resident set above the level before the phase, via /proc VmHWM).

The rollout case (the CPU stand-in for SGLang against a plain batched sampling loop on the same
prompts) is ``--rollout``; see :func:`rollout_case`.

    python benchmarks/bench_step.py                 # ~5 min on 2 cores
    python benchmarks/bench_step.py --json          # one JSON object
    python benchmarks/bench_step.py --sequences 32 --max-len 256   # a quick look
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_gopd.utils import quiet_expected_warnings

quiet_expected_warnings()
torch.set_num_threads(1)  # before any op: the measuring processes are forked from this one


def lengths(n: int, seed: int, median: int = 250, max_len: int = 2048, min_len: int = 16):
    """Log-normal lengths with the given median (sigma 0.9: a long tail), clipped."""
    rng = random.Random(seed)
    mu = math.log(median)
    return [min(max_len, max(min_len, int(rng.lognormvariate(mu, 0.9)))) for _ in range(n)]


def _arch(hidden: int, layers: int, vocab: int, max_len: int):
    from megatron_gopd.models.arch import ModelArch, pad_vocab_size

    return ModelArch(
        family="qwen3",
        hf_architecture="Qwen3ForCausalLM",
        vocab_size=vocab,
        padded_vocab_size=pad_vocab_size(vocab),
        hidden_size=hidden,
        ffn_hidden_size=3 * hidden,
        num_layers=layers,
        num_attention_heads=4,
        num_query_groups=2,
        head_dim=hidden // 4,
        norm_eps=1e-6,
        rope_theta=1e6,
        max_position_embeddings=max_len,
        tie_word_embeddings=True,
        qkv_bias=False,
        qk_norm=True,
    )


def _proc_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


class _Peak:
    """Peak resident memory of a block, above its start (Linux), and its wall time."""

    def __enter__(self):
        Path("/proc/self/clear_refs").write_text("5")
        self.rss0, self.t0 = _proc_kb("VmRSS"), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.bytes = max(0, _proc_kb("VmHWM") - self.rss0) * 1024


def _samples(lens, vocab, seed):
    from megatron_gopd.types import Sample

    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lens:
        P = max(1, n // 4)
        R = n - P
        out.append(
            Sample(
                prompt_ids=torch.randint(0, vocab, (P,), generator=g).tolist(),
                response_ids=torch.randint(0, vocab, (R,), generator=g).tolist(),
                rollout_logprobs_T=(-torch.rand(R, generator=g)).tolist(),
                teacher_logprobs_T=-torch.rand(R, generator=g),
                ref_logprobs_T=-torch.rand(R, generator=g),
            )
        )
    return out


def measure(mode: str, lens: list[int], a) -> dict:
    """One mode in this (forked) process: scoring by two frozen roles, then one update."""
    from megatron_gopd import platform
    from megatron_gopd.gopd import GOPDLossConfig
    from megatron_gopd.models import build_role
    from megatron_gopd.scoring import score_sequences
    from megatron_gopd.trainer.update import (
        OptimConfig,
        build_optimizer,
        collate,
        collate_packed,
        train_step,
    )

    platform.setup()
    max_len = max(lens) + 8
    student_arch = _arch(a.hidden, 2, a.vocab, max_len)
    teacher_arch = _arch(2 * a.hidden, 4, a.vocab, max_len)
    teacher = build_role("teacher", arch=teacher_arch, frozen=True, spec="local")
    ref = build_role("reference", arch=student_arch, frozen=True, spec="local")
    student = build_role("student", arch=student_arch, frozen=False, spec="local")
    opt = build_optimizer(student.model, OptimConfig(lr=1e-5), train_iters=1, bf16=False)
    samples = _samples(lens, a.vocab, 0)
    seqs = [s.tokens for s in samples]
    packed = mode == "packed"
    budget = a.max_tokens or a.micro_batch_size * max(lens)
    kw = dict(max_tokens=budget) if packed else dict(micro_batch_size=a.micro_batch_size)
    # warm-up on a few short sequences (lazy initialisation does not count)
    score_sequences(ref, seqs[:2], **kw)
    out = {}
    with _Peak() as p:
        for role in (teacher, ref):
            score_sequences(role, seqs, **kw)
    out["scoring"] = (p.seconds, p.bytes)
    how = dict(domains=["default"], lam_of=lambda d: 1.25, with_ref=True)
    cfg = GOPDLossConfig()
    with _Peak() as p:
        if packed:
            from megatron_gopd import packing

            plan = packing.plan(lens, budget, 1)[0]
            micro = [collate_packed([samples[i] for i in mb], **how) for mb in plan]
            train_step(opt, micro, loss_cfg=cfg, vocab_size=a.vocab)
        else:
            batch = collate(samples, pad_rows_to=a.micro_batch_size, **how)
            train_step(
                opt, batch, micro_batch_size=a.micro_batch_size, loss_cfg=cfg, vocab_size=a.vocab
            )
    out["update"] = (p.seconds, p.bytes)
    # the tokens each mode's models process (per role), for the padding efficiency
    if packed:
        from megatron_gopd import packing

        score_tokens = sum(
            -(-sum(lens[i] for i in b) // 8) * 8 for b in packing.first_fit_decreasing(lens, budget)
        )
        update_tokens = sum(m.packed.num_tokens for m in micro)
    else:
        S = -(-max(lens) // 8) * 8
        rows = -(-len(lens) // a.micro_batch_size) * a.micro_batch_size
        score_tokens = update_tokens = rows * S
    out["processed_tokens"] = {"scoring": score_tokens, "update": update_tokens}
    return out


def run(a) -> dict:
    from megatron_gopd.parallel import ParallelConfig
    from megatron_gopd.testing import run_distributed

    lens = lengths(a.sequences, a.seed, a.median, a.max_len)
    res = {
        m: run_distributed(measure, 1, m, lens, a, parallel=ParallelConfig(), timeout=3600)[0]
        for m in ("padded", "packed")
    }
    real = sum(lens)
    q = sorted(lens)
    report = {
        "workload": {
            "sequences": len(lens),
            "tokens": real,
            "length_min": q[0],
            "length_median": q[len(q) // 2],
            "length_p90": q[int(0.9 * len(q))],
            "length_max": q[-1],
            "micro_batch_size": a.micro_batch_size,
            "max_tokens_per_microbatch": a.max_tokens or a.micro_batch_size * max(lens),
        }
    }
    for mode, r in res.items():
        t = r["scoring"][0] + r["update"][0]
        report[mode] = {
            "efficiency_scoring": real / r["processed_tokens"]["scoring"],
            "efficiency_update": real / r["processed_tokens"]["update"],
            "seconds_scoring": r["scoring"][0],
            "seconds_update": r["update"][0],
            "seconds_step": t,
            "peak_bytes_scoring": r["scoring"][1],
            "peak_bytes_update": r["update"][1],
        }
    p, d = report["packed"], report["padded"]
    report["packed_vs_padded"] = {
        "time_step": p["seconds_step"] / d["seconds_step"],
        "time_scoring": p["seconds_scoring"] / d["seconds_scoring"],
        "time_update": p["seconds_update"] / d["seconds_update"],
        "peak_memory_scoring": p["peak_bytes_scoring"] / max(d["peak_bytes_scoring"], 1),
        "peak_memory_update": p["peak_bytes_update"] / max(d["peak_bytes_update"], 1),
    }
    return report


def _histogram(lens: list[int]) -> str:
    edges = [16, 64, 128, 256, 512, 1024, 2049]
    rows = []
    for lo, hi in itertools.pairwise(edges):
        n = sum(lo <= x < hi for x in lens)
        rows.append(f"  [{lo:>4}, {hi - 1:>4}]  {n:>4}  {'#' * max(0, round(60 * n / len(lens)))}")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sequences", type=int, default=160)
    ap.add_argument("--median", type=int, default=250)
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=None, help="default: mbs x longest")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    report = run(a)
    if a.json:
        print(json.dumps(report, indent=2))
        return 0
    w = report["workload"]
    print(
        f"{w['sequences']} sequences, {w['tokens']} tokens: lengths min {w['length_min']}, "
        f"median {w['length_median']}, p90 {w['length_p90']}, max {w['length_max']}"
    )
    print(_histogram(lengths(a.sequences, a.seed, a.median, a.max_len)))
    print(
        f"padded: micro-batches of {w['micro_batch_size']} rows; packed: "
        f"{w['max_tokens_per_microbatch']} tokens per micro-batch\n"
    )
    print(
        "| | efficiency (scoring / update) | scoring s | update s | step s | peak MiB (scoring / update) |"
    )
    print("|---|---|---|---|---|---|")
    for mode in ("padded", "packed"):
        r = report[mode]
        print(
            f"| {mode} | {r['efficiency_scoring']:.2f} / {r['efficiency_update']:.2f} | "
            f"{r['seconds_scoring']:.1f} | {r['seconds_update']:.1f} | {r['seconds_step']:.1f} | "
            f"{r['peak_bytes_scoring'] / 2**20:.0f} / {r['peak_bytes_update'] / 2**20:.0f} |"
        )
    v = report["packed_vs_padded"]
    print(
        f"\npacked / padded: step time {v['time_step']:.2f}x (scoring {v['time_scoring']:.2f}x, "
        f"update {v['time_update']:.2f}x); peak memory scoring {v['peak_memory_scoring']:.2f}x, "
        f"update {v['peak_memory_update']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
