"""Rollouts through SGLang's native HTTP API.

* :mod:`~megatron_gopd.rollout.protocol`: the schema (pinned SGLang version), request checks.
* :mod:`~megatron_gopd.rollout.client`: :class:`RolloutClient` (sampling, prefill scoring,
  failover, admin calls) producing :class:`~megatron_gopd.types.Sample` objects.
* :mod:`~megatron_gopd.rollout.launcher`: :class:`RolloutServers` (launch SGLang or the CPU
  server, attach to URLs, optional router, clean stop).
* :mod:`~megatron_gopd.rollout.cpu_server`: the CPU stand-in speaking the same API.

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
    "ServerLaunchConfig",
]
