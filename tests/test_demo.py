"""The README's first command: ``python -m megatron_gopd.demo`` (its task, its metric, its report),
and its CI variant ``--quick`` end to end, run twice at once: the same numbers both times."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_gopd.demo import report, task
from megatron_gopd.demo.__main__ import main as demo_main

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------- the task


def test_noisy_answers_flip_letters_at_the_stated_rate():
    """A letter is replaced with probability NOISE by one of 8 letters, itself included: it is
    wrong with probability NOISE * 7/8 (0.0875), independently per letter."""
    rng = random.Random(0)
    assert task.noisy_answer("abcdef", rng, noise=0.0) == "fedcba"
    wrong = total = 0
    for _ in range(4000):
        s = task.random_string(rng)
        ans = task.noisy_answer(s, rng)
        assert len(ans) == len(s)
        wrong += sum(a != b for a, b in zip(ans, s[::-1], strict=True))
        total += len(s)
    rate = wrong / total
    assert abs(rate - 0.1 * 7 / 8) < 0.006, rate  # ~18000 letters: sd 0.002


def test_training_prompts_are_distinct_and_leave_out_the_evaluation_prompts(tmp_path):
    held = task.write_prompts(tmp_path / "eval.jsonl", 200, seed=1)
    train = task.write_prompts(
        tmp_path / "train.jsonl", 1500, seed=2, exclude={r["prompt"] for r in held}
    )
    prompts = [r["prompt"] for r in train]
    assert len(set(prompts)) == 1500
    assert not set(prompts) & {r["prompt"] for r in held}
    assert all(r["answer"] == r["prompt"][::-1] for r in train + held)  # clean answers
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == train


def test_interval_over_prompts_is_the_normal_95_interval():
    acc = task.Accuracy(per_prompt=[1.0, 0.5, 0.0, 0.5], response_len=3.0)
    # mean 0.5, sample variance (0.25 + 0 + 0.25 + 0) / 3 = 1/6, se sqrt(1/6 / 4)
    assert acc.mean == 0.5
    assert acc.half_width == pytest.approx(1.96 * (1 / 24) ** 0.5)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """The demo's student base, made as the demo makes it (80 noisy supervised steps)."""
    tok = task.make_tokenizer(tmp_path_factory.mktemp("tok"))
    model = task.make_model(tok, task.MODEL, seed=0)
    task.SupervisedRun(model, tok, seed=1).train_to(task.BASE_STEPS)
    model.eval()
    prompts = task.write_prompts(tmp_path_factory.mktemp("p") / "eval.jsonl", 24, seed=5)
    return model, tok, prompts


@torch.no_grad()
def _exact_answer_probability(model, tok, prompt: str, answer: str) -> float:
    """P(the answer's tokens, then EOS) under the model at T = 1, by teacher forcing: the
    expected value of one sampled response being exactly right (avg@infinity)."""
    p = task._prompt_ids(tok, prompt)
    r = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    logits_T = model(input_ids=torch.tensor([p + r])).logits[0].double()
    logp_T = torch.log_softmax(logits_T[len(p) - 1 : -1], dim=-1)
    return logp_T.gather(1, torch.tensor(r)[:, None]).sum().exp().item()


@torch.no_grad()
def _greedy_by_hand(model, tok, prompt: str, max_new: int) -> str:
    ids = task._prompt_ids(tok, prompt)
    out = []
    for _ in range(max_new):
        nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
        out.append(nxt)
        if nxt == tok.eos_token_id:
            break
    return tok.decode(out, skip_special_tokens=True)


def test_sampled_accuracy_estimates_the_exact_probability_of_a_right_answer(base_model):
    model, tok, prompts = base_model
    exact = sum(_exact_answer_probability(model, tok, r["prompt"], r["answer"]) for r in prompts)
    exact /= len(prompts)
    est = task.accuracy(model, tok, prompts, n_samples=96, temperature=1.0, seed=3)
    # 24 x 96 samples: sd of the estimate <= 0.011; the exact value misses responses that only
    # decode to the answer (a special token inside), which a trained model almost never emits
    assert abs(est.mean - exact) < 0.04, (est.mean, exact)
    assert 0.1 < exact < 0.7  # the base is far from right at T = 1 (the demo's premise)


def test_greedy_accuracy_equals_an_argmax_loop(base_model):
    model, tok, prompts = base_model
    want = [float(_greedy_by_hand(model, tok, r["prompt"], 10) == r["answer"]) for r in prompts]
    got = task.accuracy(model, tok, prompts, n_samples=1, temperature=0.0, seed=0)
    assert got.per_prompt == want


# ---------------------------------------------------------------------------------- the report


def _summary(runs):
    base = {"sampled": 0.3, "sampled_ci95": 0.02, "greedy": 0.7, "greedy_ci95": 0.05}
    teacher = {"sampled": 0.65, "sampled_ci95": 0.02, "greedy": 1.0, "greedy_ci95": 0.0}
    return {
        "budget": {
            "eval_samples": 16,
            "eval_prompts": 256,
            "seeds": 2,
            "steps": 50,
            "rollout_batch_size": 32,
            "n_samples_per_prompt": 4,
            "lr": 1e-3,
        },
        "baselines": {
            "student_base": dict(base, response_len=5.0),
            "teacher": dict(teacher, response_len=5.5),
        },
        "runs": runs,
    }


def _run(lam, seed, sampled, greedy):
    return dict(
        lam=lam, seed=seed, sampled=sampled, greedy=greedy, response_len=5.0, s_per_step=0.5
    )


def test_table_rows_are_mean_and_range_over_seeds_in_lambda_order():
    runs = [
        _run(1.25, 1, 0.70, 0.98),
        _run(1.0, 0, 0.50, 0.90),
        _run(1.25, 0, 0.60, 0.96),
        _run(1.0, 1, 0.54, 0.94),
    ]
    text = report.table(_summary(runs))
    rows = [x for x in text.splitlines() if x.startswith("| ")][1:]
    assert rows[0].startswith("| student base (the reference) | - | 0.300 ± 0.020 |")
    assert rows[1].startswith("| teacher | - | 0.650 ± 0.020 |")
    assert rows[2] == (
        "| student after OPD | 1 | 0.520 [0.500, 0.540] | 0.500, 0.540 | 0.920 [0.900, 0.940] "
        "| 5.00 | 0.50 |"
    )
    assert rows[3].startswith(
        "| student after ExOPD | 1.25 | 0.650 [0.600, 0.700] | 0.600, 0.700 |"
    )
    assert "mean over 2 training seed(s) [min, max]" in text


def test_plot_is_written(tmp_path):
    from megatron_gopd.demo.__main__ import RunSpec

    runs = [_run(lam, s, 0.5 + 0.1 * lam, 0.9) for lam in (0.5, 1.0) for s in (0, 1)]
    curves = {
        RunSpec(r["lam"], r["seed"]): [
            {"step": 0, "eval/accuracy": 0.3, "eval/reverse_kl": 0.8},
            {"step": 5, "eval/accuracy": 0.4, "eval/reverse_kl": 0.6},
        ]
        for r in runs
    }
    out = report.plot(_summary(runs), curves, tmp_path / "demo.png")
    assert out.stat().st_size > 10_000


def test_bad_lambdas_are_one_line_errors(capsys):
    assert demo_main(["--lambdas", "one,two", "--workdir", "unused"]) == 2
    assert "error: --lambdas: 'one,two' is not a comma-separated list" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- end to end

TIMING = {"s_per_step", "wall_s"}


def _without_timings(summary: dict) -> dict:
    return dict(
        summary, runs=[{k: v for k, v in r.items() if k not in TIMING} for r in summary["runs"]]
    )


def _curves(run_dir: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if not k.startswith(("time/", "perf/"))} for m in lines]


@pytest.mark.slow
def test_quick_demo_twice_at_once_gives_the_same_numbers(tmp_path):
    """The CI variant through the real stack (conversion, CPU rollout server, Megatron training,
    weight sync, export), twice concurrently in two work directories (so also under contention):
    every accuracy, every curve point and every loss must be bit-identical."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "megatron_gopd.demo",
                "--quick",
                "--jobs",
                "1",
                "--workdir",
                str(tmp_path / w),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for w in ("a", "b")
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    wall = time.perf_counter() - t0
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    a, b = (json.loads((tmp_path / w / "results.json").read_text()) for w in ("a", "b"))
    assert _without_timings(a) == _without_timings(b)
    assert [r["lam"] for r in a["runs"]] == [1.0, 1.25]
    for run in ("lambda1_seed0", "lambda1.25_seed0"):
        ca, cb = _curves(tmp_path / "a" / "runs" / run), _curves(tmp_path / "b" / "runs" / run)
        assert ca == cb
        assert [m["step"] for m in ca if "eval/accuracy" in m] == [0, 3, 6]
    # the task's premise, on the quick evaluation: a teacher short of perfect at T = 1 with
    # near-perfect greedy answers, a base well below it, and every number a real fraction
    base, teacher = a["baselines"]["student_base"], a["baselines"]["teacher"]
    assert 0.5 < teacher["sampled"] < 0.85 and teacher["greedy"] > 0.9
    assert base["sampled"] < teacher["sampled"] - 0.2 and base["greedy"] > base["sampled"] + 0.1
    # lambda 1 never runs a reference, lambda 1.25 does
    counts = {
        run: [
            m["counters/reference_sequences"]
            for m in _curves(tmp_path / "a" / "runs" / run)
            if m["step"]
        ]
        for run in ("lambda1_seed0", "lambda1.25_seed0")
    }
    assert set(counts["lambda1_seed0"]) == {0.0} and min(counts["lambda1.25_seed0"]) > 0
    assert "| student after ExOPD | 1.25 |" in outs[0]
    assert (tmp_path / "a" / "results.md").read_text().strip() in outs[0]
    assert (tmp_path / "a" / "demo.png").stat().st_size > 10_000  # matplotlib: in [test]
    print(f"two quick demos at once: {wall:.0f}s")
