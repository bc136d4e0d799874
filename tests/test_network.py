"""Weight sync to a server on another host, emulated by a network namespace of its own.

The server runs inside a namespace with private addresses (IPv4 and IPv6) on a veth pair; its
127.0.0.1 is not the trainer's. A weight-update group whose rendezvous address is loopback cannot
form there, as it cannot between two real nodes; the trainer must hand out an address the server
can route to. Needs root and ``ip`` (iproute2), as the CI cluster does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from megatron_gopd.parallel import ParallelConfig
from megatron_gopd.rollout.protocol import http_json
from megatron_gopd.testing import make_tiny_hf_model, run_distributed
from megatron_gopd.utils import free_port
from tests.test_weight_sync import SEQ, TOL, _convert, perturb

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None,
        reason="needs root and iproute2 (ip netns): CI runs as root",
    ),
]


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    """A namespace reachable at 10.214.N.2 and fd14:N::2 from this one (10.214.N.1, fd14:N::1),
    serving the tiny model on both; yields (urls, the host-side interface, the model dir)."""
    d = tmp_path_factory.mktemp("netns")
    make_tiny_hf_model(d / "hf", "qwen3", seed=17)
    run_distributed(_convert, 1, str(d / "hf"), str(d / "mcore"))
    tag = os.getpid() % 100000
    n = os.getpid() % 200 + 20
    ns, host_if, ns_if = f"gopd14-{tag}", f"g14h{tag}", f"g14n{tag}"
    ip("netns", "add", ns)
    proc = None
    try:
        ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        ip("link", "set", ns_if, "netns", ns)
        ip("addr", "add", f"10.214.{n}.1/30", "dev", host_if)
        ip("-6", "addr", "add", f"fd14:{n:x}::1/64", "dev", host_if, "nodad")
        ip("link", "set", host_if, "up")
        ip("-n", ns, "addr", "add", f"10.214.{n}.2/30", "dev", ns_if)
        ip("-n", ns, "-6", "addr", "add", f"fd14:{n:x}::2/64", "dev", ns_if, "nodad")
        ip("-n", ns, "link", "set", ns_if, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        port = free_port()
        env = dict(os.environ, GLOO_SOCKET_IFNAME=ns_if, OMP_NUM_THREADS="1")
        log = open(d / "server.log", "wb")  # noqa: SIM115 (closed with the process)
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "megatron_gopd.cpu_server"]
        cmd += ["--model-path", str(d / "hf"), "--host", "::", "--port", str(port)]
        proc = subprocess.Popen(
            [*cmd, "--dist-timeout", "20"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        urls = [f"http://10.214.{n}.2:{port}", f"http://[fd14:{n:x}::2]:{port}"]
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (d / "server.log").read_text()
            try:
                if all(http_json(u + "/health", timeout=2)[0] == 200 for u in urls):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, (d / "server.log").read_text()
            time.sleep(0.2)
        yield urls, host_if, d
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, timeout=30)


def _push_remote(ckpt, url, host_if, seed):
    from megatron_gopd.models import build_role
    from megatron_gopd.rollout import RolloutClient
    from megatron_gopd.scoring import score_sequences
    from megatron_gopd.sync import SyncConfig, SyncError, WeightSyncer

    os.environ["GLOO_SOCKET_IFNAME"] = host_if  # gloo's own sockets: the veth (NCCL_SOCKET_IFNAME)
    role = build_role("student", ckpt, frozen=False)
    perturb(role, seed)
    cfg = SyncConfig(transport="distributed", bucket_bytes=64 * 1024, timeout_s=30)
    syncer = WeightSyncer(cfg, [url])
    try:
        syncer.push(role, version=f"n{seed}")
    except SyncError as e:
        return str(e)
    finally:
        syncer.close()
    got = torch.tensor(RolloutClient([url]).score([SEQ])[0])
    return (got - score_sequences(role, [SEQ])[0]).abs().max().item()


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_distributed_push_to_a_server_on_another_host(remote, family):
    urls, host_if, d = remote
    url = urls[0] if family == "ipv4" else urls[1]
    out = run_distributed(
        _push_remote, 1, str(d / "mcore"), url, host_if, 50, parallel=ParallelConfig(), timeout=200
    )[0]
    assert not isinstance(out, str), out
    assert out <= TOL


def test_the_rendezvous_address_is_the_route_to_the_servers(remote):
    from megatron_gopd.sync.process_group import routable_address

    urls, _, _ = remote
    n = os.getpid() % 200 + 20
    assert routable_address([urls[0]]) == f"10.214.{n}.1"
    assert routable_address([urls[1]]) == f"fd14:{n:x}::1"
    assert routable_address(["http://127.0.0.1:1", urls[0]]) == f"10.214.{n}.1"
    assert routable_address(["http://127.0.0.1:1", "http://localhost:2"]) == "127.0.0.1"
