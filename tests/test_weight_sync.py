"""Weight sync Megatron -> rollout server, checked by what the server computes afterwards.

The trainer's weights are perturbed (as an optimizer step would), pushed through one transport,
and then the server's prefill log-probs of a fixed sequence must equal the trainer's own Megatron
log-probs of it within 1e-4 (fp32), while they moved by far more than that. The reference is the
independent Megatron forward (``score_sequences``); the server runs the HF model. The sync check
reads rows back from the server and must find exactly what was sent. A negative control breaks
the gate/up merge of TP shards and must fail the parity check by orders of magnitude.
"""

import zlib

import pytest
import torch

from megatron_gopd.parallel import ParallelConfig
from megatron_gopd.testing import make_tiny_hf_model, run_distributed

TOL = 1e-4
SEQ = [3, 17, 42, 7, 99, 150, 12, 8, 201, 64, 5, 77, 180, 33, 2, 249, 120, 9]


def _convert(hf_dir, out_dir):
    from megatron_gopd.convert.checkpoint import convert_hf_to_megatron

    convert_hf_to_megatron(hf_dir, out_dir)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from megatron_gopd.rollout import RolloutServers, ServerLaunchConfig

    d = tmp_path_factory.mktemp("sync")
    make_tiny_hf_model(d / "hf", "qwen3", seed=5)
    run_distributed(_convert, 1, str(d / "hf"), str(d / "mcore"))
    with RolloutServers(ServerLaunchConfig(backend="cpu", model_path=str(d / "hf"))) as servers:
        yield d, servers


def perturb(role, seed):
    """An optimizer-like step: TP-sharded weights get rank-specific noise, replicated weights the
    same noise on every TP rank (they must stay identical)."""
    from megatron.core import parallel_state as ps

    from megatron_gopd.convert.mapping import tp_partition_dim
    from megatron_gopd.sync.gather import local_params

    tp_rank = ps.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, p in local_params(role):
            sharded = tp_partition_dim(name) is not None
            key = f"{seed}:{name}:{tp_rank if sharded else 0}".encode()
            g = torch.Generator().manual_seed(zlib.crc32(key))
            p.add_(torch.randn(p.shape, generator=g).to(p.device) * 0.05)


def _push_and_score(ckpt, url, transport, disk_dir, seed, bug=None):
    import torch.distributed as dist

    from megatron_gopd.models import build_role
    from megatron_gopd.rollout import RolloutClient
    from megatron_gopd.scoring import score_sequences
    from megatron_gopd.sync import SyncConfig, WeightSyncer

    if bug == "gate_up_not_deinterleaved":
        import megatron_gopd.sync.gather as gather

        gather.merge_tp_shards = lambda name, shards: torch.cat(
            shards, dim=gather.tp_partition_dim(name) or 0
        )
    client = RolloutClient([url])
    before = client.score([SEQ])[0] if dist.get_rank() == 0 else None
    role = build_role("student", ckpt, frozen=False)
    perturb(role, seed)
    cfg = SyncConfig(
        transport=transport, disk_dir=disk_dir, bucket_bytes=64 * 1024, check=bug is None
    )
    syncer = WeightSyncer(cfg, [url])
    report = syncer.push(role, version=f"step{seed}")
    syncer.close()
    megatron = score_sequences(role, [SEQ])[0]
    if dist.get_rank() != 0:
        return None
    after = client.score([SEQ])[0]
    if bug is None:  # the server reports the pushed version: rollouts can insist on it
        from megatron_gopd.rollout import RolloutPrompt, SamplingConfig

        client.sample(
            [RolloutPrompt(SEQ[:4])],
            1,
            SamplingConfig(max_new_tokens=2),
            weight_version=f"step{seed}",
        )
    return torch.tensor(before), torch.tensor(after), megatron, report


LAYOUTS = [
    (1, 1, "tensor"),
    (1, 1, "distributed"),
    (1, 1, "disk"),
    (2, 1, "tensor"),
    (2, 1, "distributed"),
    (2, 1, "disk"),
    (1, 2, "distributed"),
]


@pytest.mark.parametrize("tp,pp,transport", LAYOUTS, ids=[f"tp{a}pp{b}-{c}" for a, b, c in LAYOUTS])
def test_server_logprobs_equal_trainer_after_push(setup, tp, pp, transport):
    d, servers = setup
    seed = 10 * tp + pp + len(transport)
    out = run_distributed(
        _push_and_score,
        tp * pp,
        str(d / "mcore"),
        servers.urls[0],
        transport,
        str(d / "disk"),
        seed,
        parallel=ParallelConfig(tp, pp),
    )[0]
    before, after, megatron, report = out
    diff = (after - megatron).abs().max().item()
    moved = (before - megatron).abs().max().item()
    print(
        f"tp{tp} pp{pp} {transport}: |server - megatron| = {diff:.2e}, moved {moved:.2e}, {report.summary()}"
    )
    assert diff <= TOL
    assert moved > 100 * TOL, "the push did not change the server's model: the test proves nothing"
    assert report.buckets > 1  # bucketing exercised
    # a Qwen3 server has no /get_weights_by_name (SGLang implements it for Llama-family models):
    # the check is by checksum (see test_weight_sync_check_*)
    assert report.checked == ["checksums on 1 server(s)"] and not report.check_max_diff


def test_negative_control_broken_tp_merge_is_caught(setup):
    d, servers = setup
    before, after, megatron, _ = run_distributed(
        _push_and_score,
        2,
        str(d / "mcore"),
        servers.urls[0],
        "tensor",
        None,
        99,
        "gate_up_not_deinterleaved",
        parallel=ParallelConfig(2, 1),
    )[0]
    assert (after - megatron).abs().max().item() > 100 * TOL


def _push_expecting_failure(ckpt, url, transport, backend):
    from megatron_gopd.models import build_role
    from megatron_gopd.sync import SyncConfig, SyncError, WeightSyncer

    role = build_role("student", ckpt, frozen=False)
    cfg = SyncConfig(transport=transport, backend=backend, timeout_s=60, bucket_bytes=64 * 1024)
    syncer = WeightSyncer(cfg, [url])
    try:
        syncer.push(role, version="bad")
    except SyncError as e:
        return str(e)
    finally:
        syncer.close()
    return None


@pytest.mark.parametrize("transport,backend", [("tensor", None), ("distributed", "nccl")])
def test_failed_push_raises_on_every_rank(setup, transport, backend):
    """Rank 0's transport fails; the TP peer must not hang in the gather and gets the error."""
    from megatron_gopd.utils import free_port

    d, servers = setup
    url = f"http://127.0.0.1:{free_port()}" if transport == "tensor" else servers.urls[0]
    msgs = run_distributed(
        _push_expecting_failure,
        2,
        str(d / "mcore"),
        url,
        transport,
        backend,
        parallel=ParallelConfig(2, 1),
        timeout=120,
    )
    assert msgs[0] is not None and msgs[0] == msgs[1]
    assert "weight sync bad failed" in msgs[0]
    if transport == "tensor":
        assert url in msgs[0] and "unreachable" in msgs[0]


# ---------------------------------------------------------------------------------- SGLang versions


@pytest.fixture(scope="module")
def old_server(setup):
    """The same model served as SGLang 0.5.4 would: no weight-update sessions, no
    flattened_bucket broadcasts (the field is dropped: one broadcast per tensor), no
    /weights_checker."""
    from megatron_gopd.rollout import RolloutServers, ServerLaunchConfig

    d, _ = setup
    cfg = ServerLaunchConfig(
        backend="cpu", model_path=str(d / "hf"), extra_args=("--emulate-version", "0.5.4")
    )
    with RolloutServers(cfg) as servers:
        yield servers


def _push_to(ckpt, urls, seed, check=False, sabotage_second=False):
    import torch.distributed as dist

    from megatron_gopd.models import build_role
    from megatron_gopd.rollout import RolloutClient
    from megatron_gopd.rollout.launcher import server_info
    from megatron_gopd.rollout.protocol import SGLangFeatures
    from megatron_gopd.scoring import score_sequences
    from megatron_gopd.sync import SyncConfig, SyncError, WeightSyncer
    from megatron_gopd.sync import transports as T

    role = build_role("student", ckpt, frozen=False)
    cfg = SyncConfig(transport="distributed", bucket_bytes=64 * 1024, check=check, timeout_s=60)
    syncer = WeightSyncer(
        cfg, urls, features_of=lambda u: SGLangFeatures(server_info(u)["version"])
    )
    out = {"reports": [], "error": None}
    try:
        for k in range(2):
            perturb(role, seed + k)
            if sabotage_second and k == 1:
                T.DistributedTransport.send = lambda self, named, **kw: None
            out["reports"].append(syncer.push(role, version=f"v{seed}-{k}"))
    except SyncError as e:
        out["error"] = str(e)
    finally:
        syncer.close()
    megatron = score_sequences(role, [SEQ])[0]
    if dist.get_rank() != 0:
        return None
    out["diffs"] = [
        (torch.tensor(RolloutClient([u]).score([SEQ])[0]) - megatron).abs().max().item()
        for u in urls
    ]
    return out


def test_push_follows_each_servers_sglang_version(setup, old_server):
    """One push to a 0.5.23 server (weight-update session required) and a 0.5.4 server (no
    session, no flattened broadcast) at once: both end up with the trainer's weights."""
    d, servers = setup
    urls = [servers.urls[0], old_server.urls[0]]
    out = run_distributed(_push_to, 1, str(d / "mcore"), urls, 40, parallel=ParallelConfig())[0]
    assert out["error"] is None, out["error"]
    assert max(out["diffs"]) <= TOL, out["diffs"]


def test_weight_sync_check_refuses_what_it_cannot_verify(setup, old_server):
    """SGLang 0.5.4 serving Qwen3 has neither /weights_checker nor /get_weights_by_name."""
    d, _ = setup
    out = run_distributed(
        _push_to, 1, str(d / "mcore"), [old_server.urls[0]], 41, True, parallel=ParallelConfig()
    )[0]
    assert out["error"] and "--weight-sync-check cannot verify" in out["error"]
    assert old_server.urls[0] in out["error"] and "0.5.4" in out["error"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A Llama model, whose SGLang implementation serves /get_weights_by_name."""
    from megatron_gopd.rollout import RolloutServers, ServerLaunchConfig

    d = tmp_path_factory.mktemp("sync_llama")
    make_tiny_hf_model(d / "hf", "llama", seed=12)
    run_distributed(_convert, 1, str(d / "hf"), str(d / "mcore"))
    with RolloutServers(ServerLaunchConfig(backend="cpu", model_path=str(d / "hf"))) as s:
        yield d, s


def test_weight_sync_check_reads_rows_and_tracks_checksums(llama, setup):
    d, servers = llama
    url = servers.urls[0]
    out = run_distributed(
        _push_to, 1, str(d / "mcore"), [url], 42, True, parallel=ParallelConfig()
    )[0]
    assert out["error"] is None, out["error"]
    for r in out["reports"]:
        assert r.check_max_diff == {url: 0.0}  # the exact rows, as sent
        assert r.checked == ["exact rows on 1 server(s)", "checksums on 1 server(s)"]
    assert out["reports"][0].check_checksums != out["reports"][1].check_checksums
    # a second push that silently does not reach the model: the rows differ...
    out = run_distributed(
        _push_to, 1, str(d / "mcore"), [url], 43, True, True, parallel=ParallelConfig()
    )[0]
    assert out["error"] and "differing from the trainer's" in out["error"], out["error"]
    # ...and where rows cannot be read (Qwen3), the checksum did not move
    d, servers = setup
    out = run_distributed(
        _push_to, 1, str(d / "mcore"), servers.urls, 44, True, True, parallel=ParallelConfig()
    )[0]
    assert out["error"] and "still holds the previous weights" in out["error"], out["error"]
