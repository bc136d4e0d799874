"""The CPU demo: a lambda sweep of G-OPD (OPD and ExOPD) over seeds, end to end, on 2 CPU cores.

    python -m megatron_gopd.demo            # the sweep (~5 minutes on 2 CPU cores, after install)
    python -m megatron_gopd.demo --quick    # two short runs (what CI runs), ~1 minute

1. Makes a character tokenizer, the student's base and the teacher (``demo/task.py``): one small
   model trained on string reversal from noisy supervision, briefly (the base), then longer (the
   teacher: good, short of perfect at temperature 1, near-perfect greedy). Evaluates both.
2. Converts both to Megatron checkpoints (what ``tools/convert_hf_to_megatron.py`` does).
3. Runs ``gopd-train`` once per (lambda, seed) through the real pipeline (CPU rollout server
   speaking SGLang's API, Megatron training, weight sync after every step), all from the same base
   and teacher, with the student's base as the reference; exports each final student to HF (what
   ``tools/convert_megatron_to_hf.py`` does) and evaluates it.
4. Prints a table (sampled accuracy at T = 1 (avg@k on held-out prompts), the primary metric, and
   greedy accuracy; per lambda the mean over seeds and its range) and writes ``results.md``,
   ``results.json`` and one plot, ``demo.png`` (accuracy vs lambda with the teacher's and the base's
   lines, and the training curves).

Everything is seeded and single-threaded: a rerun prints the same numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from megatron_gopd.utils import GopdError, cli_errors

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Budget:
    """The experiment: what runs and how it is measured (fixed before any lambda result)."""

    lambdas: tuple[float, ...] = (0.5, 1.0, 1.25, 1.5)
    seeds: int = 3  # training seeds per lambda (rollout sampling and prompt order)
    steps: int = 50  # G-OPD steps per run
    lr: float = 1e-3
    rollout_batch_size: int = 32  # prompts per step
    n_samples_per_prompt: int = 4
    eval_prompts: int = 256  # held-out prompts of the final evaluation (HF, after export)
    eval_samples: int = 16  # avg@k at temperature 1
    curve_prompts: int = 64  # held-out prompts of the trainer's periodic evaluation (curves)
    curve_samples: int = 4
    curve_points: int = 5  # trainer evaluations after step 0
    train_prompts: int = 4000
    model_seed: int = 0  # the base and the teacher (demo/task.py)


FULL = Budget()
QUICK = Budget(
    lambdas=(1.0, 1.25),
    seeds=1,
    steps=6,
    eval_prompts=64,
    eval_samples=8,
    curve_prompts=16,
    curve_samples=2,
    curve_points=2,
    train_prompts=500,
)


@dataclass(frozen=True)
class RunSpec:
    lam: float
    seed: int

    @property
    def name(self) -> str:
        return f"lambda{self.lam:g}_seed{self.seed}"


def _run(cmd: list[str], log_path: Path, env: dict) -> float:
    """Run a stage, its output to ``log_path``; raise with the log's tail if it fails."""
    t0 = time.perf_counter()
    with log_path.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-25:])
        raise GopdError(
            f"{' '.join(cmd[:6])} ... failed (exit {proc.returncode}); end of {log_path}:\n{tail}"
        )
    return time.perf_counter() - t0


def make_models(work: Path, b: Budget):
    """Tokenizer, student base and teacher as HF directories (one supervised run, two stops)."""
    from megatron_gopd.demo import task

    tok = task.make_tokenizer(work / "tokenizer")
    model = task.make_model(tok, task.MODEL, seed=b.model_seed)
    sft = task.SupervisedRun(model, tok, seed=b.model_seed + 1)
    for name, steps in (("student_base", task.BASE_STEPS), ("teacher", task.TEACHER_STEPS)):
        t0 = time.perf_counter()
        loss = sft.train_to(steps)
        model.save_pretrained(str(work / "hf" / name))
        tok.save_pretrained(str(work / "hf" / name))
        print(
            f"  {name}: {task.MODEL.layers} layers, hidden {task.MODEL.hidden}, {steps} supervised "
            f"steps on {task.NOISE:.0%}-noisy answers (loss {loss:.3f}, "
            f"{time.perf_counter() - t0:.0f}s)",
            flush=True,
        )
    return tok


def train_cmd(work: Path, run: RunSpec, b: Budget, tp: int) -> list[str]:
    mc = work / "mcore"
    args = [
        *("--student-load", str(mc / "student_base")),
        *("--teacher-load", str(mc / "teacher")),
        *("--gopd-lambda", f"{run.lam:g}"),  # the reference: the student's base (the default)
        *("--prompt-data", str(work / "train.jsonl")),
        *("--eval-prompt-data", str(work / "eval_curve.jsonl")),
        *("--eval-interval", str(max(1, b.steps // b.curve_points))),
        *("--eval-n-samples", str(b.curve_samples)),
        *("--eval-grader", "exact"),
        "--apply-chat-template",
        *("--rollout-engine", "cpu"),
        "--sglang-enable-deterministic-inference",  # rollouts reproducible from --seed
        *("--weight-sync", "distributed"),
        *("--rollout-batch-size", str(b.rollout_batch_size)),
        *("--n-samples-per-prompt", str(b.n_samples_per_prompt)),
        *("--max-response-len", "10"),
        *("--rollout-temperature", "1.0"),
        *("--micro-batch-size", str(b.rollout_batch_size)),
        *("--lr", str(b.lr)),
        *("--train-iters", str(b.steps)),
        *("--tensor-model-parallel-size", str(tp)),
        *("--save", str(work / "runs" / run.name)),
        *("--seed", str(run.seed)),
        "--no-progress",
    ]
    if tp == 1:  # a world of one needs no torchrun
        return [sys.executable, "-m", "megatron_gopd.train", *args]
    return [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
        *("--nproc-per-node", str(tp), "-m", "megatron_gopd.train"),
        *args,
    ]


def evaluate(model_dir: Path, tok, prompts: list[dict], b: Budget) -> dict:
    """Sampled (avg@k, T = 1) and greedy accuracy of an HF directory on the held-out prompts."""
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_gopd.demo import task

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    sampled = task.accuracy(model, tok, prompts, n_samples=b.eval_samples, temperature=1.0, seed=1)
    greedy = task.accuracy(model, tok, prompts, n_samples=1, temperature=0.0, seed=1)
    return {
        "sampled": sampled.mean,
        "sampled_ci95": sampled.half_width,
        "greedy": greedy.mean,
        "greedy_ci95": greedy.half_width,
        "response_len": sampled.response_len,
    }


def step_time(run_dir: Path) -> float:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [x["time/step"] for x in lines if "time/step" in x]
    return sum(times) / max(len(times), 1)


def _clean(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


@cli_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m megatron_gopd.demo", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--workdir", type=Path, default=Path("demo_runs"))
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"lambda {' and '.join(f'{x:g}' for x in QUICK.lambdas)}, one seed, "
        f"{QUICK.steps} steps, a smaller evaluation (what CI runs)",
    )
    p.add_argument("--lambdas", help="comma-separated lambdas (default: 0.5,1,1.25,1.5)")
    p.add_argument("--seeds", type=int, help=f"training seeds per lambda (default: {FULL.seeds})")
    p.add_argument("--steps", type=int, help=f"G-OPD steps per run (default: {FULL.steps})")
    p.add_argument(
        "--jobs",
        type=int,
        default=min(4, len(os.sched_getaffinity(0))),
        help="training runs at a time (each is a trainer and a rollout server process, which "
        "take turns: two at a time were 1.4x faster than one on 2 cores; default: the usable "
        "CPUs, at most 4)",
    )
    p.add_argument(
        "--tp",
        type=int,
        default=1,
        help="tensor parallel size (= processes per run, under torchrun); ~2x slower on 2 cores",
    )
    a = p.parse_args(argv)
    b = QUICK if a.quick else FULL
    if a.lambdas:
        try:
            b = replace(b, lambdas=tuple(float(x) for x in a.lambdas.split(",")))
        except ValueError:
            raise GopdError(f"--lambdas: {a.lambdas!r} is not a comma-separated list") from None
    if a.seeds is not None:
        b = replace(b, seeds=a.seeds)
    if a.steps is not None:
        b = replace(b, steps=a.steps)
    if b.seeds < 1 or b.steps < 1 or a.jobs < 1 or a.tp < 1 or not b.lambdas:
        raise GopdError("--seeds, --steps, --jobs and --tp must be >= 1, --lambdas not empty")

    import torch

    from megatron_gopd import plots
    from megatron_gopd.demo import report, task

    # One thread here and in every child: the models, rollouts and updates are then the same
    # numbers run to run (and on any machine), and runs do not fight over the cores.
    torch.set_num_threads(1)
    work = a.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    for stale in ("hf", "mcore", "runs", "logs", "results.md", "results.json", "demo.png"):
        _clean(work / stale)
    (work / "logs").mkdir()
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    runs = [RunSpec(lam, s) for lam in b.lambdas for s in range(b.seeds)]
    t_all = time.perf_counter()

    print("[1/4] student base and teacher (supervised steps on noisy string reversal)", flush=True)
    eval_prompts = task.write_prompts(work / "eval.jsonl", b.eval_prompts, seed=b.model_seed + 20)
    held_out = {r["prompt"] for r in eval_prompts}
    (work / "eval_curve.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in eval_prompts[: b.curve_prompts])
    )
    task.write_prompts(
        work / "train.jsonl", b.train_prompts, seed=b.model_seed + 10, exclude=held_out
    )
    tok = make_models(work, b)
    baselines = {
        name: evaluate(work / "hf" / name, tok, eval_prompts, b)
        for name in ("student_base", "teacher")
    }
    for name, r in baselines.items():
        print(f"  {name}: sampled {r['sampled']:.3f}, greedy {r['greedy']:.3f}", flush=True)

    print("[2/4] convert to Megatron checkpoints", flush=True)
    from megatron_gopd import parallel
    from megatron_gopd.convert.checkpoint import convert_hf_to_megatron, convert_megatron_to_hf

    parallel.initialize(parallel.ParallelConfig())  # a world of one for every conversion here
    try:
        for name in ("student_base", "teacher"):
            convert_hf_to_megatron(work / "hf" / name, work / "mcore" / name)

        print(
            f"[3/4] {len(runs)} G-OPD runs: lambda {', '.join(f'{x:g}' for x in b.lambdas)} x "
            f"{b.seeds} seed(s), {b.steps} steps of {b.rollout_batch_size} prompts x "
            f"{b.n_samples_per_prompt} samples each (TP={a.tp}, CPU rollout server, "
            f"{a.jobs} at a time)",
            flush=True,
        )
        results: dict[RunSpec, dict] = {}
        with ThreadPoolExecutor(max_workers=a.jobs) as pool:
            futures = {
                pool.submit(
                    _run, train_cmd(work, r, b, a.tp), work / "logs" / f"train_{r.name}.log", env
                ): r
                for r in runs
            }
            for fut in as_completed(futures):
                r = futures[fut]
                secs = fut.result()
                out = work / "hf" / f"student_{r.name}"
                convert_megatron_to_hf(work / "runs" / r.name, out)
                res = evaluate(out, tok, eval_prompts, b)
                res.update(
                    lam=r.lam,
                    seed=r.seed,
                    s_per_step=step_time(work / "runs" / r.name),
                    wall_s=secs,
                )
                results[r] = res
                print(
                    f"  {len(results)}/{len(runs)} lambda {r.lam:g} seed {r.seed}: sampled "
                    f"{res['sampled']:.3f}, greedy {res['greedy']:.3f} ({secs:.0f}s)",
                    flush=True,
                )
    finally:
        parallel.destroy()

    print("[4/4] results", flush=True)
    summary = {
        "task": task.describe(),
        "budget": asdict(b),
        "baselines": baselines,
        "runs": [results[r] for r in runs],
    }
    (work / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    text = report.table(summary)
    (work / "results.md").write_text(text + "\n")
    print()
    print(text)
    try:
        curves = {r: plots.load_metrics(work / "runs" / r.name) for r in runs}
        print(f"\nplot: {report.plot(summary, curves, work / 'demo.png')}")
    except GopdError as e:  # matplotlib is in the [eval] / [test] extras
        print(f"(no plot: {e})")
    print(f"\n(total {time.perf_counter() - t_all:.0f}s; logs, runs and models under {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
