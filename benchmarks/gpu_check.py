"""One command for a GPU machine: does megatron_gopd work there, and how fast is it?

On one GPU with torch (megatron-core may come as a wheel, ``--wheels DIR``; SGLang and Transformer
Engine are not needed), in under 8 minutes, one JSON object on stdout:

    env                 torch / CUDA / device / megatron-core / transformers versions; whether the
                        fp32 output layer multiplies bf16 operands in place (``torch.mm(out_dtype)``)
    parity              HF parity on the GPU: tiny Llama and Qwen3 models converted and scored by
                        megatron-core against ``transformers`` on the same device, fp32 (max
                        |log-prob difference|, tolerance 1e-4) and bf16 (both sides' logits in fp32,
                        as SGLang's --enable-fp32-lm-head; against the same model in fp32 too)
    loss_bench          benchmarks/bench_loss.py on the GPU (G-OPD loss vs megatron-core's
                        cross-entropy: time and peak-memory ratios)
    output_layer_bench  benchmarks/bench_output_layer.py --part cost on the GPU (the chunked fp32
                        output layer vs megatron-core's bf16 output layer + cross-entropy)
    train               gopd-train steps on the GPU, one process without torchrun, the HF-backed
                        rollout server (megatron_gopd.cpu_server --device cuda) on the same GPU,
                        weights synced through disk: fp32 at T = 0.6 (rollout vs trainer log-probs
                        must agree to 1e-4), then bf16 with the full-vocabulary estimator,
                        --offload-frozen (pinned host buffers) and lambda 1.25
    mfu                 the student update (megatron-core DDP + optimizer + the G-OPD loss) of a
                        Qwen3-0.6B-shaped model in bf16: tokens/s, achieved TFLOP/s and MFU

Every check runs in a subprocess of its own (its log is in the work directory) within a share of
the time budget; one that fails or times out is reported as such and the others still run. The
exit status is 0 when every check passed.

    python benchmarks/gpu_check.py                       # on the GPU machine
    python benchmarks/gpu_check.py --wheels shared/wheels --peak-tflops 989
    python benchmarks/gpu_check.py --dry-run             # the same code paths on the CPU, tiny

``--dry-run`` runs every check on the CPU with tiny sizes (the test suite does): every code path
that does not need CUDA. Model FLOPs (the ``mfu`` check) count the matrix multiplications of the
forward pass (causal attention: half of the S x S products) and 3x that for training; the output
layer's recomputation in the backward is extra work, not model FLOPs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHECKS = ("env", "parity", "loss_bench", "output_layer_bench", "train", "mfu")
# seconds each check may take on a GPU (the whole run: < 8 minutes); the dry run gets the same
LIMITS = dict(env=60, parity=90, loss_bench=100, output_layer_bench=80, train=150, mfu=90)
BUDGET_S = 470

# dense bf16 tensor-core peak, TFLOP/s (vendor data sheets), by a substring of the device name
PEAK_BF16_TFLOPS = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("H800", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
    ("A10", 125.0),
)

# Qwen3-0.6B (its config.json), random weights: the ~0.5B student of the MFU check
QWEN3_06B = dict(
    vocab_size=151936,
    hidden_size=1024,
    ffn_hidden_size=3072,
    num_layers=28,
    num_attention_heads=16,
    num_query_groups=8,
    head_dim=128,
    tie_word_embeddings=True,
)
TINY = dict(
    vocab_size=1024,
    hidden_size=64,
    ffn_hidden_size=128,
    num_layers=2,
    num_attention_heads=4,
    num_query_groups=2,
    head_dim=16,
    tie_word_embeddings=True,
)


def _log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------- checks


def check_env(args) -> dict:
    import torch

    out = dict(python=sys.version.split()[0], torch=torch.__version__, cuda=torch.version.cuda)
    out["cuda_available"] = torch.cuda.is_available()
    if out["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        out.update(
            device=p.name,
            capability=f"{p.major}.{p.minor}",
            memory_gib=round(p.total_memory / 2**30, 1),
            device_count=torch.cuda.device_count(),
            bf16=torch.cuda.is_bf16_supported(),
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        )
    for mod in ("megatron.core", "transformers", "safetensors", "aiohttp", "tensorboard", "yaml"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            out[mod] = getattr(m, "__version__", "installed")
        except ImportError as e:
            out[mod] = None
            out.setdefault("missing", []).append(f"{mod} ({e})")
    for mod in ("transformer_engine", "sglang"):  # optional: reported, not needed
        try:
            __import__(mod)
            out[mod] = "installed"
        except ImportError:
            out[mod] = None
    if out["cuda_available"]:
        from megatron_gopd.vocab_parallel.output_layer import _mm_out_dtype_works

        w = torch.zeros(2, 2, dtype=torch.bfloat16, device="cuda")
        out["fp32_output_layer"] = (
            "bf16 operands, fp32 accumulate/output (torch.mm out_dtype)"
            if _mm_out_dtype_works(w)
            else "fp32 copy of the weight per pass"
        )
    out["ok"] = not out.get("missing") and (out["cuda_available"] or args.dry_run)
    if not out["cuda_available"] and not args.dry_run:
        out["error"] = "no CUDA device (use --dry-run to run the checks on the CPU)"
    return out


def _device():
    from megatron_gopd import platform

    return platform.device()


def _hf_logprobs(model, seqs, device):
    import torch
    import torch.nn.functional as F

    out = []
    with torch.no_grad():
        for s in seqs:
            ids = torch.tensor([s], device=device)
            logits = model(input_ids=ids).logits[0, :-1].double()
            out.append(F.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0].cpu())
    return out


def check_parity(args) -> dict:
    """Convert tiny HF models, score them with megatron-core on this device, compare with HF."""
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_gopd import parallel
    from megatron_gopd.convert.checkpoint import convert_hf_to_megatron
    from megatron_gopd.cpu_server.engine import _fp32_lm_head
    from megatron_gopd.models import build_role
    from megatron_gopd.scoring import score_sequences
    from megatron_gopd.testing import make_tiny_hf_model

    parallel.initialize(parallel.ParallelConfig(), seed=1)
    dev = _device()
    work = Path(args.workdir) / "parity"
    g = torch.Generator().manual_seed(0)
    out = {"device": str(dev), "fp32": {}, "bf16": {}, "bf16_vs_fp32_model": {}}
    for family, tied in (("qwen3", True), ("llama", False)):
        name = f"{family}-{'tied' if tied else 'untied'}"
        hf_dir, mc = work / name, work / f"{name}-mcore"
        make_tiny_hf_model(hf_dir, family, tied=tied, seed=1)
        convert_hf_to_megatron(hf_dir, mc)
        vocab = 250
        seqs = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (5, 17, 80, 33)]
        ref = {}
        for dtype in (torch.float32, torch.bfloat16):
            hf = AutoModelForCausalLM.from_pretrained(
                str(hf_dir), dtype=dtype, attn_implementation="eager"
            ).to(dev)
            if dtype == torch.bfloat16:
                _fp32_lm_head(hf.get_output_embeddings())  # SGLang's --enable-fp32-lm-head
            ref[dtype] = _hf_logprobs(hf.eval(), seqs, dev)
            del hf
            role = build_role("m", mc, frozen=True, params_dtype=dtype, spec="auto")
            lps = score_sequences(role, seqs, micro_batch_size=2)
            del role
            diff = [(a.double() - b).abs() for a, b in zip(lps, ref[dtype], strict=True)]
            key = "fp32" if dtype == torch.float32 else "bf16"
            out[key][name] = dict(
                max=max(d.max().item() for d in diff), mean=torch.cat(diff).mean().item()
            )
            if dtype == torch.bfloat16:
                d32 = [(a.double() - b).abs() for a, b in zip(lps, ref[torch.float32], strict=True)]
                out["bf16_vs_fp32_model"][name] = dict(
                    max=max(d.max().item() for d in d32), mean=torch.cat(d32).mean().item()
                )
    out["fp32_tolerance"] = 1e-4
    out["ok"] = all(v["max"] <= 1e-4 for v in out["fp32"].values()) and all(
        v["mean"] < 0.05 for v in out["bf16"].values()
    )
    parallel.destroy()
    return out


def _bench(args, script: str, argv: list[str], timeout: float) -> dict:
    cmd = [sys.executable, str(REPO / "benchmarks" / script), *argv, "--json"]
    _log(" ".join(cmd))
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    (Path(args.workdir) / f"{Path(script).stem}.log").write_text(p.stderr)
    if p.returncode != 0:
        raise RuntimeError(f"{script} exited with {p.returncode}: {p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def check_loss_bench(args) -> dict:
    argv = (
        ["--shapes", "256x4096x1", "--dtypes", "bf16", "--repeats", "1"]
        if args.dry_run
        else ["--shapes", "8192x151936x1", "--dtypes", "bf16", "--repeats", "3"]
    )
    res = _bench(args, "bench_loss.py", argv, LIMITS["loss_bench"] - 10)
    return dict(ok=True, **res)


def check_output_layer_bench(args) -> dict:
    argv = ["--part", "cost"] + (
        ["--shapes", "256x4096x64x1", "--dtypes", "bf16", "--repeats", "1"]
        if args.dry_run
        else ["--shapes", "8192x151936x1024x1", "--dtypes", "bf16", "--repeats", "3"]
    )
    res = _bench(args, "bench_output_layer.py", argv, LIMITS["output_layer_bench"] - 10)
    return dict(ok=True, **res)


def _free_port() -> int:
    from megatron_gopd.utils import free_port

    return free_port()


def _start_server(hf_dir: Path, dtype: str, device: str, log: Path):
    """The HF-backed rollout server (SGLang's API) on ``device``; returns (process, url)."""
    from megatron_gopd.rollout.protocol import http_json

    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "megatron_gopd.cpu_server",
        "--model-path",
        str(hf_dir),
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--device",
        device,
        "--enable-fp32-lm-head",
        "--random-seed",
        "7",
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    f = open(log, "wb")  # noqa: SIM115  (kept open for the server's lifetime)
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the rollout server exited: {log.read_text()[-2000:]}")
        try:
            if http_json(url + "/health", timeout=5)[0] == 200:
                return proc, url
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the rollout server did not start within 120 s")


def check_train(args) -> dict:
    """gopd-train on this device in one process (no torchrun), rollouts from the HF-backed server
    on the same device, two runs; the metrics of each."""
    work = Path(args.workdir) / "train"
    # the tiny world (tokenizer, student, teachers, prompts), converted on the CPU in a process
    # of its own: it forks ranks, which must not inherit an initialised CUDA runtime
    make = (
        "import json, sys, torch; torch.set_num_threads(1); import megatron_gopd, megatron.core; "
        "from megatron_gopd.testing import make_tiny_distillation_world as make; "
        "w = make(sys.argv[1], models=('student', 'teacher')); "
        "print(json.dumps({k: str(v) for k, v in w.items()}))"
    )
    p = subprocess.run(
        [sys.executable, "-c", make, str(work / "world")],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES=""),
        cwd=REPO,
        timeout=120,
        check=True,
    )
    world = {k: Path(v) for k, v in json.loads(p.stdout.strip().splitlines()[-1]).items()}
    device = "cpu" if args.dry_run else "cuda"
    steps = 2 if args.dry_run else 4
    runs = {
        "fp32_T0.6": (
            "float32",
            ["--rollout-temperature", "0.6"],
        ),
        "bf16_full_vocab_offload": (
            "bfloat16",
            [
                "--bf16",
                "--gopd-estimator",
                "full_vocab",
                "--offload-frozen",
                "--gopd-lambda",
                "1.25",
            ],
        ),
    }
    out = {}
    for name, (dtype, extra) in runs.items():
        save = work / name
        proc, url = _start_server(
            world["student"].parent / "hf" / "student", dtype, device, work / f"{name}-server.log"
        )
        try:
            cmd = [
                sys.executable,
                "-m",
                "megatron_gopd.train",
                "--student-load",
                str(world["student"]),
                "--teacher-load",
                str(world["teacher"]),
                "--prompt-data",
                str(world["train"]),
                "--eval-prompt-data",
                str(world["eval"]),
                "--eval-interval",
                str(steps),
                "--eval-grader",
                "exact",
                "--apply-chat-template",
                "--rollout-engine",
                "external",
                "--rollout-urls",
                url,
                "--weight-sync",
                "disk",
                "--rollout-batch-size",
                "8",
                "--n-samples-per-prompt",
                "2",
                "--max-response-len",
                "8",
                "--micro-batch-size",
                "4",
                "--lr",
                "3e-3",
                "--train-iters",
                str(steps),
                "--save",
                str(save),
                "--seed",
                "7",
                "--no-progress",
                *extra,
            ]
            t0 = time.perf_counter()
            p = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                env=dict(os.environ, PYTHONPATH=str(REPO)),
                cwd=REPO,
                timeout=LIMITS["train"],
            )
            (work / f"{name}-train.log").write_text(p.stderr)
            if p.returncode != 0:
                raise RuntimeError(
                    f"gopd-train {name} exited with {p.returncode}: {p.stderr[-3000:]}"
                )
            wall = time.perf_counter() - t0
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        metrics = [json.loads(x) for x in (save / "metrics.jsonl").read_text().splitlines()]
        train = [m for m in metrics if "train/loss" in m]
        mismatch = [m["train/rollout_abs_log_ratio"] for m in train]
        out[name] = dict(
            steps=len(train),
            wall_s=round(wall, 1),
            s_per_step=[round(m["time/step"], 3) for m in train],
            rollout_abs_log_ratio=mismatch,
            kl_teacher=[m.get("train/kl_teacher") for m in train],
            kl_teacher_exact=[m.get("train/kl_teacher_exact") for m in train],
            grad_norm=[m.get("optim/grad_norm") for m in train],
            eval_reverse_kl=[m["eval/reverse_kl"] for m in metrics if "eval/reverse_kl" in m],
        )
    fp32 = out["fp32_T0.6"]
    out["ok"] = (
        fp32["steps"] == steps
        and max(fp32["rollout_abs_log_ratio"]) <= 1e-4
        and out["bf16_full_vocab_offload"]["steps"] == steps
    )
    out["rollout_tolerance_fp32"] = 1e-4
    return out


def _model_flops_per_token(a: dict, seq: int) -> float:
    """Training FLOPs per token: 3 x the forward's matrix products (causal attention: half)."""
    h, L = a["hidden_size"], a["num_layers"]
    q, kv, d = a["num_attention_heads"], a["num_query_groups"], a["head_dim"]
    per_layer = (
        2 * h * (q + 2 * kv) * d  # QKV
        + 2 * 2 * q * d * seq * 0.5  # Q K^T and A V over the causal prefix
        + 2 * q * d * h  # output projection
        + 2 * 3 * h * a["ffn_hidden_size"]  # SwiGLU: gate, up, down
    )
    return 3.0 * (L * per_layer + 2 * h * a["vocab_size"])


def _peak_tflops(args, device_name: str) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    for key, peak in PEAK_BF16_TFLOPS:
        if key in device_name:
            return peak
    return None


def check_mfu(args) -> dict:
    import torch

    from megatron_gopd import parallel
    from megatron_gopd.gopd import GOPDLossConfig
    from megatron_gopd.models.arch import ModelArch
    from megatron_gopd.models.build import build_gpt
    from megatron_gopd.trainer.update import OptimConfig, build_optimizer, train_step
    from megatron_gopd.types import RolloutBatch

    parallel.initialize(parallel.ParallelConfig(), seed=1)
    dev = _device()
    dims = TINY if args.dry_run else QWEN3_06B
    seq, rows, mbs = (128, 4, 2) if args.dry_run else (2048, 16, 4)
    warmup, steps = (1, 2) if args.dry_run else (3, 5)
    arch = ModelArch(
        family="qwen3",
        hf_architecture="Qwen3ForCausalLM",
        padded_vocab_size=-(-dims["vocab_size"] // 1024) * 1024,
        norm_eps=1e-6,
        rope_theta=1_000_000.0,
        max_position_embeddings=4096,
        qkv_bias=False,
        qk_norm=True,
        **dims,
    )
    model = build_gpt(arch, params_dtype=torch.bfloat16, spec="auto", seed=1)
    n_params = sum(p.numel() for p in model.parameters())
    opt = build_optimizer(model, OptimConfig(lr=1e-6), train_iters=100, bf16=True)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, dims["vocab_size"], (rows, seq), generator=g)
    mask = torch.ones(rows, seq)
    mask[:, : seq // 8] = 0.0  # the prompts
    mask[:, -1] = 0.0
    batch = RolloutBatch(
        tokens_BS=tokens,
        response_mask_BS=mask,
        teacher_logprobs_BS=-torch.rand(rows, seq, generator=g) * 3,
        ref_logprobs_BS=None,
        rollout_logprobs_BS=None,
        lam_B=torch.ones(rows),
        domain_ids_B=torch.zeros(rows, dtype=torch.long),
        domains=["d"],
        seq_lens_B=torch.full((rows,), seq),
    )
    times = []
    for i in range(warmup + steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        _, stats = train_step(
            opt,
            batch,
            micro_batch_size=mbs,
            loss_cfg=GOPDLossConfig(),
            vocab_size=arch.vocab_size,
            temperature=1.0,
        )
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    t = min(times)
    n_tokens = rows * seq
    tflops = _model_flops_per_token(dims, seq) * n_tokens / t / 1e12
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    peak = _peak_tflops(args, name)
    out = dict(
        model="Qwen3-0.6B-shaped" if not args.dry_run else "tiny",
        parameters=n_params,
        tokens_per_step=n_tokens,
        seq_len=seq,
        micro_batch_size=mbs,
        step_s=round(t, 4),
        tokens_per_s=round(n_tokens / t, 1),
        model_tflops_per_s=round(tflops, 3),
        peak_bf16_tflops=peak,
        mfu=None if peak is None else round(tflops / peak, 4),
        grad_norm=stats["optim/grad_norm"],
        max_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if dev.type == "cuda"
        else None,
    )
    out["ok"] = tflops > 0 and out["grad_norm"] == out["grad_norm"]  # finite, not NaN
    parallel.destroy()
    return out


RUNNERS = dict(
    env=check_env,
    parity=check_parity,
    loss_bench=check_loss_bench,
    output_layer_bench=check_output_layer_bench,
    train=check_train,
    mfu=check_mfu,
)


# ---------------------------------------------------------------------------------- driver


def _run_one(args) -> int:
    """In the check's own process: run it, write its result to WORKDIR/NAME.json."""
    from megatron_gopd.utils import quiet_expected_warnings

    quiet_expected_warnings()
    if args.dry_run:
        import torch

        torch.set_num_threads(1)  # forks ranks (bench, conversion): before any op
    t0 = time.perf_counter()
    try:
        res = RUNNERS[args.run_check](args)
    except BaseException as e:  # the report says what went wrong; the parent goes on
        res = dict(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
    res["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.workdir, f"{args.run_check}.json").write_text(json.dumps(res, default=str))
    return 0


def _install_wheels(wheels: str) -> None:
    found = sorted(str(p) for p in Path(wheels).glob("*.whl"))
    if not found:
        raise SystemExit(f"--wheels {wheels}: no .whl files there")
    _log(f"installing {len(found)} wheel(s) from {wheels}")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", *found],
        check=True,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="every check on the CPU, tiny sizes")
    ap.add_argument("--checks", default=",".join(CHECKS), help="which checks, in this order")
    ap.add_argument("--workdir", help="logs and scratch (default: a temporary directory)")
    ap.add_argument("--wheels", help="pip-install every wheel in DIR first (e.g. megatron-core)")
    ap.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, for MFU")
    ap.add_argument("--run-check", choices=CHECKS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.run_check:
        return _run_one(args)
    if args.wheels:
        _install_wheels(args.wheels)
    names = args.checks.split(",")
    if not set(names) <= set(CHECKS):
        raise SystemExit(f"--checks: choose from {', '.join(CHECKS)}")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_check_"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")
    )
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU, even on a GPU machine
    start = time.perf_counter()
    result = dict(dry_run=args.dry_run, workdir=str(workdir), checks={})
    for name in names:
        left = BUDGET_S - (time.perf_counter() - start)
        if left < 10:
            result["checks"][name] = dict(ok=False, error="skipped: out of the time budget")
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), "--run-check", name]
        cmd += ["--workdir", str(workdir)]
        if args.dry_run:
            cmd.append("--dry-run")
        if args.peak_tflops:
            cmd += ["--peak-tflops", str(args.peak_tflops)]
        _log(f"{name} ...")
        t0 = time.perf_counter()
        with open(workdir / f"{name}.log", "wb") as log:
            try:
                subprocess.run(
                    cmd,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=REPO,
                    timeout=min(LIMITS[name], left),
                )
                res = json.loads((workdir / f"{name}.json").read_text())
            except subprocess.TimeoutExpired:
                res = dict(ok=False, error=f"timed out after {min(LIMITS[name], left):.0f} s")
            except (OSError, json.JSONDecodeError) as e:
                tail = (workdir / f"{name}.log").read_text(errors="replace")[-2000:]
                res = dict(ok=False, error=f"no result ({e}); log tail: {tail}")
        res.setdefault("seconds", round(time.perf_counter() - t0, 1))
        result["checks"][name] = res
        _log(f"{name}: {'ok' if res.get('ok') else 'FAILED ' + str(res.get('error'))[:300]}")
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["ok"] = all(c.get("ok") for c in result["checks"].values())
    env_res = result["checks"].get("env", {})
    result["device"] = env_res.get("device", "cpu" if args.dry_run else None)
    print(json.dumps(result, default=str), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
