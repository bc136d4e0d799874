"""Evaluate a model on benchmarks: generate, grade, write per-sample records and a summary.

    summary = evaluate(generator, tokenizer, ["aime24=math:aime24.parquet"], "out/eval/step_100",
                       EvalConfig(), tags={"step": 100, "lambda": 1.25, "run": "ExOPD"})

writes ``out/eval/step_100/records/aime24.jsonl`` (one line per sample), ``summary.json`` and
``summary.md``, and returns the summary dict. The trainer calls it every N steps on rank 0 with the
rollout client as the generator; ``gopd-eval`` calls it once. Records hold no timings, so two runs
at temperature 0 write identical record files.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from megatron_gopd.evaluation.benchmarks import BenchmarkSpec, Problem, load_benchmark
from megatron_gopd.evaluation.code_grader import grade_code
from megatron_gopd.evaluation.generation import ChatFormat, Generator, PromptEncoder
from megatron_gopd.evaluation.math_grader import grade_math
from megatron_gopd.evaluation.metrics import score_summary
from megatron_gopd.evaluation.sandbox import Sandbox, SandboxLimits
from megatron_gopd.utils import GopdError, get_logger

__all__ = ["EvalConfig", "evaluate", "flat_metrics", "summary_markdown"]

_log = get_logger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    """Sampling and grading settings of one evaluation (the paper's: temperature 1.0, 32 samples
    per math problem, 4 per code problem, which ``n_samples=None`` selects per format)."""

    n_samples: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 4096
    seed: int = 0
    math_extraction: str = "boxed"  # or "any" (math-verify's lenient extraction)
    code_workers: int = 4
    code_test_timeout: float = 6.0  # seconds per test case (LiveCodeBench's)
    sandbox_limits: SandboxLimits = field(
        default_factory=lambda: SandboxLimits(
            cpu_seconds=30, wall_seconds=90, memory_bytes=2 << 30, output_bytes=16 << 20
        )
    )
    ci_level: float = 0.95

    def __post_init__(self) -> None:
        if self.n_samples is not None and self.n_samples < 1:
            raise GopdError(f"n_samples must be >= 1, got {self.n_samples}")
        if self.temperature < 0:
            raise GopdError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise GopdError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise GopdError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.math_extraction not in ("boxed", "any"):
            raise GopdError(f"math extraction must be boxed or any, not {self.math_extraction!r}")
        if self.code_workers < 1:
            raise GopdError("code_workers must be >= 1")


def evaluate(
    generator: Generator,
    tokenizer,
    benchmarks: Sequence[BenchmarkSpec | str],
    output_dir: str | os.PathLike,
    config: EvalConfig | None = None,
    *,
    chat: ChatFormat | None = None,
    tags: dict[str, Any] | None = None,
    sandbox: Sandbox | None = None,
    problems: dict[str, list[Problem]] | None = None,
) -> dict[str, Any]:
    """Generate ``n`` samples per problem of each benchmark, grade them, write and return the
    summary (see the module docstring). ``tags`` (e.g. step, lambda, run name) are copied into
    the summary for reports and plots. ``problems``: benchmarks already loaded, by name (a
    trainer evaluating every N steps loads them once)."""
    cfg = config or EvalConfig()
    specs = [b if isinstance(b, BenchmarkSpec) else BenchmarkSpec.parse(b) for b in benchmarks]
    if not specs:
        raise GopdError("no benchmark given")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise GopdError(f"benchmark names must be unique, got {names}")
    problems = problems or {}
    # fail on bad files before generating anything
    loaded = {s.name: problems.get(s.name) or load_benchmark(s) for s in specs}
    encoder = PromptEncoder(tokenizer, chat)
    out = Path(output_dir)
    (out / "records").mkdir(parents=True, exist_ok=True)
    if sandbox is None and any(s.domain == "code" for s in specs):
        sandbox = Sandbox(cfg.sandbox_limits)

    results: dict[str, Any] = {}
    for spec in specs:
        problems = loaded[spec.name]
        n = spec.samples(cfg.n_samples)
        t0 = time.monotonic()
        prompts = [encoder.encode(p.prompt) for p in problems]
        completions = generator.generate(
            prompts,
            n=n,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens,
            seed=cfg.seed,
        )
        if len(completions) != len(problems) or any(len(c) != n for c in completions):
            raise GopdError(f"generator returned a wrong number of completions for {spec.name}")
        t_gen = time.monotonic() - t0
        records = _grade(spec, problems, prompts, completions, encoder, cfg, sandbox)
        t_grade = time.monotonic() - t0 - t_gen
        _write_jsonl(out / "records" / f"{spec.name}.jsonl", records)
        results[spec.name] = _benchmark_summary(spec, problems, records, cfg)
        results[spec.name]["seconds"] = {"generate": round(t_gen, 2), "grade": round(t_grade, 2)}
        r = results[spec.name]
        _log.info(
            "eval %s: accuracy %.4f [%.4f, %.4f] over %d problems x %d, %.0f tokens",
            spec.name, r["accuracy"], r["ci_low"], r["ci_high"], r["n_problems"], n,
            r["mean_response_tokens"],
        )  # fmt: skip

    summary = {
        "tags": dict(tags or {}),
        "config": _config_dict(cfg, chat or ChatFormat()),
        "sandbox_isolation": list(sandbox.isolation) if sandbox else None,
        "benchmarks": results,
    }
    _write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    _write_text(out / "summary.md", summary_markdown(summary))
    return summary


def _grade(
    spec, problems: list[Problem], prompts, completions, encoder, cfg, sandbox
) -> list[dict]:
    records = []
    for prob, ids, comps in zip(problems, prompts, completions):
        prompt_text = encoder.render(prob.prompt)
        for j, comp in enumerate(comps):
            records.append(
                {
                    "benchmark": spec.name,
                    "problem_id": prob.id,
                    "sample_index": j,
                    "prompt": prompt_text,
                    "prompt_tokens": len(ids),
                    "response": encoder.decode(comp.token_ids),
                    "response_tokens": len(comp.token_ids),
                    "finish_reason": comp.finish_reason,
                }
            )
    by_id = {p.id: p for p in problems}
    if spec.domain == "math":
        for r in records:  # in this thread: math-verify's timeouts need the main thread
            g = grade_math(
                r["response"], by_id[r["problem_id"]].answer, extraction=cfg.math_extraction
            )
            r.update(
                correct=g.correct,
                extracted_answer=g.extracted,
                gold_answer=by_id[r["problem_id"]].answer,
            )
        return records
    # code: identical responses to one problem (greedy decoding) are run once
    unique = {(r["problem_id"], r["response"]) for r in records}

    def run(key):
        return key, grade_code(sandbox, by_id[key[0]], key[1], test_timeout=cfg.code_test_timeout)

    with ThreadPoolExecutor(cfg.code_workers) as pool:
        grades = dict(pool.map(run, sorted(unique)))
    for r in records:
        g = grades[(r["problem_id"], r["response"])]
        r.update(correct=g.correct, status=g.status, message=g.message)
    return records


def _benchmark_summary(spec: BenchmarkSpec, problems, records, cfg: EvalConfig) -> dict:
    by_problem: dict[str, list[bool]] = {p.id: [] for p in problems}
    for r in records:
        by_problem[r["problem_id"]].append(bool(r["correct"]))
    s = score_summary(
        list(by_problem.values()),
        [r["response_tokens"] for r in records],
        level=cfg.ci_level,
        seed=cfg.seed,
    )
    s.update(format=spec.format, domain=spec.domain, path=str(spec.path))
    s["truncated_fraction"] = sum(r["finish_reason"] == "length" for r in records) / len(records)
    if spec.domain == "math":
        s["no_answer_fraction"] = sum(r["extracted_answer"] is None for r in records) / len(records)
    else:
        counts: dict[str, int] = {}
        for r in records:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        s["status_counts"] = dict(sorted(counts.items()))
    return s


def flat_metrics(summary: dict, prefix: str = "eval") -> dict[str, float]:
    """Scalars for a training logger: ``eval/<benchmark>/accuracy``, ``.../ci_low``,
    ``.../mean_response_tokens``, ``.../pass@k``, ``.../truncated_fraction``; and the mean over
    benchmarks of each domain (``eval/avg_math/accuracy``, ``eval/avg_code/accuracy``), as the paper
    reports averages."""
    out: dict[str, float] = {}
    by_domain: dict[str, list[dict]] = {}
    for name, b in summary["benchmarks"].items():
        for key, value in b.items():
            if (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and key != "ci_level"
            ):
                out[f"{prefix}/{name}/{key}"] = float(value)
        by_domain.setdefault(b["domain"], []).append(b)
    for domain, bs in by_domain.items():
        for key in ("accuracy", "mean_response_tokens"):
            out[f"{prefix}/avg_{domain}/{key}"] = sum(b[key] for b in bs) / len(bs)
    return out


def summary_markdown(summary: dict) -> str:
    """One row per benchmark: accuracy with its interval, pass@k, length, truncation."""
    tags = ", ".join(f"{k}={v}" for k, v in summary.get("tags", {}).items())
    cfg = summary.get("config", {})
    lines = [
        f"# Evaluation{f' ({tags})' if tags else ''}",
        "",
        f"temperature {cfg.get('temperature')}, top-p {cfg.get('top_p')}, "
        f"max {cfg.get('max_new_tokens')} new tokens, chat template "
        f"{'on' if cfg.get('use_chat_template') else 'off'}, seed {cfg.get('seed')}",
        "",
        "| benchmark | problems | k | accuracy (avg@k) | 95% CI | pass@k | mean response tokens | truncated |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for name, b in summary["benchmarks"].items():
        k = b["samples_per_problem"]
        pk = b.get(f"pass@{k}", float("nan")) if isinstance(k, int) else float("nan")
        lines.append(
            f"| {name} | {b['n_problems']} | {k} | {100 * b['accuracy']:.2f} | "
            f"[{100 * b['ci_low']:.2f}, {100 * b['ci_high']:.2f}] | {100 * pk:.2f} | "
            f"{b['mean_response_tokens']:.1f} | {100 * b['truncated_fraction']:.1f}% |"
        )
    lines.append("")
    lines.append("Accuracy in %; CI: percentile bootstrap over problems (see metrics.py).")
    return "\n".join(lines) + "\n"


def _config_dict(cfg: EvalConfig, chat: ChatFormat) -> dict:
    d = asdict(cfg)
    d.update(use_chat_template=chat.use_chat_template, system_prompt=chat.system_prompt,
             chat_template_kwargs=dict(chat.template_kwargs))  # fmt: skip
    return d


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    _write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
