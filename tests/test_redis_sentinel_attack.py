"""Attacks on the Sentinel client (scripts/servers redis-sentinel): a sentinel listed first
that names the replica as the primary (a stale or partitioned sentinel's view, or a lying
one). The other two sentinels know the truth; the client must reach the primary through
them instead of asking the liar again on every reconnect."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

import keel.coordination as kc
from keel import _redis_client as rc
from keel import urls
from keel.errors import BackendUnavailable
from tests import servers

pytestmark = pytest.mark.timeout(60)


def _ports() -> tuple[str, list[int], int]:
    """The sentinel URL, the sentinels' ports, the replica's port."""
    url = servers.server_url("redis-sentinel")
    hosts = url.split("//", 1)[1].split("/", 1)[0]
    sentinels = [int(h.rsplit(":", 1)[1]) for h in hosts.split(",")]
    return url, sentinels, servers.sentinel_replica_port()


def _bulk(text: str) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(text), text.encode())


async def _serve_lies(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int):  # type: ignore[no-untyped-def]
    """A sentinel that names 127.0.0.1:`port` as the master ``keel`` (just enough RESP)."""
    master = [
        "name", "keel", "ip", "127.0.0.1", "port", str(port), "flags", "master",
        "num-slaves", "1", "num-other-sentinels", "2", "quorum", "2",
    ]  # fmt: skip
    resp3 = False
    try:
        while True:
            line = await reader.readline()
            if not line:
                return
            if not line.startswith(b"*"):
                continue
            args = []
            for _ in range(int(line[1:])):
                await reader.readline()  # $len
                args.append((await reader.readline()).strip().decode().upper())
            if args[:1] == ["HELLO"]:  # redis-py 8 speaks RESP3: a map, then maps
                resp3 = True
                hello = ["server", "redis", "version", "7.0.0", "proto", "3"]
                writer.write(b"%3\r\n" + b"".join(_bulk(x) for x in hello))
            elif args[:2] == ["SENTINEL", "MASTERS"]:
                head = b"%%%d\r\n" % (len(master) // 2) if resp3 else b"*%d\r\n" % len(master)
                writer.write(b"*1\r\n" + head + b"".join(_bulk(x) for x in master))
            elif args[:1] == ["PING"]:
                writer.write(b"+PONG\r\n")
            else:
                writer.write(b"+OK\r\n")
            await writer.drain()
    except (ConnectionError, ValueError):
        return
    finally:
        writer.close()


@pytest.fixture
async def liar_url() -> AsyncIterator[str]:
    url, sentinels, replica = _ports()
    server = await asyncio.start_server(lambda r, w: _serve_lies(r, w, replica), "127.0.0.1", 0)
    fake = server.sockets[0].getsockname()[1]
    hosts = ",".join(f"127.0.0.1:{p}" for p in [fake, *sentinels])
    yield url.replace(url.split("//", 1)[1].split("/", 1)[0], hosts)
    server.close()


async def test_a_sentinel_naming_the_replica_is_asked_last(liar_url: str) -> None:
    redis = rc.client(rc.target(urls.parse(liar_url)), socket_connect_timeout=2)
    try:
        started = time.monotonic()
        for _ in range(20):  # bounded: each try reconnects
            try:
                await redis.set("keel-attack-liar", b"1")
                break
            except Exception:
                await asyncio.sleep(0.1)
        else:
            pytest.fail("every write went to the replica the first sentinel named")
        assert time.monotonic() - started < 5
        await redis.delete("keel-attack-liar")
    finally:
        await rc.close(redis)


async def test_a_lock_is_taken_past_a_lying_sentinel(liar_url: str) -> None:
    coord = await kc.connect(liar_url, member_id="liar-a", ttl=10)
    try:
        for _ in range(20):
            try:
                held = await coord.try_acquire("keel-attack-liar")
                break
            except BackendUnavailable:
                await asyncio.sleep(0.1)
        else:
            pytest.fail("the lock never reached the primary past the lying sentinel")
        assert held is not None
        await held.release_confirmed()
    finally:
        await coord.close()


async def _hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A sentinel that accepts and never answers (a stopped process, a full backlog)."""
    try:
        await reader.read()
    finally:
        writer.close()


@pytest.mark.parametrize("first", ["hung", "down"])
async def test_a_hung_or_down_first_sentinel_costs_one_timeout(first: str) -> None:
    url, sentinels, _ = _ports()
    server = await asyncio.start_server(_hang, "127.0.0.1", 0)
    bad = server.sockets[0].getsockname()[1]
    if first == "down":
        server.close()
        await server.wait_closed()
    hosts = ",".join(f"127.0.0.1:{p}" for p in [bad, *sentinels])
    bad_url = url.replace(url.split("//", 1)[1].split("/", 1)[0], hosts)
    started = time.monotonic()
    coord = await kc.connect(bad_url + "?connect_timeout=3", member_id="hung-a", ttl=10)
    redis = rc.client(rc.target(urls.parse(bad_url)), socket_connect_timeout=1)
    try:
        # Each client meets the bad sentinel once, for one timeout (before the fix, redis-py's
        # default retry made it about 15 s a connect, and connect_timeout ran out).
        held = await coord.try_acquire("keel-attack-hung")
        assert held is not None
        await held.release_confirmed()
        await redis.set("keel-attack-hung", b"1")
        assert time.monotonic() - started < 12
        # Later connects ask the sentinel that answered first: no timeout again.
        await redis.connection_pool.disconnect()
        started = time.monotonic()
        await redis.set("keel-attack-hung", b"2")
        assert time.monotonic() - started < 0.5
        await redis.delete("keel-attack-hung")
    finally:
        await rc.close(redis)
        await coord.close()
        server.close()
