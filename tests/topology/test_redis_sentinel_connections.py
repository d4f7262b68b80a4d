"""Connections to the sentinels across a failover, on both Sentinel clusters (plaintext and
TLS): none is left behind.

After the primary is killed every connection of the transport reconnects at once, each asking
the sentinels; redis-py's ``discover_master`` then lost a sentinel from the manager's list
(see `keel._redis_client._Sentinels`), and with it a client whose TLS connection nobody
closed: one leaked per failover. Asserted, with this process's own sockets
(/proc/self/fd against /proc/net/tcp): after the failover the manager still lists each
sentinel once, and every socket open to a sentinel belongs to a connection in one of their
pools (no orphan); after close, none is open. An orphan collected by the garbage collector
instead fails the test too (its ResourceWarning: warnings are errors here).
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
import uuid
from typing import Any

import pytest
from bench._cluster import _whole, servers

from keel import errors
from keel.messaging import RPCClient, RPCServer, Target, connect
from tests.topology.conftest import cluster_url
from tests.topology.tls_checks import Echo, lock_over

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

FAILOVER_BOUND_S = 30.0
TOPICS = 3  # consumers that reconnect together, asking the sentinels at once


def _sentinel_ports(url: str) -> set[int]:
    hosts = url.split("//", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
    return {int(h.rsplit(":", 1)[1]) for h in hosts.split(",")}


def _sockets_to(ports: set[int]) -> int:
    """This process's TCP sockets whose peer is one of ``ports`` (any state)."""
    ours = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            ours.add(link[len("socket:[") : -1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[2].rsplit(":", 1)[1], 16) in ports and fields[9] in ours:
                count += 1
    return count


def _pooled(manager: Any) -> int:
    """Connected connections in the pools of the sentinel clients the manager lists."""
    return sum(
        1
        for sentinel in manager.sentinels
        for connection in (
            *sentinel.connection_pool._available_connections,
            *sentinel.connection_pool._in_use_connections,
        )
        if connection.is_connected
    )


async def _orphans(ports: set[int], manager: Any) -> int:
    """Sockets to the sentinels that no listed sentinel's pool holds; 0 once settled (a
    reconnect in flight may hold a socket not yet counted as connected for a moment)."""
    extra = 0
    for _ in range(20):
        extra = _sockets_to(ports) - _pooled(manager)
        if extra == 0:
            return 0
        await asyncio.sleep(0.1)
    return extra


async def _call_until(client: RPCClient, killed: float) -> float:
    while time.monotonic() - killed < FAILOVER_BOUND_S:
        try:
            if await client.call(None, "echo", text="after") == "after":
                return time.monotonic()
        except errors.KeelError as exc:
            assert exc.retryable, exc
            await asyncio.sleep(0.2)
    raise AssertionError(f"no call succeeded within {FAILOVER_BOUND_S}s of the kill")


@pytest.mark.parametrize("cluster", ["redis-sentinel", "redis-sentinel-tls"])
async def test_no_sentinel_connection_outlives_a_failover_or_close(cluster: str) -> None:
    url = cluster_url(cluster)
    await _whole(cluster, 60)  # a node revived by the test before may still be resyncing
    ports = _sentinel_ports(url)
    gc.collect()
    before = _sockets_to(ports)
    node = int(await asyncio.to_thread(servers, "leader", cluster))
    transport = await connect(url)
    manager = transport.redis.connection_pool.sentinel_manager  # type: ignore[attr-defined]
    made = sorted(id(s) for s in manager.sentinels)
    topics = [f"sconn-{uuid.uuid4().hex[:8]}" for _ in range(TOPICS)]
    try:
        async with RPCServer(transport, Target(topics[0]), [Echo()]):
            extra = [RPCServer(transport, Target(t), [Echo()]) for t in topics[1:]]
            for server in extra:
                await server.start()
            try:
                clients = [RPCClient(transport, Target(t), timeout=5) for t in topics]
                for client in clients:
                    assert await client.call(None, "echo", text="before") == "before"
                assert await _orphans(ports, manager) == 0
                killed = time.monotonic()
                await asyncio.to_thread(servers, "kill", cluster, str(node))
                try:
                    for client in clients:
                        await _call_until(client, killed)
                    assert await asyncio.wait_for(lock_over(url), 30) > 0
                    # Every sentinel still listed, once: none dropped with its connections.
                    assert sorted(id(s) for s in manager.sentinels) == made
                    assert await _orphans(ports, manager) == 0
                    gc.collect()  # an orphan's ResourceWarning fails the test here
                    assert await _orphans(ports, manager) == 0
                finally:
                    await asyncio.to_thread(servers, "revive", cluster, str(node))
                    await _whole(cluster, 60)  # whole again for the next test
            finally:
                for server in extra:
                    await server.stop()
    finally:
        await transport.close()
    gc.collect()
    assert _sockets_to(ports) == before  # the transport's and the lock's all closed
