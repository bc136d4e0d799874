"""Colocated rollout servers: weights over (the CPU stand-in for) CUDA IPC, each server TP rank fed
by the trainer rank on its own GPU; the trainer's memory given back around rollouts.

Emulated layout: two "nodes" (``GOPD_CPU_NODE_ID``), two trainer ranks each (TP 2 x DP 2), and
three servers on the trainer GPUs: a TP-2 server on node A's GPUs 0-1, TP-1 servers on node B's
GPUs 0 and 1. A handle made on another node cannot be opened there (as a CUDA IPC handle cannot),
and our server checks that TP rank i reads a handle of its own GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

from megatron_gopd.parallel import ParallelConfig
from megatron_gopd.testing import make_tiny_hf_model, run_distributed
from tests.test_weight_sync import SEQ, TOL, _convert, perturb

NODES = ["A", "A", "B", "B"]  # node of each trainer rank; local rank = index on the node
SERVERS = [("A", 2, 0), ("B", 1, 0), ("B", 1, 1)]  # node, tp size, first GPU


@pytest.fixture(scope="module")
def colocated(tmp_path_factory):
    from megatron_gopd.rollout import RolloutServers, ServerLaunchConfig

    d = tmp_path_factory.mktemp("colocated")
    make_tiny_hf_model(d / "hf", "qwen3", seed=21)
    run_distributed(_convert, 1, str(d / "hf"), str(d / "mcore"))
    pools = []
    old = os.environ.get("GOPD_CPU_NODE_ID")
    try:
        for node, tp, base in SERVERS:
            os.environ["GOPD_CPU_NODE_ID"] = node  # the server's node, as its handles see it
            cfg = ServerLaunchConfig(
                backend="cpu", model_path=str(d / "hf"), tp_size=tp, base_gpu_id=base
            )
            pools.append(RolloutServers(cfg).start())
    finally:
        os.environ.pop("GOPD_CPU_NODE_ID")
        if old is not None:
            os.environ["GOPD_CPU_NODE_ID"] = old
    yield d, [p.urls[0] for p in pools]
    for p in pools:
        p.stop()


def _shm_files() -> set[str]:
    return {f for f in os.listdir("/dev/shm") if f.startswith("gopd-ipc-")}


def _colocated_push(ckpt, urls, seed):
    import torch.distributed as dist

    from megatron_gopd.models import build_role
    from megatron_gopd.rollout import RolloutClient
    from megatron_gopd.rollout.launcher import server_info
    from megatron_gopd.scoring import score_sequences
    from megatron_gopd.sync import SyncConfig, WeightSyncer

    rank = dist.get_rank()
    os.environ["GOPD_CPU_NODE_ID"] = NODES[rank]
    os.environ["LOCAL_RANK"] = str(NODES[: rank + 1].count(NODES[rank]) - 1)
    role = build_role("student", ckpt, frozen=False)
    perturb(role, seed)
    cfg = SyncConfig(transport="tensor", bucket_bytes=64 * 1024)
    syncer = WeightSyncer(cfg, urls, tp_size_of=lambda u: server_info(u)["tp_size"])
    before = _shm_files()
    report = syncer.push(role, version=f"c{seed}")
    leaked = _shm_files() - before
    syncer.close()
    megatron = score_sequences(role, [SEQ])[0]
    if rank != 0:
        return leaked
    out = {"report": report, "leaked": leaked, "diffs": {}, "sources": {}}
    for u in urls:
        got = torch.tensor(RolloutClient([u]).score([SEQ])[0])
        out["diffs"][u] = (got - megatron).abs().max().item()
        out["sources"][u] = server_info(u)["gopd_last_tensor_update_sources"]
    return out


def test_each_server_tp_rank_gets_the_handle_of_its_own_gpu(colocated):
    d, urls = colocated
    outs = run_distributed(
        _colocated_push, 4, str(d / "mcore"), urls, 31, parallel=ParallelConfig(2, 1)
    )
    out = outs[0]
    from megatron_gopd.sync.wire import cpu_device_uuid

    def device(node, gpu):
        os.environ["GOPD_CPU_NODE_ID"] = node
        try:
            return cpu_device_uuid(gpu)
        finally:
            os.environ.pop("GOPD_CPU_NODE_ID")

    want = {
        urls[0]: [device("A", 0), device("A", 1)],
        urls[1]: [device("B", 0)],
        urls[2]: [device("B", 1)],
    }
    assert out["sources"] == want
    assert max(out["diffs"].values()) <= TOL, out["diffs"]
    assert out["report"].buckets > 1
    # every rank released its shared copies after each bucket (torch.cuda.ipc_collect on GPU)
    assert not out["leaked"] and not any(outs[1:])


def test_a_handle_opens_only_on_its_own_node_and_gpu():
    from megatron_gopd.sync.wire import cpu_device_uuid, share_cpu_tensor

    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    os.environ["GOPD_CPU_NODE_ID"] = "A"
    try:
        handle, close = share_cpu_tensor(t, 1)
        assert torch.equal(handle.open(cpu_device_uuid(1)), t)
        with pytest.raises(RuntimeError, match="each TP rank must read the handle of its own GPU"):
            handle.open(cpu_device_uuid(0))
        os.environ["GOPD_CPU_NODE_ID"] = "B"
        with pytest.raises(RuntimeError, match=r"Invalid device_uuid=.*another node"):
            handle.open(cpu_device_uuid(1))
        close()
    finally:
        os.environ.pop("GOPD_CPU_NODE_ID")
