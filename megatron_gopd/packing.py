"""Which sequences go together: token-budget micro-batches and data-parallel balance.

Compute grows with tokens, not sequences, and rollout lengths are long-tailed (a few hundred to
16k tokens), so a fixed number of rows per micro-batch padded to the longest one spends most of
the compute on padding. Here sequences are *packed*: each micro-batch is a list of whole sequences
whose lengths sum to at most ``budget`` tokens (``--max-tokens-per-microbatch``), laid end to end
(THD: megatron-core's ``PackedSeqParams`` with ``cu_seqlens``; attention never crosses a boundary).

Two constraints shape the plan:

* **Balance across data-parallel ranks.** Every DP rank waits for the slowest at the gradient
  all-reduce, so each should get about the same number of *tokens*. :func:`balanced_partition`
  splits the sequences into ``k`` parts of near-equal token sums with the Karmarkar-Karp largest
  differencing method (verl and slime do the same), which beats greedy assignment on long-tailed
  lengths.
* **The same number of micro-batches on every rank.** The pipeline schedule runs
  ``num_microbatches`` steps in lock step with the other ranks' collectives.
  :func:`plan` finds the smallest ``m`` for which every rank's share splits into ``m``
  micro-batches within the budget (balanced again, by Karmarkar-Karp), which is also the most even
  split of each rank's work over its micro-batches.

The loss does not depend on the plan: megatron-core divides the gradient by the global token count
(``calculate_per_token_loss``), so any grouping gives the exact token mean of the whole batch.
Pure Python, no torch: the planner runs before any tensor is built.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence

from megatron_gopd.utils import GopdError

__all__ = ["balanced_partition", "first_fit_decreasing", "padding_efficiency", "plan"]


def first_fit_decreasing(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Bins of indices whose lengths sum to at most ``budget``: each sequence, longest first, goes
    into the first bin with room (at most 11/9 OPT + 6/9 bins)."""
    _check(lengths, budget)
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, r in enumerate(room):
            if lengths[i] <= r:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(budget - lengths[i])
    return bins


def balanced_partition(lengths: Sequence[int], k: int) -> list[list[int]]:
    """Split the indices into ``k`` parts whose length sums are as equal as the Karmarkar-Karp
    largest differencing method makes them (parts may be empty when there are fewer sequences).

    Each sequence starts as a k-tuple of part sums with itself in one part; the two tuples with the
    largest spread are merged repeatedly, pairing the first's largest part with the second's
    smallest, until one tuple (the partition) is left. Deterministic: ties break by index."""
    if k < 1:
        raise ValueError("k must be >= 1")
    counter = itertools.count()
    heap = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        parts = [(lengths[i], [i])] + [(0, []) for _ in range(k - 1)]
        heapq.heappush(heap, (-lengths[i], next(counter), parts))
    if not heap:
        return [[] for _ in range(k)]
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        a = sorted(a, key=lambda p: -p[0])  # largest first
        b = sorted(b, key=lambda p: p[0])  # smallest first
        merged = [(x[0] + y[0], x[1] + y[1]) for x, y in zip(a, b, strict=True)]
        merged.sort(key=lambda p: -p[0])
        spread = merged[0][0] - merged[-1][0]
        heapq.heappush(heap, (-spread, next(counter), merged))
    parts = heap[0][2]
    out = [sorted(idx) for _, idx in parts]
    return sorted(out, key=lambda idx: (-sum(lengths[i] for i in idx), idx))


def plan(lengths: Sequence[int], budget: int, ranks: int) -> list[list[list[int]]]:
    """``plan[r][m]``: the indices of the sequences of data-parallel rank ``r``'s micro-batch
    ``m``. Every rank gets the same number of micro-batches (some possibly empty, when there are
    fewer sequences than ranks); each micro-batch's lengths sum to at most ``budget``; the ranks'
    token totals are balanced.

    Raises a :class:`GopdError` naming the numbers when a sequence alone exceeds the budget."""
    _check(lengths, budget)
    shares = balanced_partition(lengths, ranks)
    # a lower bound on the micro-batches the busiest rank needs; raised until every share fits
    m = max(1, max(-(-sum(lengths[i] for i in s) // budget) for s in shares))
    while True:
        out = [_split(lengths, share, m, budget) for share in shares]
        if all(o is not None for o in out):
            return out
        m += 1


def _split(lengths, share, m, budget):
    """``share`` in exactly ``m`` micro-batches within ``budget``, or None."""
    if not share:
        return [[] for _ in range(m)]
    parts = balanced_partition([lengths[i] for i in share], m)
    if all(sum(lengths[share[j]] for j in p) <= budget for p in parts):
        return [[share[j] for j in p] for p in parts]
    ffd = first_fit_decreasing([lengths[i] for i in share], budget)
    if len(ffd) > m:
        return None
    return [[share[j] for j in b] for b in ffd] + [[] for _ in range(m - len(ffd))]


def padding_efficiency(lengths: Sequence[int], processed: int) -> float:
    """Real tokens / processed tokens (1.0: no compute spent on padding)."""
    return sum(lengths) / processed if processed else 1.0


def _check(lengths: Sequence[int], budget: int) -> None:
    if budget < 1:
        raise GopdError(f"the token budget per micro-batch must be >= 1, got {budget}")
    longest = max(lengths, default=0)
    if longest > budget:
        raise GopdError(
            f"a sequence of {longest} tokens does not fit --max-tokens-per-microbatch {budget}: "
            f"raise it to at least the longest prompt + response "
            f"(--max-prompt-len + --max-response-len)"
        )
