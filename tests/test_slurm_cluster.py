"""The launcher on a real Slurm: a one-host cluster with two emulated nodes (slurm/ci/cluster.sh).

``.ci/run`` starts the cluster and exports ``SLURM_CONF``; without it these tests start a private
one (and stop it afterwards). They are skipped only where ``sbatch`` is not installed:
``apt-get install slurmctld slurmd slurm-client munge``, then ``pytest -m slurm``.

- the tiny CPU run (TINY_RECIPE): two nodes, one rank each, TP=2 across them over gloo, submitted
  with ``sbatch --wait``; exit status 0, both nodes' logs, and the scores equal to the HF model's;
- a rank failing on one node while the other hangs: the job fails, fast, and leaves no process;
- the time-limit warning: checkpoint, requeue, resume from the checkpoint, finish with status 0.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SUPPORT = ROOT / "tests" / "slurm_support"
CI_SITE = ROOT / "slurm" / "ci" / "site.sh"
# The CI run of the launcher. To run the trainer instead, point this at its tiny CPU recipe.
TINY_RECIPE = ROOT / "examples" / "tiny-cpu-train.sh"

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(shutil.which("sbatch") is None, reason="Slurm (sbatch) is not installed"),
]


@pytest.fixture(scope="module")
def slurm_env():
    """Environment for submitting to a running test cluster (started here if CI did not)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    env["GOPD_PYTHON"] = sys.executable  # the nodes run this environment's interpreter
    state_dir = None
    if os.environ.get("SLURM_CONF"):
        env["SLURM_CONF"] = os.environ["SLURM_CONF"]
    else:
        # short path: munge's socket lives in it (unix socket paths are limited to ~107 bytes)
        state_dir = tempfile.mkdtemp(prefix="gopd-slurm-")
        env["GOPD_SLURM_CI_DIR"] = state_dir
        env["GOPD_SLURM_CI_PORT"] = str(17000 + os.getpid() % 2000)
        subprocess.run([ROOT / "slurm/ci/cluster.sh", "start"], env=env, check=True, timeout=120)
        env["SLURM_CONF"] = f"{state_dir}/slurm.conf"
    yield env
    if state_dir is not None:
        subprocess.run([ROOT / "slurm/ci/cluster.sh", "stop"], env=env, timeout=120)
        shutil.rmtree(state_dir, ignore_errors=True)


def submit(env, workdir: Path, recipe: Path, *sets: str, **popen) -> subprocess.Popen:
    """slurm/submit.sh with ``sbatch --wait``, from ``workdir`` (logs go to workdir/logs)."""
    options = [x for s in sets for x in ("--set", s)]
    return subprocess.Popen(
        ["bash", ROOT / "slurm/submit.sh", "--site", CI_SITE, *options, recipe],
        cwd=workdir,
        env=dict(env, GOPD_SBATCH_ARGS="--wait"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, int]:
    """(exit status, output, job id) of a submit() process."""
    out, _ = proc.communicate(timeout=timeout)
    m = re.search(r"Submitted batch job (\d+)", out)
    assert m, out
    return proc.returncode, out, int(m.group(1))


def job_logs(workdir: Path, name: str, job: int) -> tuple[str, dict[str, str]]:
    """The batch output and the per-node logs (file name -> text) of a job."""
    batch = (workdir / "logs" / f"{name}-{job}.out").read_text()
    nodes = {p.name: p.read_text() for p in sorted((workdir / "logs" / f"{name}-{job}").glob("*"))}
    return batch, nodes


def rollout_port() -> int:
    """A base port for the stub servers: free (and 100 above it, should a site config shift each
    node's ports), below the ephemeral range that live connections draw from and above the
    MASTER_PORTs of test jobs (20000 + job id). Each emulated node is a network namespace of its
    own, so the two nodes' servers may share a port."""
    import random
    import socket

    for _ in range(100):
        base = random.randrange(24000, 29000, 2)
        try:
            for port in (base, base + 1, base + 100, base + 101):
                with socket.socket() as s:
                    s.bind(("0.0.0.0", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port pair for the stub rollout servers")


def processes_mentioning(token: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if token in text:
            found.append(f"{cmdline.parent.name}: {text}")
    return found


def assert_no_process_left(token: str, grace: float = 60.0) -> None:
    """No process whose command line mentions ``token`` (the test's own directory) survives.

    ``grace`` covers Slurm's asynchronous step clean-up, which took over 15 s twice on a 2-core
    machine under a load average of ~10; an orphan would live far longer (the hanging rank sleeps
    for 600 s, servers serve forever), and a clean run returns as soon as nothing is left.
    """
    deadline = time.monotonic() + grace
    while (left := processes_mentioning(token)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, "orphaned processes:\n" + "\n".join(left)


# ---------------------------------------------------------------------------------- tiny run


def _prepare_tiny(path: str) -> None:
    """``python examples/tiny_cpu_prepare.py DIR``, as the recipes document it."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, ROOT / "examples/tiny_cpu_prepare.py", path],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def _hf_logprobs(hf_dir: Path, records: list[dict]) -> list[list[float]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for rec in records:
            ids = torch.tensor([rec["input_ids"]])
            logp = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            lp = logp.gather(1, ids[0, 1:, None]).squeeze(1)
            out.append(lp[max(rec["prompt_len"], 1) - 1 :].tolist())
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tiny = tmp_path_factory.mktemp("tiny")
    _prepare_tiny(str(tiny))
    return tiny


def test_tiny_cpu_run_on_two_nodes(slurm_env, tmp_path, tiny):
    start = time.monotonic()
    rc, out, job = finish(submit(slurm_env, tmp_path, TINY_RECIPE, f"TINY_DIR={tiny}"), 300)
    elapsed = time.monotonic() - start
    batch, nodes = job_logs(tmp_path, TINY_RECIPE.stem, job)
    assert rc == 0, out + batch + "".join(nodes.values())
    # both nodes took part: each ran its own torchrun node rank, and each ended with status 0
    assert sorted(nodes) == ["node0-n1.log", "node1-n2.log"]
    for rank, name in enumerate(sorted(nodes)):
        assert f"torchrun node rank {rank} of 2 started" in nodes[name]
        assert f"node {rank} (n{rank + 1}): torchrun exited with status 0" in nodes[name]
    assert "training step ended with status 0" in batch
    if TINY_RECIPE.name == "tiny-cpu-score.sh":
        check_scores(tiny)
    else:
        check_training(tiny)
    print(f"tiny CPU run: job {job}, {elapsed:.1f} s from sbatch to exit status")


def check_scores(tiny: Path) -> None:
    """What the two nodes computed together (TP=2 across them) is the HF model's log-probs."""
    scored = [json.loads(line) for line in (tiny / "logprobs.jsonl").read_text().splitlines()]
    expected = _hf_logprobs(tiny / "hf", scored)
    assert len(scored) == 3
    for rec, ref in zip(scored, expected, strict=True):
        assert len(rec["logprobs"]) == len(ref)
        assert max(abs(a - b) for a, b in zip(rec["logprobs"], ref, strict=True)) < 1e-4


def check_training(tiny: Path) -> None:
    """The two nodes trained together: every step logged, the final checkpoint written, and the
    reverse KL to the teacher on the evaluation prompts went down."""
    metrics = [
        json.loads(line) for line in (tiny / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    assert (tiny / "run" / "latest").read_text().strip() == "iter_0000003"
    assert metrics[-1]["eval/reverse_kl"] < metrics[0]["eval/reverse_kl"]
    assert all(m["train/rollout_abs_log_ratio"] < 1e-4 for m in metrics[1:])


# ---------------------------------------------------------------------------------- disaggregated

DISAGG_RECIPE = ROOT / "examples" / "tiny-cpu-disaggregated.sh"


def test_disaggregated_run_across_two_network_namespaces(slurm_env, tmp_path, tiny):
    """The disaggregated layout for real: the CPU rollout server on n2, the trainer on n1, each
    node a network namespace with its own address (a node's 127.0.0.1 reaches nothing of the
    other), weights pushed with --weight-sync distributed (gloo) across them after every step
    and verified (--weight-sync-check), rollout and trainer log-probs within 1e-4."""
    start = time.monotonic()
    rc, out, job = finish(submit(slurm_env, tmp_path, DISAGG_RECIPE, f"TINY_DIR={tiny}"), 300)
    elapsed = time.monotonic() - start
    batch, nodes = job_logs(tmp_path, DISAGG_RECIPE.stem, job)
    everything = out + batch + "".join(nodes.values())
    assert rc == 0, everything
    assert sorted(nodes) == ["node0-n1.log", "node1-n2-server0.log", "node1-n2.log"], nodes.keys()
    trainer, server = nodes["node0-n1.log"], nodes["node1-n2-server0.log"]
    # the two nodes' addresses (slurm/ci/cluster.sh): the trainer dials the server's, and hands the
    # server its own as the rendezvous address, never a loopback
    addrs = subprocess.check_output(["scontrol", "show", "node", "-o"], env=slurm_env, text=True)
    n1, n2 = (re.search(rf"NodeName={n} .*?NodeAddr=(\S+)", addrs).group(1) for n in ("n1", "n2"))
    assert not n1.startswith("127.") and not n2.startswith("127.") and n1 != n2
    assert f"--rollout-urls http://{n2}:30000" in trainer
    groups = re.findall(r"weight-update group \S+ at tcp://(\S+):\d+", trainer)
    assert groups and all(g == n1 for g in groups), groups
    # every push (the initial one and one per step) reached the server and was verified there
    pushes = re.findall(r"weights (\d+): .*checked: checksums on 1 server\(s\)", trainer)
    assert pushes == ["0", "1", "2", "3"], trainer
    assert "Traceback" not in server, server
    metrics = [
        json.loads(line)
        for line in (tiny / "run-disaggregated" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    assert all(m["train/rollout_abs_log_ratio"] <= 1e-4 for m in metrics[1:]), metrics
    print(f"disaggregated CPU run: job {job}, {elapsed:.1f} s from sbatch to exit status")


SERVED_RECIPE = ROOT / "examples" / "tiny-cpu-served-teacher.sh"


def test_served_teacher_on_a_node_of_its_own(slurm_env, tmp_path, tiny):
    """The teacher served by the CPU stand-in for SGLang on n2 (its own API key from a private
    file), the trainer on n1 asking it for prefill log-probs over the network; the reference
    (lambda 1.25) hosted. The run finishes, every step is logged and no weights go to n2."""
    rc, out, job = finish(submit(slurm_env, tmp_path, SERVED_RECIPE, f"TINY_DIR={tiny}"), 300)
    batch, nodes = job_logs(tmp_path, SERVED_RECIPE.stem, job)
    everything = out + batch + "".join(nodes.values())
    assert rc == 0, everything
    assert sorted(nodes) == ["node0-n1.log", "node1-n2-teacher-server0.log", "node1-n2.log"]
    trainer, server = nodes["node0-n1.log"], nodes["node1-n2-teacher-server0.log"]
    addrs = subprocess.check_output(["scontrol", "show", "node", "-o"], env=slurm_env, text=True)
    n2 = re.search(r"NodeName=n2 .*?NodeAddr=(\S+)", addrs).group(1)
    assert f"--teacher-urls http://{n2}:31000" in trainer
    assert f"teacher served by http://{n2}:31000, lambda 1.25, reference " in trainer
    assert "Traceback" not in server and "update_weights" not in server, server
    metrics = [
        json.loads(line)
        for line in (tiny / "run-served" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    assert all(m["counters/reference_sequences"] > 0 for m in metrics[1:])
    assert metrics[-1]["eval/reverse_kl"] < metrics[0]["eval/reverse_kl"]


# ---------------------------------------------------------------------------------- failure


def test_a_failure_on_one_node_ends_the_job_and_leaves_no_process(slurm_env, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    recipe = SUPPORT / "fake-fail.sh"
    start = time.monotonic()
    proc = submit(slurm_env, tmp_path, recipe, f"OUT={out_dir}", f"ROLLOUT_PORT={rollout_port()}")
    rc, out, job = finish(proc, 300)
    elapsed = time.monotonic() - start
    batch, nodes = job_logs(tmp_path, recipe.stem, job)
    everything = out + batch + "".join(nodes.values())
    assert rc != 0, everything
    # the hanging rank on node 0 would sleep 600 s: the launcher ended it
    assert elapsed < 120, everything
    assert_no_process_left(str(out_dir))
    # both ranks started, each on its own node, and reached both nodes' colocated servers
    for rank in (0, 1):
        path = out_dir / f"rank{rank}-restart0.json"
        assert path.exists(), everything
        record = json.loads(path.read_text())
        assert record["host"] == f"n{rank + 1}" and record["world_size"] == 2, record
        assert sorted(record["rollout_urls"].values()) == [200, 200], record
        assert record["env"] == {"CUDA_DEVICE_MAX_CONNECTIONS": "1", "NCCL_CUMEM_ENABLE": "0"}
    assert "node 1 (n2): torchrun exited with status 1" in nodes["node1-n2.log"], everything


# ---------------------------------------------------------------------------------- requeue


def test_time_limit_warning_checkpoints_requeues_and_resumes(slurm_env, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    recipe = SUPPORT / "fake-requeue.sh"
    steps = 40
    proc = submit(
        slurm_env,
        tmp_path,
        recipe,
        f"OUT={out_dir}",
        f"STEPS={steps}",
        f"ROLLOUT_PORT={rollout_port()}",
    )
    events = out_dir / "events.log"
    deadline = time.monotonic() + 120
    while not (events.exists() and "restart 0: start" in events.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, "the training never started"
        time.sleep(0.5)
    time.sleep(1.0)  # a few steps in
    # the orphan check below looks for this directory in command lines: the job's processes have it
    assert len(processes_mentioning(str(out_dir))) >= 4  # srun, node.sh, torchrun, ranks, server
    squeue = ["squeue", "--noheader", f"--name={recipe.stem}", "--format=%i"]
    job = int(subprocess.check_output(squeue, env=slurm_env, text=True))
    # what sbatch --signal=B:USR1@TIME_LIMIT_WARNING does shortly before the time limit
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], env=slurm_env, check=True)
    rc, out, _ = finish(proc, 300)
    batch, nodes = job_logs(tmp_path, recipe.stem, job)
    lines = events.read_text().splitlines()
    assert rc == 0, out + batch + "".join(nodes.values())
    stopped = re.fullmatch(r"restart 0: stopped by SIGTERM at step (\d+)", lines[1])
    assert lines[0] == "restart 0: start at step 0" and stopped, lines
    assert 0 < int(stopped.group(1)) < steps
    assert lines[2:] == [
        f"restart 1: start at step {stopped.group(1)}",
        f"restart 1: finished at step {steps}",
    ]
    assert "requeueing job" in batch and "(restart 1)" in batch
    # the disaggregated rollout node served both runs: one step per restart (a requeued job may get
    # its nodes in another order, so its log may be on either host). The restart-0 step is ended by
    # the requeue: node.sh logs its exit when it stops in time, but under load Slurm's kill wait can
    # SIGKILL it first; the last run must end cleanly, and no process may be left (checked below).
    rollout_logs = "".join(
        text for name, text in nodes.items() if name.startswith("node1-") and "-server" not in name
    )
    assert rollout_logs.count(", rollout ===") == 2, nodes.keys()
    assert re.search(
        r", restart 1, node 1 \(n\d\), rollout ===(?s:.*)node exits with status 0", rollout_logs
    ), rollout_logs
    assert_no_process_left(str(out_dir))
