"""The tiny CPU demo: OPD and ExOPD of a small student from a bigger teacher, end to end.

    python -m megatron_gopd.demo            # ~5 minutes on 2 CPU cores (after the install)

1. Makes a character tokenizer, then a teacher (4 layers) and a student (2 layers) by plain
   supervised steps on the reversal task (``demo/task.py``): the teacher is clearly better.
2. Converts both to Megatron checkpoints (``tools/convert_hf_to_megatron.py``).
3. Runs ``gopd-train`` under torchrun twice through the real pipeline (CPU rollout server speaking
   SGLang's API, Megatron training with TP, weight sync after every step): OPD (lambda = 1) and
   ExOPD (lambda = 1.25, reference = the student's initial weights).
4. Exports both students to HF (``tools/convert_megatron_to_hf.py``) and prints a table: student
   before, teacher, student after OPD, after ExOPD, with avg@8 accuracy at temperature 1 on held-out
   prompts and the time per training step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from megatron_gopd.utils import GopdError, cli_errors

REPO = Path(__file__).resolve().parents[2]


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


def make_models(work: Path, *, seed: int) -> None:
    import torch

    from megatron_gopd.demo import task

    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    tok = task.make_tokenizer(work / "tokenizer")
    for name, spec, s in (("teacher", task.TEACHER, seed + 1), ("student", task.STUDENT, seed + 2)):
        out = work / "hf" / name
        if (out / "config.json").is_file():
            continue
        t0 = time.perf_counter()
        model = task.make_model(tok, spec, seed=s)
        loss = task.supervised_train(model, tok, spec.sft_steps, seed=s)
        model.save_pretrained(str(out))
        tok.save_pretrained(str(out))
        print(
            f"  {name}: {spec.layers} layers, hidden {spec.hidden}, {spec.sft_steps} supervised steps "
            f"(loss {loss:.3f}, {time.perf_counter() - t0:.0f}s)",
            flush=True,
        )


def train_args(work: Path, name: str, lam: float, a) -> list[str]:
    mc = work / "mcore"
    args = [
        "--student-load",
        str(mc / "student"),
        "--teacher-load",
        str(mc / "teacher"),
        "--gopd-lambda",
        str(lam),
        "--prompt-data",
        str(work / "train.jsonl"),
        "--eval-prompt-data",
        str(work / "eval.jsonl"),
        "--eval-interval",
        str(max(1, a.steps // 3)),
        "--eval-n-samples",
        "4",
        "--eval-grader",
        "exact",
        "--apply-chat-template",
        "--rollout-engine",
        "cpu",
        "--sglang-enable-deterministic-inference",  # rollouts reproducible from --seed
        "--weight-sync",
        "distributed",
        "--rollout-batch-size",
        "32",
        "--n-samples-per-prompt",
        "4",
        "--max-response-len",
        "10",
        "--rollout-temperature",
        "1.0",
        "--micro-batch-size",
        "32",
        "--lr",
        str(a.lr),
        "--train-iters",
        str(a.steps),
        "--tensor-model-parallel-size",
        str(a.tp),
        "--save",
        str(work / "runs" / name),
        "--seed",
        str(a.seed),
        "--no-progress",
    ]
    return args


def evaluate(hf_dir: Path, tok_dir: Path, prompts: list[dict], seed: int) -> tuple[float, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_gopd.demo import task

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    return task.accuracy(model, tok, prompts, n_samples=8, temperature=1.0, seed=seed)


def step_time(run_dir: Path) -> float:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [x["time/step"] for x in lines if "time/step" in x]
    return sum(times) / max(len(times), 1)


@cli_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m megatron_gopd.demo", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--workdir", type=Path, default=Path("demo_runs"))
    p.add_argument("--steps", type=int, default=60, help="training steps per run")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument(
        "--tp",
        type=int,
        default=1,
        help="tensor parallel size (= processes); 2 works, ~2x slower on 2 cores",
    )
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    from megatron_gopd.demo import task

    work = a.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    t_all = time.perf_counter()
    print("[1/4] tiny teacher and student (supervised steps on string reversal)", flush=True)
    make_models(work, seed=a.seed)
    task.write_prompts(work / "train.jsonl", 2000, seed=a.seed + 10)
    task.write_prompts(work / "eval.jsonl", 64, seed=a.seed + 20)
    eval_prompts = [json.loads(x) for x in (work / "eval.jsonl").read_text().splitlines()]

    print("[2/4] convert to Megatron checkpoints", flush=True)
    for name in ("teacher", "student"):
        if not (work / "mcore" / name / "gopd_model.json").is_file():
            _run(
                [
                    sys.executable,
                    str(REPO / "tools" / "convert_hf_to_megatron.py"),
                    "--hf-dir",
                    str(work / "hf" / name),
                    "--out",
                    str(work / "mcore" / name),
                ],
                work / f"convert_{name}.log",
                env,
            )

    rows = []
    for name, lam in (("opd", 1.0), ("exopd", 1.25)):
        print(
            f"[3/4] gopd-train {name} (lambda {lam}, {a.steps} steps, TP={a.tp}, CPU rollout server)",
            flush=True,
        )
        run = work / "runs" / name
        if run.exists():
            import shutil

            shutil.rmtree(run)
        secs = _run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                str(a.tp),
                "-m",
                "megatron_gopd.train",
                *train_args(work, name, lam, a),
            ],
            work / f"train_{name}.log",
            env,
        )
        out = work / "hf" / f"student_{name}"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        _run(
            [
                sys.executable,
                str(REPO / "tools" / "convert_megatron_to_hf.py"),
                "--load",
                str(run),
                "--out",
                str(out),
            ],
            work / f"export_{name}.log",
            env,
        )
        rows.append((name, lam, out, step_time(run), secs))

    print("[4/4] evaluate: avg@8 accuracy at temperature 1.0 on 64 held-out prompts", flush=True)
    tok = work / "tokenizer"
    table = [
        (
            "student (before)",
            "-",
            *evaluate(work / "hf" / "student", tok, eval_prompts, a.seed),
            "-",
        ),
        ("teacher", "-", *evaluate(work / "hf" / "teacher", tok, eval_prompts, a.seed), "-"),
    ]
    for name, lam, out, t_step, _ in rows:
        label = "student after OPD" if name == "opd" else "student after ExOPD"
        table.append(
            (label, f"{lam:g}", *evaluate(out, tok, eval_prompts, a.seed), f"{t_step:.2f}")
        )
    lines = [
        "| model | lambda | accuracy (avg@8, T=1) | response tokens | s / step |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {m} | {lam} | {acc:.3f} | {ln:.2f} | {t} |" for m, lam, acc, ln, t in table]
    text = "\n".join(lines)
    (work / "results.md").write_text(text + "\n")
    print()
    print(text)
    try:
        from megatron_gopd import plots

        runs = {
            ("OPD" if n == "opd" else "ExOPD"): plots.load_metrics(work / "runs" / n)
            for n, *_ in rows
        }
        print(f"training curves: {plots.plot_curves(runs, work / 'curves.png')}")
    except GopdError as e:  # matplotlib is in the [eval] / [test] extras
        print(f"(no plot: {e})")
    print(f"\n(total {time.perf_counter() - t_all:.0f}s; logs and metrics under {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
