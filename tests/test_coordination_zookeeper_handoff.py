"""ZooKeeper's hand-off (keel.coordination.backends.zookeeper, `_Turn`): a waiter two places
back lists the key while the one ahead of it holds, so that the release reaches it knowing it
is next, with no listing between the release and its grant; and only a deletion of the node
ahead frees a place, not a change of its data (a holder's `update`)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

import keel.coordination as kc
import servers
from keel.coordination.backends import zookeeper

pytestmark = pytest.mark.timeout(60)

Connect = Callable[[str], Awaitable[kc.Coordinator]]


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    url = servers.server_url("zookeeper")
    opened: list[kc.Coordinator] = []

    async def make(member: str) -> kc.Coordinator:
        coord = await kc.connect(url, member_id=member, ttl=10)
        opened.append(coord)
        return coord

    yield make
    for coord in reversed(opened):
        await coord.close()


def _client(coord: kc.Coordinator) -> Any:
    backend = coord.backend
    assert isinstance(backend, zookeeper.ZookeeperBackend)
    return backend._client


def _record_listings(coord: kc.Coordinator) -> tuple[list[float], list[float]]:
    """When this coordinator's kazoo client asks for a listing, and when the answers come."""
    client = _client(coord)
    asked: list[float] = []
    answered: list[float] = []
    listing = client.get_children_async

    def recorded(*args: Any, **kwargs: Any) -> Any:
        asked.append(time.monotonic())
        result = listing(*args, **kwargs)
        result.rawlink(lambda _: answered.append(time.monotonic()))
        return result

    client.get_children_async = recorded
    return asked, answered


async def _until(condition: Callable[[], bool], what: str, seconds: float = 10) -> None:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not within {seconds}s: {what}")


async def _nodes(coord: kc.Coordinator, key: str) -> list[str]:
    backend = coord.backend
    assert isinstance(backend, zookeeper.ZookeeperBackend)
    return zookeeper._attempts_of(await backend._children_of(zookeeper._dir(key)))


async def test_each_waiter_is_granted_with_no_listing_after_its_predecessors_release(
    connect: Connect,
) -> None:
    coords = [await connect(m) for m in "abcd"]
    name = f"handoff-{uuid.uuid4().hex[:8]}"
    held = await coords[0].acquire(name)
    fences = [held.granted_fence]
    key = held.key
    waiting = []
    for place, coord in enumerate(coords[1:], start=2):  # queued in this order
        waiting.append(asyncio.create_task(coord.acquire(name, timeout=20)))
        for _ in range(1000):
            if len(await _nodes(coords[0], key)) == place:
                break
            await asyncio.sleep(0.01)
    nodes = sorted(await _nodes(coords[0], key), key=zookeeper._seq)
    assert len(nodes) == 4, nodes
    for coord, predecessor in zip(coords[1:], nodes, strict=False):
        watchers = _client(coord)._data_watchers
        await _until(
            lambda w=watchers, n=predecessor: any(p.endswith(n) and f for p, f in list(w.items())),
            "each waiter watches its predecessor",
        )
    listings = [_record_listings(coord) for coord in coords[1:]]

    for (asked, _), task in zip(listings, waiting, strict=True):
        released = time.monotonic()
        await held.release()
        held = await asyncio.wait_for(task, 10)
        granted = time.monotonic()
        late = [t for t in asked if released <= t <= granted]
        assert late == [], "a waiter listed the key between its predecessor's release and its grant"
        fences.append(held.granted_fence)
        # D lists the key once B is gone (A's deletion it did not watch), while C holds.
        await _until(lambda: all(len(a) == len(b) for a, b in listings), "listings answered")
        await asyncio.sleep(0.05)
    await held.release()
    assert fences == sorted(set(fences)), fences
    assert len(listings[2][0]) >= 1  # D's, while C held


async def test_a_holders_data_change_does_not_hand_its_lock_on(connect: Connect) -> None:
    # A second incarnation of a member waits behind the first's membership; the first's
    # metadata update changes its node's data, which fires the waiter's watch on it.
    group = f"g-{uuid.uuid4().hex[:8]}"
    first, second = await connect("m"), await connect("m")
    mine = first.group(group)
    membership = await mine.join(b"one")
    joining = asyncio.create_task(second.group(group).join(b"two", timeout=20))
    for _ in range(1000):
        if len(await _nodes(first, membership.key)) == 2:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)  # the waiter's watch is set
    await mine.update(b"changed")
    await asyncio.sleep(0.5)
    assert not joining.done(), "the waiter joined while the first membership was live"
    membership.check()
    await membership.release()
    joined = await asyncio.wait_for(joining, 10)
    assert joined.granted_fence > membership.granted_fence
    await joined.release()


async def test_a_retaken_locks_fence_is_its_nodes_czxid(connect: Connect) -> None:
    """A release and the next acquire of the same key are one multi (`_retake`), whose
    answer names the new node but not its stat: the fence is the zxid of the multi's answer
    header. It must be the node's czxid, every time, whether the key is free or contended and
    while other keys are written (whose zxids come in between)."""
    a, b = await connect("a"), await connect("b")
    client = _client(a)
    name = f"czxid-{uuid.uuid4().hex[:8]}"
    stop = asyncio.Event()

    async def elsewhere() -> None:  # writes of other keys between ours
        while not stop.is_set():
            async with b.lock(f"{name}-other"):
                pass

    async def contend() -> None:
        while not stop.is_set():
            async with b.lock(name):
                await asyncio.sleep(0)

    def czxids(key: str) -> list[int]:
        path = zookeeper._dir(key)
        stats = [client.exists(f"{path}/{n}") for n in client.get_children(path)]
        return [int(s.czxid) for s in stats if s is not None]

    checked = 0
    for noise in (elsewhere, contend):
        stop.clear()
        task = asyncio.create_task(noise())
        try:
            for _ in range(60):
                async with a.lock(name) as held:
                    assert held.fence in await asyncio.to_thread(czxids, held.key)
                    checked += 1
        finally:
            stop.set()
            await task
    assert checked == 120
