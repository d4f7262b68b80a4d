"""Attacks on etcd member rotation (scripts/servers etcd-cluster, three members): the member
the clients use is SIGKILLed while a lock is held and waited for, and during a release. The
holder keeps its lock across the loss (renewals reach another member), the waiter is not
granted while it is held, fences only grow, and a release lost with its member still frees
the lock within ttl + the documented bound."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
import uuid
from collections.abc import AsyncIterator

import pytest

import keel.coordination as kc
from keel.coordination import HeldLock
from keel.errors import BackendUnavailable
from tests import servers
from tests.coord_support import HEARTBEATS, CutProxy, handed_over
from tests.topology.conftest import cluster_url

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

CLUSTER = "etcd-cluster"
TTL = 3


def _servers(*args: str) -> None:
    subprocess.run([str(servers.SCRIPT), *args], check=True, timeout=150, capture_output=True)


async def _kill(node: int) -> None:
    await asyncio.to_thread(_servers, "kill", CLUSTER, str(node))


async def _revive(node: int) -> None:
    await asyncio.to_thread(_servers, "revive", CLUSTER, str(node))


@contextlib.asynccontextmanager
async def _held_and_waited(
    tag: str,
) -> AsyncIterator[tuple[HeldLock, int, asyncio.Task[HeldLock]]]:
    """``a`` holds a fresh lock and ``b`` waits for it: (the held lock, its fence, b's
    acquire)."""
    url = cluster_url(CLUSTER)
    a = await kc.connect(url, member_id=f"{tag}-a", ttl=TTL)
    b = await kc.connect(url, member_id=f"{tag}-b", ttl=TTL)
    try:
        name = f"attack-{uuid.uuid4().hex[:8]}"
        held = await a.try_acquire(name)
        assert held is not None
        waiting = asyncio.create_task(b.acquire(name, timeout=60))
        await asyncio.sleep(0.5)
        yield held, held.fence, waiting
    finally:
        await a.close()
        await b.close()


async def test_member_killed_while_held_and_waited_for() -> None:
    async with _held_and_waited("kill") as (held, fence, waiting):
        await _kill(1)  # the first member listed: the one both clients' channels use
        try:
            await asyncio.sleep(2 * TTL + 1)  # past the lease: only renewals keep it
            held.check()
            assert not waiting.done(), "granted to the waiter while the holder held it"
            await held.release_confirmed()
            got = await asyncio.wait_for(waiting, 20)
            assert got.fence > fence
            await got.release_confirmed()
        finally:
            await _revive(1)


async def test_member_killed_mid_release_frees_the_lock_in_bound() -> None:
    async with _held_and_waited("rel") as (held, fence, waiting):
        release = asyncio.create_task(held.release())
        killed = asyncio.create_task(_kill(1))
        started = time.monotonic()
        try:
            got = await asyncio.wait_for(waiting, TTL + 20)
            # ttl (whole seconds, floor 2) + an election timeout + the clients' reconnect
            assert time.monotonic() - started < TTL + 15
            assert got.fence > fence
            await got.release_confirmed()
            await release
        finally:
            await killed
            await _revive(1)


async def test_fences_grow_across_rotations() -> None:
    """Each round kills the member in use, takes the lock on the next one, and revives it:
    fences never go backwards."""
    url = cluster_url(CLUSTER)
    a = await kc.connect(url, member_id="rot-a", ttl=TTL)
    try:
        name = f"attack-{uuid.uuid4().hex[:8]}"
        last = 0
        for node in (1, 2, 3):
            await _kill(node)
            try:
                async with a.lock(name, timeout=30) as held:
                    assert held.fence > last
                    last = held.fence
            finally:
                await _revive(node)
    finally:
        await a.close()


def _proxied(url: str) -> tuple[str, CutProxy]:
    """The cluster's URL with its first member behind a CutProxy."""
    scheme, _, rest = url.partition("://")
    hosts = rest.split("/", 1)[0].split(",")
    host, port = hosts[0].split(":")
    proxy = CutProxy(host, int(port), HEARTBEATS["etcd"])
    return f"{scheme}://127.0.0.1:{proxy.port}," + ",".join(hosts[1:]), proxy


@pytest.mark.parametrize("queued", [False, True])
async def test_lost_reply_then_rotation_leaves_no_ghost(queued: bool) -> None:
    """An acquire applied on member 1 whose reply is lost, then member 1 gone for good (its
    proxy closed) so the retry or the clean-up runs on another member: the retried attempt
    is recognised (one entry, one grant) or, for a try, removed; either way the lock is free
    for the next client at once after its release, not after the 30 s lease."""
    url = cluster_url(CLUSTER)
    proxied, proxy = _proxied(url)
    a = await kc.connect(url, member_id="lost-a", ttl=TTL)
    b = await kc.connect(proxied, member_id="lost-b", ttl=30)
    try:
        name = f"attack-{uuid.uuid4().hex[:8]}"
        async with b.lock(name + "-warm", timeout=10):  # b has a free 30 s lease now
            pass
        held = await a.try_acquire(name) if queued else None
        proxy.lose_next_reply()
        if queued:
            assert held is not None
            waiting = asyncio.create_task(b.acquire(name, timeout=40))
            assert await asyncio.to_thread(proxy.fired.wait, 10)
            proxy.close()
            await asyncio.sleep(1)
            assert not waiting.done()
            await handed_over(held, waiting, 30)
        else:
            try:
                got_try = await b.try_acquire(name)
            except BackendUnavailable:
                got_try = None
            assert proxy.fired.is_set()
            proxy.close()
            if got_try is not None:
                await got_try.release_confirmed()
        started = time.monotonic()
        while (mine := await a.try_acquire(name)) is None:
            assert time.monotonic() - started < 10, "a ghost entry holds the lock"
            await asyncio.sleep(0.2)
        await mine.release_confirmed()
    finally:
        await a.close()
        await b.close()
        with contextlib.suppress(RuntimeError):  # closed already
            proxy.close()
