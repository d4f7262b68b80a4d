"""Attack tests of the SQLite store's group commit with the wait for the next ingest batch
(`SQLiteStore._group_write` / `_wait_for_ingest`, commit ddbfe6d) and of `_append`'s per-key
``last_seq`` update.

Asserted: cancelling a writer that waits for the ingest batch, or an append that waits for
the lock, leaves no queued write pending and no flag that makes later writes wait (beyond one
bounded wait) or never join; a batched write that raises is rolled back alone; many
concurrent writers all finish; a hub that stops ingesting costs a lone write one wait at
most; ``last_seq`` equals what the rows say after batches over many subscriptions; each
queue's sequence follows the order of the appends. The store's internals (its lock, queue
and flags) are driven directly, so every interleaving is exact, in loop turns.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from keel.hub import SQLiteStore
from keel.hub.stores.base import Retention, Routed
from keel.hub.stores.sqlite import INGEST_WAIT_TURNS
from tests.hub.test_store_conformance import NOW, ev, make_sub

pytestmark = pytest.mark.timeout(10)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "hub.db")
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def routed(n: int, *subs: str) -> Routed:
    return Routed(f"e{n}", ev(n), tuple(subs))


class Waits:
    """Counts the store's waits for an ingest batch, and whether each saw one come."""

    def __init__(self, store: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.joined: list[bool] = []
        wait = store._wait_for_ingest

        async def counted() -> None:
            await wait()
            self.joined.append(store._ingest_queued)

        monkeypatch.setattr(store, "_wait_for_ingest", counted)


class Transactions:
    """Counts the transactions the store commits (each batch that had a live write)."""

    def __init__(self, store: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        commit = store._commit

        def counted() -> None:
            self.count += 1
            commit()

        monkeypatch.setattr(store, "_commit", counted)


async def ingesting(store: SQLiteStore, *subs: str) -> None:
    """Make the subscriptions, then make the store's last transaction one that carried an
    ingest batch (a write after it would reset that, after its one wait)."""
    for sub_id in (*subs, "warm"):
        await make_sub(store, sub_id)
    await store.append([Routed("warm-0", ev(0), ("warm",))], now=NOW)
    assert store._ingesting
    assert not store._ingest_queued


def sub_ids(store: SQLiteStore) -> set[str]:
    return {r[0] for r in store.db.execute("SELECT id FROM subscriptions")}


def last_seq_against_rows(store: SQLiteStore) -> list[tuple[str, int, int]]:
    """Subscriptions whose last_seq differs from the largest seq their rows hold."""
    return store.db.execute(
        "SELECT s.id, s.last_seq, coalesce((SELECT max(seq) FROM messages m "
        "WHERE m.sub_id = s.id), 0) AS top FROM subscriptions s WHERE s.last_seq != top"
    ).fetchall()


# --- cancellation -------------------------------------------------------------------------


async def test_a_writer_cancelled_while_it_waits_for_the_ingest_batch(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled inside `_wait_for_ingest` (holding the lock): the lock is free again, its
    write never runs, the writers queued behind it run, and the flags stay as they were (the
    next write waits once more, then the store stops waiting)."""
    await ingesting(store)
    waits = Waits(store, monkeypatch)
    waiter = asyncio.create_task(make_sub(store, "cancelled"))
    await turns(2)
    assert store._lock.locked()
    assert not waiter.done()
    behind = asyncio.create_task(make_sub(store, "behind"))
    await turns(1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await asyncio.wait_for(behind, 2)
    assert sub_ids(store) == {"warm", "behind"}
    assert not store._lock.locked()
    assert not store._ingesting
    assert not store._ingest_queued
    assert store._queued == [] or all(fut.done() for _, fut, _ in store._queued)
    # "behind" took over the wait the cancelled one left, and went alone: one wait, no more.
    assert waits.joined == [False]
    await make_sub(store, "next")
    assert waits.joined == [False]


async def test_a_writer_cancelled_after_an_append_joined_its_wait(
    store: SQLiteStore,
) -> None:
    """The append arrives (its flag set), then the waiting writer is cancelled before it
    takes the batch: the append runs in a transaction of its own, and returns its rows."""
    await ingesting(store, "a")
    await store.append([routed(1, "a")], now=NOW)
    waiter = asyncio.create_task(make_sub(store, "cancelled"))
    await turns(2)
    assert store._lock.locked()
    assert not waiter.done()
    append = asyncio.create_task(store.append([routed(2, "a")], now=NOW))
    await turns(1)  # the append is queued and flagged, waiting for the lock
    assert store._ingest_queued
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    out = await asyncio.wait_for(append, 2)
    assert [(a.subscription, a.seq) for a in out] == [("a", 2)]
    assert "cancelled" not in sub_ids(store)
    assert store._ingesting
    assert not store._ingest_queued
    assert last_seq_against_rows(store) == []


async def test_an_append_cancelled_before_its_batch_runs(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An append cancelled while it waits for the lock: its events are not stored, the
    writer queued with it is, and the flag it left (an ingest "queued") costs at most one
    later wait, not one per write."""
    await make_sub(store, "a")
    waits = Waits(store, monkeypatch)
    await store._lock.acquire()
    try:
        append = asyncio.create_task(store.append([routed(1, "a")], now=NOW))
        writer = asyncio.create_task(make_sub(store, "b"))
        await turns(2)
        assert store._ingest_queued
        append.cancel()
        with pytest.raises(asyncio.CancelledError):
            await append
    finally:
        store._lock.release()
    await asyncio.wait_for(writer, 2)
    assert store.db.execute("SELECT count(*) FROM messages").fetchone() == (0,)
    assert (await store.get_subscription("a")).last_seq == 0
    assert not store._ingest_queued
    for n in range(5):
        await make_sub(store, f"after{n}")
    assert len(waits.joined) <= 1, waits.joined
    # The next append goes straight in (no wait: it carries the batch itself).
    out = await store.append([routed(2, "a")], now=NOW)
    assert [(a.subscription, a.seq) for a in out] == [("a", 1)]


@contextlib.contextmanager
def held_commit(
    store: SQLiteStore, patience: float = 2.0
) -> Iterator[tuple[threading.Event, threading.Event]]:
    """The store's COMMIT, on its thread, waits (up to ``patience`` s) for ``go_on`` once it
    has set ``committing``: a commit in flight to cancel writers against."""
    committing = threading.Event()
    go_on = threading.Event()
    commit = store._commit

    def slow() -> None:
        committing.set()
        go_on.wait(patience)
        commit()

    store._commit = slow  # type: ignore[method-assign]
    try:
        yield committing, go_on
    finally:
        go_on.set()
        store._commit = commit  # type: ignore[method-assign]


async def append_in_waiters_commit(
    store: SQLiteStore, committing: threading.Event
) -> tuple[asyncio.Task[Any], asyncio.Task[list[Any]]]:
    """A subscription write waits for the hub's next ingest batch; an append joins it; both
    are in the COMMIT `held_commit` holds: (the waiting writer's task, the append's)."""
    waiter = asyncio.create_task(make_sub(store, "w"))
    await turns(2)
    assert store._lock.locked()
    assert store._queued
    append = asyncio.create_task(store.append([routed(1, "a")], now=NOW))
    assert await asyncio.to_thread(committing.wait, 2)
    return waiter, append


async def test_an_append_cancelled_inside_another_writers_batch_is_still_committed(
    store: SQLiteStore,
) -> None:
    """The append's function already ran in the batch a waiting writer took: cancelling the
    append then cannot undo it (the rows commit; only its caller is told "cancelled"). Pinned
    so that the hub's "stopped during the commit" is known to mean "maybe stored"."""
    await ingesting(store, "a")
    with held_commit(store) as (committing, go_on):
        waiter, append = await append_in_waiters_commit(store, committing)
        append.cancel()
        await turns(2)
        go_on.set()
        await asyncio.wait_for(waiter, 2)
        with pytest.raises(asyncio.CancelledError):
            await append
    assert (await store.get_subscription("a")).last_seq == 1
    assert last_seq_against_rows(store) == []


async def test_a_batch_owner_cancelled_twice_during_its_commit(
    store: SQLiteStore,
) -> None:
    """A waiting writer took the hub's append into its batch; its task is cancelled twice
    while the COMMIT is on the store thread (a request cancelled by a timeout and by the
    client's disconnect, say). The append must still get its rows."""
    await ingesting(store, "a")
    with held_commit(store) as (committing, go_on):
        waiter, append = await append_in_waiters_commit(store, committing)
        waiter.cancel()
        await turns(2)
        waiter.cancel()  # again, while it waits for the COMMIT it could not stop
        await turns(2)
        go_on.set()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        out = await asyncio.wait_for(append, 2)
    assert [(a.subscription, a.seq) for a in out] == [("a", 1)]


# --- savepoints ---------------------------------------------------------------------------


async def test_a_raising_write_in_a_joined_batch_is_rolled_back_alone(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A waiting writer, an append that joins it and a write that inserts and then raises:
    one transaction; the raising write's row is gone, the others' are there."""
    await ingesting(store, "a")
    tx = Transactions(store, monkeypatch)

    def bad(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO ingested (event_id, at) VALUES ('poison', 0)")
        db.execute("UPDATE subscriptions SET last_seq = 99 WHERE id = 'a'")
        raise ValueError("boom")

    waiter = asyncio.create_task(make_sub(store, "w"))
    await turns(2)
    assert store._lock.locked()
    assert store._queued
    failing = asyncio.create_task(store._write(bad))
    append = asyncio.create_task(store.append([routed(1, "a")], now=NOW))
    after = asyncio.create_task(make_sub(store, "after"))
    results = await asyncio.wait_for(
        asyncio.gather(waiter, failing, append, after, return_exceptions=True), 2
    )
    assert isinstance(results[1], ValueError)
    assert [(a.subscription, a.seq) for a in results[2]] == [("a", 1)]
    assert tx.count == 1
    assert {"w", "after", "a"} <= sub_ids(store)
    assert store.db.execute("SELECT 1 FROM ingested WHERE event_id = 'poison'").fetchall() == []
    assert (await store.get_subscription("a")).last_seq == 1
    assert last_seq_against_rows(store) == []


async def test_an_append_that_raises_is_rolled_back_alone(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batched function that raises is the ingest batch itself (after its inserts):
    none of its rows stays, the writer that waited for it is committed, and the next append
    numbers the queue as if the failed one never ran."""
    await ingesting(store, "a")
    append_rows = store._append

    def failing_append(db: sqlite3.Connection, batch: Any, now: float) -> Any:
        append_rows(db, batch, now)
        raise RuntimeError("after the inserts")

    waiter = asyncio.create_task(make_sub(store, "w"))
    await turns(2)
    assert store._lock.locked()
    assert store._queued
    monkeypatch.setattr(store, "_append", failing_append)
    append = asyncio.create_task(store.append([routed(1, "a")], now=NOW))
    await asyncio.wait_for(waiter, 2)
    with pytest.raises(RuntimeError):
        await append
    monkeypatch.setattr(store, "_append", append_rows)
    assert "w" in sub_ids(store)
    assert store.db.execute("SELECT count(*) FROM messages WHERE sub_id='a'").fetchone() == (0,)
    assert store.db.execute("SELECT 1 FROM ingested WHERE event_id = 'e1'").fetchall() == []
    out = await store.append([routed(1, "a")], now=NOW)  # not a duplicate: never stored
    assert [(a.subscription, a.seq) for a in out] == [("a", 1)]


# --- many writers, a hub that stops -------------------------------------------------------


async def test_many_concurrent_writers_and_appends_all_finish(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await ingesting(store, *(f"q{n}" for n in range(10)))
    tx = Transactions(store, monkeypatch)
    rnd = random.Random(7)
    tasks: list[asyncio.Task[Any]] = []
    cancelled: list[asyncio.Task[Any]] = []
    n_events = 0
    for i in range(300):
        if i % 3 == 0:
            subs = rnd.sample([f"q{n}" for n in range(10)], 3)
            tasks.append(asyncio.create_task(store.append([routed(1000 + i, *subs)], now=NOW)))
            n_events += 1
        else:
            tasks.append(asyncio.create_task(make_sub(store, f"c{i}")))
        if i % 37 == 5:
            cancelled.append(tasks[-1])
        if i % 11 == 0:
            await turns(rnd.randint(0, 3))
            for task in cancelled:
                task.cancel()
            cancelled.clear()
    done, pending = await asyncio.wait(tasks, timeout=5)
    assert not pending
    ok = [t for t in done if not t.cancelled()]
    assert all(t.exception() is None for t in ok)
    assert tx.count < 200  # grouped, not one each
    assert last_seq_against_rows(store) == []
    assert not store._lock.locked()
    assert all(fut.done() for _, fut, _ in store._queued)


async def test_a_hub_that_stops_ingesting_costs_a_lone_write_one_wait(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await ingesting(store)
    waits = Waits(store, monkeypatch)
    for n in range(10):
        await make_sub(store, f"s{n}")
    assert waits.joined == [False]  # the first waited (and saw no batch); none since
    await store.delete_subscription("s0")
    await store.get_subscription("s1")
    assert waits.joined == [False]


async def test_the_wait_is_bounded_in_loop_turns(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the write waits (no batch coming), the loop turns INGEST_WAIT_TURNS times for
    it, and the lock is held throughout: a read queued meanwhile waits that long too."""
    await ingesting(store)
    ticks = 0
    stop = False

    async def ticker() -> None:
        nonlocal ticks
        while not stop:
            ticks += 1
            await asyncio.sleep(0)

    spans: list[int] = []
    wait = store._wait_for_ingest

    async def measured() -> None:
        start = ticks
        await wait()
        spans.append(ticks - start)

    monkeypatch.setattr(store, "_wait_for_ingest", measured)
    t = asyncio.create_task(ticker())
    try:
        await turns(1)
        writer = asyncio.create_task(make_sub(store, "lone"))
        await turns(2)
        assert store._lock.locked()
        read = asyncio.create_task(store.get_subscription("warm"))
        await turns(2)
        assert not read.done()  # behind the waiting writer's lock
        await asyncio.wait_for(asyncio.gather(writer, read), 2)
    finally:
        stop = True
        await t
    assert len(spans) == 1
    assert INGEST_WAIT_TURNS - 1 <= spans[0] <= INGEST_WAIT_TURNS + 1, spans


# --- last_seq and order -------------------------------------------------------------------


async def test_last_seq_matches_the_rows_after_batches_over_many_subscriptions(
    store: SQLiteStore,
) -> None:
    """Several appends in one transaction (queued behind the lock), over 400 subscriptions
    with awkward ids, some with a length limit, one created and one deleted inside the same
    batch: each subscription's last_seq is the largest seq of its rows, first_seq follows
    the limit."""
    odd = ['q"uote', "dot.ted", "$.path", "spa ce", "ünï", "back\\slash", "[0]", "{}"]
    ids = [f"s{n:03d}" for n in range(392)] + odd
    for n, sub_id in enumerate(ids):
        retention = Retention(max_age_s=None, max_messages=3) if n % 50 == 0 else Retention()
        await make_sub(store, sub_id, retention=retention)
    rnd = random.Random(3)
    counter = 0
    for _round in range(3):
        await store._lock.acquire()
        tasks: list[asyncio.Task[Any]] = []
        try:
            for _ in range(6):
                batch = []
                for _ in range(20):
                    counter += 1
                    batch.append(routed(counter, *rnd.sample(ids, rnd.randint(1, 60))))
                tasks.append(asyncio.create_task(store.append(batch, now=NOW)))
            tasks.append(asyncio.create_task(make_sub(store, f"new{_round}")))
            tasks.append(asyncio.create_task(store.delete_subscription(ids[_round])))
            counter += 1
            late = routed(counter, f"new{_round}", ids[_round], ids[-1])
            tasks.append(asyncio.create_task(store.append([late], now=NOW)))
            await turns(2)
        finally:
            store._lock.release()
        outs = await asyncio.wait_for(asyncio.gather(*tasks), 5)
        late_out = {(a.subscription, a.seq) for a in outs[-1]}
        assert (f"new{_round}", 1) in late_out  # created earlier in the same transaction
        assert all(s != ids[_round] for s, _ in late_out)  # deleted earlier in it
        seqs: dict[str, list[int]] = {}
        for out in outs[:6] + outs[-1:]:
            for a in out:
                seqs.setdefault(a.subscription, []).append(a.seq)
        for sub_id, got in seqs.items():
            assert got == sorted(got), sub_id
            assert len(set(got)) == len(got), sub_id
    assert last_seq_against_rows(store) == []
    bad_first = store.db.execute(
        "SELECT id FROM subscriptions s WHERE max_messages IS NOT NULL AND last_seq > 0 AND "
        "first_seq != (SELECT min(seq) FROM messages m WHERE m.sub_id = s.id)"
    ).fetchall()
    assert bad_first == []
    for sub_id in odd:
        sub = await store.get_subscription(sub_id)
        top = store.db.execute(
            "SELECT coalesce(max(seq), 0) FROM messages WHERE sub_id = ?", (sub_id,)
        ).fetchone()[0]
        assert sub.last_seq == top, sub_id


async def test_each_queue_numbers_events_in_the_order_of_the_appends(
    store: SQLiteStore,
) -> None:
    """Appends queued one after another (with writers and a waiting writer among them)
    number each queue in the order they were called, across batches."""
    await ingesting(store, "q", "r")
    tasks: list[asyncio.Task[Any]] = []
    order: list[str] = []
    for n in range(60):
        if n % 7 == 3:
            tasks.append(asyncio.create_task(make_sub(store, f"x{n}")))
        subs = ("q", "r") if n % 2 else ("q",)
        tasks.append(asyncio.create_task(store.append([routed(n, *subs)], now=NOW)))
        order.append(f"e{n}")
        if n % 5 == 0:
            await turns(n % 4)
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    _, msgs = await store.read("q", after=0, limit=100)
    got = [f"e{msgspec.json.decode(m.event)['n']}" for m in msgs]
    assert got == order
    _, rmsgs = await store.read("r", after=0, limit=100)
    assert [m.seq for m in rmsgs] == list(range(1, 31))
    assert [msgspec.json.decode(m.event)["n"] for m in rmsgs] == list(range(1, 60, 2))
