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
    python benchmarks/bench_step.py --rollout       # ~1 min
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


def _plain_sampler(model_dir: str, prompts: list[list[int]], new_tokens: int, seed: int) -> float:
    """Seconds for a plain batched sampling loop: the HF model (its default attention), the
    prompts left-padded into one batch, a KV cache, ``new_tokens`` multinomial draws at T = 1
    with the sampled tokens' log-probs -- what the server's work would cost without a server."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    gen = torch.Generator().manual_seed(seed)

    def once() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            m, pos = mask.clone(), (mask.cumsum(1) - 1).clamp(min=0)
            out = model(input_ids=ids, attention_mask=m, position_ids=pos, use_cache=True)
            cache, last = out.past_key_values, out.logits[:, -1].float()
            lps = []
            for _ in range(new_tokens):
                lp = F.log_softmax(last, dim=-1)
                tok = torch.multinomial(lp.exp(), 1, generator=gen)
                lps.append(lp.gather(1, tok))
                m = torch.cat([m, torch.ones_like(tok)], 1)
                pos = pos[:, -1:] + 1
                out = model(
                    input_ids=tok, attention_mask=m, position_ids=pos, past_key_values=cache
                )
                cache, last = out.past_key_values, out.logits[:, -1].float()
        return time.perf_counter() - t0

    once()  # warm-up
    return min(once() for _ in range(2))


def _served(
    model_dir: str, prompts, new_tokens: int, seed: int, deterministic: bool, per_request: int = 1
) -> float:
    """Seconds for the same rollout through the CPU server over HTTP with the trainer's client
    (``per_request`` prompts per request, every request in flight at once), the server started
    with one thread, as the loop has."""
    import os
    import subprocess

    from megatron_gopd.rollout.client import ClientConfig, RolloutClient
    from megatron_gopd.rollout.protocol import SamplingConfig, http_json
    from megatron_gopd.utils import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "megatron_gopd.cpu_server", "--model-path", model_dir]
    cmd += ["--port", str(port), "--random-seed", str(seed)]
    if deterministic:
        cmd.append("--enable-deterministic-inference")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read().decode()[-2000:])
            try:
                if http_json(url + "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the CPU server did not come up in 120 s")
            time.sleep(0.1)
        client = RolloutClient(
            [url],
            ClientConfig(
                max_in_flight_per_server=len(prompts),
                prompts_per_request=per_request,
                progress=False,
            ),
        )
        sampling = SamplingConfig(max_new_tokens=new_tokens, ignore_eos=True, seed=seed)
        jobs = [(p, "default", {}, i) for i, p in enumerate(prompts)]

        def once() -> float:
            t0 = time.perf_counter()
            out = client.sample(jobs, n=1, sampling=sampling)
            assert sum(s.response_len for s in out) == len(prompts) * new_tokens
            return time.perf_counter() - t0

        once()  # warm-up
        return min(once() for _ in range(2))
    finally:
        proc.kill()
        proc.wait()


def rollout_case(a) -> dict:
    """The CPU stand-in for SGLang against a plain batched sampling loop, same model, same
    prompts (``--rollout-prompts`` of 8..16 tokens, ``--rollout-tokens`` new tokens each, T = 1),
    the server in its default mode and with ``--enable-deterministic-inference`` (batch-invariant
    row-wise kernels); best of two after a warm-up, each."""
    import tempfile

    from megatron_gopd.testing import make_tiny_hf_model

    rng = random.Random(a.seed)
    with tempfile.TemporaryDirectory() as d:
        model = make_tiny_hf_model(Path(d) / "hf", "qwen3", seed=a.seed)
        params = sum(p.numel() for p in model.parameters())
        vocab = 100
        prompts = [
            [rng.randrange(3, vocab) for _ in range(rng.randint(8, 16))]
            for _ in range(a.rollout_prompts)
        ]
        args = (str(Path(d) / "hf"), prompts, a.rollout_tokens, a.seed)
        plain = _plain_sampler(*args)
        served = _served(*args, deterministic=False)
        served_det = _served(*args, deterministic=True)
        served_16 = _served(*args, deterministic=False, per_request=16)
    return {
        "workload": {
            "prompts": len(prompts),
            "new_tokens": a.rollout_tokens,
            "model_parameters": params,
        },
        "seconds_plain_loop": plain,
        "seconds_cpu_server": served,
        "seconds_cpu_server_deterministic": served_det,
        "seconds_cpu_server_16_per_request": served_16,
        "cpu_server_vs_plain": served / plain,
        "cpu_server_deterministic_vs_plain": served_det / plain,
        "cpu_server_16_per_request_vs_plain": served_16 / plain,
    }


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
    ap.add_argument("--rollout", action="store_true", help="the rollout case instead")
    ap.add_argument("--rollout-prompts", type=int, default=128)
    ap.add_argument("--rollout-tokens", type=int, default=16)
    a = ap.parse_args()
    if a.rollout:
        r = rollout_case(a)
        if a.json:
            print(json.dumps(r, indent=2))
            return 0
        w = r["workload"]
        print(
            f"{w['prompts']} prompts x {w['new_tokens']} new tokens, one sample each, "
            f"a {w['model_parameters']}-parameter Qwen3-shaped model, 1 thread\n"
        )
        print("| | seconds | vs plain loop |\n|---|---|---|")
        print(f"| plain batched HF sampling loop | {r['seconds_plain_loop']:.3f} | 1.00x |")
        print(
            f"| CPU server (HTTP, trainer's client, 1 prompt per request) | "
            f"{r['seconds_cpu_server']:.3f} | {r['cpu_server_vs_plain']:.2f}x |"
        )
        print(
            f"| CPU server, 16 prompts per request | {r['seconds_cpu_server_16_per_request']:.3f} | "
            f"{r['cpu_server_16_per_request_vs_plain']:.2f}x |"
        )
        print(
            "| CPU server, --enable-deterministic-inference | "
            f"{r['seconds_cpu_server_deterministic']:.3f} | "
            f"{r['cpu_server_deterministic_vs_plain']:.2f}x |"
        )
        return 0
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
