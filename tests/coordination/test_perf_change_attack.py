"""Attacks on the coordination fast path (pre-read clocks in `Bound`, a slotted `HeldLock`
that reads its clocks once, the restructured ``check()``, `Coordinator._release` taking a
backend's future as it is, and the SQLite backend's page size and shared cursor): what a
holder is promised must not have moved (docs/coordination-contract.md)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

import keel.coordination as kc
from keel.coordination import _clock
from keel.coordination._clock import Bound, now
from keel.coordination._lock import _RAN_OUT, HeldLock
from keel.coordination.backends import sqlite as sqlite_backend
from keel.coordination.backends.sqlite import SqliteBackend
from keel.errors import BackendUnavailable, CoordinationError, LockLost

pytestmark = pytest.mark.timeout(60)

Connect = Callable[[str], Awaitable[kc.Coordinator]]


@pytest.fixture
async def connect(tmp_path: Path) -> AsyncIterator[Connect]:
    """Coordinators on one SQLite file, closed at the end."""
    opened: list[kc.Coordinator] = []

    async def make(member: str) -> kc.Coordinator:
        coord = await kc.connect(f"sqlite://{tmp_path}/coord.db", member_id=member, ttl=2)
        opened.append(coord)
        return coord

    yield make
    for coord in reversed(opened):
        await coord.close()


# --- Bound: the pre-read clocks ----------------------------------------------------------


def test_a_bound_from_pre_read_clocks_is_the_bound_read_then() -> None:
    wall, boot = time.time(), now()
    given = Bound(boot + 5, wall, boot)
    assert given.boot == boot + 5
    assert given.wall == pytest.approx(wall + 5, abs=1e-9)
    read = Bound(boot + 5)  # reads the clocks itself, a moment later
    assert abs(read.wall - given.wall) < 0.05
    # Both or neither: one alone is ignored, the clocks are read again.
    half = Bound(boot + 5, wall=wall - 1000)
    assert abs(half.wall - given.wall) < 0.05


def test_a_bound_has_passed_exactly_at_its_instant_on_either_clock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bound = Bound(100.0, 1000.0, 90.0)  # 10 s left on both clocks: wall bound 1010
    assert bound.wall == 1010.0
    monkeypatch.setattr(_clock, "now", lambda: 99.999)
    monkeypatch.setattr(time, "time", lambda: 1009.999)
    assert not bound.passed()
    assert bound.remaining() == pytest.approx(0.001)
    monkeypatch.setattr(_clock, "now", lambda: 100.0)  # exactly at the boot bound
    assert bound.passed()
    monkeypatch.setattr(_clock, "now", lambda: 95.0)
    monkeypatch.setattr(time, "time", lambda: 1010.0)  # exactly at the wall bound
    assert bound.passed()
    # A wall clock stepped back is covered by the boot clock, and one stepped forward ends
    # the lease early.
    monkeypatch.setattr(time, "time", lambda: 0.0)
    assert not bound.passed()
    monkeypatch.setattr(_clock, "now", lambda: 100.0)
    assert bound.passed()
    monkeypatch.setattr(_clock, "now", lambda: 91.0)
    monkeypatch.setattr(time, "time", lambda: 5000.0)
    assert bound.passed()
    assert bound.remaining() < 0


# --- check(): released, lost, expired -------------------------------------------------------


async def test_check_after_release_says_released_and_is_not_a_loss(connect: Connect) -> None:
    a = await connect("a")
    held = await a.acquire("x")
    held.check()
    await held.release()
    with pytest.raises(LockLost, match="this holder released it") as raised:
        held.check()
    assert vars(raised.value)["name"] == "x"
    assert vars(raised.value)["fence"] == held.granted_fence
    assert not held.lost.is_set()
    assert held.lost_reason == ""
    with pytest.raises(LockLost):
        _ = held.fence


async def test_a_lease_run_out_exactly_at_its_bound_is_lost_with_the_reason(
    connect: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = await connect("a"), await connect("b")
    held = await a.acquire("x", ttl=5)
    lost_seen: list[bool] = []
    held._on_lost.append(lambda: lost_seen.append(True))
    bound = held._bound.boot
    with monkeypatch.context() as patch:
        patch.setattr(_clock, "now", lambda: bound - 1e-6)
        held.check()  # a microsecond left: still held
        patch.setattr(_clock, "now", lambda: bound)
        with pytest.raises(LockLost, match="the lease ran out") as raised:
            held.check()
    assert held.lost.is_set()
    assert held.lost_reason == _RAN_OUT
    assert lost_seen == [True]
    assert vars(raised.value)["fence"] == held.granted_fence
    assert held not in a._held
    # The reason stays, whatever comes after: a second check, a release.
    with pytest.raises(LockLost, match="the lease ran out"):
        held.check()
    await held.release()
    with pytest.raises(LockLost, match="the lease ran out"):
        held.check()
    # The client gave the server's record up too: another owner gets it well before its ttl.
    other = await b.acquire("x", timeout=2)
    assert other.fence > held.granted_fence
    await other.release()


async def test_a_wall_clock_step_ends_the_lease_and_a_step_back_does_not_extend_it(
    connect: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = await connect("a")
    back = await a.acquire("back", ttl=5)
    forward = await a.acquire("forward", ttl=5)
    real = time.time
    with monkeypatch.context() as patch:
        patch.setattr(time, "time", lambda: real() - 3600)  # stepped back an hour
        back.check()
        patch.setattr(_clock, "now", lambda: back._bound.boot + 0.001)
        with pytest.raises(LockLost, match="ran out"):
            back.check()
    with monkeypatch.context() as patch:
        patch.setattr(time, "time", lambda: real() + 6)  # stepped past the lease
        with pytest.raises(LockLost, match="ran out"):
            forward.check()
    assert back.lost.is_set()
    assert forward.lost.is_set()


async def test_a_lease_the_backend_no_longer_has_keeps_that_reason(connect: Connect) -> None:
    a, b = await connect("a"), await connect("b")
    held = await a.acquire("x", ttl=5)
    assert await b.break_lock("x")
    with pytest.raises(LockLost, match="backend no longer has this lease"):
        await held.extend()
    with pytest.raises(LockLost, match="backend no longer has this lease"):
        held.check()
    assert held.lost_reason.startswith("the backend no longer has")


async def test_a_block_whose_lease_ran_out_exits_with_lock_lost(connect: Connect) -> None:
    a = await connect("a")

    async def body() -> None:
        async with a.lock("x", ttl=5) as held:
            held._bound = Bound(now() - 0.001)  # a pause past the lease, without the wait
            held.check()

    with pytest.raises(LockLost, match="ran out"):
        await body()


async def test_a_body_is_cancelled_with_the_reason_when_its_lock_is_broken(
    connect: Connect,
) -> None:
    a, b = await connect("a"), await connect("b")
    entered = asyncio.Event()

    async def body() -> None:
        async with a.lock("x", ttl=0.3):
            entered.set()
            await asyncio.sleep(5)  # cancelled by the renewal that finds the lease gone

    task = asyncio.ensure_future(body())
    await asyncio.wait_for(entered.wait(), 5)
    assert await b.break_lock("x")
    with pytest.raises(LockLost, match="backend no longer has this lease"):
        await asyncio.wait_for(task, 2)


# --- the first renewal ------------------------------------------------------------------------


async def test_the_first_renewal_is_due_at_a_third_of_the_ttl(connect: Connect) -> None:
    a = await connect("a")
    before = now()
    held = await a.acquire("x", ttl=3)
    assert held._timer is not None
    due = held._timer[0]
    assert before + 1.0 - 0.01 <= due <= now() + 1.0 + 0.01
    await held.release()


async def test_a_tiny_ttl_is_renewed_in_time(connect: Connect) -> None:
    a = await connect("a")
    held = await a.acquire("x", ttl=0.3)
    end = now() + 0.7  # more than two ttls: only renewals keep it
    while now() < end:
        held.check()
        await asyncio.sleep(0.02)
    assert not held.lost.is_set()
    assert held.fence == held.granted_fence
    await held.release()


async def test_an_expiry_nearer_than_a_third_of_the_ttl_is_renewed_before_it(
    connect: Connect,
) -> None:
    a = await connect("a")
    held = await a.acquire("x", ttl=3)
    # A grant whose expiry is already near (the reply came late): renewed by then, not at
    # ttl/3 when it would long have run out.
    expires = now() + 0.05
    near = HeldLock(a, "x", held.key, fence=held.granted_fence, ttl=3, expires=expires)
    assert near._timer is not None
    assert near._timer[0] <= expires + 1e-9
    await asyncio.sleep(0.3)
    assert not near.lost.is_set(), near.lost_reason
    assert near.remaining() > 2
    await near.release()
    await held.release()


async def test_an_expiry_already_passed_is_lost_at_once(connect: Connect) -> None:
    a = await connect("a")
    held = await a.acquire("x", ttl=3)
    gone = HeldLock(a, "x", held.key, fence=held.granted_fence, ttl=3, expires=now() - 0.01)
    assert gone._timer is not None
    assert gone._timer[0] <= now()
    with pytest.raises(LockLost, match="ran out"):
        gone.check()
    await asyncio.sleep(0.05)
    assert gone.lost_reason == _RAN_OUT
    await held.release()


# --- __slots__ ------------------------------------------------------------------------------


async def test_a_held_lock_is_slotted_weakly_referenceable_and_keeps_its_data(
    connect: Connect,
) -> None:
    a = await connect("a")
    held = await a.acquire("x")
    assert not hasattr(held, "__dict__")
    ref = weakref.ref(held)
    assert ref() is held
    held.data = b"new"  # the group's update writes it
    assert held.data == b"new"
    with pytest.raises(AttributeError):
        held.something = 1  # type: ignore[attr-defined]
    assert repr(held) == f"<HeldLock 'x' fence={held.granted_fence} held>"
    await held.release()
    assert "released" in repr(held)


async def test_group_metadata_update_and_sync_face_work_on_slotted_locks(
    connect: Connect,
) -> None:
    a, b = await connect("a"), await connect("b")
    group = a.group("g")
    membership = await group.join(b"one")
    await group.update(b"two")
    assert membership.data == b"two"
    members = await b.group("g").members()
    assert members["a"].metadata == b"two"
    assert await group.leave()


# --- Coordinator._release: whatever the backend hands back ---------------------------------


async def _freed_soon(coord: kc.Coordinator, name: str) -> int:
    """Another coordinator's acquire within 2 s: the release reached the server."""
    got = await coord.acquire(name, timeout=2)
    fence = got.granted_fence
    await got.release()
    return fence


@pytest.mark.parametrize(
    "answer", ["coroutine", "failed", "cancelled", "unavailable", "fails_later", "done_later"]
)
async def test_release_reaches_the_server_whatever_the_backend_returns(
    connect: Connect, answer: str
) -> None:
    a, b = await connect("a"), await connect("b")
    held = await a.acquire("x", ttl=30)  # only a release frees it within the test
    backend = a.backend
    real = backend.release
    loop = asyncio.get_running_loop()
    calls: list[str] = []
    later: list[asyncio.Future[None]] = []

    async def release(key: str, owner: str, fence: int) -> Awaitable[None]:
        calls.append(answer)
        if len(calls) > 1:  # the retry: the real thing
            return await real(key, owner, fence)
        if answer == "unavailable":
            raise BackendUnavailable("no answer")
        if answer == "coroutine":

            async def confirm() -> None:
                await (await real(key, owner, fence))

            return confirm()
        future: asyncio.Future[None] = loop.create_future()
        if answer == "failed":
            future.set_exception(BackendUnavailable("lost reply"))
        elif answer == "cancelled":
            future.cancel()
        else:
            later.append(future)
        return future

    backend.release = release  # type: ignore[method-assign]
    await held.release()
    if later:
        await asyncio.sleep(0.01)
        if answer == "fails_later":
            later[0].set_exception(BackendUnavailable("lost reply"))
        else:
            await (await real(held.key, a.owner, held.granted_fence))
            later[0].set_result(None)
    fence = await _freed_soon(b, "x")
    assert fence > held.granted_fence
    if answer in ("coroutine", "done_later"):
        assert calls == [answer]  # confirmed: no retry
    else:
        assert len(calls) >= 2  # retried until the real release went through
    await asyncio.sleep(0)
    assert not [f for f in a._pending if not f.done()]


# --- SQLite: page size -------------------------------------------------------------------------


def _old_setup(path: str) -> tuple[sqlite3.Connection, int]:
    """What the previous release's `_setup` did: no page_size (SQLite's default)."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute(f"PRAGMA busy_timeout = {sqlite_backend._OPEN_BUSY_MS}")
    db.execute("PRAGMA journal_mode = WAL").fetchall()
    db.executescript(sqlite_backend._SCHEMA)
    db.execute("PRAGMA synchronous = FULL")
    (epoch,) = db.execute(sqlite_backend._EPOCH).fetchone()
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute("PRAGMA busy_timeout = 0")
    db.execute(f"PRAGMA wal_autocheckpoint = {sqlite_backend._AUTOCHECKPOINT}")
    return db, int(epoch)


def _page_size(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("PRAGMA page_size").fetchone()[0])


async def _old_coordinator(path: Path, member: str) -> kc.Coordinator:
    db, epoch = await asyncio.to_thread(_old_setup, str(path))
    return kc.Coordinator(
        SqliteBackend(db, str(path), epoch), member_id=member, ttl=2, url=f"sqlite://{path}"
    )


async def _share_one_key(first: kc.Coordinator, second: kc.Coordinator) -> None:
    fences = []
    for _ in range(3):
        for coord, other in ((first, second), (second, first)):
            held = await coord.acquire("shared", ttl=5)
            fences.append(held.fence)
            assert await other.try_acquire("shared") is None
            await held.release()
    assert fences == sorted(fences)
    assert len(set(fences)) == len(fences)


async def test_a_new_file_gets_small_pages_and_old_processes_share_it(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    new = await kc.connect(f"sqlite://{path}", member_id="new", ttl=2)
    assert _page_size(path) == sqlite_backend._PAGE_SIZE
    old = await _old_coordinator(path, "old")
    try:
        await _share_one_key(new, old)
    finally:
        await old.close()
        await new.close()
    assert _page_size(path) == sqlite_backend._PAGE_SIZE


async def test_a_file_made_with_the_default_page_size_keeps_it_and_works(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    old = await _old_coordinator(path, "old")
    default = _page_size(path)
    assert default != sqlite_backend._PAGE_SIZE  # SQLite's default (4096)
    new = await kc.connect(f"sqlite://{path}", member_id="new", ttl=2)
    try:
        await _share_one_key(old, new)
    finally:
        await new.close()
        await old.close()
    assert _page_size(path) == default
    again = await kc.connect(f"sqlite://{path}", member_id="again", ttl=2)
    async with again.lock("shared") as held:
        assert held.fence > 0
    await again.close()


def test_old_and_new_processes_opening_one_new_file_together_all_succeed(
    tmp_path: Path,
) -> None:
    path = tmp_path / "race.db"
    start = threading.Barrier(8)
    failures: list[BaseException] = []

    def one(i: int) -> None:
        async def go() -> None:
            start.wait()
            if i % 2:
                coord = await _old_coordinator(path, f"old{i}")
            else:
                coord = await kc.connect(f"sqlite://{path}", member_id=f"new{i}", ttl=2)
            async with coord.lock("x", timeout=10):
                pass
            await coord.close()

        try:
            asyncio.run(go())
        except BaseException as exc:  # collected and asserted below
            failures.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert failures == []
    assert _page_size(path) in (1024, 4096)


# --- SQLite: the shared cursor -----------------------------------------------------------------


async def test_the_shared_cursor_survives_busy_and_errors_with_right_rowcounts(
    tmp_path: Path,
) -> None:
    path = tmp_path / "coord.db"
    a = await kc.connect(f"sqlite://{path}", member_id="a", ttl=2)
    b = await kc.connect(f"sqlite://{path}", member_id="b", ttl=2)
    backend = a.backend
    assert isinstance(backend, SqliteBackend)
    try:
        held = await a.acquire("x", ttl=5)
        # Another process writes: every statement here is busy for a while, then goes on.
        blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        blocker.execute("BEGIN IMMEDIATE")
        loop = asyncio.get_running_loop()
        loop.call_later(0.1, blocker.execute, "COMMIT")
        await held.extend()  # a renewal's rowcount (1) read through the shared cursor
        assert held.remaining() > 4
        blocker.close()
        # A statement that fails (not busy) leaves the cursor usable for the next one.
        with pytest.raises(CoordinationError, match="no such table"):
            backend._try("SELECT * FROM no_such_table", ())
        assert backend._try("SELECT 1", ()) == ([(1,)], -1)
        # rowcounts read right after statements of every kind: renew of another's lease is 0.
        assert await b.backend.renew(held.key, b.owner, held.granted_fence, 5) is None
        assert await a.backend.renew(held.key, a.owner, held.granted_fence, 5) is not None
        assert await b.try_acquire("x") is None
        await held.release()
        got = await b.acquire("x", timeout=2)
        assert got.fence > held.granted_fence
        await got.release()
    finally:
        await b.close()
        await a.close()


async def test_many_holders_with_background_checkpoints_on_one_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A checkpoint thread every few writes, racing the loop's statements on the shared cursor.
    monkeypatch.setattr(sqlite_backend, "_CHECKPOINT_EVERY", 7)
    path = tmp_path / "coord.db"
    coords = [await kc.connect(f"sqlite://{path}", member_id=f"m{i}", ttl=2) for i in range(3)]
    register: dict[str, int] = {}
    inside: set[str] = set()

    async def worker(coord: kc.Coordinator, n: int) -> None:
        sem = coord.semaphore("s", 2)
        for i in range(n):
            name = f"k{i % 3}"
            async with coord.lock(name, timeout=10) as held:
                assert name not in inside
                inside.add(name)
                assert held.fence > register.get(name, -1)
                register[name] = held.fence
                await asyncio.sleep(0)
                members = await coord.backend.children(held.key.rpartition("/")[0] + "/")
                assert any(r.key == held.key for r in members)
                inside.discard(name)
            async with sem.acquire(timeout=10):
                pass

    try:
        await asyncio.wait_for(asyncio.gather(*(worker(c, 40) for c in coords)), 20)
        backend = coords[0].backend
        assert isinstance(backend, SqliteBackend)
        assert backend._try("PRAGMA integrity_check", ())[0] == [("ok",)]
    finally:
        for coord in coords:
            await coord.close()
