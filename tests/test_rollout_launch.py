"""Launching rollout servers the way a GPU job does: from a torchrun worker, with keys, and so that
they never outlive the trainer.

The CPU server creates its own process group at start-up as SGLang does, so a server started
with a torchrun worker's environment hangs here as SGLang hangs on a GPU node.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_gopd.rollout import (
    ClientConfig,
    RequestError,
    RolloutClient,
    RolloutPrompt,
    RolloutServers,
    SamplingConfig,
    ServerLaunchConfig,
)
from megatron_gopd.rollout.protocol import ServerAuth, http_json
from megatron_gopd.testing import make_tiny_hf_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    d = tmp_path_factory.mktemp("launch")
    make_tiny_hf_model(d / "hf", "llama", seed=8)
    return d / "hf"


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


# ---------------------------------------------------------------------------------- torchrun


WORKER = """
import sys
from megatron_gopd.rollout import RolloutClient, RolloutServers, ServerLaunchConfig
from megatron_gopd.rollout import RolloutPrompt, SamplingConfig, ClientConfig
cfg = ServerLaunchConfig(backend="cpu", model_path=sys.argv[1], startup_timeout_s=90,
                         extra_args=("--dist-timeout", "15"))
with RolloutServers(cfg) as servers:
    client = RolloutClient(servers.urls, ClientConfig(progress=False))
    out = client.sample([RolloutPrompt([1, 2, 3])], 1, SamplingConfig(max_new_tokens=2))
    print("SERVED", len(out[0].response_ids), flush=True)
"""


def test_a_server_started_by_a_torchrun_worker_comes_up(hf, tmp_path):
    """torchrun's workers carry TORCHELASTIC_USE_AGENT_STORE=True (and RANK, MASTER_ADDR...):
    inherited, they make the server's tcp:// rendezvous wait for a store nobody serves."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    out = subprocess.run(
        [*cmd, str(script), str(hf)], env=_env(), capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0 and "SERVED 2" in out.stdout, out.stdout + out.stderr[-3000:]


def test_no_two_children_are_given_one_port(monkeypatch, tmp_path):
    """Servers bind their ports only once their model is loaded, so a port the OS called free
    for server 0's process group may be offered again for server 1's HTTP port while server 0
    still loads: both would then fight for it. Here the OS offers each port twice."""
    import megatron_gopd.rollout.launcher as launcher

    offers = itertools.chain.from_iterable((p, p) for p in itertools.count(41000))
    monkeypatch.setattr(launcher, "free_port", lambda: next(offers))
    given: list[int] = []

    def popen(self, index, cmd, port, name):
        given.append(port)
        if "--nccl-port" in cmd:
            given.append(int(cmd[cmd.index("--nccl-port") + 1]))
        return None

    monkeypatch.setattr(launcher.RolloutServers, "_popen", popen)
    servers = RolloutServers(
        ServerLaunchConfig(backend="cpu", model_path="m", num_servers=3, log_dir=str(tmp_path))
    )
    for i in range(3):
        servers._spawn(i)
    servers._spawn_router()
    assert len(given) == 7 and len(set(given)) == 7, given


def test_server_env_drops_what_torchrun_sets_for_its_workers():
    from megatron_gopd.rollout.launcher import server_env

    worker = {
        "PATH": "/usr/bin",
        "HF_HOME": "/hf",
        "CUDA_VISIBLE_DEVICES": "0,1",
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "TORCHELASTIC_RUN_ID": "x",
        "TORCHELASTIC_ERROR_FILE": "/tmp/e.json",
        "RANK": "3",
        "LOCAL_RANK": "3",
        "WORLD_SIZE": "8",
        "LOCAL_WORLD_SIZE": "8",
        "GROUP_RANK": "0",
        "ROLE_RANK": "3",
        "MASTER_ADDR": "node001",
        "MASTER_PORT": "29500",
        "GOPD_ROLLOUT_API_KEY": "secret",
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
    }
    assert server_env(worker, backend="sglang") == {
        "PATH": "/usr/bin",
        "HF_HOME": "/hf",
        "CUDA_VISIBLE_DEVICES": "0,1",
    }


# ---------------------------------------------------------------------------------- orphans


TRAINER = """
import json, sys, threading, time
from megatron_gopd.rollout import RolloutServers, ServerLaunchConfig
servers = RolloutServers(ServerLaunchConfig(backend="cpu", model_path=sys.argv[1])).start()
if sys.argv[3] == "failover":
    # the rollout client restarts a dead server from a worker thread (failover): do the same
    t = threading.Thread(target=servers.replace, args=(servers.urls[0],))
    t.start(); t.join()
with open(sys.argv[2], "w") as f:
    json.dump([p.popen.pid for p in servers._procs], f)
time.sleep(600)
"""


def _group_pids(pgid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    out.append(int(entry))
            except (ProcessLookupError, PermissionError):
                pass
    return out


@pytest.mark.parametrize(
    "sig,how",
    [(signal.SIGKILL, "failover"), (signal.SIGTERM, "plain")],
    ids=["SIGKILL-after-failover", "SIGTERM"],
)
def test_servers_die_with_their_trainer_however_it_ends(hf, tmp_path, sig, how):
    """A trainer killed outright (or SIGTERM without --exit-signal-handler) runs no clean-up:
    its servers, one started by failover from a worker thread included, must still go."""
    script, pids_file = tmp_path / "trainer.py", tmp_path / "pids.json"
    script.write_text(TRAINER)
    trainer = subprocess.Popen(
        [sys.executable, str(script), str(hf), str(pids_file), how],
        env=_env(),
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while not pids_file.exists():
        assert trainer.poll() is None and time.monotonic() < deadline, "the trainer never started"
        time.sleep(0.2)
    time.sleep(0.5)
    groups = json.loads(pids_file.read_text())  # each server is a process group of its own
    members = {g: _group_pids(g) for g in groups}
    assert all(members.values()), members
    trainer.send_signal(sig)
    trainer.wait(timeout=30)
    deadline = time.monotonic() + 20
    while any(_group_pids(g) for g in groups) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = {g: _group_pids(g) for g in groups}
    for _g, pids in left.items():  # never leave them behind, even when the test fails
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
    assert not any(left.values()), f"orphaned rollout servers: {left}"


# ---------------------------------------------------------------------------------- keys


def _cmdlines(pgid: int) -> str:
    text = ""
    for pid in _group_pids(pgid):
        with contextlib.suppress(OSError):
            text += Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    return text


def test_launched_servers_take_their_keys_from_a_private_file(hf, tmp_path, caplog):
    from megatron_gopd.utils import GopdError

    auth = ServerAuth("key-9d2a", "admin-4e11")
    cfg = ServerLaunchConfig(backend="cpu", model_path=str(hf), auth=auth, log_dir=str(tmp_path))
    with caplog.at_level("INFO"), RolloutServers(cfg) as servers:
        url = servers.urls[0]
        # attached without the key: /health needs none, the rest says what to set
        attached = RolloutServers(ServerLaunchConfig(backend="attach", urls=(url,))).start()
        with pytest.raises(GopdError, match="GOPD_ROLLOUT_API_KEY"):
            attached.tp_size(url)
        client = RolloutClient(servers.urls, ClientConfig(progress=False), auth=auth)
        prompt = [RolloutPrompt([1, 2, 3])]
        assert len(client.sample(prompt, 2, SamplingConfig(max_new_tokens=2))) == 2
        client.flush_cache()
        client.abort()
        assert client.server_info(url)["tp_size"] == 1
        assert servers.tp_size(url) == 1
        # without the key: refused, and not retried (a 4xx is our mistake)
        nokey = RolloutClient(servers.urls, ClientConfig(progress=False))
        with pytest.raises(RequestError, match="HTTP 401"):
            nokey.sample(prompt, 1, SamplingConfig(max_new_tokens=2))
        assert http_json(url + "/update_weight_version", {"new_version": "x"})[0] == 401
        # the keys are on no command line (every user of a node can read those) and in no log
        proc = servers._procs[0].popen
        assert "key-9d2a" not in _cmdlines(proc.pid) and "--config" in _cmdlines(proc.pid)
        files = [p for p in tmp_path.iterdir() if p.name.endswith("-auth.yaml")]
        assert files and all(oct(p.stat().st_mode & 0o777) == "0o600" for p in files)
    assert "key-9d2a" not in caplog.text and "admin-4e11" not in caplog.text
    logs = "".join(p.read_text() for p in tmp_path.glob("*.log"))
    assert "key-9d2a" not in logs and "admin-4e11" not in logs


def test_server_auth_from_the_environment_and_its_repr():
    auth = ServerAuth.from_env({"GOPD_ROLLOUT_API_KEY": "a", "GOPD_ROLLOUT_ADMIN_API_KEY": "b"})
    assert auth.headers("/generate") == {"Authorization": "Bearer a"}
    assert auth.headers("http://h:1/update_weights_from_tensor") == {"Authorization": "Bearer b"}
    assert "a" not in repr(auth).replace("ServerAuth", "") and not ServerAuth.from_env({})
    from megatron_gopd.rollout.protocol import redact_command

    assert redact_command(["x", "--api-key", "s", "--admin-api-key=t", "--port", "1"]) == [
        "x",
        "--api-key",
        "***",
        "--admin-api-key=***",
        "--port",
        "1",
    ]


# ---------------------------------------------------------------------------------- determinism


def test_seeds_count_only_with_deterministic_inference(hf, tmp_path):
    """SGLang ignores sampling_seed unless --enable-deterministic-inference (which costs speed),
    and the launcher passes that flag only when asked: the stand-in does the same."""
    prompts = [RolloutPrompt([1, 2, 3, 4], prompt_index=i) for i in range(3)]
    cfg = SamplingConfig(max_new_tokens=8, seed=3)
    from concurrent.futures import ThreadPoolExecutor

    runs = {}
    pools = {
        det: RolloutServers(
            ServerLaunchConfig(backend="cpu", model_path=str(hf), deterministic=det)
        )
        for det in (False, True)
    }
    try:
        with ThreadPoolExecutor(2) as ex:  # both start at once
            list(ex.map(lambda p: p.start(), pools.values()))
        for det, servers in pools.items():
            flag = "--enable-deterministic-inference" in servers.command(0, 1)
            assert flag == det
            client = RolloutClient(servers.urls, ClientConfig(progress=False))
            runs[det] = [[s.response_ids for s in client.sample(prompts, 2, cfg)] for _ in range(2)]
    finally:
        for p in pools.values():
            p.stop()
    assert runs[True][0] == runs[True][1]
    assert runs[False][0] != runs[False][1]
    # the per-sample seeds keep the n samples of a prompt apart
    flat = list(itertools.chain.from_iterable(runs[True][0]))
    assert len(flat) > 0 and len({tuple(runs[True][0][i]) for i in range(6)}) == 6


def test_the_trainer_asks_for_deterministic_inference_only_when_told(monkeypatch, tmp_path):
    from megatron_gopd.trainer import rollout_side
    from megatron_gopd.trainer.config import build_config, parse_args

    launched = []

    class Servers:
        def __init__(self, config):
            launched.append(config)

        def start(self):
            return self

    import megatron_gopd.rollout as rollout_pkg
    import megatron_gopd.sync.export as export

    monkeypatch.setattr(rollout_pkg, "RolloutServers", Servers)
    monkeypatch.setattr(export, "export_role_to_hf", lambda *a, **k: None)
    base = ["--student-load", "s", "--teacher-load", "t", "--prompt-data", "p"]
    base += ["--rollout-engine", "sglang"]
    base += ["--save", str(tmp_path)]
    for extra, want in [([], False), (["--sglang-enable-deterministic-inference"], True)]:
        cfg = build_config(parse_args([*base, *extra]))
        side = rollout_side.RolloutSide(cfg, type("Tok", (), {"eos_token_id": 2})())
        side._launch(role=None)
        assert launched[-1].deterministic is want
        assert (
            "--enable-deterministic-inference" in RolloutServers(launched[-1]).command(0, 1)
        ) is want


def test_nothing_a_trainer_started_outlives_its_sigkill(tmp_path):
    """gopd-train killed with SIGKILL once it has saved a checkpoint: its rollout server (and
    watchdog) and dist_checkpointing's writer-queue Manager process must all go with it."""
    import psutil

    from tests.e2e_utils import make_world, train_args

    world = make_world(tmp_path / "world")
    save = tmp_path / "run"
    args = train_args(world, save, "--teacher-load", str(world["teacher"]), steps=50)
    args += ["--save-interval", "1", "--tensor-model-parallel-size", "1"]
    trainer = subprocess.Popen(
        [sys.executable, "-m", "megatron_gopd.train", *args],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not (save / "latest").exists():
        assert trainer.poll() is None, trainer.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    children = psutil.Process(trainer.pid).children(recursive=True)
    names = [" ".join(c.cmdline()) for c in children]
    assert any("megatron_gopd.cpu_server" in n for n in names), names
    assert any("megatron_gopd.train" in n for n in names), names  # the forked Manager
    trainer.kill()
    trainer.wait()

    def alive():
        out = []
        for c in children:
            with contextlib.suppress(psutil.Error):
                if c.status() != psutil.STATUS_ZOMBIE:
                    out.append(c)
        return out

    deadline = time.monotonic() + 20
    while alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    left = alive()
    for c in left:
        with contextlib.suppress(psutil.Error):
            c.kill()
    assert not left, [" ".join(c.cmdline())[:120] for c in left]
