"""PostgreSQL store under attack: the one-statement append (`append_batch`, issue 13), the
pool's rollback-only reset, and the patch for connects cancelled inside asyncpg's TLS probe.

Where a behaviour is the store protocol's (src/keel/hub/stores/base.py), the SQLite store given
the same calls is the reference: both must answer alike. The five that were bugs (older
than append_batch) say so."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from keel.errors import BackendUnavailable
from keel.hub import SQLiteStore
from keel.hub.stores.base import Routed, Store, Subscription
from keel.hub.stores.postgres import PostgresStore
from tests.helpers import eventually
from tests.hub.conftest import another_view, drop, fresh_pg_store, plain_sub
from tests.servers import server_url


def _schema() -> str:
    return f"t_{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def pg() -> AsyncIterator[PostgresStore]:
    async with fresh_pg_store(pool_size=4) as store:
        yield store


@pytest.fixture
async def lite(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    store = SQLiteStore(tmp_path / "hub.db")
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def admin() -> AsyncIterator[asyncpg.Connection[asyncpg.Record]]:
    conn: asyncpg.Connection[asyncpg.Record] = await asyncpg.connect(server_url("postgres"))
    try:
        yield conn
    finally:
        await conn.close()


def _sub(sub_id: str, max_messages: int | None = None, max_deliveries: int = 5) -> Subscription:
    return plain_sub(
        sub_id, max_messages=max_messages, max_age_s=None, max_deliveries=max_deliveries
    )


async def _both(
    stores: Sequence[Store], subs: Sequence[Subscription], deleted: Sequence[str] = ()
) -> None:
    for store in stores:
        for sub in subs:
            await store.create_subscription(sub)
        for sub_id in deleted:
            await store.delete_subscription(sub_id)


async def _state(store: Store, sub_ids: Sequence[str], now: float) -> dict[str, Any]:
    """Everything the store interface shows of some queues."""
    out: dict[str, Any] = {}
    for sub_id in sub_ids:
        sub = await store.get_subscription(sub_id)
        gap, msgs = await store.read(sub_id, after=0, limit=100_000)
        stats = await store.stats(sub_id, now=now)
        out[sub_id] = {
            "seqs": (sub.first_seq, sub.last_seq, sub.dropped),
            "gap": None if gap is None else (gap.first, gap.last),
            "read": [
                (m.seq, bytes(m.event), m.state, m.deliveries, m.visible_at, m.expires_at)
                for m in msgs
            ],
            "stats": (stats.free, stats.claimed, stats.delayed),
            "ends": [None if m is None else m.seq for m in (stats.oldest, stats.newest)],
            "acked_upto": await store.acked_upto(sub_id),
        }
    return out


def _flat(out: Sequence[Any]) -> list[tuple[str, int, bytes, str]]:
    return [(a.subscription, a.seq, a.body, a.event_id) for a in out]


# --- append_batch against the SQLite store -------------------------------------------------


async def _hold(admin: asyncpg.Connection[asyncpg.Record], pg: PostgresStore, sub_id: str) -> Any:
    """A transaction of ``admin`` holding the queue's row lock (roll it back to let go)."""
    tx = admin.transaction()
    await tx.start()
    await admin.execute(f"SELECT 1 FROM {pg.schema}.subscriptions WHERE id = $1 FOR UPDATE", sub_id)
    return tx


async def test_batches_of_every_shape_append_as_on_sqlite(
    pg: PostgresStore, lite: SQLiteStore
) -> None:
    subs = [_sub("a"), _sub("b", max_messages=3), _sub("c", max_messages=1), _sub("gone")]
    await _both((pg, lite), subs, deleted=["gone"])
    batches: list[list[Routed]] = [
        [],
        [Routed("nowhere", b"{}", ())],  # routed to nothing: still marked seen
        [Routed("nowhere", b"{}", ("a",))],  # ... so skipped now
        [
            Routed("e1", b"1", ("a", "b")),
            Routed("e1", b"dup", ("c",)),  # a duplicate within the batch: the first wins
            Routed("e2", b"2", ("gone",)),  # only to a deleted queue
            Routed("e2", b"2bis", ("a",)),  # its duplicate is skipped although routed live
            Routed("e3", b"3", ("a", "a")),  # one queue twice: two messages, as on SQLite
            Routed("e4", b"4", ("c", "b", "gone", "a"), ttl=5.0),
            Routed("e5", b"5", ("b",), delay=10.0),
            Routed("e6", b"6", ("b", "c"), ttl=0.0, delay=-1.0),
        ],
        [Routed("e1", b"again", ("a",)), Routed("e7", b"7", ("c", "a"))],
        [Routed(f"m{n}", b"%d" % n, ("b", "c") if n % 3 else ("a",)) for n in range(40)],
    ]
    for n, batch in enumerate(batches):
        now = 100.0 + n
        assert _flat(await pg.append(batch, now=now)) == _flat(await lite.append(batch, now=now))
    ids = ["a", "b", "c"]
    assert await _state(pg, ids, 103.0) == await _state(lite, ids, 103.0)
    # Claims, acks, dead letters and drop-before retention on what append made, alike.
    for store in (pg, lite):
        for round_ in range(3):
            claim = await store.claim(
                "a", limit=4, ttl=1.0, now=200.0 + round_ * 10, max_deliveries=2
            )
            assert claim is not None
            if round_ == 2:
                await store.ack("a", claim.id, [claim.messages[0].seq], now=200.5 + round_ * 10)
        await store.enforce_retention(now=300.0)
    assert await _state(pg, ids, 250.0) == await _state(lite, ids, 250.0)
    assert [m.seq for m in await pg.dead_letters("a", after=0, limit=100)] == [
        m.seq for m in await lite.dead_letters("a", after=0, limit=100)
    ]
    assert await pg.redrive("a", None) == await lite.redrive("a", None)
    assert await _state(pg, ids, 250.0) == await _state(lite, ids, 250.0)


async def test_unicode_long_and_binary_fields_append_as_on_sqlite(
    pg: PostgresStore, lite: SQLiteStore
) -> None:
    ids = ["sub-ü", "sub-😀" + "x" * 200, "sub-e\u0301", "sub-é", "sub-B", "sub-a"]
    await _both((pg, lite), [_sub(i, max_messages=5) for i in ids])
    batch = [
        Routed("😀" * 512, b"\x00\xff\xfe binary", tuple(ids)),  # the hub's longest id
        Routed("e\u0301", "é".encode(), (ids[2], ids[3])),  # not NFC-equal ids: distinct
        Routed("é", b"\x00" * 1000, (ids[3], ids[2])),
        Routed("'; DROP TABLE x; --", b"'", ("sub-a", "sub-B")),
        Routed("\u2028\ufeff\U0010ffff", b"{}", ("sub-B",)),
        Routed(" ", b"", ("sub-a",)),  # an empty body
    ]
    assert _flat(await pg.append(batch, now=1.0)) == _flat(await lite.append(batch, now=1.0))
    assert await _state(pg, ids, 1.0) == await _state(lite, ids, 1.0)
    assert await pg.append(batch, now=2.0) == await lite.append(batch, now=2.0) == []


async def test_a_huge_batch_appends_as_on_sqlite(pg: PostgresStore, lite: SQLiteStore) -> None:
    ids = [f"sub-{n:02d}" for n in range(12)]
    await _both(
        (pg, lite), [_sub(i, max_messages=700 if n % 2 else None) for n, i in enumerate(ids)]
    )
    near_limit = 60 * 1024  # the hub takes events of up to 64 KiB
    batch = [
        Routed(
            f"ev-{n}",
            (b"%06d" % n) * (near_limit // 6 if n % 100 == 0 else 3),
            (ids[n % 12], ids[(n * 5 + 1) % 12]) if n % 7 else (ids[n % 12],),
            ttl=30.0 if n % 11 == 0 else None,
        )
        for n in range(4000)
    ]
    batch.append(Routed("ev-7", b"dup", (ids[0],)))
    got = await pg.append(batch, now=5.0)
    want = await lite.append(batch, now=5.0)
    assert _flat(got) == _flat(want)
    assert len(got) > 6000
    assert await _state(pg, ids, 6.0) == await _state(lite, ids, 6.0)


async def test_an_event_id_with_a_nul_does_not_sink_its_batch(
    pg: PostgresStore, lite: SQLiteStore
) -> None:
    """Was a bug (older than append_batch; fixed): CloudEvents ids may hold U+0000 (the hub's
    checks let "a\\u0000b" through), SQLite stores it, PostgreSQL text cannot: the append
    raises asyncpg's CharacterNotInRepertoireError and every other event of the group
    commit fails with it."""
    await _both((pg, lite), [_sub("a")])
    batch = [Routed("fine", b"1", ("a",)), Routed("a\x00b", b"2", ("a",))]
    want = _flat(await lite.append(batch, now=1.0))
    assert _flat(await pg.append(batch, now=1.0)) == want


async def _dedup_order(
    admin: asyncpg.Connection[asyncpg.Record], batch: Sequence[Routed]
) -> list[str]:
    """The order append_batch's dedup insert takes the batch's ids in (its very query)."""
    await admin.execute(
        "CREATE OR REPLACE FUNCTION pg_temp.dedup_order(p_ev text[], p_now float8) "
        "RETURNS SETOF text LANGUAGE plpgsql AS $fn$ BEGIN RETURN QUERY SELECT d.e FROM "
        "(SELECT DISTINCT e, p_now FROM unnest(p_ev) AS e) AS d; END $fn$"
    )
    rows = await admin.fetch(
        "SELECT * FROM pg_temp.dedup_order($1::text[], $2::float8)",
        [item.event_id for item in batch],
        1.0,
    )
    return [r[0] for r in rows]


async def test_the_same_events_appended_at_once_by_two_hubs_do_not_deadlock(
    pg: PostgresStore, admin: asyncpg.Connection[asyncpg.Record]
) -> None:
    """Two hubs given overlapping event ids (a bus redelivery to two hubs), each stopped
    part way through its dedup insert by an uncommitted key, then let go: each shared event
    is enqueued once, and neither append fails. (With the dedup insert in ``SELECT
    DISTINCT``'s hash order, as at c70c016, this failed about every other run with
    DeadlockDetectedError "waits for ShareLock on transaction".)"""
    other = await another_view(pg)
    gates = [await asyncpg.connect(server_url("postgres")) for _ in range(2)]
    try:
        await pg.create_subscription(_sub("a"))
        shared = [Routed(f"s-{n}", b"x", ("a",)) for n in range(300)]
        mine = shared + [Routed(f"p-{n}", b"p", ("a",)) for n in range(20)]
        theirs = shared + [Routed(f"o-{n}", b"o", ("a",)) for n in range(3000)]
        order_a, order_b = await _dedup_order(admin, mine), await _dedup_order(admin, theirs)
        ids = {e.event_id for e in shared}
        gate_a = next(e for e in order_a[len(order_a) // 2 :] if e.startswith("p-"))
        gate_b = next(e for e in order_b[len(order_b) // 2 :] if e.startswith("o-"))
        before_a = set(order_a[: order_a.index(gate_a)]) & ids
        before_b = set(order_b[: order_b.index(gate_b)]) & ids
        # Each hub, stopped at its gate, holds a shared id the other has still to insert.
        assert before_a - before_b
        assert before_b - before_a
        for gate, key in zip(gates, (gate_a, gate_b), strict=True):
            await gate.execute("BEGIN")
            await gate.execute(
                f"INSERT INTO {pg.schema}.ingested (event_id, at) VALUES ($1, 0)", key
            )
        appends = asyncio.gather(
            pg.append(mine, now=1.0), other.append(theirs, now=1.0), return_exceptions=True
        )
        async with asyncio.timeout(10):
            while True:
                waiting = await admin.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%append_batch(%' "
                    "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
                )
                if waiting >= 2:
                    break
                await asyncio.sleep(0.02)
        for gate in gates:
            await gate.execute("ROLLBACK")
        got = await asyncio.wait_for(appends, 15)
        assert [type(r).__name__ for r in got if isinstance(r, BaseException)] == []
        made = sorted(a.event_id for out in got if isinstance(out, list) for a in out)
        assert made == sorted({e.event_id for e in [*mine, *theirs]})  # each once
    finally:
        for gate in gates:
            await gate.close()
        await other.close()


# --- concurrent deletes and notifications ----------------------------------------------------


async def test_a_queue_deleted_while_an_append_waits_for_it_gets_nothing(
    pg: PostgresStore, admin: asyncpg.Connection[asyncpg.Record]
) -> None:
    await pg.create_subscription(_sub("a"))
    await pg.create_subscription(_sub("b"))
    await pg.append([Routed("first", b"0", ("a", "b"))], now=1.0)
    # Another hub deletes "b" and has not committed yet: the append waits for its lock.
    tx = admin.transaction()
    await tx.start()
    await admin.execute(f"DELETE FROM {pg.schema}.subscriptions WHERE id = 'b'")
    await admin.execute(f"DELETE FROM {pg.schema}.messages WHERE sub_id = 'b'")
    task = asyncio.create_task(
        pg.append([Routed("x", b"x", ("b", "a")), Routed("y", b"y", ("b",))], now=2.0)
    )
    await asyncio.sleep(0.3)
    assert not task.done()
    await tx.commit()
    out = await asyncio.wait_for(task, 10)
    assert _flat(out) == [("a", 2, b"x", "x")]
    left = await admin.fetchval(f"SELECT count(*) FROM {pg.schema}.messages WHERE sub_id = 'b'")
    assert left == 0
    # "y" went only to the deleted queue: seen, its body not kept.
    bodies = await admin.fetch(f"SELECT body FROM {pg.schema}.events ORDER BY id")
    assert [bytes(r[0]) for r in bodies] == [b"0", b"x"]


async def test_a_delete_waiting_for_an_append_removes_what_it_made(
    pg: PostgresStore, admin: asyncpg.Connection[asyncpg.Record]
) -> None:
    await pg.create_subscription(_sub("a"))
    await pg.create_subscription(_sub("b"))
    # Hold "a" so the append (locking "a" then "b") stalls holding nothing the delete needs.
    tx = await _hold(admin, pg, "a")
    appending = asyncio.create_task(pg.append([Routed("x", b"x", ("a", "b"))], now=1.0))
    await asyncio.sleep(0.2)
    deleting = asyncio.create_task(pg.delete_subscription("b"))
    await asyncio.sleep(0.2)
    await tx.rollback()
    out, _ = await asyncio.wait_for(asyncio.gather(appending, deleting), 10)
    assert {a.subscription for a in out} <= {"a", "b"}
    left = await admin.fetchval(f"SELECT count(*) FROM {pg.schema}.messages WHERE sub_id = 'b'")
    assert left == 0
    assert (await pg.get_subscription("a")).last_seq == 1


async def test_another_hub_hears_of_every_queue_an_append_touched(pg: PostgresStore) -> None:
    other = await another_view(pg)
    heard: list[tuple[str, str]] = []
    mine: list[tuple[str, str]] = []
    await other.watch(lambda kind, sub_id: heard.append((kind, sub_id)))
    await pg.watch(lambda kind, sub_id: mine.append((kind, sub_id)))
    try:
        ids = [f"sub-{n:03d}" for n in range(250)]
        for sub_id in ids:
            await pg.create_subscription(_sub(sub_id))
        await pg.create_subscription(_sub("gone"))
        await pg.delete_subscription("gone")
        await asyncio.sleep(0.3)
        heard.clear()
        await pg.append([Routed("e1", b"{}", (*ids, "gone"))], now=1.0)
        await pg.append([Routed("e1", b"{}", (ids[0],))], now=1.0)  # all seen: nothing
        await pg.append([Routed("e2", b"{}", ("gone",))], now=1.0)  # only deleted: nothing
        await pg.append([Routed("e3", b"{}", (ids[7],))], now=1.0)
        await eventually(lambda: len(heard) >= 251, timeout=10)
        await asyncio.sleep(0.3)
        assert sorted(heard) == sorted([("append", i) for i in ids] + [("append", ids[7])])
        assert mine == []  # its own notifications are not news
    finally:
        await other.close()


async def test_an_append_to_many_queues_with_long_ids_is_not_refused(
    pg: PostgresStore, lite: SQLiteStore
) -> None:
    """Was a bug (older than append_batch; fixed): the NOTIFY is chunked by 100 ids whatever
    their length, and a payload over 8000 bytes fails the whole append with
    InvalidParameterValueError "payload string too long". A Zaqar queue with 60
    subscriptions (tee ids ``zs:{project}:{queue}:{32 hex}``: 133 characters for a Keystone
    project id and a 64-character queue name) can no longer take a message."""
    ids = [f"zs:{'0' * 32}:{'q' * 64}:{uuid.uuid4().hex}" for _ in range(60)]
    await _both((pg, lite), [_sub(i) for i in ids])
    batch = [Routed("e1", b"{}", tuple(ids))]
    want = _flat(await lite.append(batch, now=1.0))
    assert _flat(await pg.append(batch, now=1.0)) == want


# --- opening: several hubs, old schemas ------------------------------------------------------


async def test_hubs_opening_a_fresh_schema_at_once_all_open() -> None:
    """Was a bug (older than append_batch; fixed): open() takes
    the schema's session advisory lock and releases it inside the same implicit
    transaction, before COMMIT. The next hub gets the lock, does not see the schema yet and
    CREATE SCHEMA IF NOT EXISTS fails: asyncpg UniqueViolationError
    "pg_namespace_nspname_index" out of open() (and its pool left open)."""
    url = server_url("postgres")
    failures: list[str] = []
    for _ in range(4):
        schema = _schema()
        stores = [PostgresStore(url, schema=schema, pool_size=1) for _ in range(3)]
        try:
            got = await asyncio.gather(*(s.open() for s in stores), return_exceptions=True)
            failures += [f"{type(r).__name__}: {r}".splitlines()[0] for r in got if r]
        finally:
            for s in stores:
                await s.close()
            conn = await asyncpg.connect(url)
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            await conn.close()
    assert failures == []


async def test_hubs_reopening_a_schema_at_once_while_others_append(pg: PostgresStore) -> None:
    """Was a bug (older than append_batch; fixed): open() runs its whole script as one implicit
    transaction, and CREATE INDEX IF NOT EXISTS / ALTER TABLE ... ADD COLUMN IF NOT EXISTS
    lock the tables (Share, AccessExclusive) table by table, in another order than an
    append touches them (ingested, subscriptions, events, messages). A hub starting while
    another appends deadlocks with it: the append raises a raw asyncpg DeadlockDetectedError
    ("waits for RowExclusiveLock on relation ... waits for ShareLock on relation ...")."""
    await pg.create_subscription(_sub("a", max_messages=50))
    stop = asyncio.Event()
    made: list[int] = []

    async def append_on() -> None:
        n = 0
        while not stop.is_set():
            out = await pg.append([Routed(f"bg-{n}", b"x", ("a",))], now=1.0)
            made.extend(a.seq for a in out)
            n += 1

    runner = asyncio.create_task(append_on())
    try:
        for _ in range(4):
            others = [PostgresStore(pg.url, schema=pg.schema, pool_size=1) for _ in range(3)]
            try:
                await asyncio.gather(*(s.open() for s in others))
                for n, s in enumerate(others):
                    await s.append([Routed(f"o-{uuid.uuid4().hex}-{n}", b"o", ("a",))], now=1.0)
            finally:
                for s in others:
                    await s.close()
    finally:
        stop.set()
        await runner
    sub = await pg.get_subscription("a")
    _, msgs = await pg.read("a", after=0, limit=1000)
    assert [m.seq for m in msgs] == list(range(sub.first_seq, sub.last_seq + 1))
    assert made == sorted(made)


async def test_a_schema_from_before_append_batch_gets_it_and_keeps_its_queues(
    admin: asyncpg.Connection[asyncpg.Record],
) -> None:
    url = server_url("postgres")
    schema = _schema()
    first = PostgresStore(url, schema=schema)
    await first.open()
    try:
        await first.create_subscription(_sub("a", max_messages=3))
        await first.append([Routed(f"old-{n}", b"%d" % n, ("a",)) for n in range(5)], now=1.0)
        await first.close()
        # The store as it was before issue 13 made no function.
        await admin.execute(f"DROP FUNCTION {schema}.append_batch")
        stores = [PostgresStore(url, schema=schema) for _ in range(3)]
        await asyncio.gather(*(s.open() for s in stores))
        for s in stores:
            await s.close()
        await first.open()
        out = await first.append(
            [Routed("old-4", b"dup", ("a",)), Routed("new", b"n", ("a",))], now=2.0
        )
        assert _flat(out) == [("a", 6, b"n", "new")]
        sub = await first.get_subscription("a")
        assert (sub.first_seq, sub.last_seq, sub.dropped) == (4, 6, 3)
    finally:
        await drop(first)


# --- cancellation, termination, the pool's reset ---------------------------------------------


async def _check_all_or_nothing(
    store: PostgresStore, admin: asyncpg.Connection[asyncpg.Record], tried: Sequence[str]
) -> set[str]:
    """Each tried event is in both its queues or in neither, and its id is seen iff so;
    the queues' seqs stay gapless. Returns the events that went in."""
    rows = await admin.fetch(
        f"SELECT m.sub_id, m.seq, e.body FROM {store.schema}.messages m "
        f"JOIN {store.schema}.events e ON e.id = m.event_id ORDER BY m.sub_id, m.seq"
    )
    seen = {r[0] for r in await admin.fetch(f"SELECT event_id FROM {store.schema}.ingested")}
    per_event: dict[str, set[str]] = {}
    for r in rows:
        per_event.setdefault(bytes(r["body"]).decode(), set()).add(r["sub_id"])
    for sub_id in ("a", "b"):
        sub = await store.get_subscription(sub_id)
        seqs = [r["seq"] for r in rows if r["sub_id"] == sub_id]
        assert seqs == list(range(1, sub.last_seq + 1)), sub_id
    applied = set()
    for event_id in tried:
        assert per_event.get(event_id, set()) in (set(), {"a", "b"}), event_id
        assert (event_id in per_event) == (event_id in seen), event_id
        if event_id in per_event:
            applied.add(event_id)
    return applied


async def test_an_append_cancelled_at_any_moment_is_whole_or_absent(
    pg: PostgresStore, admin: asyncpg.Connection[asyncpg.Record]
) -> None:
    await pg.create_subscription(_sub("a"))
    await pg.create_subscription(_sub("b"))
    tried: list[str] = []
    outcomes = {"cancelled": 0, "done": 0}
    for n in range(120):
        event_id = f"c{n}"
        tried.append(event_id)
        task = asyncio.create_task(
            pg.append([Routed(event_id, event_id.encode(), ("a", "b"))], now=1.0)
        )
        if n < 30:
            for _ in range(n):
                await asyncio.sleep(0)
        else:
            await asyncio.sleep((n - 30) * 0.00005)
        task.cancel()
        (result,) = await asyncio.gather(task, return_exceptions=True)
        if isinstance(result, asyncio.CancelledError):
            outcomes["cancelled"] += 1
        else:
            assert isinstance(result, list), result
            outcomes["done"] += 1
        if n % 40 == 39:  # the next pool starts short again: cancels land in its connects
            await pg.close()
            await pg.open()
    assert outcomes["cancelled"] > 0
    applied = await _check_all_or_nothing(pg, admin, tried)
    # What a cancel left out goes in on a retry (its id was not marked seen), once.
    out = await pg.append([Routed(e, e.encode(), ("a", "b")) for e in tried], now=2.0)
    assert {a.event_id for a in out} == set(tried) - applied
    assert await _check_all_or_nothing(pg, admin, tried) == set(tried)
    pool = pg._pool
    assert pool is not None
    for _ in range(pool.get_size()):
        async with pool.acquire() as conn:
            assert not conn.is_in_transaction()


async def _append_backend(admin: asyncpg.Connection[asyncpg.Record]) -> asyncpg.Record:
    async with asyncio.timeout(10):
        while True:
            # pg_stat_activity is read once per transaction, and the caller's is open.
            await admin.execute("SELECT pg_stat_clear_snapshot()")
            row = await admin.fetchrow(
                "SELECT pid, state FROM pg_stat_activity WHERE query LIKE '%append_batch(%' "
                "AND pid <> pg_backend_pid() AND state = 'active'"
            )
            if row is not None:
                return row
            await asyncio.sleep(0.02)


async def test_an_append_cancelled_while_the_server_runs_it_is_rolled_back(
    pg: PostgresStore, admin: asyncpg.Connection[asyncpg.Record]
) -> None:
    await pg.create_subscription(_sub("a"))
    await pg.create_subscription(_sub("b"))
    for n in range(3):
        tx = await _hold(admin, pg, "b")
        task = asyncio.create_task(pg.append([Routed(f"held{n}", b"h", ("a", "b"))], now=1.0))
        backend = await _append_backend(admin)  # holds "a", waits for "b"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The server stopped it: "a" is free again while the blocker still holds "b".
        await admin.execute("SELECT pg_stat_clear_snapshot()")
        state = await admin.fetchval(
            "SELECT state FROM pg_stat_activity WHERE pid = $1", backend["pid"]
        )
        assert state == "idle"
        locked = await admin.fetchval(
            f"SELECT count(*) FROM (SELECT 1 FROM {pg.schema}.subscriptions WHERE id = 'a' "
            "FOR UPDATE NOWAIT) AS t"
        )
        assert locked == 1
        await tx.rollback()
    assert await _check_all_or_nothing(pg, admin, ["held0", "held1", "held2"]) == set()
    out = await pg.append([Routed(f"held{n}", b"h", ("a", "b")) for n in range(3)], now=2.0)
    assert [(a.subscription, a.seq) for a in out] == [
        ("a", 1),
        ("b", 1),
        ("a", 2),
        ("b", 2),
        ("a", 3),
        ("b", 3),
    ]


async def test_an_append_whose_backend_is_terminated_is_unavailable_and_absent(
    pg: PostgresStore, admin: asyncpg.Connection[asyncpg.Record]
) -> None:
    await pg.create_subscription(_sub("a"))
    await pg.create_subscription(_sub("b"))
    tx = await _hold(admin, pg, "b")
    task = asyncio.create_task(pg.append([Routed("t", b"t", ("a", "b"))], now=1.0))
    backend = await _append_backend(admin)
    assert await admin.fetchval("SELECT pg_terminate_backend($1)", backend["pid"])
    with pytest.raises(BackendUnavailable):
        await asyncio.wait_for(task, 10)
    await tx.rollback()
    assert await _check_all_or_nothing(pg, admin, ["t"]) == set()
    out = await pg.append([Routed("t", b"t", ("a", "b"))], now=2.0)
    assert [(a.subscription, a.seq) for a in out] == [("a", 1), ("b", 1)]


async def test_a_connection_given_back_in_a_failed_transaction_is_rolled_back(
    pg: PostgresStore,
) -> None:
    await pg.create_subscription(_sub("a"))
    pool = pg._pool
    assert pool is not None
    held = [await pool.acquire() for _ in range(pg.pool_size)]
    for n, conn in enumerate(held):
        await conn.execute("BEGIN")
        if n % 2:
            with pytest.raises(asyncpg.DivisionByZeroError):
                await conn.execute("SELECT 1/0")
        else:
            await conn.execute(f"SELECT 1 FROM {pg.schema}.subscriptions FOR SHARE")
    for conn in held:
        await pool.release(conn)
    # Every connection of the pool is clean: appends on all of them at once go through.
    outs = await asyncio.wait_for(
        asyncio.gather(
            *(pg.append([Routed(f"r{n}", b"r", ("a",))], now=1.0) for n in range(pg.pool_size))
        ),
        10,
    )
    assert sorted(a.seq for out in outs for a in out) == list(range(1, pg.pool_size + 1))


# --- the patch for connects cancelled in asyncpg's TLS probe ---------------------------------


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_two_hundred_cancelled_connects_leave_no_socket_behind(
    admin: asyncpg.Connection[asyncpg.Record],
) -> None:
    import keel.hub.stores._pg_connect  # noqa: F401, PLC0415 - the patch

    app = "atk" + uuid.uuid4().hex[:10]
    dsn = f"{server_url('postgres')}?application_name={app}"
    before = _fds()
    results: dict[str, int] = {}
    for n in range(200):
        task = asyncio.create_task(asyncpg.connect(dsn))
        if n % 50 < 10:
            for _ in range(n % 50):
                await asyncio.sleep(0)
        else:
            await asyncio.sleep((n % 50) * 0.0001)
        task.cancel()
        (got,) = await asyncio.gather(task, return_exceptions=True)
        if isinstance(got, asyncpg.Connection):
            await got.close()
        name = type(got).__name__
        results[name] = results.get(name, 0) + 1
    assert results.get("CancelledError", 0) > 50, results
    gc.collect()
    await eventually(lambda: _fds() <= before, timeout=10)
    backends = [1]

    async def count() -> None:
        backends[0] = await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app
        )

    async with asyncio.timeout(10):
        await count()
        while backends[0]:
            await asyncio.sleep(0.05)
            await count()


async def test_requests_cancelled_while_the_pool_connects_leave_no_backend_behind(
    pg: PostgresStore, admin: asyncpg.Connection[asyncpg.Record]
) -> None:
    await pg.create_subscription(_sub("a"))
    before = _fds()
    for turns in range(40):
        tasks = [
            asyncio.create_task(pg.append([Routed(f"p{turns}-{k}", b"p", ("a",))], now=1.0))
            for k in range(4)
        ]
        for _ in range(turns):
            await asyncio.sleep(0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await pg.close()
        await pg.open()
    gc.collect()
    await eventually(lambda: _fds() <= before, timeout=10)
    sub = await pg.get_subscription("a")
    _, msgs = await pg.read("a", after=0, limit=1000)
    assert [m.seq for m in msgs] == list(range(1, sub.last_seq + 1))


@contextlib.asynccontextmanager
async def _fake_server(reply: bytes | None) -> AsyncIterator[int]:
    """A TCP server that reads asyncpg's SSLRequest, then answers ``reply`` (or hangs up)."""
    handlers: list[asyncio.Future[None]] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readexactly(8)
            if reply is not None:
                writer.write(reply)
                await writer.drain()
                await asyncio.sleep(0.05)  # the answer arrives before the close
        writer.close()

    def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.append(asyncio.ensure_future(answer(reader, writer)))

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await asyncio.wait_for(asyncio.gather(*handlers), 5)
        await server.wait_closed()


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (None, "unexpected connection_lost"),
        (b"X", "rejected SSL upgrade"),
        (b"E", "error response during SSL exchange"),
    ],
)
async def test_a_failed_tls_probe_still_reaches_the_caller(
    reply: bytes | None, message: str
) -> None:
    import keel.hub.stores._pg_connect  # noqa: F401, PLC0415 - the patch

    async with _fake_server(reply) as port:
        with pytest.raises(ConnectionError, match=message):
            await asyncio.wait_for(asyncpg.connect(f"postgresql://u@127.0.0.1:{port}/db"), 10)
        store = PostgresStore(f"postgresql://u@127.0.0.1:{port}/db", connect_timeout=5)
        with pytest.raises(BackendUnavailable, match=message):
            await store.open()
        await store.close()
    gc.collect()
