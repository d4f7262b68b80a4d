"""The coordination contract, the same tests on every backend (docs/coordination-contract.md).

The backend comes from the one ``backend`` fixture; a test never names one. What a backend
lacks is declared in its characteristics, and the test asserts the typed error for it.
"""

from __future__ import annotations

import asyncio
import sys
import time

import pytest

import keel.coordination
from coord_support import (
    TTL,
    WORKER,
    BackendUnderTest,
    backend_fixture,  # noqa: F401 - the one backend fixture
)
from keel.coordination import Characteristic, FencedRegister, HeldLock, Leader, Partitioner
from keel.errors import BackendUnavailable, ConfigError, LockLost, LockTimeout, Unsupported

pytestmark = pytest.mark.timeout(90)


async def test_fences_strictly_increase(backend: BackendUnderTest) -> None:
    a, b = await backend.connect("a"), await backend.connect("b")
    name = backend.n("lock")
    fences = []
    for coord in (a, b, a, b, a):
        async with coord.lock(name) as held:
            fences.append(held.fence)
    assert fences == sorted(set(fences)), fences


async def test_lock_excludes_and_frees_on_release(backend: BackendUnderTest) -> None:
    a, b = await backend.connect("a"), await backend.connect("b")
    name = backend.n("lock")
    held = await a.acquire(name)
    assert await b.try_acquire(name) is None
    with pytest.raises(LockTimeout):
        await b.acquire(name, timeout=0.3)
    with pytest.raises(LockTimeout):
        await b.acquire(name, timeout=0)
    await held.release()
    other = await b.acquire(name, timeout=5)
    assert other.fence > held.granted_fence
    await other.release()


async def test_waiter_gets_lock_when_released(backend: BackendUnderTest) -> None:
    a, b = await backend.connect("a"), await backend.connect("b")
    name = backend.n("lock")
    held = await a.acquire(name)
    waiter = asyncio.create_task(b.acquire(name, timeout=10))
    await asyncio.sleep(0.2)
    assert not waiter.done()
    released = time.monotonic()
    await held.release()
    got = await waiter
    assert time.monotonic() - released < TTL / 2  # freed by the release, not by expiry
    assert got.fence > held.granted_fence
    await got.release()


async def test_renewal_keeps_lock_past_ttl(backend: BackendUnderTest) -> None:
    a, b = await backend.connect("a"), await backend.connect("b")
    name = backend.n("lock")
    async with a.lock(name) as held:
        await asyncio.sleep(TTL * 1.6)
        held.check()
        assert await b.try_acquire(name) is None
        await held.extend()
        held.check()
    assert not held.lost.is_set()


async def test_pause_past_ttl_cancels_body_and_raises_lock_lost(backend: BackendUnderTest) -> None:
    a = await backend.connect("a")
    name = backend.n("lock")
    reached = False
    seen: list[HeldLock] = []

    async def body() -> None:
        nonlocal reached
        async with a.lock(name) as held:
            seen.append(held)
            time.sleep(TTL * 1.3)  # a stuck process: renewal cannot run
            await asyncio.sleep(30)  # cancelled at once when the loop notices
            reached = True

    started = time.monotonic()
    with pytest.raises(LockLost):
        await body()
    assert time.monotonic() - started < TTL * 1.3 + 5
    assert not reached
    assert seen[0].lost.is_set()
    with pytest.raises(LockLost):
        seen[0].check()


async def test_loss_noticed_by_check_raises_once(backend: BackendUnderTest) -> None:
    a = await backend.connect("a")

    async def body() -> None:
        async with a.lock(backend.n("lock")) as held:
            time.sleep(TTL * 1.3)
            held.check()  # noticed here, before the renewal timer runs

    with pytest.raises(LockLost):
        await body()
    await asyncio.sleep(0.05)  # no stray cancellation is left pending on this task


async def test_opt_out_of_cancellation_still_reports_loss(backend: BackendUnderTest) -> None:
    a = await backend.connect("a")
    finished = False

    async def body() -> None:
        nonlocal finished
        async with a.lock(backend.n("lock"), cancel_on_loss=False) as held:
            time.sleep(TTL * 1.3)
            await asyncio.sleep(0.2)
            assert held.lost.is_set()
            finished = True

    with pytest.raises(LockLost):
        await body()
    assert finished


async def test_contending_tasks_are_mutually_exclusive(backend: BackendUnderTest) -> None:
    coords = [await backend.connect(f"m{i}") for i in range(4)]
    name = backend.n("lock")
    register = FencedRegister()
    inside = 0
    max_inside = 0

    async def worker(coord: keel.coordination.Coordinator, i: int) -> None:
        nonlocal inside, max_inside
        for j in range(5):
            async with coord.lock(name, timeout=30) as held:
                inside += 1
                max_inside = max(max_inside, inside)
                register.write(name, held.fence, (i, j))
                await asyncio.sleep(0.005)
                inside -= 1

    await asyncio.gather(*(worker(c, i) for i, c in enumerate(coords)))
    assert max_inside == 1


async def test_dead_holder_frees_within_ttl(backend: BackendUnderTest) -> None:
    b = await backend.connect("b")
    name = backend.n("lock")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(WORKER),
        "hold",
        backend.url,
        name,
        str(TTL),
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    assert line.startswith(b"HOLDING")
    assert await b.try_acquire(name) is None
    proc.kill()
    await proc.wait()
    killed = time.monotonic()
    held = await b.acquire(name, timeout=TTL + 5)
    assert time.monotonic() - killed < TTL + 3
    assert held.fence > int(line.split()[1])
    await held.release()


async def test_election_terms_are_fenced(backend: BackendUnderTest) -> None:
    a, b = await backend.connect("a"), await backend.connect("b")
    ea, eb = a.election(backend.n("e")), b.election(backend.n("e"))
    assert await ea.leader() is None
    seen: list[Leader | None] = []

    async def watch() -> None:
        async for leader in eb.observe(poll=0.02):
            seen.append(leader)
            if leader is not None and leader.member_id == "b":
                return

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0.1)
    term_a = await ea.campaign()
    leader = await eb.leader()
    assert leader is not None
    assert (leader.member_id, leader.fence) == ("a", term_a.fence)
    await asyncio.sleep(0.2)
    campaign_b = asyncio.create_task(eb.campaign(timeout=10))
    await asyncio.sleep(0.2)
    assert not campaign_b.done()
    await ea.resign()
    term_b = await campaign_b
    assert term_b.fence > term_a.granted_fence
    await asyncio.wait_for(watcher, 10)
    assert seen[0] is None
    terms = [(x.member_id, x.fence) for x in seen if x is not None]
    assert terms == [("a", term_a.granted_fence), ("b", term_b.granted_fence)]
    await eb.resign()


async def test_group_membership_and_watch(backend: BackendUnderTest) -> None:
    a, b = await backend.connect("a"), await backend.connect("b")
    ga, gb = a.group(backend.n("g")), b.group(backend.n("g"))
    await ga.join(b"meta-a")
    changes = gb.watch(poll=0.02)
    first = await asyncio.wait_for(anext(changes), 5)
    assert (first.kind, first.member.member_id, first.member.metadata) == ("join", "a", b"meta-a")
    await gb.join(b"meta-b")
    second = await asyncio.wait_for(anext(changes), 5)
    assert (second.kind, second.member.member_id) == ("join", "b")
    assert set(await ga.members()) == {"a", "b"}
    await ga.leave()
    third = await asyncio.wait_for(anext(changes), 5)
    assert (third.kind, third.member.member_id) == ("leave", "a")
    await changes.aclose()
    assert set(await gb.members()) == {"b"}


async def test_dead_member_leaves_by_expiry(backend: BackendUnderTest) -> None:
    b = await backend.connect("b")
    group = b.group(backend.n("g"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(WORKER),
        "join",
        backend.url,
        backend.n("g"),
        str(TTL),
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert (await asyncio.wait_for(proc.stdout.readline(), 30)).startswith(b"JOINED")
    assert "worker" in await group.members()
    proc.kill()
    await proc.wait()
    deadline = time.monotonic() + TTL + 3
    while "worker" in await group.members():
        assert time.monotonic() < deadline, "a dead member was still listed after ttl + 3s"
        await asyncio.sleep(0.05)


async def test_semaphore_permits_and_fences(backend: BackendUnderTest) -> None:
    a, b, c = [await backend.connect(m) for m in "abc"]
    name = backend.n("sem")
    sa, sb, sc = a.semaphore(name, 2), b.semaphore(name, 2), c.semaphore(name, 2)
    p1 = await sa.take()
    p2 = await sb.take()
    assert p1.name != p2.name
    assert await sc.holders() == 2
    with pytest.raises(LockTimeout):
        await sc.take(timeout=0.3)
    await p1.release()
    async with sc.acquire(timeout=5) as p3:
        assert p3.name == p1.name
        assert p3.fence > p1.granted_fence
    await p2.release()
    with pytest.raises(ConfigError):
        a.semaphore(name, 0)


async def test_partitioner_maps_keys_and_reports_rebalances(backend: BackendUnderTest) -> None:
    a, b = await backend.connect("a"), await backend.connect("b")
    ga, gb = a.group(backend.n("p")), b.group(backend.n("p"))
    await ga.join()
    await gb.join()
    pa, pb = Partitioner(ga), Partitioner(gb)
    first = await pa.refresh()
    assert first is not None
    assert first.joined == {"a", "b"}
    await pb.refresh()
    keys = [f"key-{i}" for i in range(200)]
    owners = {k: pa.owner(k) for k in keys}
    assert owners == {k: pb.owner(k) for k in keys}
    assert 40 < sum(pa.owns(k) for k in keys) < 160
    await gb.leave()
    change = await pa.refresh()
    assert change is not None
    assert change.left == {"b"}
    assert all(pa.owner(k) == "a" for k in keys)


async def test_session_ttl_floor_is_a_typed_error(backend: BackendUnderTest) -> None:
    a = await backend.connect("a", ttl=TTL)
    if Characteristic.PER_LOCK_TTL in a.characteristics:
        async with a.lock(backend.n("lock"), ttl=TTL * 2) as held:
            assert held.ttl >= TTL * 2
    else:
        with pytest.raises(Unsupported):
            await a.acquire(backend.n("lock"), ttl=TTL / 4)
    with pytest.raises(ConfigError):
        await a.acquire(backend.n("lock"), ttl=0)


async def test_fences_survive_server_restart(backend: BackendUnderTest) -> None:
    a = await backend.connect("a")
    name = backend.n("lock")
    async with a.lock(name) as held:
        before = held.fence
    assert Characteristic.DURABLE_FENCES in a.characteristics
    backend.restart()
    b = await backend.connect("b")
    async with b.lock(name, timeout=TTL * 5) as held:
        assert held.fence > before


async def test_unreachable_backend_is_backend_unavailable(backend: BackendUnderTest) -> None:
    started = time.monotonic()
    with pytest.raises(BackendUnavailable):
        await keel.coordination.connect(backend.unreachable_url(), connect_timeout="2")
    assert time.monotonic() - started < 10
