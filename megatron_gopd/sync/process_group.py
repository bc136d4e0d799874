"""A process group with members outside the trainer's world: trainer rank 0 + the rollout servers.

``torch.distributed`` has no public API for a group that is not a subgroup of the default world,
so this follows SGLang's ``init_custom_process_group`` (``srt/utils/common.py``), which the server
side runs for ``/init_weights_update_group``: rendezvous on a TCP store, prefix the store with the
group name, build the backend with torch's group helper, and map group ranks to themselves so that
``broadcast(src=0, group=pg)`` means group rank 0. Used by the trainer (rank 0 of the group) and by
our CPU server (ranks ``rank_offset + tp_rank``), exactly as SGLang's workers do.

One deliberate difference: the TCP store is created directly, with group rank 0 as its master.
``rendezvous("tcp://...")`` honours ``TORCHELASTIC_USE_AGENT_STORE``, which torchrun sets in every
trainer process: rank 0 then connects as a *client* to a store that nobody serves, and both sides
wait forever.
"""

from __future__ import annotations

from datetime import timedelta

__all__ = ["init_custom_process_group", "routable_address", "tcp_url"]


def routable_address(urls) -> str:
    """This host's address as the servers at ``urls`` see it: the source address of the route
    toward each server (a UDP ``connect`` sends nothing). Loopback only when every server is on
    this host's loopback; a server elsewhere gets the address of the interface that reaches it,
    so a weight-update group never asks a remote server to dial 127.0.0.1 (IPv6 too)."""
    import ipaddress
    import socket
    from urllib.parse import urlparse

    from megatron_gopd.utils import GopdError

    loopback = None
    tried = []
    for url in urls:
        host = urlparse(url).hostname
        if not host:
            continue
        try:
            infos = socket.getaddrinfo(host, 80, type=socket.SOCK_DGRAM)
        except socket.gaierror as e:
            tried.append(f"{host}: {e.strerror}")
            continue
        for family, _, _, _, sockaddr in infos:
            if ipaddress.ip_address(sockaddr[0].split("%")[0]).is_loopback:
                loopback = loopback or sockaddr[0]
                continue
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                try:
                    s.connect(sockaddr)
                except OSError as e:
                    tried.append(f"{host}: {e.strerror}")
                    continue
                return s.getsockname()[0].split("%")[0]
    if loopback is not None:
        return loopback
    raise GopdError(
        "cannot tell which address of this host the rollout servers reach "
        f"({'; '.join(tried) or 'no server URL'}): set --weight-sync-master-addr"
    )


def tcp_url(host: str, port: int) -> str:
    """``tcp://HOST:PORT`` with an IPv6 address in brackets (``tcp://[fd00::1]:29500``); a host
    given in brackets already is kept as it is."""
    host = host.strip()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"tcp://{host}:{int(port)}"


def init_custom_process_group(
    *,
    backend: str,
    init_method: str,
    world_size: int,
    rank: int,
    group_name: str,
    timeout: timedelta | None = None,
):
    from urllib.parse import urlparse

    from torch.distributed import TCPStore
    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
        default_pg_timeout,
    )

    timeout = timeout or default_pg_timeout
    url = urlparse(init_method)
    if url.scheme != "tcp" or not url.hostname or not url.port:
        raise ValueError(f"init_method must be tcp://HOST:PORT, got {init_method!r}")
    store = TCPStore(
        url.hostname,
        url.port,
        world_size,
        is_master=rank == 0,
        timeout=timeout,
        wait_for_workers=False,
    )
    store = PrefixStore(group_name, store)
    pg, _ = _new_process_group_helper(
        world_size,
        rank,
        [],
        Backend(backend),
        store,
        group_name=group_name,
        backend_options=None,
        timeout=timeout,
    )
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg
