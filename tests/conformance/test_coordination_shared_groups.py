"""The coordination contract's later parts, on every backend: created groups, member metadata
updated in place, forced release (break), confirmed release and reader-writer locks
(docs/coordination-contract.md, "Created groups, metadata, breaking, shared locks").

Same rules as test_coordination.py: the backend comes from the one ``backend`` fixture.
"""

from __future__ import annotations

import asyncio
import random
import sys
import textwrap
import time

import pytest

from coord_support import (
    TTL,
    BackendUnderTest,
    backend_fixture,  # noqa: F401 - the one backend fixture
)
from keel.coordination import Group
from keel.errors import (
    GroupExists,
    GroupNotEmpty,
    GroupNotFound,
    LockTimeout,
    NotMember,
)

pytestmark = pytest.mark.timeout(90)


async def test_created_group_lives_until_deleted_and_refuses_while_members(
    backend: BackendUnderTest,
) -> None:
    a, b = await backend.connect("a"), await backend.connect("b")
    name = backend.n("g")
    ga, gb = a.group(name), b.group(name)
    assert not await ga.exists()
    with pytest.raises(GroupNotFound):
        await gb.join(b"m", created=True)
    await ga.create()
    with pytest.raises(GroupExists):
        await gb.create()
    assert name in await b.groups()
    await gb.join(b"m", created=True)
    with pytest.raises(GroupNotEmpty):
        await ga.delete()
    await gb.leave()
    await a.close()  # the record is not a lease: it outlives its creator
    assert await gb.exists()
    await gb.delete()
    assert not await gb.exists()
    assert name not in await b.groups()
    with pytest.raises(GroupNotFound):
        await gb.delete()
    with pytest.raises(GroupNotFound):
        await gb.join(b"m", created=True)
    assert await gb.members() == {}  # the refused join left no member behind
    await gb.create()  # and the name can be created again
    assert await gb.exists()


async def test_join_racing_delete_never_leaves_a_member_in_a_deleted_group(
    backend: BackendUnderTest,
) -> None:
    a, b = await backend.connect("a"), await backend.connect("b")
    outcomes = set()
    for round_ in range(15):
        name = backend.n(f"race{round_}")
        await a.group(name).create()
        joiner = b.group(name)

        async def join(joiner: Group = joiner) -> str:
            try:
                await joiner.join(b"", created=True)
            except GroupNotFound:
                return "join-refused"
            return "joined"

        async def delete(name: str = name) -> str:
            await asyncio.sleep(random.random() * 0.01)
            try:
                await a.group(name).delete()
            except GroupNotEmpty:
                return "delete-refused"
            return "deleted"

        joined, deleted = await asyncio.gather(join(), delete())
        outcomes.add((joined, deleted))
        assert (joined, deleted) != ("joined", "deleted"), f"round {round_}: a member survived"
        exists = await a.group(name).exists()
        members = await a.group(name).members()
        assert exists or not members, f"round {round_}: members {members} of a deleted group"
        await joiner.leave()
    assert outcomes  # which interleavings occurred varies with the machine


async def test_member_metadata_updates_in_place_and_keeps_its_lease(
    backend: BackendUnderTest,
) -> None:
    a, b = await backend.connect("a"), await backend.connect("b")
    name = backend.n("g")
    ga = a.group(name)
    with pytest.raises(NotMember):
        await ga.update(b"v0")
    held = await ga.join(b"v1")
    await ga.update(b"v2")
    seen = (await b.group(name).members())["a"]
    assert (seen.metadata, seen.fence) == (b"v2", held.fence)
    await asyncio.sleep(TTL * 1.5)  # renewed past its ttl after the update
    assert (await b.group(name).members())["a"].metadata == b"v2"
    await ga.leave()
    with pytest.raises(NotMember):
        await ga.update(b"v3")


async def test_updated_member_of_a_dead_process_still_expires(backend: BackendUnderTest) -> None:
    """An update must not turn the membership into a record without a lease."""
    name = backend.n("g")
    script = textwrap.dedent(
        f"""
        import asyncio, keel.coordination as kc
        async def main():
            coord = await kc.connect({backend.url!r}, member_id="worker", ttl={TTL})
            group = coord.group({name!r})
            await group.join(b"v1", timeout=30)
            await group.update(b"v2")
            print("UPDATED", flush=True)
            await asyncio.sleep(600)
        asyncio.run(main())
        """
    )
    b = await backend.connect("b")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    assert (await asyncio.wait_for(proc.stdout.readline(), 30)).startswith(b"UPDATED")
    assert (await b.group(name).members())["worker"].metadata == b"v2"
    proc.kill()
    await proc.wait()
    deadline = time.monotonic() + TTL + 3
    while "worker" in await b.group(name).members():
        assert time.monotonic() < deadline, "an updated member of a dead process stayed listed"
        await asyncio.sleep(0.05)


async def test_expel_ends_another_holders_membership(backend: BackendUnderTest) -> None:
    a, b = await backend.connect("a"), await backend.connect("b")
    name = backend.n("g")
    held = await a.group(name).join(b"x")
    assert await b.group(name).expel("a")
    assert "a" not in await b.group(name).members()
    assert not await b.group(name).expel("a")
    await asyncio.wait_for(held.lost.wait(), TTL)  # the holder learns at its next renewal


async def test_break_lock_frees_it_and_the_broken_holder_learns(backend: BackendUnderTest) -> None:
    a, b = await backend.connect("a"), await backend.connect("b")
    name = backend.n("lock")
    assert not await b.break_lock(name)  # nobody holds it
    held = await a.acquire(name)
    assert await b.try_acquire(name) is None
    assert await b.break_lock(name)
    other = await b.acquire(name, timeout=0)
    assert other.fence > held.fence
    assert not await held.release_confirmed()  # it was not ours any more
    # the broken holder's release did not free the new holder's lock
    assert await a.try_acquire(name) is None
    assert await other.release_confirmed()
    assert not await other.release_confirmed()  # once only


async def test_a_broken_holders_release_leaves_the_next_holders_lock(
    backend: BackendUnderTest,
) -> None:
    a, b, c = [await backend.connect(m) for m in "abc"]
    name = backend.n("lock")
    broken = await a.acquire(name)
    assert await b.break_lock(name)
    successor = await c.acquire(name, timeout=0)
    await broken.release()  # the plain release, as close() and `async with` use it
    await asyncio.sleep(0.1)
    assert await b.try_acquire(name) is None, "the broken holder's release freed another's lock"
    await successor.release()


async def test_broken_holder_is_marked_lost_by_renewal(backend: BackendUnderTest) -> None:
    a, b = await backend.connect("a"), await backend.connect("b")
    name = backend.n("lock")
    held = await a.acquire(name)
    assert await b.break_lock(name)
    await asyncio.wait_for(held.lost.wait(), TTL)


async def test_readers_share_and_exclude_writers(backend: BackendUnderTest) -> None:
    a, b, c = [await backend.connect(m) for m in "abc"]
    name = backend.n("rw")
    ra, rb, rc = a.rwlock(name), b.rwlock(name), c.rwlock(name)
    r1 = await ra.acquire_read(timeout=0)
    r2 = await ra.acquire_read(timeout=0)  # one coordinator, twice: two slots
    r3 = await rb.acquire_read(timeout=0)
    assert len({r1.key, r2.key, r3.key}) == 3
    with pytest.raises(LockTimeout):
        await rc.acquire_write(timeout=0)
    with pytest.raises(LockTimeout):
        await rc.acquire_write(timeout=0.3)
    plain = await c.try_acquire(name)  # a refused writer left the key free
    assert plain is not None
    await plain.release()
    writer = asyncio.create_task(rc.acquire_write(timeout=10))
    await asyncio.sleep(0.2)
    assert not writer.done()
    for r in (r1, r2, r3):
        await r.release()
    w = await writer
    with pytest.raises(LockTimeout):
        await ra.acquire_read(timeout=0)
    with pytest.raises(LockTimeout):
        await ra.acquire_write(timeout=0)
    assert await a.try_acquire(name) is None  # a writer holds the plain lock's key
    await w.release()
    async with ra.read(timeout=5) as again:
        assert again.fence > 0


async def test_readers_and_writers_never_overlap(backend: BackendUnderTest) -> None:
    """A history check: random readers and writers from three clients for a few seconds;
    no writer's critical section overlaps any other holder's."""
    coords = [await backend.connect(m) for m in "abc"]
    name = backend.n("rw")
    intervals: list[tuple[str, float, float]] = []
    inside: dict[str, int] = {"read": 0, "write": 0}
    violations: list[str] = []
    stop = time.monotonic() + 4

    async def client(i: int) -> None:
        rw = coords[i].rwlock(name)
        rng = random.Random(i)
        while time.monotonic() < stop:
            mode = "write" if rng.random() < 0.4 else "read"
            ctx = rw.write(timeout=20) if mode == "write" else rw.read(timeout=20)
            async with ctx:
                inside[mode] += 1
                if inside["write"] > 1 or (inside["write"] and inside["read"]):
                    violations.append(f"{mode} entered with {dict(inside)}")
                start = time.monotonic()
                await asyncio.sleep(rng.random() * 0.01)
                inside[mode] -= 1
                intervals.append((mode, start, time.monotonic()))

    # Two tasks per client: readers of one coordinator share, a writer excludes its own.
    await asyncio.gather(*(client(i % 3) for i in range(6)))
    assert not violations, violations
    modes = {m for m, _, _ in intervals}
    assert modes == {"read", "write"}, intervals[:5]
