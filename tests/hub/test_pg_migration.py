"""The PostgreSQL store opens a database of the previous layout (each message row held its own
copy of the event body, ``messages.event``) and migrates it to one body per event
(``events`` and ``messages.event_id``) with nothing lost: every message keeps its seq, body,
state, deliveries, visibility and claim; claims, dead letters, retention and dedup go on
working; new messages continue each queue's sequence. Several hubs opening the old database
at once migrate it once, under the schema's advisory lock."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import asyncpg
import msgspec
import pytest

from keel.hub.stores.base import Routed, Subscription
from keel.hub.stores.postgres import PostgresStore
from tests.servers import server_url

# The layout before the events table (from the store as it was), and rows a hub of that
# version wrote: subscription bodies as it encoded them (its Webhook had no ``mode``).
OLD_SCHEMA = """
CREATE SCHEMA {s};
CREATE TABLE {s}.subscriptions (
    id TEXT PRIMARY KEY, project TEXT NOT NULL, body TEXT NOT NULL,
    last_seq BIGINT NOT NULL DEFAULT 0, first_seq BIGINT NOT NULL DEFAULT 1,
    dropped BIGINT NOT NULL DEFAULT 0, max_messages BIGINT, max_age_s DOUBLE PRECISION
);
CREATE INDEX subscriptions_project ON {s}.subscriptions (project, id);
CREATE TABLE {s}.messages (
    sub_id TEXT NOT NULL, seq BIGINT NOT NULL, event BYTEA NOT NULL, state TEXT NOT NULL,
    deliveries INT NOT NULL DEFAULT 0, visible_at DOUBLE PRECISION NOT NULL DEFAULT 0,
    claim_id TEXT, enqueued_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (sub_id, seq)
);
CREATE INDEX messages_state ON {s}.messages (sub_id, state, seq);
CREATE INDEX messages_claim ON {s}.messages (claim_id) WHERE claim_id IS NOT NULL;
CREATE TABLE {s}.claims (
    id TEXT PRIMARY KEY, sub_id TEXT NOT NULL, expires_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE {s}.ingested (event_id TEXT PRIMARY KEY, at DOUBLE PRECISION NOT NULL);
CREATE INDEX ingested_at ON {s}.ingested (at);
"""
NOW = 1_800_000_000.0
SUBS = {
    # id: (project, first_seq, last_seq, dropped, webhook)
    "sub-a": ("p-one", 1, 40, 0, None),
    "sub-b": ("p-one", 11, 25, 10, None),  # retention dropped 1..10
    "sub-c": ("p-two", 1, 0, 0, {"url": "https://hooks.example/x", "secret": "whsec_AAAA"}),
}


def body(sub: str, seq: int) -> bytes:
    event = {"specversion": "1.0", "id": f"{sub}-{seq}", "source": "s", "type": "t"}
    return json.dumps({**event, "data": {"n": seq, "pad": "x" * (seq % 7)}}).encode()


def old_row(sub: str, seq: int) -> tuple[str, int, bytes, str, int, float, str | None, float]:
    """A message of every kind: acked, dead, claimed (live), ready after failed deliveries."""
    if seq % 5 == 0:
        return (sub, seq, body(sub, seq), "acked", 1, 0.0, None, NOW - seq)
    if seq % 7 == 0:
        return (sub, seq, body(sub, seq), "dead", 5, 0.0, None, NOW - seq)
    if seq in (12, 13):
        return (sub, seq, body(sub, seq), "ready", 2, NOW + 600, "clm-old", NOW - seq)
    return (sub, seq, body(sub, seq), "ready", seq % 3, 0.0, None, NOW - seq)


async def make_old(url: str, schema: str) -> list[tuple[object, ...]]:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(OLD_SCHEMA.replace("{s}", schema))
        rows = []
        for sub, (project, first, last, dropped, webhook) in SUBS.items():
            encoded = {
                "id": sub,
                "project": project,
                "user": "u",
                "spec": {},
                "all_projects": False,
                "retention": {"max_age_s": 604800.0, "max_messages": 10000},
                "max_deliveries": 5,
                "webhook": webhook,
                "created_at": NOW - 3600,
                "last_seq": 0,
                "first_seq": 1,
                "dropped": 0,
            }
            await conn.execute(
                f"INSERT INTO {schema}.subscriptions VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                sub,
                project,
                json.dumps(encoded),
                last,
                first,
                dropped,
                10000,
                604800.0,
            )
            rows += [old_row(sub, seq) for seq in range(first, last + 1)]
        await conn.executemany(
            f"INSERT INTO {schema}.messages VALUES ($1, $2, $3, $4, $5, $6, $7, $8)", rows
        )
        await conn.execute(
            f"INSERT INTO {schema}.claims VALUES ('clm-old', 'sub-b', $1)", NOW + 600
        )
        await conn.execute(f"INSERT INTO {schema}.ingested VALUES ('seen-before', $1)", NOW)
        return rows
    finally:
        await conn.close()


@pytest.fixture
async def old_schema() -> AsyncIterator[str]:
    url = server_url("postgres")
    schema = f"t_old_{uuid.uuid4().hex[:10]}"
    yield schema
    conn = await asyncpg.connect(url)
    await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    await conn.close()


async def test_an_old_database_migrates_with_nothing_lost(old_schema: str) -> None:
    url = server_url("postgres")
    rows = await make_old(url, old_schema)
    # Three hubs open it at once: one migrates under the advisory lock, the others wait for
    # it and find the new layout.
    stores = [PostgresStore(url, schema=old_schema) for _ in range(3)]
    await asyncio.gather(*(s.open() for s in stores))
    store = stores[0]
    try:
        conn = await asyncpg.connect(url)
        try:
            columns = {
                r[0]
                for r in await conn.fetch(
                    "SELECT column_name FROM information_schema.columns "
                    "WHERE table_schema = $1 AND table_name = 'messages'",
                    old_schema,
                )
            }
            assert "event" not in columns
            assert "event_id" in columns
            events = await conn.fetchval(f"SELECT count(*) FROM {old_schema}.events")
            assert events == len(rows)  # each old row's body once, nothing made twice
        finally:
            await conn.close()

        # Every message as it was, read through the store.
        for sub, (_, first, last, dropped, _) in SUBS.items():
            got = await store.get_subscription(sub)
            assert (got.first_seq, got.last_seq, got.dropped) == (first, last, dropped)
            gap, messages = await store.read(sub, after=0, limit=1000)
            want = [r for r in rows if r[0] == sub]
            assert [m.seq for m in messages] == [r[1] for r in want]
            for m, r in zip(messages, want, strict=True):
                assert bytes(m.event) == r[2]
                assert (m.state, m.deliveries, m.enqueued_at) == (r[3], r[4], r[7])
            if first > 1:
                assert gap is not None
                assert (gap.first, gap.last) == (1, first - 1)
        assert (await store.get_subscription("sub-c")).webhook is not None

        # The live claim still holds its messages and can be acked; dead letters are there.
        assert await store.ack("sub-b", "clm-old", None, now=NOW) == 2
        dead = await store.dead_letters("sub-a", after=0, limit=100)
        assert [m.seq for m in dead] == [r[1] for r in rows if r[0] == "sub-a" and r[3] == "dead"]
        assert await store.redrive("sub-a", [7]) == 1
        claim = await store.claim("sub-a", limit=100, ttl=30, now=NOW, max_deliveries=5)
        assert claim is not None
        assert 7 in [m.seq for m in claim.messages]

        # New messages continue each queue; the dedup table still knows what it saw.
        fresh = [
            Routed("seen-before", b'{"id":"seen-before"}', ("sub-a",)),
            Routed("new-1", body("new", 1), ("sub-a", "sub-b", "sub-c")),
        ]
        appended = await stores[1].append(fresh, now=NOW)
        assert sorted((a.subscription, a.seq) for a in appended) == [
            ("sub-a", 41),
            ("sub-b", 26),
            ("sub-c", 1),
        ]
        # Retention's clean-up of unreferenced bodies keeps every body a message names (it
        # relies on each queue's messages naming increasing event ids).
        before = {sub: (await store.read(sub, after=0, limit=1000))[1] for sub in SUBS}
        assert await store.enforce_retention(now=NOW) == 0
        for sub in SUBS:
            _, messages = await store.read(sub, after=0, limit=1000)
            assert [(m.seq, bytes(m.event)) for m in messages] == [
                (m.seq, bytes(m.event)) for m in before[sub]
            ]
        _, tail = await store.read("sub-a", after=40, limit=10)
        assert [bytes(m.event) for m in tail] == [body("new", 1)]
    finally:
        for s in stores:
            await s.close()


async def test_opening_a_current_database_again_changes_nothing(old_schema: str) -> None:
    url = server_url("postgres")
    stores = [PostgresStore(url, schema=old_schema) for _ in range(3)]
    await stores[0].open()
    try:
        await stores[0].append([Routed("e", body("s", 1), ())], now=NOW)
        await stores[0].create_subscription(
            msgspec.json.decode(
                json.dumps(
                    {"id": "sub-x", "project": "p", "user": "u", "spec": {}, "created_at": NOW}
                ),
                type=Subscription,
            )
        )
        await stores[0].append([Routed("e2", body("s", 2), ("sub-x",))], now=NOW)
        await asyncio.gather(stores[1].open(), stores[2].open())
        _, messages = await stores[2].read("sub-x", after=0, limit=10)
        assert [bytes(m.event) for m in messages] == [body("s", 2)]
    finally:
        for s in stores:
            await s.close()
