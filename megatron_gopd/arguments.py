"""Command-line flags of ``gopd-train``: Megatron-LM's names where they exist, ``--gopd-*`` /
``--rollout-*`` / ``--sglang-*`` / role flags for the rest, and a YAML config file.

A YAML file given with ``--config`` sets defaults; flags on the command line override it (a list
flag given on the command line replaces the file's list). YAML keys are the flag names with
underscores: ``tensor_model_parallel_size: 2``, ``teacher_load: [math=/ckpt/a, code=/ckpt/b]``.

This module only parses. :mod:`megatron_gopd.config` turns the namespace into validated, typed
configs; nothing below the driver sees the namespace.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from megatron_gopd.utils import GopdError

__all__ = ["build_parser", "parse_args"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gopd-train",
        description="Generalized On-Policy Distillation (G-OPD / ExOPD) with Megatron-Core. "
        "Run under torchrun.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", type=Path, help="YAML file of flag defaults (flags override it)")

    g = p.add_argument_group("models")
    g.add_argument(
        "--student-load", help="student checkpoint (tools/convert_hf_to_megatron.py output)"
    )
    g.add_argument(
        "--teacher-load",
        action="append",
        metavar="[DOMAIN=]PATH",
        help="teacher checkpoint; repeat as DOMAIN=PATH for multi-teacher runs",
    )
    g.add_argument(
        "--ref-load",
        action="append",
        metavar="[DOMAIN=]PATH",
        help="reference pi_ref (default: the student's initial checkpoint); the teacher's "
        "pre-RL base gives reward correction; DOMAIN=PATH per domain",
    )
    g.add_argument(
        "--offload-frozen",
        action="store_true",
        help="keep teacher/reference weights in host memory between scoring passes",
    )
    g.add_argument(
        "--bf16", action="store_true", help="bf16 models (fp32 main params in the optimizer)"
    )
    g.add_argument(
        "--transformer-impl",
        choices=["auto", "local", "te"],
        default="auto",
        help="layer implementation: Transformer Engine when available (auto), or local",
    )

    g = p.add_argument_group("parallelism and batches (Megatron-LM names)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument(
        "--sequence-parallel",
        action="store_true",
        help="split activations between layers along the sequence over the TP ranks (all "
        "roles; needs TP > 1; sequences are padded to a multiple of TP)",
    )
    g.add_argument("--micro-batch-size", type=int, default=1, help="samples per forward pass")
    g.add_argument(
        "--global-batch-size",
        type=int,
        help="samples per optimizer step (default: the whole rollout batch, i.e. one "
        "on-policy update per rollout as in the paper)",
    )
    g.add_argument("--use-distributed-optimizer", action="store_true")

    g = p.add_argument_group("optimization (Megatron-LM names)")
    g.add_argument("--lr", type=float, default=1e-5)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["constant", "cosine", "linear"], default="constant")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, help="default: --train-iters")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.98)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--train-iters", type=int, default=100, help="training steps (rollout batches)")
    g.add_argument("--seed", type=int, default=1234)

    g = p.add_argument_group("G-OPD")
    g.add_argument(
        "--gopd-lambda",
        action="append",
        metavar="[DOMAIN=]LAMBDA",
        help="reward scale lambda: 1 = OPD, >1 = ExOPD (1.25 in the paper); "
        "DOMAIN=VALUE per domain (default 1.0)",
    )
    g.add_argument(
        "--gopd-estimator", choices=["sampled", "full_vocab", "top_k"], default="sampled"
    )
    g.add_argument("--gopd-top-k", type=int, default=64)
    g.add_argument("--gopd-aggregation", choices=["token_mean", "seq_mean"], default="token_mean")
    g.add_argument(
        "--gopd-tis-cap",
        type=float,
        help="truncated importance-sampling cap between rollout and trainer log-probs "
        "(official code: 5.0; default off)",
    )

    g = p.add_argument_group("OPD+ (f-divergence distillation; --gopd-objective fdiv)")
    g.add_argument(
        "--gopd-objective",
        choices=["gopd", "fdiv"],
        default="gopd",
        help="gopd: the G-OPD advantage; fdiv: minimise an f-divergence to the teacher "
        "(sampled estimator only)",
    )
    g.add_argument(
        "--fdiv-divergence",
        choices=["reverse_kl", "forward_kl", "js", "tv", "alpha"],
        default="reverse_kl",
        help="reverse_kl is G-OPD exactly",
    )
    g.add_argument(
        "--fdiv-alpha",
        type=float,
        default=0.5,
        help="alpha of --fdiv-divergence alpha (1: reverse KL, 0: forward KL, 0.5: Hellinger)",
    )
    g.add_argument(
        "--fdiv-advantage",
        choices=["corrected", "naive"],
        default="corrected",
        help="corrected: the unbiased advantage f'(r) - f'(1); naive: the stop-gradient f(r)/r "
        "(biased except for reverse KL; for comparison)",
    )
    g.add_argument(
        "--fdiv-max-log-ratio",
        type=float,
        default=20.0,
        help="clamp of |log(pi_theta / pi*)| for all divergences but reverse KL",
    )

    g = p.add_argument_group("data")
    g.add_argument(
        "--prompt-data", help="jsonl: 'prompt' or 'messages', optional 'domain', extra fields kept"
    )
    g.add_argument("--eval-prompt-data", help="jsonl of fixed evaluation prompts (same format)")
    g.add_argument("--apply-chat-template", action="store_true")
    g.add_argument(
        "--chat-template-kwargs",
        type=json.loads,
        default=None,
        metavar="JSON",
        help="extra chat-template variables, e.g. '{\"enable_thinking\": false}' for Qwen3 "
        "non-thinking models",
    )
    g.add_argument("--max-prompt-len", type=int, default=1024)
    g.add_argument("--tokenizer", help="HF tokenizer directory (default: the student checkpoint's)")

    g = p.add_argument_group("rollout")
    g.add_argument("--rollout-batch-size", type=int, default=32, help="prompts per training step")
    g.add_argument("--n-samples-per-prompt", type=int, default=4)
    g.add_argument("--rollout-temperature", type=float, default=1.0)
    g.add_argument("--rollout-top-p", type=float, default=1.0)
    g.add_argument("--rollout-top-k", type=int, default=-1)
    g.add_argument("--max-response-len", type=int, default=1024)
    g.add_argument(
        "--rollout-engine",
        choices=["sglang", "cpu", "external"],
        default="sglang",
        help="sglang: start SGLang servers; cpu: start our protocol-compatible CPU "
        "server; external: attach to --rollout-urls",
    )
    g.add_argument("--rollout-urls", nargs="+", help="existing servers (or an sglang-router URL)")
    g.add_argument("--rollout-num-servers", type=int, default=1)
    g.add_argument("--rollout-max-in-flight", type=int, default=256)
    g.add_argument("--rollout-timeout", type=float, default=600.0, help="seconds per request")
    g.add_argument("--sglang-tp-size", type=int, default=1)
    g.add_argument("--sglang-mem-fraction-static", type=float, default=0.6)
    g.add_argument(
        "--sglang-enable-memory-saver",
        action="store_true",
        help="launch SGLang with --enable-memory-saver (implied by --rollout-colocate)",
    )
    g.add_argument(
        "--rollout-colocate",
        action="store_true",
        help="the rollout servers share the training GPUs: release their memory while the "
        "trainer works, resume it for weight sync and rollouts",
    )
    g.add_argument("--sglang-base-gpu-id", type=int, default=0)
    g.add_argument(
        "--weight-sync",
        choices=["tensor", "distributed", "disk"],
        default="distributed",
        help="how student weights reach the rollout servers after each update",
    )
    g.add_argument("--weight-sync-bucket-mb", type=int, default=512)
    g.add_argument(
        "--weight-sync-check",
        action="store_true",
        help="after each push, compare the servers' weights with the trainer's",
    )

    g = p.add_argument_group("checkpointing, evaluation, logging (Megatron-LM names)")
    g.add_argument("--save", help="directory for checkpoints and run outputs")
    g.add_argument(
        "--load",
        help="resume from this save directory (its latest iteration); a "
        "directory without checkpoints starts a new run from --student-load, so a "
        "requeued job can pass --load and --save the same directory",
    )
    g.add_argument(
        "--save-interval", type=int, default=0, help="steps between checkpoints (0: end only)"
    )
    g.add_argument(
        "--exit-signal-handler",
        action="store_true",
        help="on SIGTERM, finish the current step, save a checkpoint and exit 0 (time limits, "
        "preemption; the Slurm launcher sends it)",
    )
    g.add_argument(
        "--eval-interval", type=int, default=0, help="steps between evaluations (0: never)"
    )
    g.add_argument("--eval-n-samples", type=int, default=1)
    g.add_argument(
        "--eval-grader",
        choices=["math", "exact"],
        default="math",
        help="how evaluation prompts' 'answer' is checked: math-verify on the last \\boxed{} "
        "(math), or the whole response equal to the answer (exact)",
    )
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--tensorboard-dir", help="default: SAVE/tensorboard")
    g.add_argument("--wandb-project")
    g.add_argument("--wandb-exp-name")
    g.add_argument("--wandb-save-dir")
    g.add_argument("--wandb-mode", choices=["online", "offline", "disabled"], default="online")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (log lines only)")
    return p


def _append_dests(parser: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in parser._actions if isinstance(a, argparse._AppendAction)}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config is not None:
        import yaml

        try:
            data = yaml.safe_load(first.config.read_text()) or {}
        except OSError as e:
            raise GopdError(f"cannot read config {first.config}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise GopdError(f"{first.config} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise GopdError(f"{first.config} must be a mapping of flag names to values")
        known = {a.dest for a in parser._actions}
        data = {k.replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(data) - known)
        if unknown:
            raise GopdError(f"{first.config}: unknown key(s) {', '.join(unknown)}")
        appends = _append_dests(parser)
        for k, v in data.items():
            if k in appends and not isinstance(v, list):
                data[k] = [v]
        # list flags: the command line replaces the file's list, so they stay None until parsed
        parser.set_defaults(**{k: v for k, v in data.items() if k not in appends})
        args = parser.parse_args(argv)
        for k in appends & set(data):
            if getattr(args, k) is None:
                setattr(args, k, [str(x) for x in data[k]])
        return args
    return parser.parse_args(argv)
