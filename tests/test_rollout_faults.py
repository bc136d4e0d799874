"""Rollout servers killed (SIGKILL) in the middle of a rollout.

One pool of two CPU servers goes through three phases:

1. server 0 dies mid-rollout: its unfinished requests finish on server 1, reported;
2. server 1 (the last one) dies mid-rollout: the launcher restarts it, the requests finish there;
3. the restarted server dies with no restart allowed: a clear :class:`RolloutError`.

The kill is triggered by progress (the client's live report), not by a timer; every phase checks
that each (prompt, sample) pair comes back exactly once.
"""

import threading

import pytest

from megatron_gopd.rollout import (
    ClientConfig,
    RolloutClient,
    RolloutError,
    RolloutPrompt,
    RolloutServers,
    SamplingConfig,
    ServerLaunchConfig,
)
from megatron_gopd.testing import make_tiny_hf_model

N_PROMPTS, N = 12, 2
SAMPLING = SamplingConfig(max_new_tokens=40, ignore_eos=True, seed=0)


def _prompts():
    return [RolloutPrompt([1 + i, 2, 3, 4, 5], prompt_index=i) for i in range(N_PROMPTS)]


def _kill_after(client, servers, index, responses):
    """Kill server ``index`` once the running rollout has ``responses`` answers back."""

    def run():
        while client.last_report.responses < responses:
            done.wait(0.01)
            if done.is_set():
                return
        servers.kill(index)
        killed.set()

    done, killed = threading.Event(), threading.Event()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return done, killed, t


def _complete(samples):
    return sorted((s.prompt_index, s.sample_index) for s in samples) == [
        (i, j) for i in range(N_PROMPTS) for j in range(N)
    ]


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    make_tiny_hf_model(d / "hf", "llama", seed=4)
    # seeded samples are reproducible (and server-independent) with deterministic inference only
    cfg = ServerLaunchConfig(
        backend="cpu", model_path=str(d / "hf"), num_servers=2, deterministic=True
    )
    with RolloutServers(cfg) as servers:
        yield servers


def test_server_killed_mid_rollout(pool):
    cfg = ClientConfig(progress=False, max_in_flight_per_server=2, backoff_s=0.05)
    reference = RolloutClient(pool.urls, cfg).sample(_prompts(), N, SAMPLING)
    ref = {(s.prompt_index, s.sample_index): s.response_ids for s in reference}

    # 1. server 0 dies: failover to server 1, no restart
    dead0 = pool.urls[0]
    client = RolloutClient(lambda: pool.urls, cfg)
    done, killed, t = _kill_after(client, pool, 0, responses=4)
    samples = client.sample(_prompts(), N, SAMPLING)
    done.set()
    t.join()
    report = client.last_report
    assert killed.is_set() and report.dead_servers == [dead0]
    assert report.failovers >= 1 and _complete(samples)
    # seeded samples do not depend on which server produced them
    assert {(s.prompt_index, s.sample_index): s.response_ids for s in samples} == ref

    # 2. the last live server dies: restarted by the launcher, requests finish on it
    dead1 = pool.urls[1]
    client = RolloutClient([dead1], cfg, replace_server=pool.replace)
    done, killed, t = _kill_after(client, pool, 1, responses=4)
    samples = client.sample(_prompts(), N, SAMPLING)
    done.set()
    t.join()
    report = client.last_report
    assert killed.is_set() and report.dead_servers == [dead1]
    assert len(report.restarted_servers) == 1 and report.restarted_servers[0] == pool.urls[1]
    assert _complete(samples)
    assert "restarted as" in report.summary()

    # 3. it dies again and nothing may restart it: a clear error, naming the server
    url = pool.urls[1]
    client = RolloutClient([url], cfg)
    done, killed, t = _kill_after(client, pool, 1, responses=2)
    with pytest.raises(RolloutError) as e:
        client.sample(_prompts(), N, SAMPLING)
    done.set()
    t.join()
    msg = str(e.value)
    assert "no rollout server left" in msg and url in msg and "requests unfinished" in msg
