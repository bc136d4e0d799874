"""Rank 0's samples to the data-parallel replicas: each replica gets only its share, as tensors.

Global rank 0 talks to the rollout servers and holds every sample of a step. Broadcasting all of
them to every rank (a pickle of Python objects per rank) costs world_size x the whole batch in
transfer and memory; here each replica receives its own share once, in two collectives:

1. **scatter** over the data-parallel group of rank 0 (the first tensor- and pipeline-parallel
   rank of every replica): share ``r`` goes to replica ``r``;
2. **broadcast** within each replica's model-parallel group (its TP x PP ranks), which all need
   the same samples.

A share travels as one flat ``uint8`` tensor (:func:`encode`): an int64 header, the token ids, the
rollout log-probs, per-sample scalars, and the small per-sample dicts (domain, finish reason,
dataset fields such as ``answer``) as JSON. Shares differ in size, so their lengths are scattered
first and the buffers padded to the longest.
"""

from __future__ import annotations

import json

import torch
import torch.distributed as dist

from megatron_gopd.types import Sample

__all__ = ["decode", "encode", "scatter_samples"]

_HEADER = 6  # n, prompt tokens, response tokens, samples with rollout log-probs, json bytes, pad


def encode(samples: list[Sample], layout=None) -> torch.Tensor:
    """``samples`` (and a small JSON-able ``layout``, e.g. the share's micro-batches) -> one flat
    uint8 tensor (:func:`decode` reverses it exactly)."""
    n = len(samples)
    p_len = torch.tensor([len(s.prompt_ids) for s in samples], dtype=torch.int64)
    r_len = torch.tensor([len(s.response_ids) for s in samples], dtype=torch.int64)
    ids = torch.tensor(
        [t for s in samples for t in (*s.prompt_ids, *s.response_ids)], dtype=torch.int64
    )
    with_lp = [s.rollout_logprobs_T is not None for s in samples]
    lps = torch.tensor(
        [x for s in samples if s.rollout_logprobs_T is not None for x in s.rollout_logprobs_T],
        dtype=torch.float64,  # exactly the floats the server sent
    )
    scalars = torch.tensor(
        [[s.prompt_index, s.sample_index, int(w)] for s, w in zip(samples, with_lp, strict=True)],
        dtype=torch.int64,
    ).reshape(n, 3)
    meta = json.dumps(
        {"samples": [[s.domain, s.finish_reason, s.metadata] for s in samples], "layout": layout},
        separators=(",", ":"),
    ).encode()
    header = torch.tensor(
        [n, int(p_len.sum()), int(r_len.sum()), int(sum(with_lp)), len(meta), 0],
        dtype=torch.int64,
    )
    parts = [
        header.view(torch.uint8),
        p_len.view(torch.uint8),
        r_len.view(torch.uint8),
        scalars.reshape(-1).view(torch.uint8),
        ids.view(torch.uint8),
        lps.view(torch.uint8),
        torch.frombuffer(bytearray(meta), dtype=torch.uint8) if meta else _empty(),
    ]
    return torch.cat(parts)


def _empty() -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8)


def decode(buf: torch.Tensor) -> tuple[list[Sample], object]:
    """``(samples, layout)`` from :func:`encode`'s tensor."""
    buf = buf.cpu().contiguous()
    pos = 0

    def take(count: int, dtype: torch.dtype) -> torch.Tensor:
        nonlocal pos
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        out = buf[pos : pos + nbytes].clone().view(dtype)
        pos += nbytes
        return out

    n, n_p, n_r, n_lp, n_meta, _ = take(_HEADER, torch.int64).tolist()
    p_len = take(n, torch.int64).tolist()
    r_len = take(n, torch.int64).tolist()
    scalars = take(3 * n, torch.int64).view(n, 3).tolist()
    ids = take(n_p + n_r, torch.int64).tolist()
    n_lps = sum(r for r, (_, _, w) in zip(r_len, scalars, strict=True) if w)
    lps = take(n_lps, torch.float64).tolist()
    meta = json.loads(bytes(buf[pos : pos + n_meta].tolist()).decode())
    layout, meta = meta["layout"], meta["samples"]
    out, i, j = [], 0, 0
    for k in range(n):
        P, R = p_len[k], r_len[k]
        prompt_index, sample_index, with_lp = scalars[k]
        rollout_lps = None
        if with_lp:
            rollout_lps, j = lps[j : j + R], j + R
        domain, finish, fields = meta[k]
        out.append(
            Sample(
                prompt_ids=ids[i : i + P],
                response_ids=ids[i + P : i + P + R],
                domain=domain,
                prompt_index=prompt_index,
                sample_index=sample_index,
                finish_reason=finish,
                rollout_logprobs_T=rollout_lps,
                metadata=fields,
            )
        )
        i += P + R
    return out, layout


def scatter_samples(
    shares: list[list[Sample]] | None, layouts: list | None = None, *, device=None
) -> tuple[list[Sample], object]:
    """This rank's ``(share, layout)``. On global rank 0, ``shares[r]`` is data-parallel replica
    ``r``'s samples and ``layouts[r]`` its layout (None elsewhere). Collective over all ranks of
    the job; a world of one returns ``shares[0]``."""
    layouts = layouts if layouts is not None else [None] * len(shares or [])
    from megatron.core import parallel_state as ps

    from megatron_gopd import platform

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(shares[0]), layouts[0]
    device = device or platform.device()
    dp_group = ps.get_data_parallel_group()
    mp_group = ps.get_model_parallel_group()
    first_mp_rank = ps.get_tensor_model_parallel_rank() == 0 and (
        ps.get_pipeline_model_parallel_rank() == 0
    )
    mine = None
    if first_mp_rank:
        dp = ps.get_data_parallel_world_size()
        src = 0  # global rank 0 is data-parallel rank 0 of its group
        if dist.get_rank() == 0:
            if len(shares) != dp:
                raise ValueError(f"{len(shares)} shares for {dp} data-parallel replicas")
            bufs = [encode(s, lay) for s, lay in zip(shares, layouts, strict=True)]
            longest = max(b.numel() for b in bufs)
            sizes = [torch.tensor([b.numel()], dtype=torch.int64, device=device) for b in bufs]
            padded = [
                torch.cat([b, torch.zeros(longest - b.numel(), dtype=torch.uint8)]).to(device)
                for b in bufs
            ]
            lengths = [torch.tensor([longest], dtype=torch.int64, device=device)] * dp
        else:
            sizes = padded = lengths = None
        size = torch.zeros(1, dtype=torch.int64, device=device)
        longest = torch.zeros(1, dtype=torch.int64, device=device)
        dist.scatter(size, sizes, src=src, group=dp_group)
        dist.scatter(longest, lengths, src=src, group=dp_group)
        buf = torch.empty(int(longest.item()), dtype=torch.uint8, device=device)
        dist.scatter(buf, padded, src=src, group=dp_group)
        mine = buf[: int(size.item())]
    if dist.get_world_size(mp_group) > 1:
        first = dist.get_global_rank(mp_group, 0)
        n = torch.tensor(
            [mine.numel() if mine is not None else 0], dtype=torch.int64, device=device
        )
        dist.broadcast(n, src=first, group=mp_group)
        if mine is None:
            mine = torch.empty(int(n.item()), dtype=torch.uint8, device=device)
        dist.broadcast(mine, src=first, group=mp_group)
    return decode(mine)
