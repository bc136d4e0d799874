"""Rollouts through SGLang's native HTTP API: the client side only.

* :mod:`~megatron_gopd.rollout.protocol`: the schema (pinned SGLang version), request checks.
* :mod:`~megatron_gopd.rollout.client`: :class:`RolloutClient` (sampling, prefill scoring,
  failover, admin calls) producing :class:`~megatron_gopd.types.Sample` objects.
* :mod:`~megatron_gopd.rollout.launcher`: :class:`RolloutServers` (launch SGLang or the CPU
  server, attach to URLs, optional router, clean stop).

The CPU stand-in that speaks the same API is :mod:`megatron_gopd.cpu_server`, a package of its own
(it depends on this one and on :mod:`megatron_gopd.sync`, never the other way round).

Importing this package imports neither aiohttp nor transformers nor megatron.
"""

from megatron_gopd.rollout.client import (
    ClientConfig,
    RolloutClient,
    RolloutError,
    RolloutPrompt,
    RolloutReport,
)
from megatron_gopd.rollout.launcher import RolloutServers, ServerLaunchConfig
from megatron_gopd.rollout.protocol import (
    SGLANG_SCHEMA_VERSION,
    ProtocolError,
    RequestError,
    SamplingConfig,
    ServerAuth,
)

__all__ = [
    "SGLANG_SCHEMA_VERSION",
    "ClientConfig",
    "ProtocolError",
    "RequestError",
    "RolloutClient",
    "RolloutError",
    "RolloutPrompt",
    "RolloutReport",
    "RolloutServers",
    "SamplingConfig",
    "ServerAuth",
    "ServerLaunchConfig",
]
