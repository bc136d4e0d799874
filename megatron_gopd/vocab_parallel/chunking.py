"""Chunking shared by the vocab-parallel autograd functions.

Work on ``[tokens, V_local]`` logits goes through row chunks of at most ``chunk_elements`` values
(:func:`row_chunks`), in fp32 scratch buffers allocated once per call and reused by every chunk
(:class:`ChunkBuffers`); bf16 input is read chunk-wise into them (:func:`as_fp32`), fp32 input is
used in place. So the extra memory of a call is a few chunks, whatever the number of tokens.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["DEFAULT_CHUNK_ELEMENTS", "ChunkBuffers", "as_fp32", "group_rank_size", "row_chunks"]

DEFAULT_CHUNK_ELEMENTS = 1 << 26  # 64 Mi fp32 values = 256 MiB per temporary


def group_rank_size(group) -> tuple[int, int]:
    """``(rank, size)`` in ``group``; ``(0, 1)`` for None or without torch.distributed."""
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def row_chunks(n_rows: int, n_cols: int, chunk_elements: int):
    """``(start, stop)`` row ranges of at most ``chunk_elements // n_cols`` rows (at least one)."""
    step = max(1, chunk_elements // max(1, n_cols))
    for s in range(0, n_rows, step):
        yield s, min(n_rows, s + step)


class ChunkBuffers:
    """fp32 ``[rows_per_chunk, cols]`` scratch tensors, allocated once per call and reused by every
    chunk: a fresh allocation per chunk costs page faults on the host (~1.5x slower measured)."""

    def __init__(self, n_rows: int, n_cols: int, chunk_elements: int, device):
        self.rows = min(n_rows, max(1, chunk_elements // max(1, n_cols)))
        self.cols, self.device = n_cols, device
        self._bufs: dict[int, torch.Tensor] = {}

    def get(self, i: int, n: int) -> torch.Tensor:
        if i not in self._bufs:
            self._bufs[i] = torch.empty(
                (self.rows, self.cols), device=self.device, dtype=torch.float32
            )
        return self._bufs[i][:n]

    def mask(self, n: int) -> torch.Tensor:
        """A bool scratch tensor of the same shape."""
        if -1 not in self._bufs:
            self._bufs[-1] = torch.empty(
                (self.rows, self.cols), device=self.device, dtype=torch.bool
            )
        return self._bufs[-1][:n]


def as_fp32(x: torch.Tensor, bufs: ChunkBuffers, i: int) -> torch.Tensor:
    """``x`` itself when it is fp32 (a view: no copy), else its fp32 copy in buffer ``i``."""
    return x if x.dtype == torch.float32 else bufs.get(i, x.shape[0]).copy_(x)
