"""The Slurm launcher without a cluster: dry runs (the exact commands of every node), recipe
validation, and shellcheck. The runs on a real Slurm are in ``test_slurm_cluster.py``.

The golden file ``tests/data/slurm/dryrun-exopd-qwen3-4b.txt`` is the dry run of a 4-node
GPU job (8 GPUs per node, colocated SGLang servers, pyxis container, InfiniBand). After an
intended change to the launcher, regenerate it with ``GOPD_UPDATE_GOLDEN=1 pytest
tests/test_slurm_launcher.py`` and review the diff.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "data" / "slurm" / "dryrun-exopd-qwen3-4b.txt"
EXAMPLE_SITE = "slurm/sites/example-pyxis.sh"
SHELL_FILES = [
    *sorted((ROOT / "slurm").rglob("*.sh")),
    ROOT / "slurm" / "gopd.sbatch",
    *sorted((ROOT / "examples").rglob("*.sh")),
    *sorted((ROOT / "tests" / "slurm_support").glob("*.sh")),
    ROOT / ".ci" / "run",
]


def _clean_env() -> dict[str, str]:
    """The environment of a login shell with no Slurm job, proxy or Python path of its own."""
    drop = ("SLURM_", "SBATCH_", "GOPD_", "PYTHONPATH", "NO_PROXY", "no_proxy")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["HOME"] = "/home/user"
    return env


def launcher(script: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", script, *argv],
        cwd=ROOT,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def dry_run(recipe: str, *options: str, args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return launcher("slurm/submit.sh", "--dry-run", *options, recipe, *args)


def gpu_dry_run(recipe: str) -> str:
    out = dry_run(
        recipe,
        "--site",
        EXAMPLE_SITE,
        "--set",
        "GOPD_HOME=/shared/gopd",
        "--set",
        "LOG_ROOT=/shared/logs",
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.replace(str(ROOT), "$CHECKOUT")


def node_sections(text: str) -> dict[int, str]:
    parts = re.split(r"^## node (\d+) ", text, flags=re.M)
    return {int(parts[i]): parts[i + 1] for i in range(1, len(parts), 2)}


def commands(section: str, program: str) -> list[str]:
    """The (line-joined) commands in ``section`` that start with ``program``."""
    joined = section.replace(" \\\n    ", " ")
    return [line for line in joined.splitlines() if line.startswith(program)]


# ---------------------------------------------------------------------------------- dry runs


def test_dry_run_of_a_4_node_gpu_job_is_the_golden_one():
    text = gpu_dry_run("examples/exopd-qwen3-4b.sh")
    if os.environ.get("GOPD_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


LARGE_TEACHER_GOLDEN = {
    "exopd-qwen3-1.7b-reward-correction-served.sh": GOLDEN.parent
    / "dryrun-exopd-qwen3-1.7b-reward-correction-served.txt",
    "exopd-qwen3-1.7b-reward-correction-moe-hosted.sh": GOLDEN.parent
    / "dryrun-exopd-qwen3-1.7b-reward-correction-moe-hosted.txt",
}


@pytest.mark.parametrize("recipe", sorted(LARGE_TEACHER_GOLDEN))
def test_dry_runs_of_the_large_teacher_recipes_are_the_golden_ones(recipe):
    text = gpu_dry_run(f"examples/{recipe}")
    golden = LARGE_TEACHER_GOLDEN[recipe]
    if os.environ.get("GOPD_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()


def _trainer_config(text: str):
    import shlex

    from megatron_gopd.trainer.config import build_config, parse_args

    (torchrun,) = commands(node_sections(text)[0], "python -m torch.distributed.run")
    return build_config(parse_args(shlex.split(torchrun.split("-m megatron_gopd.train", 1)[1])))


def test_served_teacher_and_reference_run_on_nodes_of_their_own():
    """Qwen3-30B-A3B teacher and its base on SGLang nodes of their own (2 servers of TP 4 / EP 4
    each), the 1.7B student trained on one node with colocated rollouts; the trainer gets their
    URLs, and no weights ever go to them."""
    text = gpu_dry_run("examples/exopd-qwen3-1.7b-reward-correction-served.sh")
    assert "--nodes=3" in commands(text, "sbatch")[0]
    server_srun, train_srun = commands(text, "srun")
    assert "--job-name=gopd-rollout" in server_srun and "--nodes=2" in server_srun
    assert "--relative=1" in server_srun and "--nodes=1" in train_srun
    nodes = node_sections(text)
    assert sorted(nodes) == [0, 1, 2]
    assert text.count("): teacher; log") == 1 and text.count("): ref; log") == 1
    for n, model, port in ((1, "Qwen3-30B-A3B", 31000), (2, "Qwen3-30B-A3B-Base", 32000)):
        servers = commands(nodes[n], "python -m sglang.launch_server")
        assert len(servers) == 2
        for j, server in enumerate(servers):
            assert f"--model-path /shared/gopd/hf/{model} " in server
            assert f"--port {port + 10 * j} " in server and f"--base-gpu-id {4 * j} " in server
            assert "--tp-size 4 " in server and "--ep-size 4 " in server
            assert "--enable-fp32-lm-head" in server and "--enable-memory-saver" not in server
            assert f"--config /tmp/gopd-0-node{n}-server{j}.yaml" in server
        assert "#   weights:" not in nodes[n] and "no weight sync" in nodes[n]
    # the trainer waits for the served roles before it starts
    train = nodes[0]
    assert train.index("4 teacher/reference server(s)") < train.index("torch.distributed.run")
    cfg = _trainer_config(text)
    assert cfg.routing.teacher_urls == {"default": ("http://node002:31000", "http://node002:31010")}
    assert cfg.routing.reference_urls == {
        "default": ("http://node003:32000", "http://node003:32010")
    }
    assert cfg.routing.teachers == {} and cfg.routing.references == {}
    assert cfg.routing.lambdas == {"default": 1.25}
    assert cfg.models.teacher_temperature == cfg.models.ref_temperature == 1.0
    assert cfg.loss.estimator == "sampled" and cfg.parallel.tp == 1
    assert len(cfg.rollout.urls) == 8 and cfg.rollout.colocate


def test_moe_teacher_hosted_with_expert_parallelism():
    text = gpu_dry_run("examples/exopd-qwen3-1.7b-reward-correction-moe-hosted.sh")
    assert "--nodes=2" in commands(text, "sbatch")[0]
    assert "teacher; log" not in text and "--teacher-urls" not in text
    cfg = _trainer_config(text)
    name = lambda p: p.rsplit("/", 1)[-1]  # noqa: E731
    assert {k: name(v) for k, v in cfg.routing.teachers.items()} == {"default": "Qwen3-30B-A3B"}
    assert {k: name(v) for k, v in cfg.routing.references.items()} == {
        "default": "Qwen3-30B-A3B-Base"
    }
    assert cfg.parallel.ep == 8 and cfg.parallel.tp == 2
    # EP 8 divides the data-parallel size of 2 nodes x 8 GPUs at TP 2
    cfg.parallel.validate(16)
    assert cfg.models.offload_frozen


def test_dry_run_of_a_4_node_gpu_job_starts_colocated_servers_and_torchrun_on_every_node():
    text = gpu_dry_run("examples/exopd-qwen3-4b.sh")
    submit = commands(text, "sbatch")[0]
    for option in ("--nodes=4", "--gpus-per-node=8", "--partition=gpu", "--account=my-project"):
        assert option in submit
    assert "--requeue" in submit and "--signal=B:USR1@300" in submit
    srun = commands(text, "srun")
    assert len(srun) == 1 and "--nodes=4" in srun[0] and "--kill-on-bad-exit=1" in srun[0]
    assert "--container-image=nvcr.io#nvidia/pytorch:25.06-py3" in srun[0]
    for name in ("CUDA_DEVICE_MAX_CONNECTIONS=1", "NCCL_CUMEM_ENABLE=0", "NCCL_SOCKET_IFNAME=ib0"):
        assert f"export {name}\n" in text

    nodes = node_sections(text)
    assert sorted(nodes) == [0, 1, 2, 3]
    # one GPU per Qwen3-4B server (examples/models/qwen3-4b.sh): 8 servers per node
    all_urls = [f"http://node00{n}:{30000 + 10 * j}" for n in range(1, 5) for j in range(8)]
    for n, section in nodes.items():
        servers = commands(section, "python -m sglang.launch_server")
        assert len(servers) == 8
        for j, server in enumerate(servers):
            assert f"--port {30000 + 10 * j} " in server
            assert f"--base-gpu-id {j} " in server and "--tp-size 1 " in server
            assert "--enable-memory-saver" in server
            assert server.endswith(f"node{n}-node00{n + 1}-server{j}.log 2>&1 &")
        (torchrun,) = commands(section, "python -m torch.distributed.run")
        assert f"--nnodes=4 --node-rank={n} --nproc-per-node=8 --master-addr=node001" in torchrun
        assert "-m megatron_gopd.train" in torchrun
        assert torchrun.endswith("--rollout-urls " + " ".join(all_urls))
        # each colocated server takes its weights over CUDA IPC from the trainer rank on its GPU,
        # and its API key from a private file on its node
        transports = re.findall(r"^#   weights: (.*)$", section, flags=re.M)
        assert transports == [
            f"tensor (CUDA IPC) to TP rank 0 <- trainer rank {8 * n + j}, GPU {j} of this node"
            for j in range(8)
        ]
        for j, server in enumerate(servers):
            assert f"--config /tmp/gopd-0-node{n}-server{j}.yaml" in server
        # the servers start first, the health wait comes before torchrun
        assert section.index("# wait") < section.index("python -m torch.distributed.run")


def test_dry_run_of_a_disaggregated_job_puts_the_servers_on_their_own_nodes():
    text = gpu_dry_run("examples/exopd-qwen3-4b-disaggregated.sh")
    assert "--nodes=4" in commands(text, "sbatch")[0]
    rollout_srun, train_srun = commands(text, "srun")
    assert "--job-name=gopd-rollout" in rollout_srun and "--relative=2" in rollout_srun
    assert rollout_srun.endswith(" &")
    assert "--job-name=gopd-train" in train_srun and "--nodes=2" in train_srun
    nodes = node_sections(text)
    # 8 GPUs per rollout node, one GPU per Qwen3-4B server (examples/models/qwen3-4b.sh)
    urls = [f"http://node00{n}:{30000 + 10 * j}" for n in (3, 4) for j in range(8)]
    for n in (0, 1):
        assert not commands(nodes[n], "python -m sglang")
        (torchrun,) = commands(nodes[n], "python -m torch.distributed.run")
        assert "--nnodes=2" in torchrun and "--rollout-colocate" not in torchrun
        assert torchrun.endswith("--rollout-urls " + " ".join(urls))
    for n in (2, 3):
        servers = commands(nodes[n], "python -m sglang.launch_server")
        assert len(servers) == 8 and not any("--enable-memory-saver" in s for s in servers)
        assert not commands(nodes[n], "python -m torch.distributed.run")
        # the servers have GPUs of their own: one NCCL group, trainer rank 0 + every server rank
        transports = re.findall(r"^#   weights: (.*)$", nodes[n], flags=re.M)
        first = 1 + (n - 2) * 8
        assert transports == [
            f"distributed (broadcast from trainer rank 0: NCCL, gloo on CPU), group ranks "
            f"{first + j}..{first + j}"
            for j in range(8)
        ]


def test_dry_run_of_the_tiny_cpu_recipe_starts_no_servers():
    out = dry_run(
        "examples/tiny-cpu-score.sh", "--site", "slurm/ci/site.sh", "--set", "TINY_DIR=/t"
    )
    assert out.returncode == 0, out.stderr
    assert "sglang" not in out.stdout and "--rollout-urls" not in out.stdout
    assert "--gpus-per-node" not in out.stdout  # the CI site asks for no GPUs
    nodes = node_sections(out.stdout)
    for n in (0, 1):
        (torchrun,) = commands(nodes[n], "python3 -m torch.distributed.run")
        assert f"--nnodes=2 --node-rank={n} --nproc-per-node=1" in torchrun
        assert "-m megatron_gopd.scoring --load /t/mcore" in torchrun


def test_arguments_after_the_recipe_are_appended_to_its_args():
    out = dry_run(
        "examples/tiny-cpu-score.sh",
        "--site",
        "slurm/ci/site.sh",
        "--set",
        "TINY_DIR=/t",
        "--set",
        "NODES=1",
    )
    assert out.returncode == 0 and "--nnodes=1 " in out.stdout.replace(" \\\n    ", " ")
    out = dry_run(
        "examples/tiny-cpu-score.sh",
        *("--site", "slurm/ci/site.sh", "--set", "TINY_DIR=/t"),
        args=("--micro-batch-size", "4"),
    )
    assert out.returncode == 0, out.stderr
    torchrun = commands(node_sections(out.stdout)[0], "python3 -m torch.distributed.run")[0]
    assert torchrun.endswith("--tensor-model-parallel-size 2 --micro-batch-size 4")


@pytest.mark.parametrize(
    "sets, message",
    [
        (["ROLLOUT_MODE=sideways"], "expected none, colocated or disaggregated"),
        (["ROLLOUT_GPUS_PER_SERVER=3"], "not a multiple of ROLLOUT_GPUS_PER_SERVER=3"),
        (["ROLLOUT_MODE=disaggregated", "ROLLOUT_NODES=0"], "needs ROLLOUT_NODES >= 1"),
        (["TIME_LIMIT=8:00"], "leaves no time before the checkpoint warning"),
        (["TIME_LIMIT=soon"], "not a Slurm time"),
        (["NODES=0"], "NODES must be at least 1"),
        (["GPUS_PER_NODE=eight"], "expected a non-negative integer"),
        (["ROLLOUT_ENGINE=vllm"], "expected sglang or cpu"),
        (["ROLLOUT_SERVERS_PER_NODE=4"], "must cover the NPROC_PER_NODE=8 trainer GPUs"),
    ],
)
def test_recipe_mistakes_are_reported_before_anything_is_submitted(sets, message):
    options = [x for s in sets for x in ("--set", s)]
    out = dry_run("examples/exopd-qwen3-4b.sh", *options)
    assert out.returncode == 2
    assert message in out.stderr


@pytest.mark.parametrize(
    "recipe,args,message",
    [
        ("exopd-qwen3-4b.sh", ("--weight-sync", "distributed"), "NCCL refuses a trainer rank"),
        ("exopd-qwen3-4b-disaggregated.sh", ("--rollout-colocate",), "drop --rollout-colocate"),
        ("exopd-qwen3-4b-disaggregated.sh", ("--weight-sync", "tensor"), "open only on their"),
    ],
)
def test_a_transport_that_cannot_work_is_refused_before_submitting(recipe, args, message):
    out = dry_run(f"examples/{recipe}", args=args)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_a_missing_recipe_or_site_is_reported():
    out = dry_run("examples/nope.sh")
    assert out.returncode == 2 and "recipe" in out.stderr and "not found" in out.stderr
    out = dry_run("examples/tiny-cpu-score.sh", "--site", "nope.sh")
    assert out.returncode == 2 and "site config" in out.stderr


def test_outside_an_allocation_the_batch_script_refuses_to_run():
    out = launcher(
        "slurm/gopd.sbatch",
        *("--site", "slurm/ci/site.sh", "--set", "TINY_DIR=/t", "examples/tiny-cpu-score.sh"),
    )
    assert out.returncode == 2 and "not inside a Slurm job" in out.stderr


@pytest.mark.parametrize(
    "limit, seconds",
    [("30", 1800), ("5:30", 330), ("01:02:03", 3723), ("2-00", 172800), ("1-02:03:04", 93784)],
)
def test_slurm_time_limits_are_parsed(limit, seconds):
    out = subprocess.run(
        ["bash", "-c", 'source slurm/lib.sh && gopd_time_seconds "$1"', "_", limit],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0 and int(out.stdout) == seconds


# ---------------------------------------------------------------------------------- lint


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_launcher_scripts_are_shellcheck_clean():
    out = subprocess.run(
        ["shellcheck", "-x", *map(str, SHELL_FILES)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize(
    "recipe,lambdas,teachers,refs",
    [
        (
            "exopd-qwen3-4b.sh",
            {"default": 1.25},
            {"default": "Qwen3-4B-math-teacher"},
            {"default": "Qwen3-4B"},
        ),
        (
            "exopd-qwen3-4b-multi-teacher.sh",
            {"default": 1.25},
            {"math": "Qwen3-4B-math-teacher", "code": "Qwen3-4B-code-teacher"},
            {"default": "Qwen3-4B"},
        ),
        (
            "exopd-qwen3-1.7b-strong-to-weak.sh",
            {"default": 1.25},
            {"default": "Qwen3-4B-math-teacher"},
            {"default": "Qwen3-1.7B"},
        ),
        (
            "exopd-qwen3-1.7b-reward-correction.sh",
            {"default": 1.25},
            {"default": "Qwen3-4B-math-teacher"},
            {"default": "Qwen3-4B"},
        ),
        (
            "exopd-qwen3-4b-disaggregated.sh",
            {"default": 1.25},
            {"default": "Qwen3-4B-math-teacher"},
            {"default": "Qwen3-4B"},
        ),
    ],
)
def test_paper_recipes_are_valid_trainer_commands(recipe, lambdas, teachers, refs):
    """What node 0 would run is accepted by gopd-train's own parser and flag checks, and sets up
    the paper setting the recipe is named after."""
    import shlex

    from megatron_gopd.trainer.config import build_config, parse_args

    text = gpu_dry_run(f"examples/{recipe}")
    (torchrun,) = commands(node_sections(text)[0], "python -m torch.distributed.run")
    argv = shlex.split(torchrun.split("-m megatron_gopd.train", 1)[1])
    cfg = build_config(parse_args(argv))
    name = lambda p: p.rsplit("/", 1)[-1]  # noqa: E731
    assert cfg.routing.lambdas == lambdas
    assert {k: name(v) for k, v in cfg.routing.teachers.items()} == teachers
    assert {k: name(v) for k, v in cfg.routing.references.items()} == refs
    assert cfg.optim.lr == 1e-5 and cfg.optim.lr_decay_style == "constant"
    assert cfg.rollout.temperature == 1.0 and cfg.updates_per_step == 1
    assert cfg.data.chat_template_kwargs == {"enable_thinking": False}
    assert cfg.rollout.engine == "external" and len(cfg.rollout.urls) >= 16
    assert cfg.rollout.colocate == ("disaggregated" not in recipe)
    # colocated servers take CUDA IPC, the others an NCCL broadcast
    assert cfg.rollout.weight_sync_transport == (
        "tensor" if cfg.rollout.colocate else "distributed"
    )
    ck = cfg.checkpoint
    assert ck.exit_signal_handler and ck.load == ck.save
