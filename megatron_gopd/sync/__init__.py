"""Weight sync Megatron -> rollout servers, through the one HF name mapping.

:class:`WeightSyncer` (``push`` after every optimizer step, collective over trainer ranks) with the
transports of :mod:`~megatron_gopd.sync.transports`: ``tensor`` (colocated), ``distributed``
(NCCL / gloo broadcast) and ``disk`` (HF export + reload).
"""

from megatron_gopd.sync.syncer import SyncConfig, SyncError, SyncReport, WeightSyncer

__all__ = ["SyncConfig", "SyncError", "SyncReport", "WeightSyncer"]
