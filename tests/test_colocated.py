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
    """This process's stand-ins for CUDA IPC handles (named by the pid that made them): the other
    ranks free theirs on their own schedule, and other jobs on the host make their own."""
    return {f for f in os.listdir("/dev/shm") if f.startswith(f"gopd-ipc-{os.getpid()}-")}


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


# ---------------------------------------------------------------------------------- trainer memory


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(-1).view(torch.uint8).clone()


def _offload_round_trip(ckpt):
    """A student after a real optimizer step (bf16, distributed optimizer over DP 2: fp32 main
    params and Adam moments sharded), a frozen teacher: offload must free every storage they
    hold, and onload must give back every byte, after which training continues identically."""
    from megatron_gopd.models import build_role
    from megatron_gopd.trainer.offload import TrainOffloader, trainer_tensors
    from megatron_gopd.trainer.update import OptimConfig, build_optimizer

    def setup():
        student = build_role("student", ckpt, frozen=False, params_dtype=torch.bfloat16)
        teacher = build_role("teacher", ckpt, frozen=True, params_dtype=torch.bfloat16)
        opt = build_optimizer(
            student.model,
            OptimConfig(lr=1e-2, use_distributed_optimizer=True),
            train_iters=10,
            bf16=True,
        )
        return student, teacher, opt

    def step(student, opt, seed):
        g = torch.Generator().manual_seed(seed)
        for p in student.model.parameters():
            p.main_grad.copy_(torch.randn(p.shape, generator=g) * 1e-2)
        opt.optimizer.step()

    student, teacher, opt = setup()
    step(student, opt, 1)  # Adam state exists
    tensors = list(trainer_tensors(student, opt, [teacher]))
    before = [_bits(t) for t in tensors]
    kinds = {
        "main_grad": sum(1 for p in student.model.parameters() if hasattr(p, "main_grad")),
        "adam": sum(
            len(s)
            for o in getattr(opt.optimizer, "chained_optimizers", [opt.optimizer])
            for s in o.optimizer.state.values()
        ),
    }
    off = TrainOffloader(student, opt, [teacher])
    resident = off.resident_bytes()
    freed = off.offload()
    after_offload = off.resident_bytes()
    released = all(t.untyped_storage().nbytes() == 0 for t in tensors if t.dim())
    off.onload()
    exact = all(torch.equal(b, _bits(t)) for b, t in zip(before, tensors, strict=True))
    # a second round trip reuses the host buffers
    pool_before = sum(len(v) for v in off._pool.values())
    off.offload()
    off.onload()
    pool_after = sum(len(v) for v in off._pool.values())
    # training goes on as if nothing happened: same step as a run that never offloaded
    step(student, opt, 2)
    twin, _, twin_opt = setup()
    step(twin, twin_opt, 1)
    step(twin, twin_opt, 2)
    same = all(
        torch.equal(a, b)
        for a, b in zip(student.model.parameters(), twin.model.parameters(), strict=True)
    )
    return dict(
        resident=resident,
        freed=freed,
        after_offload=after_offload,
        released=released,
        exact=exact,
        kinds=kinds,
        pool=(pool_before, pool_after),
        same=same,
    )


def test_trainer_offload_frees_everything_and_onload_is_bit_exact(colocated):
    d, _ = colocated
    for out in run_distributed(_offload_round_trip, 2, str(d / "mcore"), parallel=ParallelConfig()):
        assert out["kinds"]["main_grad"] > 0 and out["kinds"]["adam"] > 0, out["kinds"]
        assert out["freed"] == out["resident"] > 0 and out["after_offload"] == 0
        assert out["released"], "a storage kept its memory"
        assert out["exact"], "onload changed a byte"
        assert out["pool"][0] == out["pool"][1] > 0
        assert out["same"], "training after a round trip differs from training without"


# ---------------------------------------------------------------------------------- transports


BASE = ["--student-load", "s", "--teacher-load", "t", "--prompt-data", "p"]


@pytest.mark.parametrize(
    "extra,transport",
    [
        (["--rollout-colocate"], "tensor"),
        ([], "distributed"),
        (["--rollout-colocate", "--weight-sync", "disk"], "disk"),
        (["--weight-sync", "disk"], "disk"),
    ],
)
def test_colocated_servers_take_cuda_ipc_and_the_others_nccl(extra, transport):
    from megatron_gopd.trainer.config import build_config, parse_args

    cfg = build_config(parse_args([*BASE, *extra]))
    assert cfg.rollout.weight_sync_transport == transport


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--rollout-colocate", "--weight-sync", "distributed"], "NCCL refuses two ranks"),
        (["--weight-sync", "tensor"], "add --rollout-colocate"),
    ],
)
def test_an_impossible_transport_is_an_error_before_anything_is_built(extra, message):
    from megatron_gopd.trainer.config import build_config, parse_args
    from megatron_gopd.utils import GopdError

    with pytest.raises(GopdError, match=message):
        build_config(parse_args([*BASE, *extra]))


# ---------------------------------------------------------------------------------- end to end


def _colocated_training(args):
    """gopd-train with spies: during every rollout, how much trainer memory is resident and what
    the servers hold released."""
    from megatron_gopd.rollout.protocol import http_json
    from megatron_gopd.train import train
    from megatron_gopd.trainer import rollout_side as R
    from megatron_gopd.trainer.config import build_config, parse_args

    seen = []
    orig = R.RolloutSide.sample

    def spy(self, prompts, **kw):
        offloader, auth = getattr(self, "offloader", None), getattr(self, "auth", None)
        seen.append(
            {
                "resident": offloader.resident_bytes() if offloader else None,
                "released": [
                    http_json(u + "/server_info", auth=auth)[1]["gopd_memory_released"]
                    for u in self.servers.urls
                ],
                "auth": bool(auth),
            }
        )
        return orig(self, prompts, **kw)

    R.RolloutSide.sample = spy
    train(build_config(parse_args(args)))
    return seen


def test_colocated_training_gives_the_gpus_back_and_forth(tmp_path):
    """Two trainer ranks (TP 2) and two CPU servers launched on their "GPUs" 0 and 1, with
    SGLang's memory saver: the weights go over the per-GPU IPC path, the trainer is offloaded
    during every rollout while the servers hold everything, and rollouts match the trainer."""
    from tests.e2e_utils import make_world, read_metrics, train_args

    world = make_world(tmp_path / "world")
    save = tmp_path / "run"
    args = train_args(world, save, "--teacher-load", str(world["teacher"]), steps=2)
    args += ["--rollout-colocate", "--rollout-num-servers", "2", "--eval-interval", "2"]
    seen = run_distributed(_colocated_training, 2, args, timeout=900)[0]
    assert len(seen) == 1 + 2 + 1  # eval at step 0, two rollouts, eval at the end
    for s in seen:
        assert s["resident"] == 0, "the trainer kept GPU memory during a rollout"
        assert s["released"] == [[], []], "a server sampled with released memory"
        assert s["auth"]
    metrics = {m["step"]: m for m in read_metrics(save)}
    assert all(metrics[k]["train/rollout_abs_log_ratio"] < 1e-4 for k in (1, 2))
