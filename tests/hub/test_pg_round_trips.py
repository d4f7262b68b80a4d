"""PostgreSQL store: how many round trips an append costs (issue 13).

Under a hostile tenant every round trip costs several times its quiet price, on the hub's
loop and on the server; an append was nine (BEGIN, six statements, COMMIT, the pool's reset)
and the measured tenant's events waited behind two of them. Counted, not timed: every
statement the store's connections send."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import asyncpg.connection
import pytest

from keel.errors import Conflict, NotFound, QuotaExceeded
from keel.hub.stores.base import Routed
from keel.hub.stores.postgres import PostgresStore
from tests.hub.conftest import another_view, fresh_pg_store, plain_sub

_SENDS = ("execute", "fetch", "fetchrow", "fetchval")


@pytest.fixture
async def pg() -> AsyncIterator[PostgresStore]:
    async with fresh_pg_store() as store:
        yield store


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every query any asyncpg connection sends from now on."""
    log: list[str] = []
    for name in _SENDS:
        original = getattr(asyncpg.connection.Connection, name)

        def counting(self: Any, query: str, *args: Any, _o: Any = original, **kw: Any) -> Any:
            log.append(query)
            return _o(self, query, *args, **kw)

        monkeypatch.setattr(asyncpg.connection.Connection, name, counting)
    return log


async def test_an_append_is_one_round_trip(pg: PostgresStore, sent: list[str]) -> None:
    for sub_id in ("sub-a", "sub-b", "sub-c"):
        await pg.create_subscription(
            plain_sub(sub_id, max_messages=3 if sub_id == "sub-c" else None)
        )
    batch = [
        Routed(f"e{n}", b'{"n":%d}' % n, ("sub-a", "sub-c") if n % 2 else ("sub-b",))
        for n in range(10)
    ] + [Routed("e1", b"{}", ("sub-a",)), Routed("gone", b"{}", ("sub-gone",))]
    sent.clear()
    out = await pg.append(batch, now=1.0)
    assert len(sent) == 1, sent  # no BEGIN, COMMIT or pool reset of its own
    # The same messages as ever: batch order, per-queue gapless seqs, duplicates and
    # deleted queues skipped, max_messages enforced.
    assert [(a.subscription, a.seq, a.event_id) for a in out][:4] == [
        ("sub-b", 1, "e0"),
        ("sub-a", 1, "e1"),
        ("sub-c", 1, "e1"),
        ("sub-b", 2, "e2"),
    ]
    assert [a.seq for a in out if a.subscription == "sub-a"] == [1, 2, 3, 4, 5]
    assert len(out) == 15
    c = await pg.get_subscription("sub-c")
    assert (c.first_seq, c.last_seq, c.dropped) == (3, 5, 2)
    _, kept = await pg.read("sub-c", after=0, limit=10)
    assert [m.seq for m in kept] == [3, 4, 5]
    assert [bytes(m.event) for m in kept] == [b'{"n":5}', b'{"n":7}', b'{"n":9}']
    sent.clear()
    assert await pg.append([Routed("e3", b"{}", ("sub-a",))], now=2.0) == []  # seen before
    assert len(sent) == 1


async def test_a_read_is_one_round_trip_and_a_left_transaction_is_rolled_back(
    pg: PostgresStore, sent: list[str]
) -> None:
    await pg.create_subscription(plain_sub("sub-a"))
    sent.clear()
    await pg.get_subscription("sub-a")
    assert len(sent) == 1  # the pool's reset sends nothing after a statement
    pool = pg._pool
    assert pool is not None
    conn = await pool.acquire()
    await conn.execute("BEGIN")
    await pool.release(conn)  # given back inside a transaction: rolled back
    again = await pool.acquire()
    assert not again.is_in_transaction()
    await pool.release(again)


async def test_subscription_writes_are_one_round_trip_each(
    pg: PostgresStore, sent: list[str]
) -> None:
    """A tenant may change subscriptions at its write rate beside a flood; each write was
    seven round trips (BEGIN, lock, count, insert or three deletes, NOTIFY, COMMIT)."""
    other = await another_view(pg)
    heard: list[tuple[str, str]] = []
    await other.watch(lambda kind, sub_id: heard.append((kind, sub_id)))
    try:
        sent.clear()
        await pg.create_subscription(plain_sub("sub-a"), quota=2)
        await pg.create_subscription(plain_sub("sub-b"), quota=2)
        assert len(sent) == 2, sent
        sent.clear()
        with pytest.raises(QuotaExceeded):
            await pg.create_subscription(plain_sub("sub-c"), quota=2)
        with pytest.raises(Conflict):
            await pg.create_subscription(plain_sub("sub-a"))
        updated = plain_sub("sub-a", max_messages=7)
        await pg.update_subscription(updated)
        with pytest.raises(NotFound):
            await pg.update_subscription(plain_sub("sub-gone"))
        await pg.append([Routed("e1", b"{}", ("sub-b",))], now=1.0)
        await pg.delete_subscription("sub-b")
        with pytest.raises(NotFound):
            await pg.delete_subscription("sub-b")
        with pytest.raises(NotFound):
            await pg.delete_subscription("sub-\x00")  # refused before PostgreSQL sees it
        assert len(sent) == 7, sent
        assert (await pg.get_subscription("sub-a")).retention.max_messages == 7
        assert [s.id for s in await pg.list_subscriptions("p", limit=10, marker=None)] == ["sub-a"]
        pool = pg._pool
        assert pool is not None
        for table in ("messages", "claims"):
            left = await pool.fetchval(
                f"SELECT count(*) FROM {pg.schema}.{table} WHERE sub_id = 'sub-b'"
            )
            assert left == 0, table
        for _ in range(100):  # NOTIFY is delivered after the commit, asynchronously
            if len(heard) >= 4:
                break
            await asyncio.sleep(0.02)
        subscription_changes = [s for kind, s in heard if kind == "subscription"]
        assert subscription_changes == ["sub-a", "sub-b", "sub-a", "sub-b"], heard
    finally:
        await other.close()
