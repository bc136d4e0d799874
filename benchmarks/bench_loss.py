"""Forward+backward time and peak memory of the G-OPD loss against megatron-core's cross-entropy.

For each (tokens, vocabulary, TP, dtype) the same vocab-parallel logits go through:

    megatron_ce   megatron.core.tensor_parallel.vocab_parallel_cross_entropy, masked sum
                  (the lower bound: it computes the same log-prob of the sampled token)
    gopd          megatron_gopd.trainer.loss.gopd_loss, default config (sampled estimator), with its
                  advantages, entropy and the full metrics report
    fdiv          gopd_loss(objective="fdiv", divergence="alpha", alpha=0.5): OPD+, the corrected
                  f-divergence advantage on the same log-probs (sampled estimator)
    naive         all-gather the vocabulary, log_softmax in fp32, gather, masked sum
    gopd_full     gopd_loss(estimator="full_vocab"): also reads the teacher's and reference's
                  logits (three inputs, so its memory is not comparable; time for information)

and the ratios to megatron_ce are printed, all measured in one run.

Method.
* Time: the minimum over ``--repeats`` rounds (after a warm-up round) of forward + backward
  (``torch.autograd.grad`` w.r.t. the logits), candidates interleaved round by round in one
  process group so that load from other processes hits all of them alike; inputs are restored
  before each call (two of the candidates overwrite their logits, as megatron-core's does). With
  TP > 1 each rank times itself and the slowest rank counts. CUDA: synchronised wall clock.
* Peak memory: every candidate runs once in a fresh process group (forked ranks), after a tiny
  warm-up call. On CPU: peak resident set size above the resident size just before the call
  (``/proc/self/status`` VmHWM after resetting it through ``/proc/self/clear_refs``), with glibc's
  mmap threshold pinned to 128 KiB in that process (``mallopt``) so that every tensor of 128 KiB
  or more is its own mapping and leaves the resident set when freed. (Not in the timing processes:
  there it would add page faults to every temporary, which a normal process does not pay.)
  On CUDA: ``max_memory_allocated``
  above ``memory_allocated`` before the call. Reported peak = the candidate's inputs (logits;
  for gopd_full also teacher + reference) + that extra, i.e. what the loss step needs in total;
  the extra alone is printed too. TP > 1: the largest rank.

    python benchmarks/bench_loss.py                      # default shapes for this machine
    python benchmarks/bench_loss.py --json               # one JSON object on stdout
    python benchmarks/bench_loss.py --shapes 4096x151936x1,2048x65536x2 --dtypes bf16 --repeats 7
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_gopd.utils import quiet_expected_warnings

quiet_expected_warnings()  # before megatron is imported: its CPU-only warnings say nothing here
# megatron-core 0.16's tensor-parallel gather (the naive candidate) calls an API torch 2.13 deprecates
warnings.filterwarnings(
    "ignore",
    message=r"`torch.distributed.all_gather_into_tensor` is deprecated",
    category=FutureWarning,
)
torch.set_num_threads(1)  # before any op: ranks are forked from this process

CANDIDATES = ("megatron_ce", "gopd", "fdiv", "naive", "gopd_full")
FDIV = dict(objective="fdiv", divergence="alpha", alpha=0.5)  # exercises the clamp and expm1
CPU_SHAPES = "2048x32768x1,1024x151936x1,2048x65536x2,1024x151936x4"
GPU_SHAPES = "8192x151936x1,16384x151936x1,8192x262144x1"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SEQ = 256  # tokens are laid out as [tokens / SEQ, SEQ]
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


# ------------------------------------------------------------------------- inputs and candidates


def _inputs(tokens: int, vocab: int, dtype, need_roles: bool, device) -> dict:
    """This rank's vocabulary slice of the logits (+ teacher/ref), labels and a RolloutBatch."""
    import torch.distributed as dist

    from megatron_gopd.types import RolloutBatch

    rank, world = dist.get_rank(), dist.get_world_size()
    v_local = vocab // world
    B, S = max(1, tokens // SEQ), min(tokens, SEQ)
    g = torch.Generator(device=device).manual_seed(1000 + rank)
    gt = torch.Generator(device=device).manual_seed(7)  # same tokens on every TP rank

    def logits():
        return (torch.randn(B, S, v_local, generator=g, device=device) * 2).to(dtype)

    tok = torch.randint(0, vocab, (B, S), generator=gt, device=device)
    mask = torch.ones(B, S, device=device)
    mask[:, : S // 8] = 0.0  # a prompt
    mb = RolloutBatch(
        tokens_BS=tok,
        response_mask_BS=mask,
        teacher_logprobs_BS=-torch.rand(B, S, generator=gt, device=device) * 3,
        ref_logprobs_BS=-torch.rand(B, S, generator=gt, device=device) * 3,
        rollout_logprobs_BS=None,
        lam_B=torch.full((B,), 1.25, device=device),
        domain_ids_B=torch.zeros(B, dtype=torch.long, device=device),
        domains=["math"],
        seq_lens_B=torch.full((B,), S, device=device),
    )
    labels = torch.roll(tok, -1, dims=1)
    x = logits().requires_grad_(True)
    inp = dict(logits=x, labels=labels, mb=mb, vocab=vocab, world=world)
    if need_roles:
        inp["teacher"], inp["ref"] = logits(), logits()
    return inp


def _run(name: str, inp: dict) -> None:
    """One forward + backward of candidate ``name``."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from megatron_gopd.gopd import GOPDLossConfig
    from megatron_gopd.trainer.loss import gopd_loss

    x, labels, mb = inp["logits"], inp["labels"], inp["mb"]
    group = dist.group.WORLD if inp["world"] > 1 else None
    m = mb.response_mask_BS
    if name == "megatron_ce":
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        loss = (vocab_parallel_cross_entropy(x, labels) * m).sum()
    elif name == "gopd":
        loss, _, _ = gopd_loss(x, mb, GOPDLossConfig(), tp_group=group, vocab_size=inp["vocab"])
    elif name == "fdiv":
        cfg = GOPDLossConfig(**FDIV)
        loss, _, _ = gopd_loss(x, mb, cfg, tp_group=group, vocab_size=inp["vocab"])
    elif name == "gopd_full":
        loss, _, _ = gopd_loss(
            x,
            mb,
            GOPDLossConfig(estimator="full_vocab"),
            tp_group=group,
            vocab_size=inp["vocab"],
            teacher_logits_BSV=inp["teacher"],
            ref_logits_BSV=inp["ref"],
        )
    elif name == "naive":
        full = x
        if inp["world"] > 1:  # Megatron's gather (backward: this rank's slice of the gradient)
            from megatron.core.tensor_parallel.mappings import (
                gather_from_tensor_model_parallel_region,
            )

            full = gather_from_tensor_model_parallel_region(x)
        lp = F.log_softmax(full.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        loss = (lp * m).sum()
    else:
        raise ValueError(name)
    torch.autograd.grad(loss, x)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ------------------------------------------------------------------------- measurements (per rank)


def _proc_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1))


def _input_bytes(name: str, inp: dict) -> int:
    n = inp["logits"].numel() * inp["logits"].element_size()
    return 3 * n if name == "gopd_full" else n


def measure_memory(name: str, tokens: int, vocab: int, dtype: str) -> dict:
    from megatron_gopd import platform

    dev = platform.device()
    if not torch.cuda.is_available():
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    small = _inputs(2 * SEQ // 8, vocab, DTYPES[dtype], name == "gopd_full", dev)
    _run(name, small)  # warm-up: lazy initialisation does not count
    del small
    inp = _inputs(tokens, vocab, DTYPES[dtype], name == "gopd_full", dev)
    gc.collect()
    _sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        _run(name, inp)
        _sync()
        extra = torch.cuda.max_memory_allocated() - before
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
        before = _proc_kb("VmRSS")
        _run(name, inp)
        extra = (_proc_kb("VmHWM") - before) * 1024
    return dict(extra_bytes=int(extra), peak_bytes=int(extra + _input_bytes(name, inp)))


def measure_time(names: list[str], tokens: int, vocab: int, dtype: str, repeats: int) -> dict:
    import torch.distributed as dist

    from megatron_gopd import platform

    inp = _inputs(tokens, vocab, DTYPES[dtype], "gopd_full" in names, platform.device())
    base = inp["logits"].detach().clone()
    best = {n: float("inf") for n in names}
    for r in range(repeats + 1):  # round 0 warms up
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            with torch.no_grad():
                inp["logits"].copy_(base)
            if inp["world"] > 1:
                dist.barrier()
            _sync()
            t0 = time.perf_counter()
            _run(name, inp)
            _sync()
            if r > 0:
                best[name] = min(best[name], time.perf_counter() - t0)
    return best


# ------------------------------------------------------------------------- driver


def _distributed(fn, tp: int, *args):
    from megatron_gopd.parallel import ParallelConfig
    from megatron_gopd.testing import run_distributed

    # CUDA: spawned ranks (a forked one cannot use the CUDA runtime this process initialised)
    start = "spawn" if torch.cuda.is_available() else "fork"
    return run_distributed(
        fn, tp, *args, parallel=ParallelConfig(tp), timeout=1800, start_method=start
    )


def bench_shape(tokens, vocab, tp, dtype, repeats, names) -> dict:
    times = _distributed(measure_time, tp, names, tokens, vocab, dtype, repeats)
    row = dict(tokens=tokens, vocab=vocab, tp=tp, dtype=dtype, candidates={})
    for name in names:
        mem = _distributed(measure_memory, tp, name, tokens, vocab, dtype)
        row["candidates"][name] = dict(
            time_s=max(t[name] for t in times),
            peak_bytes=max(m["peak_bytes"] for m in mem),
            extra_bytes=max(m["extra_bytes"] for m in mem),
        )
    ce = row["candidates"]["megatron_ce"]
    row["ratios"] = {
        name: dict(
            time=c["time_s"] / ce["time_s"],
            peak_memory=c["peak_bytes"] / ce["peak_bytes"],
        )
        for name, c in row["candidates"].items()
        if name != "megatron_ce"
    }
    return row


def _table(result: dict) -> str:
    mib = 1 << 20
    names = [n for n in result["results"][0]["candidates"] if n != "megatron_ce"]
    head = f"{'tokens x vocab':>16} {'TP':>2} {'dtype':>5} | {'megatron_ce':>20} |"
    head += "".join(f" {n + ' time / peak':>24} |" for n in names)
    lines = [head, "-" * len(head)]
    for r in result["results"]:
        ce = r["candidates"]["megatron_ce"]
        cells = [
            f"{r['tokens']:>6} x {r['vocab']:<7} {r['tp']:>2} {r['dtype']:>5}",
            f"{ce['time_s'] * 1e3:8.1f} ms {ce['peak_bytes'] / mib:6.0f} MiB",
        ]
        for n in names:
            q = r["ratios"][n]
            extra = r["candidates"][n]["extra_bytes"] / mib
            cells.append(f"{q['time']:5.2f}x {q['peak_memory']:5.2f}x (+{extra:5.0f} MiB)")
        lines.append(" | ".join(cells) + " |")
    lines.append(
        "ratios to megatron_ce (time: min over rounds; peak: inputs + extra above the "
        "pre-call baseline; '+MiB': the candidate's extra, megatron_ce's extras: "
        + ", ".join(
            f"{r['candidates']['megatron_ce']['extra_bytes'] / mib:.0f}" for r in result["results"]
        )
        + " MiB)"
    )
    return "\n".join(lines)


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    out = []
    for part in text.split(","):
        t, v, tp = (int(x) for x in part.lower().split("x"))
        if v % tp:
            raise SystemExit(f"vocabulary {v} is not divisible by TP={tp}")
        out.append((t, v, tp))
    return out


def main(argv=None) -> dict:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=GPU_SHAPES if cuda else CPU_SHAPES, help="TxVxTP,...")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--candidates", default=",".join(CANDIDATES))
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    names = args.candidates.split(",")
    if names[0] != "megatron_ce" or not set(names) <= set(CANDIDATES):
        raise SystemExit(f"--candidates: megatron_ce first, then any of {CANDIDATES[1:]}")
    shapes = parse_shapes(args.shapes)
    if cuda and any(tp > torch.cuda.device_count() for _, _, tp in shapes):
        print("note: TP > number of GPUs is skipped", file=sys.stderr)
        shapes = [s for s in shapes if s[2] <= torch.cuda.device_count()]
    result = dict(
        device=torch.cuda.get_device_name() if cuda else "cpu (1 thread per rank)",
        memory_method="cuda max_memory_allocated" if cuda else "peak RSS (VmHWM) per fresh rank",
        results=[],
    )
    for t, v, tp in shapes:
        for dt in args.dtypes.split(","):
            result["results"].append(bench_shape(t, v, tp, dt, args.repeats, names))
            print(f"done {t}x{v} TP{tp} {dt}", file=sys.stderr, flush=True)
    print(json.dumps(result) if args.json else _table(result), flush=True)
    return result


if __name__ == "__main__":
    import megatron.core  # noqa: F401  (paid once here; the forked ranks inherit it)

    main()
