"""fp32 log-probs from a bf16 model: the error they remove, the rollout/trainer mismatch before and
after, and what the chunked fp32 output layer costs against megatron-core's output layer.

Part ``error`` (a small Qwen3-shaped HF model whose output layer gives logits of a trained model's
scale, converted to Megatron; tokens sampled by the CPU rollout engine at T = 1). Per-token
log-prob errors, mean and max:

    head        bf16-rounded logits vs fp32 logits from the *same* bf16 hidden states and weight
                (the trainer's old output layer vs the new one: exactly what this change removes)
    model       the bf16 model's log-probs (old head / new head) vs the fp32 model (same weights)
    mismatch    rollout engine vs trainer on the engine's own samples, before (bf16 logits on both
                sides) and after (fp32 logits on both: the engine's --enable-fp32-lm-head); also
                with an fp32 engine (the bf16 end-to-end test's setting: the tiny checkpoints
                are fp32, so the CPU server runs them in fp32)

Part ``cost`` (the student update's output layer + log-prob loss, forward + backward to the
hidden states and the weight, one micro-batch of ``T`` tokens with hidden size ``H``):

    megatron    megatron-core's path: the output layer's GEMM in the model dtype, ``[T, V / TP]``
                logits, ``vocab_parallel_cross_entropy`` (which makes an fp32 copy of them)
    bf16_gopd   the trainer's old path: the same bf16 logits, then ``gopd_loss`` on them
    fp32_gopd   the trainer's path: ``gopd_loss`` on the chunked fp32 output layer

Time: min over rounds (interleaved) after a warm-up; peak memory above the inputs (hidden states,
weight), measured as in ``bench_loss.py`` (a fresh forked rank per candidate; CPU: resident-set
high-water mark with glibc's mmap threshold pinned; CUDA: ``max_memory_allocated``).

    python benchmarks/bench_output_layer.py                 # both parts, sizes for this machine
    python benchmarks/bench_output_layer.py --part cost --shapes 8192x151936x2560x1 --json
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_gopd.utils import quiet_expected_warnings

quiet_expected_warnings()
torch.set_num_threads(1)  # before any op: ranks are forked from this process

_spec = importlib.util.spec_from_file_location(
    "bench_loss", Path(__file__).resolve().parent / "bench_loss.py"
)
bench_loss = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_loss)  # its memory method and helpers

CANDIDATES = ("megatron", "bf16_gopd", "fp32_gopd")
CPU_SHAPES = "1024x32768x512x1,8192x32768x512x1,2048x65536x512x2"
GPU_SHAPES = "8192x151936x2560x1,8192x151936x4096x1,16384x151936x4096x2"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SEQ = 256


# ---------------------------------------------------------------------------------- cost


def _cost_inputs(tokens, vocab, hidden, dtype, device):
    import torch.distributed as dist

    from megatron_gopd.types import RolloutBatch

    rank, world = dist.get_rank(), dist.get_world_size()
    B, S = max(1, tokens // SEQ), min(tokens, SEQ)
    g = torch.Generator(device=device).manual_seed(7)  # the same hidden states on every TP rank
    gw = torch.Generator(device=device).manual_seed(100 + rank)
    h = (torch.randn(S, B, hidden, generator=g, device=device)).to(dtype).requires_grad_(True)
    w = (torch.randn(vocab // world, hidden, generator=gw, device=device) * hidden**-0.5 * 3).to(
        dtype
    )
    w.requires_grad_(True)
    tok = torch.randint(0, vocab, (B, S), generator=g, device=device)
    mask = torch.ones(B, S, device=device)
    mask[:, : S // 8] = 0.0
    mb = RolloutBatch(
        tokens_BS=tok,
        response_mask_BS=mask,
        teacher_logprobs_BS=-torch.rand(B, S, generator=g, device=device) * 3,
        ref_logprobs_BS=None,
        rollout_logprobs_BS=None,
        lam_B=torch.ones(B, device=device),
        domain_ids_B=torch.zeros(B, dtype=torch.long, device=device),
        domains=["d"],
        seq_lens_B=torch.full((B,), S, device=device),
    )
    return dict(h=h, w=w, mb=mb, vocab=vocab, world=world)


def _cost_run(name, inp):
    import torch.distributed as dist
    import torch.nn.functional as F
    from megatron.core import tensor_parallel

    from megatron_gopd.gopd import GOPDLossConfig
    from megatron_gopd.trainer.loss import gopd_loss
    from megatron_gopd.vocab_parallel.output_layer import OutputLayer

    h, w, mb = inp["h"], inp["w"], inp["mb"]
    group = dist.group.WORLD if inp["world"] > 1 else None
    x = tensor_parallel.copy_to_tensor_model_parallel_region(h) if group is not None else h
    x = x.transpose(0, 1)  # [B, S, H]
    if name == "fp32_gopd":
        layer = OutputLayer(x.reshape(-1, x.shape[-1]), w, inp["vocab"])
        loss, _, _ = gopd_loss(layer, mb, GOPDLossConfig(), tp_group=group)
    else:
        logits = F.linear(x, w)  # the output layer's GEMM in the model dtype
        if name == "megatron":
            labels = torch.roll(mb.tokens_BS, -1, 1)
            ce = tensor_parallel.vocab_parallel_cross_entropy(logits, labels)
            loss = (ce * mb.response_mask_BS).sum()
        else:
            loss, _, _ = gopd_loss(
                logits, mb, GOPDLossConfig(), tp_group=group, vocab_size=inp["vocab"]
            )
    torch.autograd.grad(loss, (h, w))


def cost_memory(name, tokens, vocab, hidden, dtype):
    from megatron_gopd import platform

    dev = platform.device()
    cuda = torch.cuda.is_available()
    if not cuda:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(bench_loss.M_MMAP_THRESHOLD, 128 * 1024)
    _cost_run(name, _cost_inputs(SEQ // 4, vocab, hidden, DTYPES[dtype], dev))  # warm-up
    inp = _cost_inputs(tokens, vocab, hidden, DTYPES[dtype], dev)
    gc.collect()
    bench_loss._sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        _cost_run(name, inp)
        bench_loss._sync()
        return int(torch.cuda.max_memory_allocated() - before)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = bench_loss._proc_kb("VmRSS")
    _cost_run(name, inp)
    return (bench_loss._proc_kb("VmHWM") - before) * 1024


def cost_time(names, tokens, vocab, hidden, dtype, repeats):
    import torch.distributed as dist

    from megatron_gopd import platform

    inp = _cost_inputs(tokens, vocab, hidden, DTYPES[dtype], platform.device())
    best = dict.fromkeys(names, float("inf"))
    for r in range(repeats + 1):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if inp["world"] > 1:
                dist.barrier()
            bench_loss._sync()
            t0 = time.perf_counter()
            _cost_run(name, inp)
            bench_loss._sync()
            if r:
                best[name] = min(best[name], time.perf_counter() - t0)
    return best


def _start_method() -> str:
    """CUDA: spawned ranks (a forked one cannot use the CUDA runtime this process initialised)."""
    return "spawn" if torch.cuda.is_available() else "fork"


def bench_cost(shapes, dtypes, repeats):
    from megatron_gopd.parallel import ParallelConfig
    from megatron_gopd.testing import run_distributed

    rows = []
    for t, v, hsz, tp in shapes:
        for dt in dtypes:
            par = ParallelConfig(tp)
            kw = dict(parallel=par, timeout=3600, start_method=_start_method())
            times = run_distributed(cost_time, tp, list(CANDIDATES), t, v, hsz, dt, repeats, **kw)
            row = dict(tokens=t, vocab=v, hidden=hsz, tp=tp, dtype=dt, candidates={})
            for name in CANDIDATES:
                mem = run_distributed(cost_memory, tp, name, t, v, hsz, dt, **kw)
                row["candidates"][name] = dict(
                    time_s=max(x[name] for x in times), extra_bytes=max(mem)
                )
            base = row["candidates"]["megatron"]
            row["ratios"] = {
                n: dict(
                    time=c["time_s"] / base["time_s"],
                    extra_memory=c["extra_bytes"] / max(base["extra_bytes"], 1),
                )
                for n, c in row["candidates"].items()
            }
            rows.append(row)
            print(f"cost: done {t}x{v}x{hsz} TP{tp} {dt}", file=sys.stderr, flush=True)
    return rows


# ---------------------------------------------------------------------------------- error


def _stats(d: torch.Tensor) -> dict:
    return dict(mean=d.abs().mean().item(), max=d.abs().max().item())


def _make_model(root: Path, vocab: int, hidden: int, logit_std: float):
    """A random Qwen3-shaped HF model (saved in bf16) whose logits have std ``logit_std``, as a
    trained model's do (random init gives logits near 0, which bf16 represents almost exactly)."""
    from transformers import AutoModelForCausalLM

    from megatron_gopd.testing import make_tiny_hf_model

    hf = root / "hf"
    model = make_tiny_hf_model(
        hf,
        "qwen3",
        seed=3,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=hidden // 8,
        max_position_embeddings=512,
    )
    with torch.no_grad():
        h = model.model(input_ids=torch.arange(64).unsqueeze(0) % vocab).last_hidden_state
        std = (h[0] @ model.lm_head.weight.t()).std().item()
        model.lm_head.weight.mul_(logit_std / std)
    model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(str(hf))
    del model
    # the same (bf16) weights in fp32, as the reference and as the fp32 engine load them
    return hf, AutoModelForCausalLM.from_pretrained(
        str(hf), dtype=torch.float32, attn_implementation="eager"
    ).eval()


def _sample(hf, dtype, fp32_head, prompts, new_tokens):
    from megatron_gopd.cpu_server.engine import CpuEngine, GenItem

    engine = CpuEngine(str(hf), dtype=dtype, enable_fp32_lm_head=fp32_head)
    items = [
        GenItem(
            rid=str(i),
            input_ids=p,
            params={"max_new_tokens": new_tokens, "sampling_seed": i, "ignore_eos": True},
            return_logprob=True,
        )
        for i, p in enumerate(prompts)
    ]
    engine.generate(items)
    return [(it.input_ids + it.output_ids, len(it.input_ids), it.output_logprobs) for it in items]


def _trainer_logprobs(ckpt, seqs, old_head: bool):
    """The trainer's bf16 log-probs of ``seqs``: scoring's fp32 output layer, or (``old_head``)
    the old one: the GEMM in bf16, then the same log-prob."""
    import torch.nn.functional as F

    from megatron_gopd.models import build_role
    from megatron_gopd.models.build import final_hidden_states, output_weight
    from megatron_gopd.scoring import score_sequences
    from megatron_gopd.vocab_parallel import vocab_parallel_logprobs

    role = build_role("model", ckpt, frozen=True, params_dtype=torch.bfloat16, spec="local")
    if not old_head:
        return score_sequences(role, seqs)
    out = []
    with torch.no_grad():
        for s in seqs:
            ids = torch.tensor([s])
            pos = torch.arange(len(s)).unsqueeze(0)
            with final_hidden_states(role.model):
                h = role.model(ids, pos, None)[:, 0]  # [S, H] bf16
            logits = F.linear(h, output_weight(role.model))  # bf16, as the old code had them
            lp, _ = vocab_parallel_logprobs(
                logits[:-1], ids[0, 1:], vocab_size=role.arch.vocab_size
            )
            out.append(lp)
    return out


def _error_rank(root: str, vocab: int, hidden: int, logit_std: float, n_prompts: int, new: int):
    """Everything of part ``error`` in one forked rank (conversion needs a process group)."""
    import torch.nn.functional as F

    from megatron_gopd.convert.checkpoint import convert_hf_to_megatron
    from megatron_gopd.models.build import final_hidden_states, output_weight

    root = Path(root)
    hf, fp32_model = _make_model(root, vocab, hidden, logit_std)
    convert_hf_to_megatron(hf, root / "mcore")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (16,), generator=g).tolist() for _ in range(n_prompts)]
    rollouts = {
        (dt, head): _sample(hf, dt, head, prompts, new)
        for dt, head in (("bfloat16", False), ("bfloat16", True), ("float32", False))
    }
    res = {}
    # the bf16 engine's samples (plain head) are the tokens every comparison scores
    seqs = [s for s, _, _ in rollouts[("bfloat16", False)]]
    starts = [p for _, p, _ in rollouts[("bfloat16", False)]]

    def response(lps):  # the response tokens' log-probs, flattened
        return torch.cat([lp[p - 1 :] for lp, p in zip(lps, starts, strict=True)]).double()

    # the fp32 model (same weights), float64 softmax
    with torch.no_grad():
        ref = [
            F.log_softmax(
                fp32_model(input_ids=torch.tensor([s])).logits[0, :-1].double(), -1
            ).gather(1, torch.tensor(s[1:])[:, None])[:, 0]
            for s in seqs
        ]
    ref = response(ref)
    new_lp = response(_trainer_logprobs(root / "mcore", seqs, old_head=False))
    old_lp = response(_trainer_logprobs(root / "mcore", seqs, old_head=True))
    res["head"] = _stats(old_lp - new_lp)
    res["model_before"] = _stats(old_lp - ref)
    res["model_after"] = _stats(new_lp - ref)

    def engine_lps(key):  # each engine scored its own samples; the trainer scores them too
        out = rollouts[key]
        seq = [s for s, _, _ in out]
        eng = torch.cat([torch.tensor(lp) for _, _, lp in out]).double()
        return seq, [p for _, p, _ in out], eng

    for label, key, old in (
        ("mismatch_before", ("bfloat16", False), True),
        ("mismatch_after", ("bfloat16", True), False),
        ("mismatch_fp32_engine_before", ("float32", False), True),
        ("mismatch_fp32_engine_after", ("float32", False), False),
    ):
        seq, st, eng = engine_lps(key)
        tr = _trainer_logprobs(root / "mcore", seq, old_head=old)
        tr = torch.cat([lp[p - 1 :] for lp, p in zip(tr, st, strict=True)]).double()
        res[label] = _stats(tr - eng)
    # the logit scale the numbers belong to
    from megatron_gopd.models import build_role

    role = build_role("m", root / "mcore", frozen=True, params_dtype=torch.bfloat16, spec="local")
    with torch.no_grad(), final_hidden_states(role.model):
        h = role.model(torch.tensor([seqs[0]]), torch.arange(len(seqs[0]))[None], None)[:, 0]
    z = h.float() @ output_weight(role.model).float().t()
    res["logits"] = dict(std=z[:, :vocab].std().item(), max=z[:, :vocab].amax(-1).mean().item())
    res["tokens"] = int(ref.numel())
    return res


def bench_error(vocab, hidden, logit_std, n_prompts, new_tokens):
    from megatron_gopd.parallel import ParallelConfig
    from megatron_gopd.testing import run_distributed

    with tempfile.TemporaryDirectory() as d:
        out = run_distributed(
            _error_rank,
            1,
            d,
            vocab,
            hidden,
            logit_std,
            n_prompts,
            new_tokens,
            parallel=ParallelConfig(),
            timeout=3600,
            start_method=_start_method(),
        )[0]
    return dict(vocab=vocab, hidden=hidden, logit_std_target=logit_std, **out)


# ---------------------------------------------------------------------------------- driver


def _parse_shapes(text):
    out = []
    for part in text.split(","):
        t, v, h, tp = (int(x) for x in part.lower().split("x"))
        if v % tp:
            raise SystemExit(f"vocabulary {v} is not divisible by TP={tp}")
        out.append((t, v, h, tp))
    return out


def _tables(result) -> str:
    lines = []
    if "error" in result:
        e = result["error"]
        lines.append(
            f"error: {e['tokens']} sampled tokens, vocab {e['vocab']}, hidden {e['hidden']}, "
            f"logits std {e['logits']['std']:.2f} (row max {e['logits']['max']:.1f})"
        )
        for k in (
            "head",
            "model_before",
            "model_after",
            "mismatch_before",
            "mismatch_after",
            "mismatch_fp32_engine_before",
            "mismatch_fp32_engine_after",
        ):
            lines.append(f"  {k:30s} mean {e[k]['mean']:.2e}   max {e[k]['max']:.2e}")
    if "cost" in result:
        mib = 1 << 20
        lines.append("cost (output layer + log-prob loss, forward + backward):")
        for r in result["cost"]:
            cells = []
            for n in CANDIDATES:
                c, q = r["candidates"][n], r["ratios"][n]
                cells.append(
                    f"{n} {c['time_s'] * 1e3:7.1f} ms +{c['extra_bytes'] / mib:6.0f} MiB "
                    f"({q['time']:.2f}x / {q['extra_memory']:.2f}x)"
                )
            lines.append(
                f"  {r['tokens']}x{r['vocab']}x{r['hidden']} TP{r['tp']} {r['dtype']}: "
                + " | ".join(cells)
            )
        lines.append("  (ratios to megatron: time / extra memory above the inputs)")
    return "\n".join(lines)


def main(argv=None) -> dict:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["both", "error", "cost"], default="both")
    ap.add_argument("--shapes", default=GPU_SHAPES if cuda else CPU_SHAPES, help="TxVxHxTP,...")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=32768, help="error part: vocabulary")
    ap.add_argument("--hidden", type=int, default=256, help="error part: hidden size")
    ap.add_argument("--logit-std", type=float, default=4.0, help="error part: logits' std")
    ap.add_argument("--prompts", type=int, default=16, help="error part: prompts sampled")
    ap.add_argument("--new-tokens", type=int, default=32, help="error part: tokens per sample")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    result = dict(device=torch.cuda.get_device_name() if cuda else "cpu (1 thread per rank)")
    if args.part in ("both", "error"):
        result["error"] = bench_error(
            args.vocab, args.hidden, args.logit_std, args.prompts, args.new_tokens
        )
    if args.part in ("both", "cost"):
        result["cost"] = bench_cost(
            _parse_shapes(args.shapes), args.dtypes.split(","), args.repeats
        )
    print(json.dumps(result) if args.json else _tables(result), flush=True)
    return result


if __name__ == "__main__":
    import megatron.core  # noqa: F401  (paid once here; the forked ranks inherit it)

    main()
