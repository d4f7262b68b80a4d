"""Attack tests of the SQLite store's commit leader (`SQLiteStore._group_write`, `_lead`,
`_pass_lead`, `_wake_successor`, `_commit_then`, commit 435bc84) and of the hub's committer
per slot (`Hub._committer`, `_next_batch`).

Asserted, store: a cancel at every await (the leader on the lock, a follower, a follower
handed the lead just as it is cancelled, once or twice, every queued writer at once), a
COMMIT that fails, a BEGIN refused by another connection, reads and a thread transaction
interleaved, and `close()` with writes queued each leave every writer exactly one outcome,
no write applied twice, no lead held (`_leading` False, nothing live in `_queued`) and a
store that still commits. Asserted, hub: a stop during commits releases each admission slot
once and commits no event twice (both stores); the express commit never starts while a
normal slot is free, and starts as soon as the last one is taken with an idle tenant's event
left behind; a committer whose commit raises goes on committing.

The writes of the store tests insert one row each into a table of their own (no key), so a
write applied twice is two rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import random
import sqlite3
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from keel.errors import ConfigError
from keel.hub import CloudEvent, Hub, SQLiteStore, StaticTokens, Store
from keel.hub.stores.base import Appended, Routed
from keel.hub.stores.sqlite import SMALL_QUEUE
from tests.hub.conftest import STORES, TOKENS, drop
from tests.hub.test_sqlite_group_write_attack import held_commit, turns
from tests.hub.test_store_conformance import NOW, ev, make_sub

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "hub.db")
    await s.open()
    s.db.execute("CREATE TABLE attack (k TEXT NOT NULL)")
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """What the loop's exception handler saw (a future set twice in a callback, say)."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    try:
        yield seen
    finally:
        loop.set_exception_handler(previous)


def insert(k: str) -> Callable[[sqlite3.Connection], str]:
    def run(db: sqlite3.Connection) -> str:
        db.execute("INSERT INTO attack (k) VALUES (?)", (k,))
        return k

    return run


def write(store: SQLiteStore, k: str) -> asyncio.Task[str]:
    return asyncio.create_task(store._write(insert(k)), name=k)


def rows(store: SQLiteStore) -> dict[str, int]:
    out: dict[str, int] = {}
    for (k,) in store.db.execute("SELECT k FROM attack"):
        out[k] = out.get(k, 0) + 1
    return out


def assert_quiet(store: SQLiteStore) -> None:
    assert not store._leading
    assert not store._successor_due
    assert not store._lock.locked()
    assert all(fut.done() for _, fut, _ in store._queued), store._queued


async def settle(store: SQLiteStore) -> None:
    """A few loop turns: a successor scheduled by the last leader has run."""
    await turns(4)
    assert_quiet(store)


async def in_commit(store: SQLiteStore, committing: threading.Event) -> None:
    assert await asyncio.to_thread(committing.wait, 5)


def hand_lead_then(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch, act: Callable[[asyncio.Task[Any]], object]
) -> list[str]:
    """After each `_wake_successor` that hands the lead, ``act`` on the task handed it, in
    the same callback (before that task can run). Returns the names of the tasks handed it."""
    handed: list[str] = []
    wake_successor = store._wake_successor

    def patched() -> None:
        was_leading = store._leading
        live = [w for _, _, w in store._queued if not w.done()]
        wake_successor()
        if was_leading or not store._leading:
            return
        target = next(w for w in live if w.done())
        task = next(t for t in asyncio.all_tasks() if getattr(t, "_fut_waiter", None) is target)
        handed.append(task.get_name())
        act(task)

    monkeypatch.setattr(store, "_wake_successor", patched)
    return handed


async def leader_in_commit_with_followers(
    store: SQLiteStore, committing: threading.Event, n: int
) -> tuple[asyncio.Task[str], list[asyncio.Task[str]]]:
    """A leader whose COMMIT `held_commit` holds, and ``n`` followers queued behind it (not
    in its batch): (the leader, the followers F0..)."""
    leader = write(store, "L")
    await in_commit(store, committing)
    followers = [write(store, f"F{i}") for i in range(n)]
    await turns(2)
    assert store._leading
    assert len(store._queued) == n
    return leader, followers


# --- a follower handed the lead -----------------------------------------------------------


@pytest.mark.parametrize("cancels", [1, 2])
async def test_a_follower_cancelled_as_it_is_handed_the_lead_passes_it_on(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch, cancels: int
) -> None:
    """The leader's COMMIT ends with three followers queued: the first is handed the lead
    and cancelled (once, or twice) in the same callback, before it runs. The lead goes to the
    next one, which commits its own write and the third's; the cancelled one's never runs."""

    def cancel_the_first(task: asyncio.Task[Any]) -> None:
        if len(handed) == 1:
            for _ in range(cancels):
                task.cancel()

    handed = hand_lead_then(store, monkeypatch, cancel_the_first)
    with held_commit(store, patience=5) as (committing, go_on):
        leader, followers = await leader_in_commit_with_followers(store, committing, 3)
        go_on.set()
        results = await asyncio.wait_for(
            asyncio.gather(leader, *followers, return_exceptions=True), 5
        )
    assert handed == ["F0", "F1"]
    assert isinstance(results[1], asyncio.CancelledError)
    assert results[0] == "L"
    assert results[2:] == ["F1", "F2"]
    assert rows(store) == {"L": 1, "F1": 1, "F2": 1}
    await settle(store)
    assert await store._write(insert("after")) == "after"


async def test_every_follower_cancelled_as_it_is_handed_the_lead(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each successor is cancelled as it is handed the lead, down to the last: nobody leads,
    no write of theirs ran, and the next writer leads at once."""
    handed = hand_lead_then(store, monkeypatch, lambda t: t.cancel())
    with held_commit(store, patience=5) as (committing, go_on):
        leader, followers = await leader_in_commit_with_followers(store, committing, 4)
        go_on.set()
        results = await asyncio.wait_for(
            asyncio.gather(leader, *followers, return_exceptions=True), 5
        )
    assert handed == ["F0", "F1", "F2", "F3"]
    assert results[0] == "L"
    assert all(isinstance(r, asyncio.CancelledError) for r in results[1:])
    assert rows(store) == {"L": 1}
    await settle(store)
    assert await asyncio.wait_for(store._write(insert("after")), 2) == "after"


async def test_a_handed_follower_cancelled_while_it_waits_for_the_lock(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The successor runs, then waits for the lock (held: a read, or a thread transaction,
    say) and is cancelled there: the next queued writer leads once the lock is free."""
    await store._lock.acquire()
    released = False
    try:
        hand_lead_then(store, monkeypatch, lambda t: None)
        leader = write(store, "L")
        await turns(1)
        followers = [write(store, f"F{i}") for i in range(3)]
        await turns(1)
        leader.cancel()  # on the lock: F0 is handed the lead, and waits on it too
        with pytest.raises(asyncio.CancelledError):
            await leader
        await turns(3)
        assert store._leading
        assert not followers[0].done()
        followers[0].cancel()
        await turns(3)
        store._lock.release()
        released = True
        results = await asyncio.wait_for(asyncio.gather(*followers, return_exceptions=True), 5)
    finally:
        if not released:
            store._lock.release()
    assert isinstance(results[0], asyncio.CancelledError)
    assert results[1:] == ["F1", "F2"]
    assert rows(store) == {"F1": 1, "F2": 1}
    await settle(store)


# --- the leader ----------------------------------------------------------------------------


async def test_a_leader_cancelled_twice_during_its_commit_leaves_the_next_one_a_lead(
    store: SQLiteStore,
) -> None:
    """The leader's batch carries two followers; the leader is cancelled twice during the
    COMMIT, while more writers queue. The batch commits (the leader's caller told
    "cancelled"), its followers get their results, the writers queued meanwhile commit."""
    with held_commit(store, patience=5) as (committing, go_on):
        leader = write(store, "L")
        await turns(1)
        inside = [write(store, f"in{i}") for i in range(2)]
        # The leader took its batch (itself only) at once; these two join the next one...
        await in_commit(store, committing)
        go_on.set()
        await asyncio.wait_for(leader, 5)
        committing.clear()
        go_on.clear()
        # ...whose leader (in0, handed the lead) is now in the COMMIT with in1.
        await in_commit(store, committing)
        later = [write(store, f"later{i}") for i in range(3)]
        inside[0].cancel()
        await turns(2)
        inside[0].cancel()
        await turns(2)
        assert not inside[0].done()  # still waiting for the COMMIT it cannot stop
        go_on.set()
        results = await asyncio.wait_for(asyncio.gather(*inside, *later, return_exceptions=True), 5)
    assert isinstance(results[0], asyncio.CancelledError)
    assert results[1:] == ["in1", "later0", "later1", "later2"]
    assert rows(store) == dict.fromkeys(("L", "in0", "in1", "later0", "later1", "later2"), 1)
    await settle(store)


async def test_a_leader_cancelled_on_the_lock_hands_its_followers_a_lead(
    store: SQLiteStore,
) -> None:
    """The leader waits for the lock (held by the test, as by a thread transaction) with
    followers queued and is cancelled: its write never runs, the followers commit."""
    await store._lock.acquire()
    try:
        leader = write(store, "L")
        await turns(1)
        followers = [write(store, f"F{i}") for i in range(3)]
        await turns(1)
        leader.cancel()
        leader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leader
        await turns(3)
    finally:
        store._lock.release()
    assert await asyncio.wait_for(asyncio.gather(*followers), 5) == ["F0", "F1", "F2"]
    assert rows(store) == {"F0": 1, "F1": 1, "F2": 1}
    await settle(store)


# --- failures ------------------------------------------------------------------------------


async def test_a_failed_commit_fails_every_write_of_its_batch_and_only_those(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The COMMIT of a batch of four raises (on the store thread): each of the four gets
    that error and none of their rows stays; the writers queued during it commit in the next
    transaction; a leader cancelled during the failing COMMIT still hands its followers the
    error, not a hang."""
    commit = store._commit
    # One permit per COMMIT, and a note as each one starts: clearing a shared event after
    # the next COMMIT had already set it made this test fail 3 runs in 5.
    entered: queue.SimpleQueue[None] = queue.SimpleQueue()
    permits = threading.Semaphore(0)
    fail = [False]

    def failing() -> None:
        entered.put(None)
        assert permits.acquire(timeout=5)
        if fail[0]:
            fail[0] = False
            store.db.execute("ROLLBACK")
            raise sqlite3.OperationalError("disk I/O error")
        commit()

    async def commit_started() -> None:
        await asyncio.to_thread(entered.get, True, 5)

    monkeypatch.setattr(store, "_commit", failing)
    # The first batch: a leader alone ("warm"), then four writers in the next one.
    warm = write(store, "warm")
    await commit_started()
    batch = [write(store, f"b{i}") for i in range(4)]
    await turns(1)
    permits.release()
    assert await asyncio.wait_for(warm, 5) == "warm"
    await turns(1)  # b0 is handed the lead and takes all four
    await commit_started()
    fail[0] = True  # read once its permit is given: this COMMIT fails
    queued = [write(store, f"q{i}") for i in range(3)]
    await turns(1)
    batch[0].cancel()  # the leader, during the failing COMMIT
    permits.release(2)
    results = await asyncio.wait_for(asyncio.gather(*batch, *queued, return_exceptions=True), 5)
    assert isinstance(results[0], asyncio.CancelledError)
    assert all(isinstance(r, sqlite3.OperationalError) for r in results[1:4]), results
    assert results[4:] == ["q0", "q1", "q2"]
    assert rows(store) == {"warm": 1, "q0": 1, "q1": 1, "q2": 1}
    await settle(store)


async def test_a_begin_refused_by_another_connection(store: SQLiteStore) -> None:
    """Another connection holds the write lock: the batch's BEGIN fails (busy), every writer
    of it gets the error, and once the other lets go the store commits again."""
    store.db.execute("PRAGMA busy_timeout=20")  # not 5 s of a blocked loop
    other = sqlite3.connect(store.path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        tasks = [write(store, f"w{i}") for i in range(5)]
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
        assert all(isinstance(r, sqlite3.OperationalError) for r in results), results
        assert not store.db.in_transaction
        other.execute("ROLLBACK")
    finally:
        other.close()
    await settle(store)
    assert await asyncio.gather(*(write(store, f"ok{i}") for i in range(3))) == [
        "ok0",
        "ok1",
        "ok2",
    ]
    assert rows(store) == {"ok0": 1, "ok1": 1, "ok2": 1}


# --- reads, thread transactions, close -----------------------------------------------------


async def test_reads_and_a_long_delete_between_group_writes(store: SQLiteStore) -> None:
    """Reads (`get_subscription`, `list_subscriptions`) and the delete of a queue longer
    than SMALL_QUEUE (a transaction on the store thread, holding the lock) interleaved with
    writers: each read sees only committed state, every writer commits once, the big queue
    is gone."""
    await make_sub(store, "big")
    for start in range(0, SMALL_QUEUE + 5, 500):
        batch = [Routed(f"big{n}", ev(n), ("big",)) for n in range(start, start + 500)]
        await store.append(batch, now=NOW)
    tasks: list[asyncio.Task[Any]] = []
    with held_commit(store, patience=5) as (committing, go_on):
        tasks.append(write(store, "w0"))
        await in_commit(store, committing)
        tasks.append(asyncio.create_task(store.get_subscription("big")))  # on the lock
        tasks.append(write(store, "w1"))
        tasks.append(asyncio.create_task(store.delete_subscription("big")))
        tasks.append(asyncio.create_task(store.list_subscriptions(None, limit=10, marker=None)))
        tasks.append(write(store, "w2"))
        tasks.append(asyncio.create_task(make_sub(store, "new")))
        await turns(2)
        go_on.set()
        _, pending = await asyncio.wait(tasks, timeout=10)
    assert not pending
    got = [t.result() for t in tasks]
    assert [got[0], got[2], got[5]] == ["w0", "w1", "w2"]
    assert (got[1].id, got[1].last_seq) == ("big", SMALL_QUEUE + 500)
    assert rows(store) == {"w0": 1, "w1": 1, "w2": 1}
    assert [s.id for s in await store.list_subscriptions(None, limit=10, marker=None)] == ["new"]
    assert store.db.execute("SELECT count(*) FROM messages").fetchone() == (0,)
    await settle(store)


async def test_close_with_writes_queued_gives_each_writer_one_outcome(
    tmp_path: Path, loop_errors: list[dict[str, Any]]
) -> None:
    """`close()` while a leader is in its COMMIT and writers are queued behind it: the
    COMMIT finishes, the queued writers are told the store is closed (each once, as the
    error ``close`` means, not "left without an outcome"), nothing hangs."""
    store = SQLiteStore(tmp_path / "hub.db")
    await store.open()
    store.db.execute("CREATE TABLE attack (k TEXT NOT NULL)")
    with held_commit(store, patience=5) as (committing, go_on):
        leader = write(store, "L")
        await in_commit(store, committing)
        queued = [write(store, f"q{i}") for i in range(4)]
        await turns(1)
        closing = asyncio.create_task(store.close())
        await turns(2)
        go_on.set()
        results = await asyncio.wait_for(asyncio.gather(leader, *queued, return_exceptions=True), 5)
        await asyncio.wait_for(closing, 5)
    assert results[0] == "L"
    assert all(isinstance(r, ConfigError) for r in results[1:]), results
    assert not store._leading
    assert loop_errors == []
    check = sqlite3.connect(store.path)
    try:
        assert check.execute("SELECT k FROM attack").fetchall() == [("L",)]
    finally:
        check.close()


# --- many writers, random cancels and failures ---------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
async def test_many_writers_random_cancels_and_failed_commits(  # noqa: PLR0912 - one scenario
    store: SQLiteStore,
    monkeypatch: pytest.MonkeyPatch,
    loop_errors: list[dict[str, Any]],
    seed: int,
) -> None:
    """Writes, writes that raise, thread transactions, appends and reads, cancelled at
    random (some twice), with one COMMIT in eight failing and each taking a random while.
    Every task ends; a write that returned is stored once, one that raised is not stored,
    one cancelled is stored at most once; the queue's numbering has no gap or repeat; the
    store is quiet and works afterwards."""
    rnd = random.Random(seed)
    thread_rnd = random.Random(seed + 100)  # used on the store thread only
    commit = store._commit

    def flaky() -> None:
        if thread_rnd.random() < 0.1:
            threading.Event().wait(thread_rnd.random() / 1000)
        if thread_rnd.random() < 1 / 8:
            store.db.execute("ROLLBACK")
            raise sqlite3.OperationalError("injected COMMIT failure")
        commit()

    await make_sub(store, "q")
    monkeypatch.setattr(store, "_commit", flaky)

    def raising(k: str) -> Callable[[sqlite3.Connection], str]:
        def run(db: sqlite3.Connection) -> str:
            db.execute("INSERT INTO attack (k) VALUES (?)", (k,))
            raise ValueError(k)

        return run

    kinds: dict[str, str] = {}
    tasks: list[asyncio.Task[Any]] = []
    to_cancel: list[tuple[asyncio.Task[Any], int]] = []
    events: dict[str, asyncio.Task[Any]] = {}
    for i in range(400):
        k = f"k{i}"
        roll = rnd.random()
        if roll < 0.45:
            kinds[k] = "write"
            task: asyncio.Task[Any] = write(store, k)
        elif roll < 0.55:
            kinds[k] = "raise"
            task = asyncio.create_task(store._write(raising(k)), name=k)
        elif roll < 0.6:
            kinds[k] = "thread"
            task = asyncio.create_task(store._write_on_thread(insert(k)), name=k)
        elif roll < 0.85:
            task = asyncio.create_task(store.append([Routed(k, ev(i), ("q",))], now=NOW))
            events[k] = task
        else:
            task = asyncio.create_task(store.get_subscription("q"))
        tasks.append(task)
        if rnd.random() < 0.2:
            to_cancel.append((task, rnd.choice([1, 1, 2])))
        if rnd.random() < 0.3:
            await turns(rnd.randint(0, 3))
            for victim, times in to_cancel:
                for _ in range(times):
                    victim.cancel()
                    if rnd.random() < 0.5:
                        await turns(1)
            to_cancel.clear()
        if rnd.random() < 0.02:
            await asyncio.sleep(rnd.random() / 500)
    _, pending = await asyncio.wait(tasks, timeout=20)
    assert not pending, [t.get_name() for t in pending]
    stored = rows(store)
    assert all(n == 1 for n in stored.values()), stored
    for task in tasks:
        k = task.get_name()
        if k not in kinds:
            continue
        if task.cancelled():
            continue
        exc = task.exception()
        if exc is None:
            assert (kinds[k] in ("write", "thread"), task.result()) == (True, k)
            assert stored.get(k) == 1, k
        else:
            assert isinstance(exc, ValueError | sqlite3.OperationalError), (k, exc)
            assert k not in stored, k
            if kinds[k] == "raise":
                assert isinstance(exc, ValueError | sqlite3.OperationalError)
    _, msgs = await store.read("q", after=0, limit=1000)
    seqs = [m.seq for m in msgs]
    assert seqs == list(range(1, len(seqs) + 1))
    assert (await store.get_subscription("q")).last_seq == len(seqs)
    ingested = {r[0] for r in store.db.execute("SELECT event_id FROM ingested")}
    assert len(msgs) == len(ingested)  # one message per stored event, none twice
    for k, task in events.items():
        if not task.cancelled() and task.exception() is None:
            assert k in ingested, k
            assert [(a.subscription, a.event_id) for a in task.result()] == [("q", k)]
        elif not task.cancelled():
            assert k not in ingested, k
    assert loop_errors == []
    await settle(store)
    monkeypatch.setattr(store, "_commit", commit)
    assert await asyncio.gather(*(write(store, f"after{i}") for i in range(5))) == [
        f"after{i}" for i in range(5)
    ]
    await settle(store)


# --- the hub's committers ------------------------------------------------------------------

ALICE = TOKENS["tok-alice"]  # p-one
BOB = TOKENS["tok-bob"]  # p-two


def event(tenant: str, eid: str | None = None) -> CloudEvent:
    return CloudEvent(id=eid or uuid.uuid4().hex, source="t", type="t.e", tenant=tenant, data={})


class _GatedStore:
    """The real store as one that commits ``slots`` at a time (as PostgreSQL), with the
    appends of the events named in ``gates`` held until their gate is set; records, for
    each append, the committer task and the normal slots busy as it started."""

    def __init__(self, store: Store, hub_ref: list[Hub], slots: int = 2) -> None:
        self._store = store
        self._hub = hub_ref
        self.append_concurrency = slots
        self.gates: dict[str, asyncio.Event] = {}
        self.holding: dict[str, asyncio.Event] = {}
        self.starts: list[tuple[str, int, tuple[str, ...]]] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    def gate(self, eid: str) -> asyncio.Event:
        self.holding[eid] = asyncio.Event()
        self.gates[eid] = asyncio.Event()
        return self.gates[eid]

    async def append(self, batch: list[Routed], *, now: float) -> list[Appended]:
        task = asyncio.current_task()
        name = task.get_name() if task is not None else "?"
        ids = tuple(item.event_id for item in batch)
        self.starts.append((name, self._hub[0]._busy_slots, ids))
        for eid in ids:
            if eid in self.gates:
                self.holding[eid].set()
                await self.gates[eid].wait()
        return await self._store.append(batch, now=now)


async def gated_hub(tmp_path: Path, **options: Any) -> tuple[Hub, _GatedStore, SQLiteStore]:
    inner = SQLiteStore(tmp_path / "hub.db")
    await inner.open()
    ref: list[Hub] = []
    gated = _GatedStore(inner, ref)
    hub = Hub(gated, StaticTokens(TOKENS), quota_subscriptions=100, **options)  # type: ignore[arg-type]
    ref.append(hub)
    await hub.start()
    await hub.create_subscription(ALICE, {})
    await hub.create_subscription(BOB, {})
    return hub, gated, inner


async def test_the_express_commit_starts_when_the_last_slot_is_taken_past_an_idle_tenant(
    tmp_path: Path,
) -> None:
    """Both slots busy with the flooding tenant, the express committer waiting before a
    normal one: an event of the flood and one of another tenant arrive in the same turn, the
    normal committer takes the flood's (a batch holds one event here: a full batch, as one
    event of 2048 rows or 128 KiB is), which takes the last slot. The other tenant's event
    must go express at once, not wait for a flood commit to end (what the batcher did
    before the committer per slot)."""
    hub, gated, inner = await gated_hub(tmp_path, batch_max=1)
    ingests: list[asyncio.Task[None]] = []
    try:

        async def held(tenant: str, eid: str) -> asyncio.Event:
            gate = gated.gate(eid)
            ingests.append(asyncio.create_task(hub.ingest(event(tenant, eid))))
            async with asyncio.timeout(5):
                await gated.holding[eid].wait()
            return gate

        a1 = await held(ALICE.project, "a1")  # slot 1, held throughout
        a2 = await held(ALICE.project, "a2")  # slot 2
        b1 = await held(BOB.project, "b1")  # express
        a2.set()
        b1.set()
        async with asyncio.timeout(5):
            await asyncio.gather(ingests[1], ingests[2])
        await turns(5)
        assert hub._busy_slots == 1
        a3 = gated.gate("a3")
        ingests.append(asyncio.create_task(hub.ingest(event(ALICE.project, "a3"))))
        b2 = asyncio.create_task(hub.ingest(event(BOB.project, "b2")))
        async with asyncio.timeout(5):
            await gated.holding["a3"].wait()
        assert hub._busy_slots == 2
        async with asyncio.timeout(2):
            await b2  # with both slots held by the flood: only the express commit takes it
        express = [ids for name, _, ids in gated.starts if name == "keel-hub-express"]
        assert ("b2",) in express
        a1.set()
        a3.set()
        async with asyncio.timeout(5):
            await asyncio.gather(*ingests)
    finally:
        for gate in gated.gates.values():
            gate.set()
        await hub.stop()
        await inner.close()


async def test_a_committer_whose_commit_raises_goes_on_committing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store's append raises once, then something after the append (the fan-out) raises
    once: the events of those commits are told (or at least not stuck behind a dead
    committer), and every later event still commits."""
    store = SQLiteStore(tmp_path / "hub.db")
    await store.open()
    hub = Hub(store, StaticTokens(TOKENS), quota_subscriptions=100)
    await hub.start()
    try:
        await hub.create_subscription(ALICE, {})
        real_append = store.append
        failures = ["append", "publish"]

        async def append(batch: Any, *, now: float) -> list[Appended]:
            if failures and failures[0] == "append":
                failures.pop(0)
                raise sqlite3.OperationalError("injected")
            return await real_append(batch, now=now)

        real_publish = hub.fanout.publish

        def publish(appended: Any) -> None:
            if failures and failures[0] == "publish":
                failures.pop(0)
                raise RuntimeError("injected fan-out failure")
            real_publish(appended)

        monkeypatch.setattr(store, "append", append)
        monkeypatch.setattr(hub.fanout, "publish", publish)
        with pytest.raises(sqlite3.OperationalError):
            await asyncio.wait_for(hub.ingest(event(ALICE.project)), 5)
        with contextlib.suppress(RuntimeError):  # committed: the event's caller may be told
            await asyncio.wait_for(hub.ingest(event(ALICE.project)), 5)
        assert failures == []
        for _ in range(3):
            await asyncio.wait_for(hub.ingest(event(ALICE.project)), 5)
        assert hub.admission.inflight(ALICE.project) == 0
    finally:
        await hub.stop()
        await store.close()


@pytest.fixture(params=sorted(STORES))
async def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s = await STORES[request.param](tmp_path)
    yield s
    await drop(s)


@pytest.mark.parametrize("fair_share", [1000, 2])
async def test_stop_during_commits_releases_each_slot_once_and_commits_no_event_twice(
    any_store: Store, fair_share: int
) -> None:
    """Three tenants ingest concurrently on a hub whose every commit takes a few loop
    turns; the hub stops mid-flight. Every ingest ends (committed, or told the hub
    stopped); each admission is released exactly once; no event is in a queue twice; every
    event whose ingest returned is stored. The express commit never started while a normal
    slot was free."""
    store = any_store
    ref: list[Hub] = []
    gated = _GatedStore(store, ref, slots=store.append_concurrency)
    # With a fair share of 2 callers wait in line for admission: stop() fails them (one
    # that a slot released by stop() admitted used to wait forever for a committer).
    hub = Hub(
        gated,  # type: ignore[arg-type]
        StaticTokens(TOKENS),
        quota_subscriptions=100,
        batch_max=3,
        fair_share=fair_share,
    )
    ref.append(hub)
    await hub.start()
    carol = TOKENS["tok-admin"]
    subs = [await hub.create_subscription(p, {}) for p in (ALICE, BOB, carol)]
    entered: dict[str | None, int] = {}
    released: dict[str | None, int] = {}
    enter, release = hub.admission._enter, hub.admission.release

    def counted_enter(tenant: str | None, now: float) -> None:
        entered[tenant] = entered.get(tenant, 0) + 1
        enter(tenant, now)

    def counted_release(tenant: str | None) -> None:
        released[tenant] = released.get(tenant, 0) + 1
        release(tenant)

    hub.admission._enter = counted_enter  # type: ignore[method-assign]
    hub.admission.release = counted_release  # type: ignore[method-assign]
    rnd = random.Random(5)
    ingests: dict[str, asyncio.Task[None]] = {}
    try:
        for i in range(120):
            p = rnd.choice((ALICE, BOB, carol))
            eid = f"e{i}"
            ingests[eid] = asyncio.create_task(hub.ingest(event(p.project, eid)))
            if rnd.random() < 0.3:
                await turns(rnd.randint(1, 4))
    finally:
        await asyncio.wait_for(hub.stop(), 10)
    done, pending = await asyncio.wait(ingests.values(), timeout=5)
    assert not pending
    for task in done:
        assert (
            task.cancelled()
            or task.exception() is None
            or isinstance(task.exception(), ConnectionError)
        ), task.exception()
    assert entered == released
    assert hub.admission._inflight == {}
    seen: dict[str, int] = {}
    for sub in subs:
        _, msgs = await store.read(sub.id, after=0, limit=1000)
        for m in msgs:
            eid = str(msgspec.json.decode(m.event)["id"])
            seen[eid] = seen.get(eid, 0) + 1
    assert all(n == 1 for n in seen.values()), seen
    ok = {eid for eid, t in ingests.items() if not t.cancelled() and t.exception() is None}
    assert ok <= set(seen)
    for name, busy, _ in gated.starts:
        if name == "keel-hub-express":
            assert busy >= store.append_concurrency
