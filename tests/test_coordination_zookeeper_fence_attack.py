"""An attack on the fence of a retaken ZooKeeper lock (keel.coordination.backends.zookeeper,
`_retake`): a release and the next acquire of the same key are one ``multi``, and the new
node's fence is the zxid kazoo reads off the multi's answer header (``client.last_zxid``, read
by a callback as the answer is read). Whatever else the same client has in flight, whichever
server of an ensemble the client talks to, and whether the multi's reply is lost or its delete
fails, the fence must be the granted node's czxid, and fences of the key must only grow.
Real ZooKeeper on 127.0.0.1 (tests/servers.py)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import pytest

import keel.coordination as kc
import servers
from coord_support import CutProxy, _zookeeper_ping
from keel.coordination.backends import zookeeper
from keel.errors import BackendUnavailable

pytestmark = pytest.mark.timeout(90)

Connect = Callable[..., Awaitable[kc.Coordinator]]


def _name(what: str) -> str:
    return f"fence-{secrets.token_hex(4)}-{what}"


def _backend(coord: kc.Coordinator) -> zookeeper.ZookeeperBackend:
    backend = coord.backend
    assert isinstance(backend, zookeeper.ZookeeperBackend)
    return backend


def _count_retakes(coord: kc.Coordinator) -> list[int]:
    """How many times this coordinator's backend took the multi path (`_retake`)."""
    backend = _backend(coord)
    retake = backend._retake
    count = [0]

    async def counted(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return await retake(*args, **kwargs)

    backend._retake = counted  # type: ignore[method-assign]
    return count


async def _czxid_of_granted(coord: kc.Coordinator, held: kc.HeldLock) -> int | None:
    """The czxid of the node this coordinator holds the lock by (None: no such node)."""
    backend = _backend(coord)
    node = backend._held[(held.key, held.granted_fence)]
    stat = await asyncio.to_thread(backend._client.exists, node)
    return None if stat is None else int(stat.czxid)


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    opened: list[kc.Coordinator] = []

    async def make(member: str, url: str | None = None) -> kc.Coordinator:
        coord = await kc.connect(url or servers.server_url("zookeeper"), member_id=member, ttl=10)
        opened.append(coord)
        return coord

    yield make
    for coord in reversed(opened):
        with contextlib.suppress(Exception):
            await coord.close()


async def _cycle(coord: kc.Coordinator, name: str, rounds: int, fences: list[int]) -> None:
    """Acquire and release ``name`` ``rounds`` times (each release deferred, so the next
    acquire is a retake), checking each fence against the granted node's czxid."""
    for _ in range(rounds):
        async with coord.lock(name, timeout=20) as held:
            assert await _czxid_of_granted(coord, held) == held.granted_fence
            assert not fences or held.granted_fence > fences[-1], (fences[-1], held.granted_fence)
            fences.append(held.granted_fence)


async def test_the_fence_holds_while_the_same_client_has_other_writes_in_flight(
    connect: Connect,
) -> None:
    """The existing czxid test's noise comes from another client, whose answers never touch
    this client's last_zxid. Here the same coordinator writes other keys concurrently, so the
    multi's answer is read among answers of other writes with other zxids, just before and
    just after it on the same connection."""
    a, b = await connect("a"), await connect("b")
    name = _name("same-client")
    retakes = _count_retakes(a)
    stop = asyncio.Event()

    async def elsewhere(i: int) -> None:  # the same client, other keys: writes around ours
        while not stop.is_set():
            async with a.lock(f"{name}-other-{i}", timeout=20):
                await asyncio.sleep(0)

    async def contend() -> None:
        while not stop.is_set():
            async with b.lock(name, timeout=20):
                await asyncio.sleep(0)

    fences: list[int] = []
    noise = [asyncio.create_task(elsewhere(i)) for i in range(4)]
    try:
        await _cycle(a, name, 60, fences)
        noise.append(asyncio.create_task(contend()))
        await _cycle(a, name, 60, fences)
    finally:
        stop.set()
        await asyncio.gather(*noise)
    assert len(fences) == 120
    assert retakes[0] >= 100, retakes  # the multi path, not the plain create


async def test_the_fence_holds_when_the_answer_is_read_before_the_loop_links_it(
    connect: Connect,
) -> None:
    """The multi's answer may be read (on kazoo's connection thread) before the event loop
    links its own callback to the result: kazoo's rawlink then runs every callback again,
    the zxid reader included, on the loop thread. If other answers were read meanwhile,
    last_zxid is theirs by then. Forced here: the multi is sent, its answer awaited, then
    another write's answer read on the same client, all before `_retake` links the result."""
    a = await connect("a")
    name = _name("early-answer")
    client = _backend(a)._client
    call = client._call
    forced = [0]
    noise = f"/{name}-noise"

    def answered_early(request: Any, async_object: Any) -> Any:
        sent = call(request, async_object)
        if isinstance(request, zookeeper._Multi):
            async_object.wait(10)  # the multi's answer is read
            client.create(noise, ephemeral=True, sequence=True)  # and a later write's
            forced[0] += 1
        return sent

    client._call = answered_early
    fences: list[int] = []
    await _cycle(a, name, 5, fences)
    assert forced[0] >= 4, forced


async def test_the_fence_holds_when_the_multis_reply_is_lost(connect: Connect) -> None:
    """The multi is applied but its reply lost and the connection cut: the retake fails with
    ConnectionLoss, the core tries again, and the node it finds by name (its czxid read by an
    exists) is the one granted, with its own czxid; no second node of ours is left."""
    parts = urlsplit(servers.server_url("zookeeper"))
    assert parts.hostname
    assert parts.port
    proxy = CutProxy(parts.hostname, parts.port, _zookeeper_ping)
    try:
        url = servers.server_url("zookeeper").replace(f":{parts.port}", f":{proxy.port}", 1)
        a = await connect("a", url)
        name = _name("lost-reply")
        retakes = _count_retakes(a)
        first = await a.acquire(name, timeout=20)
        fence = first.granted_fence
        key = first.key
        await first.release()  # deferred: the acquire below sends it in the multi
        proxy.lose_next_reply()
        again = await a.acquire(name, timeout=30)
        assert proxy.fired.is_set()
        assert retakes[0] == 1
        assert again.granted_fence > fence
        assert await _czxid_of_granted(a, again) == again.granted_fence
        backend = _backend(a)
        mine = zookeeper._attempts_of(await backend._children_of(zookeeper._dir(key)))
        assert len(mine) == 1, mine
        await again.release_confirmed()
    finally:
        proxy.close()


async def test_the_fence_holds_when_the_multis_delete_finds_no_node(connect: Connect) -> None:
    """Our node was deleted behind our back (a break, say): the multi fails on its delete,
    nothing is created by it, and the plain create that follows gives the fence."""
    a, b = await connect("a"), await connect("b")
    name = _name("gone")
    retakes = _count_retakes(a)
    held = await a.acquire(name, timeout=20)
    node = _backend(a)._held[(held.key, held.granted_fence)]
    await asyncio.to_thread(_backend(b)._client.delete, node)
    with contextlib.suppress(Exception):  # the lock is lost already
        await held.release()
    again = await a.acquire(name, timeout=20)
    assert retakes[0] == 1
    assert again.granted_fence > held.granted_fence
    assert await _czxid_of_granted(a, again) == again.granted_fence
    await again.release_confirmed()


def _ports(url: str) -> list[int]:
    return [int(h.rsplit(":", 1)[1]) for h in url.split("//", 1)[1].split("/", 1)[0].split(",")]


async def test_the_fence_holds_on_a_follower_of_an_ensemble(connect: Connect) -> None:
    """A follower forwards our multi to the leader and answers it once the commit reaches
    it, applying the leader's other writes (other sessions', on other servers) in between:
    the header of its answer must still carry our txn's zxid. The retaking client talks to a
    follower alone; other clients write the same key and others through the leader and the
    other follower."""
    url = servers.server_url("zookeeper-cluster")
    ports = _ports(url)
    leader = int(servers._run("leader", "zookeeper-cluster").stdout.strip())
    followers = [p for n, p in enumerate(ports, start=1) if n != leader]
    host = urlsplit(url.split(",")[0]).hostname

    def only(port: int) -> str:
        return f"zookeeper://{host}:{port}"

    a = await connect("a", only(followers[0]))
    b = await connect("b", only(ports[leader - 1]))
    c = await connect("c", only(followers[1]))
    name = _name("follower")
    retakes = _count_retakes(a)
    stop = asyncio.Event()

    async def elsewhere(coord: kc.Coordinator, i: int) -> None:
        while not stop.is_set():
            async with coord.lock(f"{name}-other-{i}", timeout=20):
                await asyncio.sleep(0)

    async def contend(coord: kc.Coordinator) -> None:
        while not stop.is_set():
            async with coord.lock(name, timeout=20):
                await asyncio.sleep(0)

    fences: list[int] = []
    noise = [asyncio.create_task(elsewhere(coord, i)) for i, coord in enumerate((a, b, c, b, c))]
    try:
        await _cycle(a, name, 60, fences)
        noise += [asyncio.create_task(contend(b)), asyncio.create_task(contend(c))]
        await _cycle(a, name, 60, fences)
    finally:
        stop.set()
        await asyncio.gather(*noise)
    assert retakes[0] >= 100, retakes


async def test_a_retake_refused_while_disconnected_fails_fast_and_is_retried(
    connect: Connect,
) -> None:
    """The connection is down as the retake is sent: its multi and listing are refused at once
    by `_fail_fast_while_disconnected`, which sets their results inside ``_call``, before
    `_retake` links them (kazoo then runs the links at once, on the loop thread). No hang,
    nothing left for asyncio to log as never retrieved (the conftest's teardown fails the test
    if one is), the release is not lost, and the acquire's retry (connected again) is granted
    with its node's czxid."""
    a = await connect("a")
    name = _name("refused")
    backend = _backend(a)
    client = backend._client
    retake = backend._retake
    refused: list[BaseException] = []

    async def disconnected(*args: Any, **kwargs: Any) -> Any:
        state, client.state = client.state, "SUSPENDED"
        try:
            return await retake(*args, **kwargs)
        except BaseException as exc:
            refused.append(exc)
            raise
        finally:
            client.state = state

    backend._retake = disconnected  # type: ignore[method-assign]
    held = await a.acquire(name, timeout=20)
    key, fence = held.key, held.granted_fence
    await held.release()  # deferred: the acquire below sends it in its multi
    with contextlib.suppress(BackendUnavailable):  # the same loop iteration: no wait_for
        again = await a.acquire(name, timeout=10)
        assert again.granted_fence > fence
        assert await _czxid_of_granted(a, again) == again.granted_fence
        await again.release_confirmed()
    assert refused, "the retake was not refused"
    await asyncio.sleep(0.1)  # every settle has run
    for _ in range(200):  # the old node is deleted (the release was sent again)
        mine = zookeeper._attempts_of(await backend._children_of(zookeeper._dir(key)))
        if not mine:
            break
        await asyncio.sleep(0.05)
    assert mine == [], mine
