"""``gopd-eval`` / ``python -m megatron_gopd.evaluation``: evaluate a model on local benchmarks.

    gopd-eval --hf-model ckpt/hf --benchmark aime24=math:data/aime24.parquet \\
        --benchmark humaneval+=evalplus:data/HumanEvalPlus.jsonl --output-dir out/eval/base \\
        --tag run=base --tag lambda=0

Generation backends live in :func:`build_generator`, the one place to add another one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_gopd.evaluation.benchmarks import BenchmarkSpec, load_benchmark
from megatron_gopd.evaluation.evaluate import EvalConfig, evaluate
from megatron_gopd.evaluation.generation import (
    ChatFormat,
    Generator,
    HFGenerator,
    RolloutClientGenerator,
)
from megatron_gopd.evaluation.sandbox import Sandbox, SandboxLimits
from megatron_gopd.utils import GopdError, check_writable, cli_errors

__all__ = ["build_generator", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gopd-eval",
        description="Evaluate a model as in the G-OPD paper: avg@k accuracy / pass rate and "
        "response length on local math and code benchmarks.",
    )
    g = p.add_argument_group("model (one of)")
    g.add_argument(
        "--hf-model", help="HF checkpoint dir: generate in this process with transformers"
    )
    g.add_argument(
        "--load",
        metavar="MCORE",
        help="a megatron_gopd checkpoint or trainer save dir (exported to HF first)",
    )
    g.add_argument("--rollout-urls", nargs="+", metavar="URL",
                   help="running SGLang (or CPU) servers: generate through the rollout client")  # fmt: skip
    g.add_argument("--tokenizer", help="tokenizer dir (default: the --hf-model dir)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument(
        "--device", default=None, help="torch device for --hf-model (default: cuda if present)"
    )

    b = p.add_argument_group("benchmarks")
    b.add_argument("--benchmark", action="append", default=[], metavar="NAME=FORMAT:PATH",
                   help="repeatable; FORMAT is math, evalplus or livecodebench; PATH .jsonl/.json/.parquet")  # fmt: skip
    b.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark")

    s = p.add_argument_group("sampling")
    s.add_argument("--n-samples", type=int, default=None,
                   help="samples per problem (default: the paper's, 32 for math, 4 for code)")  # fmt: skip
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--max-new-tokens", type=int, default=4096)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=True,
                   help="wrap prompts in the tokenizer's chat template (--no-chat-template: raw)")  # fmt: skip
    s.add_argument("--system-prompt", default=None)
    s.add_argument("--chat-template-kwargs", default="{}", metavar="JSON",
                   help='extra template variables, e.g. \'{"enable_thinking": true}\'')  # fmt: skip

    c = p.add_argument_group("grading")
    c.add_argument("--math-extraction", choices=["boxed", "any"], default="boxed")
    c.add_argument("--code-workers", type=int, default=4, help="sandboxed programs run in parallel")
    c.add_argument("--code-test-timeout", type=float, default=6.0, help="seconds per test case")
    c.add_argument("--code-cpu-seconds", type=float, default=30.0, help="CPU limit per program run")
    c.add_argument("--code-wall-seconds", type=float, default=90.0)
    c.add_argument("--code-memory-mb", type=int, default=2048)
    c.add_argument("--sandbox-python", default=None, help="interpreter for generated programs")
    c.add_argument("--sandbox-isolation", choices=["auto", "strict", "minimal"], default="auto")

    o = p.add_argument_group("output")
    o.add_argument("--output-dir", required=True)
    o.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                   help="recorded in the summary (run=ExOPD, lambda=1.25, step=200) for reports")  # fmt: skip
    return p


def build_generator(args: argparse.Namespace):
    """The generation backend and its tokenizer, from the command line.

    Another backend is one more branch here returning ``(generator, tokenizer)``; e.g. ``--load``:
    export the Megatron checkpoint to HF, serve it (``RolloutServers``), then the same
    :class:`RolloutClientGenerator` as ``--rollout-urls``.
    """
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if sum(map(bool, (args.hf_model, args.rollout_urls, args.load))) != 1:
        raise GopdError(
            "pass exactly one of --hf-model DIR, --load MCORE and --rollout-urls URL ..."
        )
    if args.load:
        # a Megatron checkpoint (converted or trained): export it once next to the results, then
        # generate in-process like --hf-model (serve the export with SGLang for big models)
        from megatron_gopd.convert.checkpoint import convert_megatron_to_hf
        from megatron_gopd.models import resolve_checkpoint

        export = Path(args.output_dir) / "model_hf"
        if not (export / "config.json").is_file():
            convert_megatron_to_hf(resolve_checkpoint(args.load), export)
        args.hf_model = str(export)
    tok_path = args.tokenizer or args.hf_model
    if not tok_path:
        raise GopdError("--rollout-urls needs --tokenizer DIR (the served model's tokenizer)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_path)
    except (OSError, ValueError) as e:
        raise GopdError(f"cannot load a tokenizer from {tok_path}: {e}") from None
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    gen: Generator
    if args.hf_model:
        gen = HFGenerator(
            args.hf_model, eos_token_ids=eos or None, device=args.device, dtype=args.dtype
        )
    else:
        try:
            from megatron_gopd.rollout import ClientConfig, RolloutClient
        except ImportError as e:
            raise GopdError(f"--rollout-urls needs megatron_gopd.rollout: {e}") from None
        client = RolloutClient(list(args.rollout_urls), ClientConfig(progress=False))
        gen = RolloutClientGenerator(client, stop_token_ids=eos)
    return gen, tokenizer


def _parse_tags(items: list[str]) -> dict:
    tags = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise GopdError(f"--tag {item!r}: expected KEY=VALUE")
        try:
            tags[key] = json.loads(value)  # numbers stay numbers (lambda=1.25, step=200)
        except json.JSONDecodeError:
            tags[key] = value
    return tags


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_writable(args.output_dir, "--output-dir", directory=True)  # before the work
    if not args.benchmark:
        raise GopdError("no benchmark given: pass --benchmark NAME=FORMAT:PATH")
    specs = [BenchmarkSpec.parse(b) for b in args.benchmark]
    if args.limit:
        specs = [BenchmarkSpec(s.name, s.format, s.path, limit=args.limit) for s in specs]
    try:
        template_kwargs = json.loads(args.chat_template_kwargs)
    except json.JSONDecodeError as e:
        raise GopdError(f"--chat-template-kwargs is not JSON: {e.msg}") from None
    limits = SandboxLimits(
        cpu_seconds=args.code_cpu_seconds,
        wall_seconds=args.code_wall_seconds,
        memory_bytes=args.code_memory_mb << 20,
        output_bytes=16 << 20,
    )
    cfg = EvalConfig(
        n_samples=args.n_samples,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        math_extraction=args.math_extraction,
        code_workers=args.code_workers,
        code_test_timeout=args.code_test_timeout,
        sandbox_limits=limits,
    )
    chat = ChatFormat(args.chat_template, args.system_prompt, template_kwargs)
    tags = _parse_tags(args.tag)
    problems = {s.name: load_benchmark(s) for s in specs}  # bad files fail before the model loads
    sandbox = None
    if any(s.domain == "code" for s in specs):
        sandbox = Sandbox(limits, python=args.sandbox_python, isolation=args.sandbox_isolation)
    generator, tokenizer = build_generator(args)
    summary = evaluate(
        generator, tokenizer, specs, args.output_dir, cfg,
        chat=chat, tags=tags, sandbox=sandbox, problems=problems,
    )  # fmt: skip
    from megatron_gopd.evaluation.evaluate import summary_markdown

    sys.stdout.write(summary_markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
