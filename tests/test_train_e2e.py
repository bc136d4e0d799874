"""gopd-train end to end on CPU (gloo, TP 2 / PP 2): the paper's settings, a few steps each.

Each run goes through the real pipeline: CPU rollout server (SGLang's API), Megatron scoring and
update, weight sync after every step, evaluation, checkpointing. Spies record which role scored
which samples, so that routing and "no reference forward when lambda == 1" are checked, not
assumed.
"""

import pytest

from megatron_gopd.testing import run_distributed
from tests.e2e_utils import make_world, read_metrics, torchrun_env, torchrun_train, train_args

ROLLOUT_TOL = 1e-4  # |log pi_rollout - log pi_trainer| after a sync (fp32; measured ~1e-6)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("e2e"))


def _train_with_spies(args):
    """Run ``train`` in this rank with spies on role construction and scoring."""
    from megatron_gopd.train import train
    from megatron_gopd.trainer import stages as T
    from megatron_gopd.trainer.config import build_config, parse_args

    scored, built = [], []
    orig_score, orig_build = T.GOPDTrainer._response_logprobs, T.build_role

    def score_spy(self, role, samples, *args):
        scored.append((role.name, sorted({s.domain for s in samples}), len(samples)))
        return orig_score(self, role, samples, *args)

    def build_spy(name, path, **kw):
        built.append((name, str(path)))
        return orig_build(name, path, **kw)

    T.GOPDTrainer._response_logprobs, T.build_role = score_spy, build_spy
    train(build_config(parse_args(args)))
    return scored, built


def _run(args, world_size=2):
    out = run_distributed(_train_with_spies, world_size, args, timeout=900)
    return out[0]


def _check_common(save, steps=4):
    m = read_metrics(save)
    by_step = {x["step"]: x for x in m}
    assert sorted(by_step) == list(range(steps + 1))
    # the reverse KL to the teacher on the fixed evaluation set falls over the run
    assert by_step[steps]["eval/reverse_kl"] < by_step[0]["eval/reverse_kl"]
    for s in range(1, steps + 1):
        # rollout and trainer log-probs agree after each sync: the samples of step s come from the
        # weights pushed after step s-1 and are scored by the trainer with those same weights
        assert by_step[s]["train/rollout_abs_log_ratio"] < ROLLOUT_TOL
        for key in (
            "train/loss",
            "train/kl_teacher",
            "train/entropy",
            "train/advantage_std",
            "time/rollout",
            "time/teacher",
            "time/update",
            "time/sync",
            "perf/tokens_per_s",
        ):
            assert key in by_step[s], key
    assert (save / "latest").read_text().strip() == f"iter_{steps:07d}"
    assert list((save / "tensorboard").glob("events.out.tfevents.*"))
    return by_step


def _exopd_args(world, save, *extra):
    return train_args(
        world, save, "--teacher-load", str(world["teacher"]), "--gopd-lambda", "1.25", *extra
    )


@pytest.fixture(scope="module")
def exopd_tp2(world, tmp_path_factory):
    save = tmp_path_factory.mktemp("exopd") / "run"
    scored, built = _run(_exopd_args(world, save))
    return save, scored, built


@pytest.mark.slow
def test_single_teacher_exopd_tp2(exopd_tp2, world):
    save, scored, built = exopd_tp2
    by_step = _check_common(save)
    # ExOPD needs the reference: the student's initial checkpoint by default
    assert ("reference:default", str(world["student"])) in built
    assert by_step[4]["counters/reference_sequences"] > 0
    assert any(name == "reference:default" for name, _, _ in scored)
    assert "train/implicit_reward" in by_step[4]


@pytest.mark.slow
def test_sequence_parallel_tp2(exopd_tp2, world, tmp_path):
    """The same ExOPD run with --sequence-parallel: every check above holds, and the first
    update (same rollouts, same initial weights) has the loss and metrics of the run without it."""
    save = tmp_path / "exopd-sp"
    _run(_exopd_args(world, save, "--sequence-parallel"))
    by_step = _check_common(save)
    plain = {x["step"]: x for x in read_metrics(exopd_tp2[0])}
    for key in ("train/loss", "train/kl_teacher", "train/entropy", "train/implicit_reward"):
        assert by_step[1][key] == pytest.approx(plain[1][key], rel=1e-5, abs=1e-6), key
    assert by_step[0]["eval/reverse_kl"] == pytest.approx(plain[0]["eval/reverse_kl"], rel=1e-5)


@pytest.mark.slow
def test_opd_runs_no_reference_forward(world, tmp_path):
    save = tmp_path / "opd"
    scored, built = _run(
        train_args(world, save, "--teacher-load", str(world["teacher"]), "--gopd-lambda", "1")
    )
    by_step = _check_common(save)
    assert not any(name.startswith("reference") for name, _ in built), "a reference model was built"
    assert not any(name.startswith("reference") for name, _, _ in scored), "a reference forward ran"
    assert all(by_step[s]["counters/reference_sequences"] == 0 for s in range(1, 5))


@pytest.mark.slow
def test_two_teachers_routed_by_domain(world, tmp_path):
    save = tmp_path / "multi"
    args = train_args(
        world,
        save,
        "--teacher-load",
        f"math={world['teacher']}",
        "--teacher-load",
        f"code={world['teacher2']}",
        "--gopd-lambda",
        "math=1.25",
        "--gopd-lambda",
        "code=1.0",
    )
    args[args.index("--prompt-data") + 1] = str(world["train2"])
    args[args.index("--eval-prompt-data") + 1] = str(world["eval2"])
    scored, built = _run(args)
    by_step = _check_common(save)
    teacher_calls = [(n, d) for n, d, _ in scored if n.startswith("teacher")]
    assert {n for n, _ in teacher_calls} == {"teacher:math", "teacher:code"}
    for name, domains in teacher_calls:  # each teacher saw its own domain's samples only
        assert domains == [name.split(":")[1]]
    # lambda = 1 for code: the reference scores math samples only
    assert [d for n, d, _ in scored if n.startswith("reference")] and all(
        d == ["math"] for n, d, _ in scored if n.startswith("reference")
    )
    for dom in ("math", "code"):
        assert f"train/{dom}/kl_teacher" in by_step[4]
    assert (
        "train/math/implicit_reward" in by_step[4]
        and "train/code/implicit_reward" not in by_step[4]
    )


@pytest.mark.slow
def test_reward_correction_pp2(world, tmp_path):
    """Strong-to-weak with reward correction: pi_ref = the teacher's pre-RL base (as large as the
    teacher), under pipeline parallelism."""
    save = tmp_path / "rc"
    args = train_args(
        world,
        save,
        "--teacher-load",
        str(world["teacher"]),
        "--gopd-lambda",
        "1.25",
        "--ref-load",
        str(world["teacher_base"]),
    )
    args[args.index("--tensor-model-parallel-size") + 1] = "1"
    args += ["--pipeline-model-parallel-size", "2"]
    scored, built = _run(args)
    _check_common(save)
    assert ("reference:default", str(world["teacher_base"])) in built
    assert not any(p == str(world["student"]) for n, p in built if n.startswith("reference"))


# ---------------------------------------------------------------------------------- resume


def test_resume_matches_an_uninterrupted_run(world, tmp_path):
    """8 steps straight vs the same run killed (SIGKILL of the whole torchrun job, rollout server
    included) once a checkpoint exists, then resumed with --load: identical metrics at every
    step, including the steps recomputed after the checkpoint."""
    import signal
    import subprocess
    import time

    steps = 8
    base = [
        "--teacher-load",
        str(world["teacher"]),
        "--gopd-lambda",
        "1.25",
        "--save-interval",
        "1",
    ]
    straight = tmp_path / "straight"
    _run(train_args(world, straight, *base, steps=steps))

    env = torchrun_env()
    crashed = tmp_path / "crashed"
    args = train_args(world, crashed, *base, steps=steps)
    proc = subprocess.Popen(
        torchrun_train(args),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    while (
        not (crashed / "latest").is_file()
        or (crashed / "latest").read_text().strip() < "iter_0000002"
    ):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no step-2 checkpoint within 10 minutes"
        time.sleep(0.05)
    # a crash: every process of the job dies at once (torchrun's workers run in sessions of
    # their own, so the process tree is walked rather than one process group signalled)
    import psutil

    job = psutil.Process(proc.pid)
    victims = [job, *job.children(recursive=True)]
    for p in victims:
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(victims, timeout=30)
    proc.wait()
    killed_at = int((crashed / "latest").read_text().strip().split("_")[1])
    assert 2 <= killed_at < steps, f"the run was not interrupted (checkpoint {killed_at})"
    resumed = subprocess.run(
        torchrun_train([*args, "--load", str(crashed)]),
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {crashed} at step {killed_at}" in resumed.stderr
    a, b = read_metrics(straight), read_metrics(crashed)
    assert [x["step"] for x in b] == list(range(steps + 1))
    for x, y in zip(a, b, strict=True):
        assert set(x) == set(y)
        for k in x:
            if not k.startswith(("time/", "perf/")):
                assert x[k] == y[k], (x["step"], k, x[k], y[k])


def test_sigterm_saves_and_stops_then_resumes(world, tmp_path):
    """What the Slurm launcher does before a time limit: SIGTERM to the training ranks. With
    --exit-signal-handler the job finishes its step, saves, and exits 0; the same command (with
    --load and --save on one directory, empty at first) then resumes and completes."""
    import signal
    import subprocess
    import time

    import psutil

    steps = 30
    run = tmp_path / "run"
    args = train_args(
        world,
        run,
        "--teacher-load",
        str(world["teacher"]),
        "--exit-signal-handler",
        "--load",
        str(run),
        steps=steps,
    )
    env, cmd = torchrun_env(), torchrun_train(args)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while (
        not (run / "metrics.jsonl").is_file()
        or '"step": 1,' not in (run / "metrics.jsonl").read_text()
    ):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    ranks = [
        p
        for p in psutil.Process(proc.pid).children()
        if "megatron_gopd.train" in " ".join(p.cmdline())
    ]
    assert len(ranks) == 2
    for p in ranks:
        p.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()[-3000:]
    stopped_at = int((run / "latest").read_text().strip().split("_")[1])
    assert 1 <= stopped_at < steps
    assert b"stopped after step" in err
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {stopped_at}" in resumed.stderr
    assert (run / "latest").read_text().strip() == f"iter_{steps:07d}"
    assert [m["step"] for m in read_metrics(run)] == list(range(steps + 1))


@pytest.mark.slow
def test_bf16_distributed_optimizer_dp2_resumes_exactly(world, tmp_path):
    """The GPU settings on CPU: bf16 models with fp32 main params in megatron-core's distributed
    optimizer, sharded over two data-parallel ranks. 2 steps + a resume to 4 give the same metrics
    as 4 steps straight (the sharded optimizer state is restored, not re-initialised)."""

    def args(run, steps):
        return train_args(
            world,
            run,
            "--teacher-load",
            str(world["teacher"]),
            "--gopd-lambda",
            "1.25",
            "--bf16",
            "--use-distributed-optimizer",
            "--tensor-model-parallel-size",
            "1",
            steps=steps,
        )

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _run(args(straight, 4))
    _run([*args(resumed, 4), "--train-iters", "2", "--eval-interval", "4"])
    _run([*args(resumed, 4), "--load", str(resumed)])
    a, b = read_metrics(straight), read_metrics(resumed)
    assert [x["step"] for x in b] == [0, 1, 2, 3, 4]
    for x, y in zip(a, b, strict=True):
        for k in x:
            if not k.startswith(("time/", "perf/")):
                assert x[k] == y[k], (x["step"], k, x[k], y[k])
    # bf16 trainer (fp32 logits) vs the fp32 rollout server: what is left is the bf16 body's
    # rounding. Measured mean |log ratio| 0.0015-0.0022 per step (0.0018-0.0024 with the old bf16
    # logits); the bound was 0.05 (issue 15, item 4)
    assert all(a[s]["train/rollout_abs_log_ratio"] < 0.005 for s in (1, 2, 3, 4))
    assert all(a[s]["optim/update_skipped"] == 0 for s in (1, 2, 3, 4))
