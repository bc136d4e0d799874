"""Rank 0's samples reach each data-parallel replica as its share only, bit for bit."""

from __future__ import annotations

import random

import pytest

from megatron_gopd.parallel import ParallelConfig
from megatron_gopd.testing import run_distributed
from megatron_gopd.trainer import distribute
from megatron_gopd.types import Sample


def _samples(n, seed):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        R = rng.randint(0, 9)
        out.append(
            Sample(
                prompt_ids=[rng.randint(0, 50000) for _ in range(rng.randint(1, 7))],
                response_ids=[rng.randint(0, 50000) for _ in range(R)],
                domain=rng.choice(["math", "code", "ünïcode"]),
                prompt_index=rng.randint(0, 10**6),
                sample_index=i % 4,
                finish_reason=rng.choice(["stop", "length", "abort"]),
                rollout_logprobs_T=None if i % 3 == 0 else [-rng.random() * 5 for _ in range(R)],
                metadata={"answer": str(i), "tests": [1, 2.5, None]} if i % 2 else {},
            )
        )
    return out


def test_encode_decode_is_exact():
    s = _samples(11, 0)
    assert distribute.decode(distribute.encode(s, [[3, 8]])) == (s, [[3, 8]])
    assert distribute.decode(distribute.encode([])) == ([], None)


def _receive(dp):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    shares = layouts = None
    if dist.get_rank() == 0:
        all_ = _samples(13, 1)
        shares = [all_[r::dp] for r in range(dp)]
        layouts = [[r, "x"] for r in range(dp)]
    return ps.get_data_parallel_rank(), distribute.scatter_samples(shares, layouts)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2-dp2", "pp2-dp2"])
def test_each_replica_gets_its_share(tp, pp):
    dp = 2
    out = run_distributed(_receive, tp * pp * dp, dp, parallel=ParallelConfig(tp, pp))
    want = _samples(13, 1)
    for dp_rank, (got, layout) in out:
        assert got == want[dp_rank::dp] and layout == [dp_rank, "x"]
